//! `POST /email/send`: a keyed email API that honors `Idempotency-Key`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Shared, bad_request, error, lock};
use crate::DeliveredEmail;

/// `POST /email/send`: delivers once per `Idempotency-Key`; replays answer the same id;
/// a different payload under a used key answers 422; a key whose first request is still
/// being worked on (see `FakeVendor::set_email_delay`) answers 409, as Stripe does. The
/// work runs on its own task, so a client that gives up does not stop the delivery.
pub(super) async fn email_send(
    AxState(st): AxState<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return bad_request("body must be a JSON object").into_response(),
    };
    let Some(to) = payload["to"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
    else {
        return bad_request("\"to\" is required").into_response();
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let delay = {
        let mut s = lock(&st);
        if let Some((seen, id)) = key.as_ref().and_then(|k| s.email_keys.get(k)) {
            if *seen != payload {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_error",
                    "Idempotency-Key reused with a different payload",
                );
            }
            let mut resp = Json(json!({"id": id})).into_response();
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return resp;
        }
        if let Some(k) = &key {
            if !s.email_keys_in_progress.insert(k.clone()) {
                return error(
                    StatusCode::CONFLICT,
                    "idempotency_error",
                    "There is currently another in-progress request using this Idempotency-Key; try again later",
                );
            }
        }
        s.email_delay
    };
    let work = tokio::spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut s = lock(&st);
        let id = format!("msg_{}", s.emails.len() + 1);
        let text = |k: &str| payload[k].as_str().unwrap_or_default().to_owned();
        let email = DeliveredEmail {
            id: id.clone(),
            idempotency_key: key.clone(),
            to,
            subject: text("subject"),
            body: text("body"),
            message_id: payload["message_id"].as_str().map(str::to_owned),
        };
        s.emails.push(email);
        if let Some(k) = key {
            s.email_keys_in_progress.remove(&k);
            s.email_keys.insert(k, (payload.clone(), id.clone()));
        }
        id
    });
    match work.await {
        Ok(id) => Json(json!({"id": id})).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "the send task failed",
        ),
    }
}
