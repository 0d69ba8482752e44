//! `GET /v1/invoices/{id}/lines`: an invoice's line items in Stripe's shape
//! (`starting_after`, `has_more`).

use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Shared, lock};

/// `GET /v1/invoices/{id}/lines`: ascending line order, `limit` (default 10, at most 100),
/// `starting_after`; 404 for an unknown invoice.
pub(crate) async fn invoice_lines(
    AxState(st): AxState<Shared>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10)
        .clamp(1, 100);
    let state = lock(&st);
    let Some(all) = state.data.invoice_lines(&id) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {
                "type": "invalid_request_error",
                "code": "resource_missing",
                "message": format!("No such invoice: '{id}'"),
            }})),
        )
            .into_response();
    };
    let start = match q.get("starting_after") {
        Some(after) => match all.iter().position(|l| l["id"] == after.as_str()) {
            Some(index) => index + 1,
            None => all.len(),
        },
        None => 0,
    };
    let end = (start + limit).min(all.len());
    let data = all[start.min(end)..end].to_vec();
    axum::Json(json!({
        "object": "list",
        "url": format!("/v1/invoices/{id}/lines"),
        "has_more": end < all.len(),
        "data": data,
    }))
    .into_response()
}
