//! The admin API (`/admin/...`, behind `X-Admin-Key`) and the client's own `GET /balance`.
//!
//! Every refusal is a JSON body `{"error": {"status", "message"}}` whose message names the problem;
//! a refused request changes nothing.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::body::{self, Body};
use crate::config::MAX_CREDITS;
use crate::gate::{Gate, Refusal};
use crate::ledger::{Key, LedgerError, Status};
use crate::proxy::AppState;

/// The largest admin request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Why an admin or balance request is refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("billing is off in this gateway: there are no keys")]
    BillingOff,
    #[error("a valid X-Admin-Key header is required")]
    Unauthorized,
    #[error("{0}")]
    Client(Refusal),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("the request body is larger than {MAX_ADMIN_BODY} bytes")]
    BodyTooLarge,
    #[error("{0}")]
    BadRequest(String),
    #[error("no key with id {0:?}")]
    NotFound(String),
    #[error("not found")]
    NoRoute,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("the ledger is unavailable")]
    Unavailable,
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::BillingOff | AdminError::NotFound(_) | AdminError::NoRoute => StatusCode::NOT_FOUND,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::Client(r) => match r {
                Refusal::MissingKey | Refusal::UnknownKey => StatusCode::UNAUTHORIZED,
                Refusal::Revoked | Refusal::Suspended => StatusCode::FORBIDDEN,
                Refusal::Insufficient { .. } => StatusCode::PAYMENT_REQUIRED,
                Refusal::LedgerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            },
            AdminError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AdminError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn into_response(self) -> Response<Body> {
        let status = self.status();
        let body = json!({"error": {"status": status.as_u16(), "message": self.to_string()}});
        body::json(status, serde_json::to_vec(&body).expect("JSON serializes"))
    }
}

impl From<LedgerError> for AdminError {
    fn from(e: LedgerError) -> AdminError {
        match e {
            LedgerError::UnknownKey(id) => AdminError::NotFound(id),
            LedgerError::Revoked => AdminError::Conflict("the key is revoked; a revoked key cannot change".into()),
            LedgerError::Debit(d) => AdminError::Conflict(d.to_string()),
            LedgerError::Store(e) => {
                tracing::error!(error = %e, "admin write failed");
                AdminError::Unavailable
            }
        }
    }
}

