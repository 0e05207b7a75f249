//! The admin API (`/admin/...`, behind `X-Admin-Key`) and the client's own `GET /balance`.
//!
//! Every refusal is a JSON body `{"error": {"status", "message"}}` whose message names the problem;
//! a refused request changes nothing.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::body::{self, Body};
use crate::config::MAX_CREDITS;
use crate::gate::{Gate, Refusal};
use crate::ledger::{Key, KeySettings, LedgerError, Quota, Status, now_ms};
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
    #[error("too many wrong admin keys from this address; retry in {0} s")]
    TooManyFailures(u64),
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
    /// A reload refused; the plugins that were serving still are.
    #[error("reload refused, the running plugins keep serving: {0}")]
    ReloadRefused(String),
    /// The health plugin failed (details in the log).
    #[error("health policy failed")]
    HealthFailed,
    #[error(transparent)]
    Reload(#[from] crate::reload::ReloadError),
    #[error("no webhook destination named {0:?}")]
    NoDestination(String),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::BillingOff | AdminError::NotFound(_) | AdminError::NoRoute => StatusCode::NOT_FOUND,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::TooManyFailures(_) => StatusCode::TOO_MANY_REQUESTS,
            AdminError::Client(r) => match r {
                Refusal::MissingKey | Refusal::UnknownKey => StatusCode::UNAUTHORIZED,
                Refusal::Revoked
                | Refusal::Suspended
                | Refusal::Expired
                | Refusal::ToolForbidden(_)
                | Refusal::IpForbidden(_) => StatusCode::FORBIDDEN,
                Refusal::Insufficient { .. } => StatusCode::PAYMENT_REQUIRED,
                Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                Refusal::Limit(crate::ledger::DebitError::SpendingLimit { .. }) => StatusCode::PAYMENT_REQUIRED,
                Refusal::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
                Refusal::LedgerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                Refusal::PolicyDenied(_) => StatusCode::FORBIDDEN,
                Refusal::PolicyFailed => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AdminError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AdminError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::ReloadRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::HealthFailed => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::Reload(crate::reload::ReloadError::NoFile) => StatusCode::CONFLICT,
            AdminError::Reload(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::NoDestination(_) => StatusCode::NOT_FOUND,
        }
    }

    fn into_response(self) -> Response<Body> {
        let status = self.status();
        let body = json!({"error": {"status": status.as_u16(), "message": self.to_string()}});
        body::json(status, serde_json::to_vec(&body).expect("JSON serializes"))
    }
}

