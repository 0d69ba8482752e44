//! `idem serve`: checks the schedules and the transport, binds the listener, then hands
//! over to the service until a shutdown signal.

use anyhow::Context as _;

use super::check::transport_guarantee;
use super::{EXIT_OK, connect_creating_sized, select, usage};
use crate::config::Settings;
use crate::ledger::transport::AnyTransport;

pub(super) async fn serve(settings: Settings, listen: Option<String>) -> anyhow::Result<u8> {
    let connectors = settings.load_connectors()?;
    for (index, schedule) in settings.serve.schedules.iter().enumerate() {
        select(&connectors, &schedule.streams)
            .with_context(|| format!("serve.schedules[{index}].streams"))?;
    }
    let transport =
        AnyTransport::from_settings(&settings.notify).map_err(|e| usage(e.to_string()))?;
    let instance = crate::instance::set_id(settings.serve.instance.as_deref());
    let pool = connect_creating_sized(&settings, true, settings.serve.pool_size()).await?;
    let url = settings.database_url()?;
    let address = listen.unwrap_or_else(|| settings.serve.listen.clone());
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|err| usage(format!("serve.listen: cannot listen on {address}: {err}")))?;
    println!(
        "idem serve: {} schedule(s), instance {instance}; health http://{addr}/healthz, metrics http://{addr}/metrics, console http://{addr}/",
        settings.serve.schedules.len(),
        addr = listener.local_addr()?
    );
    if settings.notify.transport == crate::config::TransportKind::Log {
        println!("{}", transport_guarantee(settings.notify.transport));
    }
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let shutdown = crate::serve::shutdown_signal();
    crate::serve::serve(
        settings, connectors, pool, url, transport, listener, shutdown,
    )
    .await?;
    Ok(EXIT_OK)
}
