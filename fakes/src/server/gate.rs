//! The middleware in front of every endpoint: records the request, runs the hooks due at
//! its number, applies the injected fault (status, delay, raw, huge, malformed or
//! wrong-shaped body, redirect, duplicated records), checks auth, and stamps the vendor's
//! `Date`.

use std::time::Instant;

use axum::Json;
use axum::body::{Bytes, to_bytes};
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{Dup, Shared, lock};
use crate::{FaultKind, RecordedRequest};

/// Records the request, runs due hooks, applies faults, checks auth, then serves.
pub(super) async fn gate(AxState(st): AxState<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if path.starts_with("/_fake/") {
        return next.run(req).await;
    }
    let (idx, fault) = {
        let mut s = lock(&st);
        let h = req.headers();
        let hv = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        s.requests.push(RecordedRequest {
            method: req.method().to_string(),
            path: path.clone(),
            query: req.uri().query().map(str::to_owned),
            authorization: hv("authorization"),
            idempotency_key: hv("idempotency-key"),
            headers: h
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            status: 0,
            received: Instant::now(),
        });
        let nth = s.requests.len();
        if let Some(hooks) = s.hooks.remove(&nth) {
            for hook in hooks {
                s.data.run_hook(hook);
            }
        }
        if let Some(faults) = s.faults_at.remove(&nth) {
            for fault in faults.into_iter().rev() {
                s.faults.insert(0, fault);
            }
        }
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or(path.clone(), |pq| pq.as_str().to_owned());
        (nth - 1, s.take_fault(&path, &path_and_query))
    };
    let mut resp = serve(&st, &path, req, next, fault).await;
    let mut s = lock(&st);
    if let Some(r) = s.requests.get_mut(idx) {
        r.status = resp.status().as_u16();
    }
    // The vendor's own clock (see `FakeVendor::set_clock`), as a real vendor's `Date` is.
    if let Some(date) = chrono::DateTime::from_timestamp(s.data.clock, 0).and_then(|t| {
        HeaderValue::from_str(&t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()).ok()
    }) {
        resp.headers_mut().insert(header::DATE, date);
    }
    resp
}

pub(super) async fn serve(
    st: &Shared,
    path: &str,
    mut req: Request,
    next: Next,
    fault: Option<FaultKind>,
) -> Response {
    match &fault {
        Some(FaultKind::Status {
            code,
            retry_after,
            body,
        }) => return status_fault(*code, retry_after.as_deref(), body.clone()),
        Some(FaultKind::EchoRequest { code }) => return echo_request(*code, &req),
        Some(FaultKind::RawBody {
            code,
            content_type,
            body,
        }) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_REQUEST);
            return (
                status,
                [(header::CONTENT_TYPE, content_type.clone())],
                body.clone(),
            )
                .into_response();
        }
        Some(FaultKind::HugeBody { bytes }) => return huge_body(*bytes),
        Some(FaultKind::Redirect { code, to_base }) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::FOUND);
            let location = match req.uri().query() {
                Some(q) => format!("{to_base}{path}?{q}"),
                None => format!("{to_base}{path}"),
            };
            let mut resp = status.into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            return resp;
        }
        Some(FaultKind::Delay(d)) => tokio::time::sleep(*d).await,
        Some(FaultKind::DuplicateRecords) => {
            req.extensions_mut().insert(Dup);
        }
        _ => {}
    }
    if path.starts_with("/v1/") || path.starts_with("/crm/") {
        let checked = lock(st).check_auth(req.headers(), req.uri().query());
        if let Err(resp) = checked {
            return resp.into_response();
        }
    }
    let resp = next.run(req).await;
    let resp = match fault {
        Some(FaultKind::SlowAnswer(d)) => {
            tokio::time::sleep(d).await;
            resp
        }
        Some(FaultKind::MalformedJson) => malformed(resp).await,
        Some(FaultKind::WrongShape) => wrong_shape(resp).await,
        _ => resp,
    };
    let (rewrites, reverse_keys) = {
        let s = lock(st);
        (s.body_rewrites.clone(), s.reverse_keys)
    };
    if rewrites.is_empty() && !reverse_keys {
        resp
    } else {
        rewrite_body(resp, reverse_keys, &rewrites).await
    }
}