impl From<crate::webhooks::WebhookError> for AdminError {
    fn from(e: crate::webhooks::WebhookError) -> AdminError {
        match e {
            crate::webhooks::WebhookError::UnknownDestination(d) => AdminError::NoDestination(d),
            crate::webhooks::WebhookError::Store(e) => AdminError::from(LedgerError::from(e)),
        }
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
pub async fn handle(state: &AppState, req: Request<hyper::body::Incoming>, peer: std::net::IpAddr) -> Response<Body> {
    match route(state, req, peer).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn route(
    state: &AppState,
    req: Request<hyper::body::Incoming>,
    peer: std::net::IpAddr,
) -> Result<Response<Body>, AdminError> {
    let gate = state.gate().ok_or(AdminError::BillingOff)?;
    let path = req.uri().path().to_string();
    if path == "/balance" {
        if req.method() != Method::GET {
            return Err(AdminError::MethodNotAllowed);
        }
        let key = gate.key_of(req.headers()).map_err(AdminError::Client)?;
        gate.check_ip(&key.settings(), crate::proxy::client_ip_of(state, req.headers(), peer))
            .map_err(AdminError::Client)?;
        return Ok(ok(StatusCode::OK, balance_view(&key)));
    }
    authorize(gate, req.headers(), peer)?;
    let parts: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
    match (req.method().clone(), parts.as_slice()) {
        (Method::POST, ["keys"]) => create_key(gate, req).await,
        (Method::GET, ["keys"]) => list_keys(gate, req.uri().query().unwrap_or("")).await,
        (Method::PATCH, ["keys", id]) => {
            let key = gate
                .ledger()
                .get(id)
                .ok_or_else(|| AdminError::NotFound(id.to_string()))?;
            let change: SettingsInput = json_body(req).await?;
            let settings = change.apply(&key.settings(), now_ms())?;
            let key = gate.ledger().set_settings(&key.id, settings).await?;
            Ok(ok(StatusCode::OK, key_view(&key)))
        }
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
            event(gate, "key.rotated", &key, json!({})).await;
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
            let kind = match status {
                Status::Revoked => "key.revoked",
                Status::Suspended => "key.suspended",
                Status::Active => "key.resumed",
            };
            event(gate, kind, &key, json!({})).await;
            Ok(ok(StatusCode::OK, key_view(&key)))
        }
        (Method::GET, ["requests"]) => {
            caught_up(gate).await?;
            list_requests(gate, req.uri().query().unwrap_or("")).await
        }
        (Method::GET, ["consumer-insights"]) => {
            caught_up(gate).await?;
            consumer_insights(gate).await
        }
        (Method::GET, ["plugins"]) => Ok(ok(StatusCode::OK, plugins_view(gate))),
        (Method::POST, ["plugins", "reload"]) => reload_plugins(state, gate, req).await,
        (Method::GET, ["system-health"]) => system_health(gate).await,
        (Method::POST, ["config", "reload"]) => Ok(ok(StatusCode::OK, crate::reload::reload(state).await?)),
        (Method::GET, ["webhooks"]) => match state.webhooks() {
            Some(w) => Ok(ok(StatusCode::OK, w.status().await?)),
            None => Ok(ok(StatusCode::OK, json!({"destinations": []}))),
        },
        (Method::POST, ["webhooks", name, "replay"]) => match state.webhooks() {
            Some(w) => Ok(ok(StatusCode::OK, w.replay(name).await?)),
            None => Err(AdminError::NoDestination(name.to_string())),
        },
        (Method::GET, ["ledger"]) => list_ledger(gate, req.uri().query().unwrap_or("")).await,
        (
            _,
            ["keys"]
            | ["keys", _]
            | ["keys", _, _]
            | ["ledger"]
            | ["requests"]
            | ["consumer-insights"]
            | ["plugins"]
            | ["plugins", "reload"]
            | ["system-health"]
            | ["config", "reload"]
            | ["webhooks"]
            | ["webhooks", _, "replay"],
        ) => Err(AdminError::MethodNotAllowed),
        _ => Err(AdminError::NoRoute),
    }
}

/// Whether the request carries the admin key (`X-Admin-Key`); a peer that keeps sending wrong
/// ones is refused for a while.
fn authorize(gate: &Gate, headers: &http::HeaderMap, peer: std::net::IpAddr) -> Result<(), AdminError> {
    let peer = crate::ledger::keys::canonical(peer);
    if let Some(wait) = gate.admin_blocked(peer) {
        return Err(AdminError::TooManyFailures(wait.as_secs().max(1)));
    }
    let admin_key = headers.get("x-admin-key").and_then(|v| v.to_str().ok());
    if !admin_key.is_some_and(|k| gate.is_admin(k)) {
        tracing::warn!(%peer, "admin request without a valid admin key");
        gate.admin_failed(peer);
        return Err(AdminError::Unauthorized);
    }
    Ok(())
}

/// `GET /metrics` on the main address: Prometheus text, behind the admin key.
pub async fn metrics(state: &AppState, req: Request<hyper::body::Incoming>, peer: std::net::IpAddr) -> Response<Body> {
    let authorized = match state.gate() {
        Some(gate) => authorize(gate, req.headers(), peer),
        None => Err(AdminError::BillingOff),
    };
    match authorized {
        Ok(()) => metrics_text(),
        Err(e) => e.into_response(),
    }
}

/// The Prometheus text exposition.
pub fn metrics_text() -> Response<Body> {
    let mut r = Response::new(Body::from(crate::metrics::render().into_bytes()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// `GET /admin/keys?status=&namespace=&tag=&namePrefix=&limit=&cursor=`: keys in id order; the
/// answer's `nextCursor` fetches the next page.
async fn list_keys(gate: &Gate, query: &str) -> Result<Response<Body>, AdminError> {
    let mut status = None;
    let mut namespace = None;
    let mut tag = None;
    let mut name_prefix = None;
    let mut limit = 100usize;
    let mut cursor = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "status" => {
                if !["active", "suspended", "revoked", "expired"].contains(&v.as_str()) {
                    return Err(AdminError::BadRequest(format!(
                        "status: {v:?} is not one of active, suspended, revoked, expired"
                    )));
                }
                status = Some(v);
            }
            "namespace" => namespace = Some(v),
            "tag" => tag = Some(v),
            "namePrefix" => name_prefix = Some(v),
            "limit" => {
                limit = page_limit(&v)? as usize;
            }
            "cursor" => cursor = Some(v),
            other => return Err(AdminError::BadRequest(format!("{other}: unknown filter"))),
        }
    }
    let now = now_ms();
    // A filter few keys pass walks every key: on the blocking pool, not this connection's thread.
    let g = gate.clone();
    let page = tokio::task::spawn_blocking(move || {
        g.ledger().page(cursor.as_deref(), limit + 1, |k| {
            let s = k.settings();
            let shown = match k.status() {
                Status::Active if s.is_expired(now) => "expired",
                st => st.as_str(),
            };
            status.as_deref().is_none_or(|want| want == shown)
                && namespace.as_deref().is_none_or(|n| s.namespace.as_deref() == Some(n))
                && tag.as_deref().is_none_or(|t| s.tags.iter().any(|x| x == t))
                && name_prefix.as_deref().is_none_or(|p| k.name.starts_with(p))
        })
    })
    .await
    .map_err(|_| AdminError::Unavailable)?;
    let more = page.len() > limit;
    let keys: Vec<Value> = page.iter().take(limit).map(|k| key_view(k)).collect();
    let next = if more {
        page.get(limit - 1).map(|k| k.id.clone())
    } else {
        None
    };
    Ok(ok(StatusCode::OK, json!({ "keys": keys, "nextCursor": next })))
}

/// A page size in a query: 1 to 1000.
fn page_limit(v: &str) -> Result<i64, AdminError> {
    v.parse()
        .ok()
        .filter(|l| (1..=1000).contains(l))
        .ok_or_else(|| AdminError::BadRequest(format!("limit: {v:?} is not a number from 1 to 1000")))
}

/// Runs a database read on the blocking pool, never on the connection's thread.
async fn read_store<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, crate::ledger::StoreError> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|_| AdminError::Unavailable)?
        .map_err(|e| AdminError::from(LedgerError::from(e)))
}

/// The cursor of the page after `rows`: the last row's seq when the page came back full.
fn next_cursor<R>(rows: &[R], limit: i64, seq: impl Fn(&R) -> i64) -> Option<String> {
    (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| seq(r).to_string()))
        .flatten()
}

