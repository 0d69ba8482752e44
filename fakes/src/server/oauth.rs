//! `POST /oauth/token`: client-credentials tokens.

use std::collections::HashMap;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Auth, Shared, base64, lock};

pub(super) fn oauth_error(status: StatusCode, code: &str, description: &str) -> Response {
    let body = json!({"error": code, "error_description": description});
    (status, Json(body)).into_response()
}

/// `POST /oauth/token`: client-credentials grant (form fields, JSON, or HTTP basic).
pub(super) async fn oauth_token(
    AxState(st): AxState<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    let form: HashMap<String, String> = if is_json {
        serde_json::from_slice::<HashMap<String, Value>>(&body)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_owned())))
            .collect()
    } else {
        url::form_urlencoded::parse(&body).into_owned().collect()
    };
    let mut s = lock(&st);
    let Auth::OAuth2 {
        client_id,
        client_secret,
        ttl,
        tokens,
    } = &mut s.auth
    else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "OAuth2 is not enabled on this fake vendor",
        );
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials is supported",
        );
    }
    let basic = format!(
        "Basic {}",
        base64(format!("{client_id}:{client_secret}").as_bytes())
    );
    let basic_ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(basic.as_str());
    let form_ok = form.get("client_id") == Some(client_id)
        && form.get("client_secret") == Some(client_secret);
    if !basic_ok && !form_ok {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    let token = format!("tok_{:032x}", rand::random::<u128>());
    tokens.insert(token.clone(), Instant::now() + *ttl);
    Json(json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": ttl.as_secs(),
    }))
    .into_response()
}