/// The body written another way. With `reverse_keys`, every object's keys in reverse
/// order with spaces after separators, as a vendor whose serializer changed (or that
/// builds objects from a hash map) would send the same JSON (a body that is not JSON
/// passes unchanged). Then raw text replacements: how a test serves JSON that no `Value`
/// can hold (a lone surrogate escape, a number beyond f64).
async fn rewrite_body(
    resp: Response,
    reverse_keys: bool,
    rewrites: &[(String, String)],
) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = to_bytes(body, usize::MAX).await.unwrap_or_default();
    let reversed = reverse_keys
        .then(|| serde_json::from_slice::<Value>(&bytes).ok())
        .flatten()
        .map(|value| crate::reversed_json(&value));
    let mut text = reversed.unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    for (from, to) in rewrites {
        text = text.replace(from.as_str(), to);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(text))
}

/// An error that quotes the request back, credentials and all, as plain text with a raw
/// terminal escape sequence in it.
pub(super) fn echo_request(code: u16, req: &Request) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    let headers: Vec<String> = req
        .headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    let body = format!(
        "\u{1b}[2J\u{1b}[31mbad request\u{7}: {} {}\r\nrequest headers:\r\n{}",
        req.method(),
        req.uri(),
        headers.join("\r\n")
    );
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// `{"data": [{"id": "big_0000000000", "amount_due": 1}, ...]}` of about `bytes` bytes
/// (64 bytes a record), valid JSON, generated chunk by chunk as the client reads.
pub(super) fn huge_body(bytes: u64) -> Response {
    const RECORD: u64 = 64;
    const CHUNK_RECORDS: u64 = 1024;
    let records = bytes.saturating_sub(16) / RECORD;
    let stream = futures_util::stream::unfold(Some(0u64), move |next| async move {
        let first = next?;
        let mut chunk = String::with_capacity((RECORD * CHUNK_RECORDS) as usize + 16);
        if first == 0 {
            chunk.push_str("{\"data\": [");
        }
        let last = (first + CHUNK_RECORDS).min(records);
        for n in first..last {
            let separator = if n == 0 { "" } else { "," };
            let record = format!("{separator}{{\"id\": \"big_{n:010}\", \"amount_due\": 1}}");
            chunk.push_str(&format!("{record:<width$}", width = RECORD as usize));
        }
        let next = if last >= records {
            chunk.push_str("]}");
            None
        } else {
            Some(last)
        };
        Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), next))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

pub(super) fn status_fault(code: u16, retry_after: Option<&str>, body: Option<String>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = body.unwrap_or_else(|| {
        json!({"error": {
            "type": "injected_fault",
            "code": code,
            "message": format!("injected fault: HTTP {code}"),
        }})
        .to_string()
    });
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(v) = retry_after.and_then(|ra| HeaderValue::from_str(ra).ok()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

pub(super) async fn malformed(resp: Response) -> Response {
    let bytes = to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let mut cut = bytes[..bytes.len() / 2].to_vec();
    if cut.is_empty() || serde_json::from_slice::<Value>(&cut).is_ok() {
        cut = b"{\"data\": [{\"id\":".to_vec();
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        cut,
    )
        .into_response()
}

pub(super) async fn wrong_shape(resp: Response) -> Response {
    let bytes = to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let mut v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({}));
    let mut changed = false;
    for k in ["data", "results", "items"] {
        if let Some(arr) = v.get(k).and_then(Value::as_array).cloned() {
            let obj: Map<String, Value> = arr
                .into_iter()
                .enumerate()
                .map(|(i, x)| (i.to_string(), x))
                .collect();
            v[k] = Value::Object(obj);
            changed = true;
        }
    }
    if !changed {
        v = json!({"data": {"unexpected": v}});
    }
    (StatusCode::OK, Json(v)).into_response()
}