/// A time in a query: Unix milliseconds or RFC 3339.
fn query_time(field: &str, v: &str) -> Result<i64, AdminError> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(v)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| AdminError::BadRequest(format!("{field}: {v:?} is not Unix milliseconds or an RFC 3339 time")))
}

/// `GET /admin/ledger?keyId=&requestId=&kind=&limit=&cursor=`: ledger rows, oldest first;
/// `nextCursor` fetches newer rows. Read on the blocking pool: a key's page may read many rows.
async fn list_ledger(gate: &Gate, query: &str) -> Result<Response<Body>, AdminError> {
    let mut f = crate::ledger::LedgerFilter {
        limit: 100,
        ..Default::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "keyId" => f.key_id = Some(v),
            "requestId" => f.request_id = Some(v),
            "kind" => {
                f.kind = Some(crate::ledger::Entry::parse(&v).ok_or_else(|| {
                    AdminError::BadRequest(format!(
                        "kind: {v:?} is not one of grant, topup, charge, refund, partial_refund"
                    ))
                })?);
            }
            "limit" => {
                f.limit = page_limit(&v)?;
            }
            "cursor" => {
                f.after =
                    Some(v.parse().ok().filter(|c: &i64| *c >= 0).ok_or_else(|| {
                        AdminError::BadRequest(format!("cursor: {v:?} is not a cursor from this API"))
                    })?);
            }
            other => return Err(AdminError::BadRequest(format!("{other}: unknown filter"))),
        }
    }
    caught_up(gate).await?;
    let store = gate.ledger().store().clone();
    let limit = f.limit;
    let rows = read_store(move || store.ledger_rows(&f)).await?;
    let next = next_cursor(&rows, limit, |r| r.seq);
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({"seq": r.seq, "requestId": r.request_id, "keyId": r.key_id, "kind": r.kind,
                   "amount": r.amount, "createdAt": r.created_at})
        })
        .collect();
    Ok(ok(StatusCode::OK, json!({ "entries": rows, "nextCursor": next })))
}