/// Serves `/admin/...` and `/balance`.
pub async fn handle(state: &AppState, req: Request<hyper::body::Incoming>) -> Response<Body> {
    match route(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn route(state: &AppState, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, AdminError> {
    let gate = state.gate().ok_or(AdminError::BillingOff)?;
    let path = req.uri().path().to_string();
    if path == "/balance" {
        if req.method() != Method::GET {
            return Err(AdminError::MethodNotAllowed);
        }
        let key = gate.key_of(req.headers()).map_err(AdminError::Client)?;
        return Ok(ok(StatusCode::OK, balance_view(&key)));
    }
    let admin_key = req
        .headers()
        .get("x-admin-key")
        .and_then(|v| v.to_str().ok())
        .ok_or(AdminError::Unauthorized)?;
    if !gate.is_admin(admin_key) {
        tracing::warn!("admin request with a wrong admin key");
        return Err(AdminError::Unauthorized);
    }
    let parts: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
    match (req.method().clone(), parts.as_slice()) {
        (Method::POST, ["keys"]) => create_key(gate, req).await,
        (Method::GET, ["keys", id]) => {
            let key = gate
                .ledger()
                .get(id)
                .ok_or_else(|| AdminError::NotFound(id.to_string()))?;
            Ok(ok(StatusCode::OK, key_view(&key)))
        }
        (Method::POST, ["keys", id, "topup"]) => {
            let id = id.to_string();
            topup(gate, &id, req).await
        }
        (Method::POST, ["keys", id, "rotate"]) => {
            let (key, secret) = gate.ledger().rotate(id).await?;
            let mut view = key_view(&key);
            view["key"] = Value::String(secret);
            tracing::info!(key_id = %key.id, "key rotated");
            Ok(ok(StatusCode::OK, view))
        }
        (Method::POST, ["keys", id, action @ ("revoke" | "suspend" | "resume")]) => {
            let status = match *action {
                "revoke" => Status::Revoked,
                "suspend" => Status::Suspended,
                _ => Status::Active,
            };
            let key = gate.ledger().set_status(id, status).await?;
            Ok(ok(StatusCode::OK, key_view(&key)))
        }
        (Method::GET, ["ledger"]) => {
            let key_id = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("keyId=")))
                .map(str::to_string);
            let rows = gate
                .ledger()
                .store()
                .ledger(key_id.as_deref())
                .map_err(|e| AdminError::from(LedgerError::from(e)))?;
            let rows: Vec<Value> = rows
                .into_iter()
                .map(|r| {
                    json!({"seq": r.seq, "requestId": r.request_id, "keyId": r.key_id, "kind": r.kind,
                           "amount": r.amount, "createdAt": r.created_at})
                })
                .collect();
            Ok(ok(StatusCode::OK, json!({ "entries": rows })))
        }
        (_, ["keys"] | ["keys", _] | ["keys", _, _] | ["ledger"]) => Err(AdminError::MethodNotAllowed),
        _ => Err(AdminError::NoRoute),
    }
}

fn ok(status: StatusCode, v: Value) -> Response<Body> {
    body::json(status, serde_json::to_vec(&v).expect("JSON serializes"))
}

fn key_view(key: &Key) -> Value {
    json!({
        "id": key.id,
        "name": key.name,
        "prefix": *key.prefix.read().unwrap(),
        "status": key.status().as_str(),
        "credits": key.credits(),
        "spent": key.spent(),
        "calls": key.calls(),
        "createdAt": key.created_at,
    })
}

fn balance_view(key: &Key) -> Value {
    json!({
        "id": key.id,
        "name": key.name,
        "credits": key.credits(),
        "spent": key.spent(),
        "calls": key.calls(),
    })
}

/// Reads a JSON body of type `T` (unknown fields refused), with clear errors.
async fn json_body<T: serde::de::DeserializeOwned>(req: Request<hyper::body::Incoming>) -> Result<T, AdminError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.to_ascii_lowercase().starts_with("application/json") {
        return Err(AdminError::UnsupportedMediaType);
    }
    let bytes: Bytes = match Limited::new(req.into_body(), MAX_ADMIN_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(AdminError::BodyTooLarge),
        Err(e) => return Err(AdminError::BadRequest(format!("reading the body failed: {e}"))),
    };
    // serde_path_to_error names the field that is wrong (`credits: invalid type: ...`).
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            AdminError::BadRequest(format!("invalid request body: {}", e.inner()))
        } else {
            AdminError::BadRequest(format!("{path}: {}", e.inner()))
        }
    })
}

fn check_credits(field: &str, v: i64, min: i64) -> Result<i64, AdminError> {
    if v < min || v > MAX_CREDITS {
        return Err(AdminError::BadRequest(format!(
            "{field}: {v} is out of range; give a whole number from {min} to {MAX_CREDITS}"
        )));
    }
    Ok(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    credits: i64,
}

async fn create_key(gate: &Gate, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, AdminError> {
    let body: CreateKey = json_body(req).await?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(AdminError::BadRequest("name: give 1 to 200 characters".into()));
    }
    let credits = check_credits("credits", body.credits, 0)?;
    let (key, secret) = gate.ledger().create_key(name, credits).await?;
    let mut view = key_view(&key);
    // The secret is in this answer and nowhere else, ever.
    view["key"] = Value::String(secret);
    tracing::info!(key_id = %key.id, credits, "key created");
    Ok(ok(StatusCode::CREATED, view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Topup {
    credits: i64,
}

async fn topup(gate: &Gate, id: &str, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, AdminError> {
    let key: Arc<Key> = gate
        .ledger()
        .get(id)
        .ok_or_else(|| AdminError::NotFound(id.to_string()))?;
    let body: Topup = json_body(req).await?;
    let credits = check_credits("credits", body.credits, 1)?;
    if key.credits().saturating_add(credits) > MAX_CREDITS {
        return Err(AdminError::BadRequest(format!(
            "credits: the balance would exceed {MAX_CREDITS}"
        )));
    }
    let request_id = format!("topup_{:016x}", rand::random::<u64>());
    let balance = gate.ledger().topup(id, credits, &request_id).await?;
    tracing::info!(key_id = %id, credits, "key topped up");
    Ok(ok(StatusCode::OK, json!({ "id": id, "credits": balance })))
}
