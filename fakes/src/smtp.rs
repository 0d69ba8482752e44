//! A real SMTP sink: a tokio TCP server driving `mailin` sessions that keeps every message.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mailin::{Action, Handler, Response, SessionBuilder};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// One message accepted by the [`SmtpSink`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReceivedMail {
    /// The envelope sender (`MAIL FROM`).
    pub from: String,
    /// The envelope recipients (`RCPT TO`).
    pub to: Vec<String>,
    /// The message as sent after `DATA` (headers and body, CRLF line ends, dots unstuffed).
    pub data: String,
    /// The `Message-ID` header value as written (angle brackets kept), if present.
    pub message_id: Option<String>,
    /// The `Subject` header value (not RFC 2047-decoded), if present.
    pub subject: Option<String>,
}

type Store = Arc<Mutex<Vec<ReceivedMail>>>;
/// Milliseconds the sink waits, per message, between storing it and answering its DATA.
type Delay = Arc<AtomicU64>;

/// An SMTP server on loopback that accepts any message (no TLS, no AUTH).
pub struct SmtpSink {
    addr: SocketAddr,
    store: Store,
    delay: Delay,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSink {
    /// Starts on `127.0.0.1` with an OS-chosen port.
    ///
    /// # Panics
    /// If no loopback port can be bound (a broken test environment).
    pub async fn start() -> SmtpSink {
        SmtpSink::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind 127.0.0.1:0 for the SMTP sink")
    }

    /// Starts on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<SmtpSink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let store: Store = Arc::default();
        let delay: Delay = Arc::default();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, store.clone(), delay.clone(), rx));
        Ok(SmtpSink {
            addr,
            store,
            delay,
            shutdown: Some(tx),
            task,
        })
    }

    /// Makes the sink slow: each message is kept at once, but its `250` answer comes
    /// `delay` later (a slow relay; a client that gives up earlier cannot know it went out).
    pub fn set_delay(&self, delay: Duration) {
        self.delay
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Messages received so far, in arrival order.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn store(&self) -> Store {
        self.store.clone()
    }

    /// Stops listening and closes every open connection; returns the messages received.
    /// The address can be bound again right after (e.g. `start_on(addr)` for "back up").
    pub async fn stop(mut self) -> Vec<ReceivedMail> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        self.messages()
    }
}

async fn accept_loop(
    listener: TcpListener,
    store: Store,
    delay: Delay,
    mut shutdown: oneshot::Receiver<()>,
) {
    let builder = SessionBuilder::new("idem-smtp-sink");
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let accepted = Arc::new(AtomicU64::new(0));
                    let handler = Collector { store: store.clone(), accepted: accepted.clone(), ..Collector::default() };
                    let session = builder.build(peer.ip(), handler);
                    conns.spawn(serve_conn(stream, session, accepted, delay.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "smtp sink accept failed"),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve_conn(
    stream: TcpStream,
    mut session: mailin::Session<Collector>,
    accepted: Arc<AtomicU64>,
    delay: Delay,
) {
    if let Err(e) = drive(stream, &mut session, &accepted, &delay).await {
        tracing::debug!(error = %e, "smtp sink connection ended");
    }
}

async fn drive(
    stream: TcpStream,
    session: &mut mailin::Session<Collector>,
    accepted: &AtomicU64,
    delay: &Delay,
) -> std::io::Result<()> {
    let stored = || accepted.load(Ordering::Relaxed);
    // Replies to a pipelined client go out back to back; without TCP_NODELAY the second
    // waits for an ACK, as a real relay's would not.
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    w.write_all(&session.greeting().buffer()?).await?;
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let before = stored();
        let res = session.process(&line);
        let wait = delay.load(Ordering::Relaxed);
        if wait > 0 && stored() > before {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        match res.action {
            Action::NoReply => {}
            Action::Reply => w.write_all(&res.buffer()?).await?,
            Action::Close | Action::UpgradeTls => {
                w.write_all(&res.buffer()?).await?;
                w.shutdown().await?;
                return Ok(());
            }
        }
    }
}

/// The per-connection mailin handler: buffers one message, stores it at end of data.
#[derive(Default)]
struct Collector {
    store: Store,
    /// Messages this connection has stored (so its session knows which answer to delay).
    accepted: Arc<AtomicU64>,
    from: String,
    to: Vec<String>,
    data: Vec<u8>,
}

impl Handler for Collector {
    fn data_start(&mut self, _domain: &str, from: &str, _is8bit: bool, to: &[String]) -> Response {
        self.from = from.to_owned();
        self.to = to.to_vec();
        self.data.clear();
        mailin::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let data = String::from_utf8_lossy(&std::mem::take(&mut self.data)).into_owned();
        let mail = ReceivedMail {
            from: std::mem::take(&mut self.from),
            to: std::mem::take(&mut self.to),
            message_id: header(&data, "message-id"),
            subject: header(&data, "subject"),
            data,
        };
        self.store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(mail);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        mailin::response::OK
    }
}

/// The (unfolded, trimmed) value of the first header named `name`, case-insensitively.
fn header(data: &str, name: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in data.lines() {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = found.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if found.is_some() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case(name) {
                found = Some(v.trim().to_owned());
            }
        }
    }
    found
}