/// `GET /admin/requests?keyId=&tool=&outcome=&since=&until=&limit=&cursor=`: the request log,
/// newest first; `nextCursor` fetches older rows.
async fn list_requests(gate: &Gate, query: &str) -> Result<Response<Body>, AdminError> {
    let mut f = crate::ledger::RequestFilter {
        limit: 100,
        ..Default::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "keyId" => f.key_id = Some(v),
            "tool" => f.tool = Some(v),
            "outcome" => {
                if !["allowed", "refunded", "denied", "error"].contains(&v.as_str()) {
                    return Err(AdminError::BadRequest(format!(
                        "outcome: {v:?} is not one of allowed, refunded, denied, error"
                    )));
                }
                f.outcome = Some(v);
            }
            "since" => f.since = Some(query_time("since", &v)?),
            "until" => f.until = Some(query_time("until", &v)?),
            "limit" => {
                f.limit = page_limit(&v)?;
            }
            "cursor" => {
                f.before = Some(
                    v.parse()
                        .map_err(|_| AdminError::BadRequest(format!("cursor: {v:?} is not a cursor from this API")))?,
                );
            }
            other => return Err(AdminError::BadRequest(format!("{other}: unknown filter"))),
        }
    }
    let store = gate.ledger().store().clone();
    let limit = f.limit;
    let rows = read_store(move || store.requests(&f)).await?;
    let next = next_cursor(&rows, limit, |r| r.seq);
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({"requestId": r.request_id, "keyId": r.key_id, "method": r.method, "tool": r.tool,
                   "outcome": r.outcome, "reason": r.reason, "credits": r.credits,
                   "durationUs": r.duration_us, "at": rfc3339(r.created_at)})
        })
        .collect();
    Ok(ok(StatusCode::OK, json!({ "requests": rows, "nextCursor": next })))
}

/// `GET /admin/consumer-insights`: who spends and who calls most. Spend and calls come from the
/// ledger-backed balances, in one pass over the keys off the async workers (a bounded heap keeps
/// the top ten); `uniqueTools` from the successful calls of those keys in the request log.
async fn consumer_insights(gate: &Gate) -> Result<Response<Body>, AdminError> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let g = gate.clone();
    let report = tokio::task::spawn_blocking(move || {
        let now = now_ms();
        let (mut total, mut active, mut total_spent, mut total_calls) = (0usize, 0usize, 0i64, 0u64);
        // Min-heaps of (figure, Reverse(id)): the smallest of the ten best is popped first.
        let mut spenders: BinaryHeap<Reverse<(i64, Reverse<String>)>> = BinaryHeap::new();
        let mut callers: BinaryHeap<Reverse<(i64, Reverse<String>)>> = BinaryHeap::new();
        let keep = |heap: &mut BinaryHeap<Reverse<(i64, Reverse<String>)>>, figure: i64, id: &str| {
            if figure <= 0 {
                return;
            }
            if heap.len() < 10 {
                heap.push(Reverse((figure, Reverse(id.to_string()))));
            } else if heap.peek().is_some_and(|Reverse((min, _))| figure > *min) {
                heap.pop();
                heap.push(Reverse((figure, Reverse(id.to_string()))));
            }
        };
        g.ledger().for_each(|k| {
            total += 1;
            if k.status() == Status::Active && !k.is_expired(now) {
                active += 1;
            }
            let (spent, calls) = (k.spent(), k.calls());
            total_spent += spent;
            total_calls += calls;
            keep(&mut spenders, spent, &k.id);
            keep(&mut callers, calls as i64, &k.id);
        });
        let ranked = |heap: BinaryHeap<Reverse<(i64, Reverse<String>)>>| -> Vec<Arc<Key>> {
            let mut v: Vec<_> = heap.into_iter().map(|Reverse(x)| x).collect();
            v.sort_by(|a, b| b.cmp(a));
            v.into_iter()
                .filter_map(|(_, Reverse(id))| g.ledger().get(&id))
                .collect()
        };
        let (spenders, callers) = (ranked(spenders), ranked(callers));
        let mut ids: Vec<String> = spenders.iter().chain(callers.iter()).map(|k| k.id.clone()).collect();
        ids.sort();
        ids.dedup();
        let unique = g.ledger().store().unique_tools(&ids)?;
        Ok::<_, crate::ledger::StoreError>((total, active, total_spent, total_calls, spenders, callers, unique, now))
    })
    .await
    .map_err(|_| AdminError::Unavailable)?
    .map_err(|e| AdminError::from(LedgerError::from(e)))?;
    let (total, active, total_spent, total_calls, spenders, callers, unique, now) = report;
    let entry = |k: &Key| {
        json!({"id": k.id, "name": k.name, "totalSpent": k.spent(), "totalCalls": k.calls(),
               "uniqueTools": unique.get(&k.id).copied().unwrap_or(0)})
    };
    Ok(ok(
        StatusCode::OK,
        json!({
            "summary": {"totalConsumers": total, "activeConsumers": active,
                        "totalCreditsSpent": total_spent, "totalCalls": total_calls},
            "topSpenders": spenders.iter().map(|k| entry(k)).collect::<Vec<_>>(),
            "mostActive": callers.iter().map(|k| entry(k)).collect::<Vec<_>>(),
            "generatedAt": rfc3339(now),
        }),
    ))
}

