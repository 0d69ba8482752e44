//! `/_fake/*`: control endpoints for shell demos and benchmarks (state, invoice updates,
//! the mailbox), never recorded or faulted.

use std::sync::PoisonError;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Shared, bad_request, error, lock};

pub(super) async fn fake_state(AxState(st): AxState<Shared>) -> Json<Value> {
    let s = lock(&st);
    Json(json!({
        "base_url": s.base_url,
        "clock": s.data.clock,
        "invoices": s.data.invoice_count(),
        "contacts": s.data.contacts.len(),
        "events": s.data.events.len(),
        "requests": s.requests.len(),
        "line_item_requests": s.requests.iter().filter(|r| r.path.starts_with("/v1/invoices/") && r.path.ends_with("/lines")).count(),
        "emails": s.emails.len(),
        "mailbox": s.mailbox.as_ref().map(|m| m.lock().unwrap_or_else(PoisonError::into_inner).len()),
    }))
}

/// `POST /_fake/update_invoice/{id}`: merges the body's fields (bumping "updated" unless
/// given) and answers the updated invoice.
pub(super) async fn fake_update_invoice(
    AxState(st): AxState<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("body must be a JSON object of fields to merge").into_response();
    };
    let mut s = lock(&st);
    let found = s.data.update_invoice(&id, |inv| {
        for (k, v) in fields {
            inv[k] = v;
        }
    });
    match s.data.invoices.get(&id) {
        Some(inv) if found => Json(inv.clone()).into_response(),
        _ => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no such invoice",
        ),
    }
}

pub(super) async fn fake_mailbox(AxState(st): AxState<Shared>) -> Response {
    let Some(mb) = lock(&st).mailbox.clone() else {
        return error(StatusCode::NOT_FOUND, "not_found", "no SMTP sink attached");
    };
    let msgs: Vec<Value> = mb
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|m| {
            json!({
                "from": m.from,
                "to": m.to,
                "subject": m.subject,
                "message_id": m.message_id,
            })
        })
        .collect();
    Json(Value::Array(msgs)).into_response()
}

pub(super) async fn fake_emails(AxState(st): AxState<Shared>) -> Json<Value> {
    Json(json!(lock(&st).emails))
}
