//! HubSpot-shaped contact associations: `GET /crm/v4/objects/contacts/{id}/associations/companies`,
//! the companies a contact is associated with, derived from its `company` property.

use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Shared, lock};

/// The company ids contact `contact` is associated with: the one its `company` property
/// names ("Company 007" is company 9007), none when it names none.
pub(crate) fn companies_of(contact: &Value) -> Vec<u64> {
    contact["properties"]["company"]
        .as_str()
        .and_then(|name| name.strip_prefix("Company "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map(|n| vec![9000 + n])
        .unwrap_or_default()
}

/// One page holds every association (HubSpot pages at 500; a contact has few); 404 for
/// an unknown contact.
pub(crate) async fn contact_companies(
    AxState(st): AxState<Shared>,
    Path(id): Path<String>,
) -> Response {
    let state = lock(&st);
    let Some(contact) = state.data.contacts.get(&id) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "message": format!("resource not found: contact {id}"),
            })),
        )
            .into_response();
    };
    let results: Vec<Value> = companies_of(contact)
        .into_iter()
        .map(|company| {
            json!({
                "toObjectId": company,
                "associationTypes": [
                    {"category": "HUBSPOT_DEFINED", "typeId": 1, "label": "Primary"},
                ],
            })
        })
        .collect();
    axum::Json(json!({ "results": results })).into_response()
}