/// Waits until the database holds every change made so far (charges reach it a moment after
/// they are journaled), so an admin read sees the calls that were answered before it.
async fn caught_up(gate: &Gate) -> Result<(), AdminError> {
    gate.ledger()
        .store()
        .sync()
        .await
        .map_err(|e| AdminError::from(LedgerError::from(e)))
}

/// `GET /admin/plugins`: each loaded plugin, where it came from, and how its calls go.
fn plugins_view(gate: &Gate) -> Value {
    let policy = gate.policy();
    let l = policy.limits();
    json!({
        "plugins": policy.describe(crate::policy::DEFAULT_TENANT),
        "limits": {
            "memoryBytes": l.memory_bytes,
            "pricingFuel": l.pricing_fuel,
            "healthFuel": l.health_fuel,
            "pricingTimeoutMs": l.pricing_deadline.as_millis() as u64,
            "healthTimeoutMs": l.health_deadline.as_millis() as u64,
            "maxArgumentBytes": l.max_argument_bytes,
            "maxPrice": l.max_price,
            "poolSize": l.pool_size,
            "recycleAfter": l.recycle_after,
        },
    })
}

/// One role in a `POST /admin/plugins/reload` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginInput {
    /// A component file; omitted: the embedded default.
    file: Option<std::path::PathBuf>,
    /// The plugin's configuration; omitted: `{}`.
    config: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadInput {
    pricing: Option<PluginInput>,
    health: Option<PluginInput>,
}

/// `POST /admin/plugins/reload`: load the plugins again and swap them in atomically, or change
/// nothing and say why. With a body, the roles it names get the component and configuration it
/// gives; without one, the plugins come from the config file again (`serve`), or the same
/// component files are read again (`wrap`).
async fn reload_plugins(
    state: &AppState,
    gate: &Gate,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, AdminError> {
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    let (pricing, health) = if has_body {
        let input: ReloadInput = json_body(req).await?;
        let spec = |p: PluginInput| crate::policy::PluginSpec {
            file: p.file,
            config: p.config.unwrap_or_else(|| json!({})).to_string(),
        };
        (input.pricing.map(spec), input.health.map(spec))
    } else if let Some(path) = state.config().source.clone() {
        let config = crate::config::RawConfig::from_file(&path)
            .and_then(crate::config::RawConfig::validate)
            .map_err(|e| AdminError::ReloadRefused(e.to_string()))?;
        let Some(billing) = config.billing else {
            return Err(AdminError::ReloadRefused(format!(
                "{}: billing is off in the file; that needs a restart",
                path.display()
            )));
        };
        if billing.policy.limits != *gate.policy().limits() {
            tracing::warn!("plugin limits changed in the config file; they apply after a restart");
        }
        (Some(billing.policy.pricing), Some(billing.policy.health))
    } else {
        (None, None)
    };
    let g = gate.clone();
    let reloaded =
        tokio::task::spawn_blocking(move || g.policy().reload(crate::policy::DEFAULT_TENANT, pricing, health))
            .await
            .map_err(|_| AdminError::Unavailable)?;
    match reloaded {
        Ok(changes) => {
            tracing::info!(?changes, "plugins reloaded");
            crate::webhooks::plugins_reloaded(gate.ledger().store(), &changes).await;
            Ok(ok(
                StatusCode::OK,
                json!({"reloaded": changes, "plugins": plugins_view(gate)["plugins"]}),
            ))
        }
        Err(e) => {
            tracing::warn!(error = %e, "plugin reload refused");
            Err(AdminError::ReloadRefused(e.to_string()))
        }
    }
}

/// `GET /admin/system-health`: the health plugin's report on a snapshot of the keys and the
/// request-log window. Scored off the async workers, so the proxy never waits for it.
async fn system_health(gate: &Gate) -> Result<Response<Body>, AdminError> {
    let g = gate.clone();
    let scored = tokio::task::spawn_blocking(move || {
        let now = now_ms();
        let mut figures = crate::policy::health::KeyFigures::default();
        g.ledger().for_each(|k| figures.add(k, now));
        let policy = g.policy();
        let window_ms = policy.health_window.as_millis() as i64;
        let buckets = g.window().since((now - window_ms).div_euclid(60_000) + 1);
        let plugin = policy.default_tenant().health.load();
        let report = plugin.score(policy.limits(), &figures, &buckets, window_ms, now);
        (report, plugin.info.file.clone(), now, window_ms)
    })
    .await
    .map_err(|_| AdminError::Unavailable)?;
    match scored {
        (Ok(r), _, now, window_ms) => Ok(ok(
            StatusCode::OK,
            json!({"score": r.score, "level": r.level, "components": r.components,
                   "windowMs": window_ms, "generatedAt": rfc3339(now)}),
        )),
        (Err(f), file, _, _) => {
            tracing::error!(plugin = %file, error = %f, "health plugin failed");
            Err(AdminError::HealthFailed)
        }
    }
}

/// Decodes `%XX` and `+` in a query value.
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ok(status: StatusCode, v: Value) -> Response<Body> {
    body::json(status, serde_json::to_vec(&v).expect("JSON serializes"))
}

/// A key's status as shown: `expired` once its expiry has passed.
fn shown_status(key: &Key, settings: &KeySettings) -> &'static str {
    match key.status() {
        Status::Active if settings.is_expired(now_ms()) => "expired",
        s => s.as_str(),
    }
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn key_view(key: &Key) -> Value {
    let s = key.settings();
    json!({
        "id": key.id,
        "name": key.name,
        "prefix": *key.prefix.read().unwrap(),
        "status": shown_status(key, &s),
        "credits": key.credits(),
        "spent": key.spent(),
        "calls": key.calls(),
        "createdAt": rfc3339(key.created_at),
        "tags": s.tags,
        "namespace": s.namespace,
        "expiresAt": s.expires_at.map(rfc3339),
        "allowedTools": s.allowed_tools,
        "deniedTools": s.denied_tools,
        "ipAllowlist": s.ip_allowlist.as_ref().map(|l| l.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
        "rateLimit": s.rate_limit,
        "toolRateLimits": s.tool_rate_limits,
        "spendingLimit": s.spending_limit,
        "quota": s.quota,
        "quotaUsage": usage_view(key),
    })
}

fn usage_view(key: &Key) -> Value {
    let u = key.usage(now_ms());
    json!({"dailyCalls": u.day_calls, "dailyCredits": u.day_credits,
           "monthlyCalls": u.month_calls, "monthlyCredits": u.month_credits})
}

fn balance_view(key: &Key) -> Value {
    let s = key.settings();
    json!({
        "id": key.id,
        "name": key.name,
        "status": shown_status(key, &s),
        "credits": key.credits(),
        "spent": key.spent(),
        "calls": key.calls(),
        "expiresAt": s.expires_at.map(rfc3339),
        "allowedTools": s.allowed_tools,
        "deniedTools": s.denied_tools,
        "spendingLimit": s.spending_limit,
        "remainingBudget": s.spending_limit.map(|l| (l - key.spent()).max(0).min(key.credits())),
        "quota": s.quota,
        "quotaUsage": usage_view(key),
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
    let (parts, body) = req.into_parts();
    let bytes = match crate::body::read_limited(&parts.headers, body, MAX_ADMIN_BODY).await {
        Ok(b) => b,
        Err(crate::body::ReadError::TooLarge) => return Err(AdminError::BodyTooLarge),
        Err(crate::body::ReadError::Failed(e)) => {
            return Err(AdminError::BadRequest(format!("reading the body failed: {e}")));
        }
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

/// A `null` in JSON is `Some(None)` (clear it); a missing field is `None` (leave it).
fn nullable<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Limits on settings lists, so that a key record stays small.
const MAX_LIST: usize = 1000;
const MAX_ITEM: usize = 256;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SettingsInput {
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    namespace: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    expires_at: Option<Option<String>>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default, deserialize_with = "nullable")]
    allowed_tools: Option<Option<Vec<String>>>,
    #[serde(default)]
    denied_tools: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    ip_allowlist: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    rate_limit: Option<Option<String>>,
    #[serde(default)]
    tool_rate_limits: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "nullable")]
    spending_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    quota: Option<Option<Quota>>,
}

fn check_rate(field: &str, spec: &str) -> Result<(), AdminError> {
    if crate::gate::parse_rate(spec).is_none() {
        return Err(AdminError::BadRequest(format!(
            "{field}: {spec:?} is not N/s, N/min or N/h (N from 1 to 1000000)"
        )));
    }
    Ok(())
}

fn check_list(field: &str, items: Vec<String>) -> Result<Vec<String>, AdminError> {
    if items.len() > MAX_LIST {
        return Err(AdminError::BadRequest(format!("{field}: at most {MAX_LIST} entries")));
    }
    for (i, item) in items.iter().enumerate() {
        if item.is_empty() || item.len() > MAX_ITEM {
            return Err(AdminError::BadRequest(format!(
                "{field}[{i}]: give 1 to {MAX_ITEM} characters"
            )));
        }
    }
    Ok(items)
}

impl SettingsInput {
    /// The settings after this change, validated.
    fn apply(self, base: &KeySettings, now_ms: i64) -> Result<KeySettings, AdminError> {
        let mut s = base.clone();
        if let Some(tags) = self.tags {
            s.tags = check_list("tags", tags)?;
        }
        if let Some(ns) = self.namespace {
            if let Some(n) = &ns
                && (n.is_empty() || n.len() > 64)
            {
                return Err(AdminError::BadRequest("namespace: give 1 to 64 characters".into()));
            }
            s.namespace = ns;
        }
        match (self.expires_at, self.expires_in) {
            (Some(_), Some(_)) => {
                return Err(AdminError::BadRequest(
                    "expiresAt, expiresIn: give one, not both".into(),
                ));
            }
            (Some(None), None) => s.expires_at = None,
            (Some(Some(at)), None) => {
                let t = humantime::parse_rfc3339_weak(&at)
                    .map_err(|e| AdminError::BadRequest(format!("expiresAt: {at:?} is not an RFC 3339 time ({e})")))?;
                let ms = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|_| AdminError::BadRequest("expiresAt: before 1970".into()))?
                    .as_millis() as i64;
                s.expires_at = Some(ms);
            }
            (None, Some(secs)) => {
                if !(1..=10 * 365 * 24 * 3600).contains(&secs) {
                    return Err(AdminError::BadRequest(format!(
                        "expiresIn: {secs} is out of range; give seconds from 1 to 315360000"
                    )));
                }
                s.expires_at = Some(now_ms + secs * 1000);
            }
            (None, None) => {}
        }
        if let Some(allowed) = self.allowed_tools {
            s.allowed_tools = allowed.map(|a| check_list("allowedTools", a)).transpose()?;
        }
        if let Some(denied) = self.denied_tools {
            s.denied_tools = check_list("deniedTools", denied)?;
        }
        if let Some(ips) = self.ip_allowlist {
            s.ip_allowlist = match ips {
                None => None,
                Some(list) => {
                    if list.len() > 100 {
                        return Err(AdminError::BadRequest("ipAllowlist: at most 100 entries".into()));
                    }
                    let nets = list
                        .iter()
                        .enumerate()
                        .map(|(i, ip)| {
                            crate::config::parse_net(ip).ok_or_else(|| {
                                AdminError::BadRequest(format!(
                                    "ipAllowlist[{i}]: {ip:?} is not an IP address or CIDR range"
                                ))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Some(nets)
                }
            };
        }
        if let Some(rate) = self.rate_limit {
            if let Some(r) = &rate {
                check_rate("rateLimit", r)?;
            }
            s.rate_limit = rate;
        }
        if let Some(tools) = self.tool_rate_limits {
            if tools.len() > MAX_LIST {
                return Err(AdminError::BadRequest(format!(
                    "toolRateLimits: at most {MAX_LIST} tools"
                )));
            }
            for (tool, r) in &tools {
                check_rate(&format!("toolRateLimits.{tool}"), r)?;
            }
            s.tool_rate_limits = tools;
        }
        if let Some(limit) = self.spending_limit {
            if let Some(l) = limit {
                check_credits("spendingLimit", l, 0)?;
            }
            s.spending_limit = limit;
        }
        if let Some(quota) = self.quota {
            if let Some(q) = &quota {
                for (field, v) in [
                    ("quota.dailyCalls", q.daily_calls),
                    ("quota.monthlyCalls", q.monthly_calls),
                    ("quota.dailyCredits", q.daily_credits),
                    ("quota.monthlyCredits", q.monthly_credits),
                ] {
                    if let Some(v) = v {
                        check_credits(field, v, 0)?;
                    }
                }
            }
            s.quota = quota;
        }
        Ok(s)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateKey {
    name: String,
    credits: i64,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    allowed_tools: Option<Vec<String>>,
    #[serde(default)]
    denied_tools: Option<Vec<String>>,
    #[serde(default)]
    ip_allowlist: Option<Vec<String>>,
    #[serde(default)]
    rate_limit: Option<String>,
    #[serde(default)]
    tool_rate_limits: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    spending_limit: Option<i64>,
    #[serde(default)]
    quota: Option<Quota>,
}

async fn create_key(gate: &Gate, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, AdminError> {
    let body: CreateKey = json_body(req).await?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(AdminError::BadRequest("name: give 1 to 200 characters".into()));
    }
    let credits = check_credits("credits", body.credits, 0)?;
    let settings = SettingsInput {
        tags: body.tags,
        namespace: body.namespace.map(Some),
        expires_at: body.expires_at.map(Some),
        expires_in: body.expires_in,
        allowed_tools: body.allowed_tools.map(Some),
        denied_tools: body.denied_tools,
        ip_allowlist: body.ip_allowlist.map(Some),
        rate_limit: body.rate_limit.map(Some),
        tool_rate_limits: body.tool_rate_limits,
        spending_limit: body.spending_limit.map(Some),
        quota: body.quota.map(Some),
    }
    .apply(&KeySettings::default(), now_ms())?;
    let (key, secret) = gate.ledger().create_key(name, credits, settings).await?;
    event(gate, "key.created", &key, json!({})).await;
    let mut view = key_view(&key);
    // The secret is in this answer and nowhere else, ever.
    view["key"] = Value::String(secret);
    tracing::info!(key_id = %key.id, credits, "key created");
    Ok(ok(StatusCode::CREATED, view))
}

/// Records an admin event for the webhooks. The change it reports is already durable; an event
/// that cannot be recorded is logged, and the change stands.
async fn event(gate: &Gate, kind: &str, key: &Key, extra: Value) {
    if let Err(e) = crate::webhooks::record(gate.ledger().store(), kind, Some(key), extra).await {
        tracing::error!(error = %e, kind, key_id = %key.id, "could not record a webhook event");
    }
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
    event(
        gate,
        "key.topup",
        &key,
        json!({ "amount": credits, "requestId": request_id }),
    )
    .await;
    tracing::info!(key_id = %id, credits, "key topped up");
    Ok(ok(StatusCode::OK, json!({ "id": id, "credits": balance })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
