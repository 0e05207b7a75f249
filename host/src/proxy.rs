//! The `/mcp` endpoint (Streamable HTTP, server side) and the public health endpoints.
//!
//! A POST carries one JSON-RPC message. Checks run in a fixed order (origin, media types, size,
//! JSON, protocol version, routing headers, session) before anything reaches the upstream; answers
//! go back as JSON, or as SSE when there is something to stream and the client accepts it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use compact_str::CompactString;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::body::{self, Body};
use crate::config::Config;
use crate::deadline::{self, Deadline, Deadlines};
use crate::error::Error;
use crate::gate::{self, CallRecord, Gate, GateError, Outcome};
use crate::jsonrpc::{self, Kind, Message, code};
use crate::ledger::{Key, Reservation};
use crate::policy::pricing::{CallInput, Price};
use crate::session::{Session, Sessions};
use crate::sse;
use crate::upstream::{self, Replies, Reply, Upstream};

/// How often deadlines (call timeouts, slow clients) are checked: they fire up to this late.
const DEADLINE_TICK: Duration = Duration::from_millis(50);

const SESSION_HEADER: HeaderName = HeaderName::from_static("mcp-session-id");
const VERSION_HEADER: HeaderName = HeaderName::from_static("mcp-protocol-version");
const METHOD_HEADER: HeaderName = HeaderName::from_static("mcp-method");
const NAME_HEADER: HeaderName = HeaderName::from_static("mcp-name");

/// What every request handler shares; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    config: Config,
    sessions: Sessions,
    upstream: Upstream,
    deadlines: Deadlines,
    gate: Option<Gate>,
    webhooks: Option<crate::webhooks::Webhooks>,
    /// The config as last (re)loaded: what a reload compares against.
    live: std::sync::Mutex<Config>,
}

impl AppState {
    /// Builds the state: opens the ledger (when billing is on) and starts the upstream. Returns a
    /// generated admin key too, the one time it exists in clear (first start without one).
    /// Must run inside a tokio runtime (it starts the webhook tasks).
    pub fn new(config: Config) -> Result<(AppState, Option<String>), GateError> {
        crate::metrics::install();
        let (gate, admin_key) = match &config.billing {
            Some(b) => {
                let (gate, shown) = Gate::open(b)?;
                (Some(gate), shown)
            }
            None => (None, None),
        };
        let sessions = Sessions::new(config.sessions.max, config.sessions.idle_timeout);
        let upstream = Upstream::start(&config, sessions.clone()).map_err(GateError::UpstreamTls)?;
        let webhooks = gate
            .as_ref()
            .map(|g| crate::webhooks::Webhooks::start(g.ledger().clone(), &config.webhooks));
        let state = AppState {
            inner: Arc::new(StateInner {
                live: std::sync::Mutex::new(config.clone()),
                webhooks,
                config,
                sessions,
                upstream,
                deadlines: Deadlines::start(DEADLINE_TICK),
                gate,
            }),
        };
        Ok((state, admin_key))
    }

    /// The gate, when billing is on.
    pub fn gate(&self) -> Option<&Gate> {
        self.inner.gate.as_ref()
    }

    /// The config the gateway started with (what needs a restart to change stays as here).
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The config as last (re)loaded.
    pub fn live_config(&self) -> std::sync::MutexGuard<'_, Config> {
        self.inner.live.lock().unwrap()
    }

    /// The webhook destinations, when billing is on.
    pub fn webhooks(&self) -> Option<&crate::webhooks::Webhooks> {
        self.inner.webhooks.as_ref()
    }

    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    pub fn upstream(&self) -> &Upstream {
        &self.inner.upstream
    }

    pub fn deadlines(&self) -> &Deadlines {
        &self.inner.deadlines
    }

    /// Ends the sessions idle past the timeout, and what the upstream holds for them.
    pub async fn expire_idle_sessions(&self) {
        for s in self.inner.sessions.expire_idle() {
            tracing::debug!(session = %s.id, "session expired");
            self.inner.upstream.end_session(&s).await;
        }
    }
}

/// Routes one HTTP request.
pub async fn handle(state: &AppState, req: Request<hyper::body::Incoming>, peer: IpAddr) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::POST, "/mcp") => post(state, req, peer).await,
        (&Method::GET, "/mcp") => get_stream(state, req).await,
        (&Method::DELETE, "/mcp") => delete(state, req).await,
        (_, "/mcp") => {
            let mut r = body::status(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
            r
        }
        // Boxed: the admin API's future is bigger than a call's and would make every request's
        // future as big (a request's future is copied as it is built and handed to hyper).
        (_, "/balance") => Box::pin(crate::admin::handle(state, req, peer)).await,
        (&Method::GET, "/metrics") => crate::admin::metrics(state, req, peer).await,
        (_, p) if p.starts_with("/admin/") => Box::pin(crate::admin::handle(state, req, peer)).await,
        (&Method::GET, "/healthz") => body::json(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#)),
        (&Method::GET, "/readyz") => {
            if state.upstream().is_ready().await {
                body::json(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#))
            } else {
                body::json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from_static(br#"{"status":"starting","reason":"the upstream is not initialized"}"#),
                )
            }
        }
        _ => body::json(StatusCode::NOT_FOUND, Bytes::from_static(br#"{"error":"not found"}"#)),
    }
}

/// What the client's `Accept` header allows.
#[derive(Debug, Clone, Copy)]
struct Accepts {
    json: bool,
    sse: bool,
}

fn accepts(headers: &HeaderMap) -> Accepts {
    let mut a = Accepts {
        json: false,
        sse: false,
    };
    let mut any = false;
    for v in headers.get_all(header::ACCEPT) {
        any = true;
        for part in v.to_str().unwrap_or("").split(',') {
            let media = part.split(';').next().unwrap_or("").trim();
            match media {
                "application/json" => a.json = true,
                "text/event-stream" => a.sse = true,
                "*/*" => {
                    a.json = true;
                    a.sse = true;
                }
                "application/*" => a.json = true,
                "text/*" => a.sse = true,
                _ => {}
            }
        }
    }
    if !any {
        // No Accept header: a lenient client that takes either.
        return Accepts { json: true, sse: true };
    }
    a
}

/// Browsers send `Origin`; only allowed ones may reach a (possibly local) gateway.
fn check_origin(config: &Config, headers: &HeaderMap) -> Result<(), Error> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let allowed = &config.server.allowed_origins;
    if allowed.iter().any(|o| o == "*" || o == origin) {
        return Ok(());
    }
    if config.server.allow_loopback_origins && is_loopback_origin(origin) {
        return Ok(());
    }
    Err(Error::OriginForbidden(origin.to_string()))
}

fn is_loopback_origin(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = if let Some(v6) = rest.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        rest.split(':').next().unwrap_or("")
    };
    host == "localhost" || host == "::1" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// The session a request names, if it is live and the request may use it. A session started with
/// an API key answers only to requests carrying that key (whatever its status now): to a request
/// with another key it does not exist (404), and one without a valid key is refused as such, so a
/// session id that leaks lets no one else into the session, its stream or its upstream state.
/// `holder`: the key the request carries, if the caller has looked it up already (else it is
/// looked up here when the session has an owner). `gated`: the gate refuses a request without a
/// valid key next (and logs it), so that refusal is left to it.
fn session_of(
    state: &AppState,
    headers: &HeaderMap,
    holder: Option<&Result<Arc<Key>, gate::Refusal>>,
    gated: bool,
) -> Result<Arc<Session>, Error> {
    let id = headers.get(&SESSION_HEADER).ok_or(Error::MissingSession)?;
    let id = id.to_str().map_err(|_| Error::SessionNotFound)?;
    let session = state.sessions().get(id).ok_or(Error::SessionNotFound)?;
    if let Some(owner) = session.owner() {
        let looked_up;
        let holder = match holder {
            Some(h) => h,
            None => {
                looked_up = state.gate().map(|g| g.holder_of(headers));
                looked_up.as_ref().ok_or(Error::SessionNotFound)?
            }
        };
        match holder {
            Ok(key) if key.id == owner => {}
            Ok(_) => return Err(Error::SessionNotFound),
            Err(_) if gated => {}
            Err(refusal) => return Err(refusal.clone().into()),
        }
    }
    Ok(session)
}

async fn read_body(parts: &Parts, body: hyper::body::Incoming, limit: usize) -> Result<Bytes, Error> {
    crate::body::read_limited(&parts.headers, body, limit)
        .await
        .map_err(|e| match e {
            crate::body::ReadError::TooLarge => Error::BodyTooLarge(limit),
            crate::body::ReadError::Failed(e) => Error::BodyRead(e),
        })
}

/// Checks `MCP-Protocol-Version` (missing means 2025-03-26) and the 2026-07-28 routing headers.
fn check_headers(headers: &HeaderMap, msg: &Message) -> Result<(), Error> {
    if let Some(v) = headers.get(VERSION_HEADER) {
        let v = v.to_str().unwrap_or("");
        if !jsonrpc::is_supported_version(v) {
            return Err(Error::UnsupportedVersion(v.to_string()));
        }
    }
    if let Some(m) = headers.get(METHOD_HEADER)
        && (msg.kind == Kind::Response || m.to_str().ok() != msg.method())
    {
        return Err(Error::HeaderMismatch("Mcp-Method"));
    }
    if let Some(n) = headers.get(NAME_HEADER) {
        let n = n.to_str().map_err(|_| Error::HeaderMismatch("Mcp-Name"))?;
        let expected = msg
            .method()
            .and_then(jsonrpc::name_param_of)
            .and_then(|key| msg.param_str(key));
        // A value the client had to encode (`=?base64?…?=`) is left to the upstream to check.
        let encoded = n.starts_with("=?base64?");
        if !encoded && expected.as_deref() != Some(n) {
            return Err(Error::HeaderMismatch("Mcp-Name"));
        }
    }
    Ok(())
}

/// What the request's log line and metrics need, filled in as the request goes.
struct Trace {
    /// The gateway's id for this request (the ledger's, when it is charged).
    id: CompactString,
    /// The client's valid `X-Request-Id`, returned as given.
    client: Option<String>,
    method: Option<&'static str>,
    /// The gate logged this request (its one line, its metrics).
    gated: bool,
    upstream: Option<Duration>,
}

/// A client's `X-Request-Id`: `Ok(None)` if it sent none, `Err` if it is not a sane id.
fn client_request_id(headers: &HeaderMap) -> Result<Option<String>, Error> {
    let Some(v) = headers.get(REQUEST_ID_HEADER) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| Error::BadRequestId)?;
    let sane =
        !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(&b));
    if sane {
        Ok(Some(v.to_string()))
    } else {
        Err(Error::BadRequestId)
    }
}

async fn post(state: &AppState, req: Request<hyper::body::Incoming>, peer: IpAddr) -> Response<Body> {
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let mut id = Value::Null;
    let mut trace = Trace {
        id: gate::next_request_id(),
        client: None,
        method: None,
        gated: false,
        upstream: None,
    };
    let result = match client_request_id(&parts.headers) {
        Ok(client) => {
            trace.client = client;
            // Boxed, so that the futures above it (and the one hyper holds) stay small: each is
            // copied whole as it is built, and this one is most of a request's.
            Box::pin(post_inner(state, &parts, body, peer, started, &mut id, &mut trace)).await
        }
        Err(e) => Err(e),
    };
    let (mut r, error) = match result {
        Ok(r) => (r, None),
        Err(e) => {
            let reason = e.to_string();
            (e.into_response(id), Some(reason))
        }
    };
    if !trace.gated {
        let method = trace.method.unwrap_or("other");
        let elapsed = started.elapsed();
        crate::metrics::free(method, error.is_some(), elapsed, trace.upstream);
        tracing::info!(
            target: "tollgate::request",
            request_id = %trace.id,
            client_request_id = trace.client.as_deref(),
            method,
            outcome = if error.is_some() { "error" } else { "free" },
            status = r.status().as_u16(),
            error,
            duration_us = elapsed.as_micros() as u64,
            upstream_us = trace.upstream.map(|d| d.as_micros() as u64),
            "request"
        );
    }
    let h = r.headers_mut();
    let shown = trace.client.as_deref().unwrap_or(trace.id.as_str());
    if let Ok(v) = HeaderValue::from_str(shown) {
        h.insert(REQUEST_ID_HEADER, v);
    }
    if trace.client.is_some()
        && let Ok(v) = HeaderValue::from_str(&trace.id)
    {
        h.insert(GATEWAY_REQUEST_ID_HEADER, v);
    }
    r
}

async fn post_inner(
    state: &AppState,
    parts: &Parts,
    body: hyper::body::Incoming,
    peer: IpAddr,
    started: std::time::Instant,
    id_out: &mut Value,
    trace: &mut Trace,
) -> Result<Response<Body>, Error> {
    let config = state.config();
    let headers = &parts.headers;
    check_origin(config, headers)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return Err(Error::UnsupportedMediaType);
    }
    let accept = accepts(headers);
    if !accept.json && !accept.sse {
        return Err(Error::NotAcceptable("application/json or text/event-stream"));
    }
    // One deadline for the whole exchange: reading the body, the upstream call, the answer.
    let call_timeout = config.upstream.call_timeout;
    let deadline = state.deadlines().register_from(started, call_timeout);
    let raw = deadline::race(deadline.alarm(), read_body(parts, body, config.server.max_body_bytes))
        .await
        .map_err(|_| Error::BodyTimeout)??;
    let msg = Message::parse(&raw)?;
    if let Some(id) = msg.id() {
        *id_out = id.clone();
    }
    trace.method = Some(match msg.kind {
        Kind::Request => crate::metrics::method_label(msg.method().unwrap_or_default()),
        Kind::Notification => "notification",
        Kind::Response => "response",
    });
    check_headers(headers, &msg)?;
    let upstream = state.upstream();

    match (msg.kind, msg.method()) {
        (Kind::Request, Some("initialize")) => {
            // With billing on, the session belongs to the key that starts it.
            let owner = state.gate().and_then(|g| g.holder_of(headers).ok());
            let session = state.sessions().create(owner.as_ref().map(|k| k.id.as_str()))?;
            let reply = with_deadline(
                &deadline,
                call_timeout,
                upstream.initialize(&session, headers, msg, raw),
            )
            .await;
            // An initialize the upstream refused leaves no session behind.
            let refused = matches!(&reply, Ok(Reply::Done(m)) if m.is_error());
            let resp = match reply {
                Ok(reply) => respond(reply, accept, deadline, call_timeout, id_out.clone()).await,
                Err(e) => Err(e),
            };
            match resp {
                Ok(mut r) if r.status().is_success() && !refused => {
                    let v = HeaderValue::from_str(&session.id).expect("hex is a valid header value");
                    r.headers_mut().insert(SESSION_HEADER, v);
                    tracing::debug!(session = %session.id, "session started");
                    Ok(r)
                }
                other => {
                    state.sessions().remove(&session.id);
                    other
                }
            }
        }
        (Kind::Request, Some("server/discover")) => {
            let reply = with_deadline(&deadline, call_timeout, upstream.discover(headers, msg, raw)).await?;
            respond(reply, accept, deadline, call_timeout, id_out.clone()).await
        }
        (Kind::Request, Some("ping")) if !headers.contains_key(&SESSION_HEADER) => {
            let v = jsonrpc::result_response(id_out.clone(), serde_json::json!({}));
            Ok(one(&Message::from_value(&v), accept))
        }
        (Kind::Request, method) => {
            let method = method.unwrap_or_default();
            // The key the request carries, looked up once, where something reads it: the gate (a
            // method that is not free) and tools/list's view; for a free method on a session with
            // an owner, `session_of` looks it up itself. A free method on any other session (a
            // ping) hashes no secret.
            let mut holder = state
                .gate()
                .filter(|g| !g.is_free(method) || method == "tools/list")
                .map(|g| g.holder_of(headers));
            let gated = state.gate().is_some_and(|g| !g.is_free(method) && !g.is_shadow());
            let session = session_of(state, headers, holder.as_ref(), gated)?;
            // The gate: a key, then its credits, reserved before anything reaches the upstream.
            // tools/list shows only what the caller's key may call, with prices.
            let view = match state.gate() {
                Some(gate) if method == "tools/list" => Some(ToolsView {
                    gate: gate.clone(),
                    key: holder.clone().and_then(Result::ok).and_then(|k| gate.admit(k).ok()),
                }),
                _ => None,
            };
            let mut charge = match state.gate() {
                Some(gate) if !gate.is_free(method) => {
                    trace.gated = true;
                    let request_id = trace.id.clone();
                    // Parsed once: the tool lists, the rate limits and the price all use it.
                    let (tool, arguments) = if method == "tools/call" {
                        gate::tool_call(&msg)
                    } else {
                        (None, msg.raw_params().map(|p| p.get()))
                    };
                    let gate_tool = (method == "tools/call").then(|| tool.as_deref().unwrap_or(""));
                    let mut key_id = None;
                    let mut price = None;
                    let shadow = gate.is_shadow();
                    let admitted = (|| {
                        // The wall clock, read once for the key's expiry, the price and the quotas.
                        let now_ms = crate::ledger::now_ms();
                        let key =
                            gate.admit_at(holder.take().expect("looked up for a method that is not free")?, now_ms)?;
                        key_id = Some(CompactString::from(key.id.as_str()));
                        // One read of the key's settings serves every check and the price.
                        let settings = key.settings_now();
                        gate.check_ip(&settings, client_ip_of(state, headers, peer))?;
                        gate.check_call(&key, &settings, gate_tool)?;
                        let input = CallInput {
                            method,
                            tool: gate_tool,
                            arguments,
                            request_id: &request_id,
                            now_ms,
                        };
                        let p = gate.price(&key, &settings, &input)?;
                        price = Some(p);
                        if shadow {
                            gate.would_reserve(&key, p.reserved())?;
                            return Ok(None);
                        }
                        gate.reserve(key, p.reserved(), &request_id, now_ms).map(Some)
                    })();
                    let record = CallRecord {
                        request_id: &request_id,
                        client_request_id: trace.client.as_deref(),
                        upstream: None,
                        key_id: key_id.as_deref(),
                        method,
                        tool: tool.as_deref(),
                        started,
                    };
                    match admitted {
                        Ok(Some(reservation)) => Some(Charge {
                            gate: gate.clone(),
                            reservation: Some(reservation),
                            price: price.unwrap_or(Price::flat(0)),
                            method: method.into(),
                            tool,
                            started,
                            client_request_id: trace.client.clone(),
                            // Set below, as the call is forwarded.
                            forwarded: started,
                        }),
                        Ok(None) => {
                            gate.log_shadow_allowed(&record, price.map_or(0, |p| p.reserved()));
                            None
                        }
                        Err(refusal) if shadow => {
                            tracing::info!(reason = refusal.reason(), "shadow mode: would refuse");
                            gate.log_denied(&record, &refusal);
                            None
                        }
                        Err(refusal) => {
                            gate.log_denied(&record, &refusal);
                            return Err(refusal.into());
                        }
                    }
                }
                _ => None,
            };
            let forwarded = std::time::Instant::now();
            if let Some(c) = charge.as_mut() {
                c.forwarded = forwarded;
            }
            let reply = with_deadline(&deadline, call_timeout, upstream.request(&session, headers, msg, raw)).await;
            trace.upstream = Some(forwarded.elapsed());
            match gone_ends_session(state, &session, reply).await {
                Ok(reply) => respond_charged(reply, accept, deadline, call_timeout, id_out.clone(), charge, view).await,
                Err(e) => {
                    if let Some(c) = charge {
                        c.settle(outcome_of_error(&e), 0).await?;
                    }
                    Err(e)
                }
            }
        }
        (Kind::Notification, _) | (Kind::Response, _) => {
            let session = session_of(state, headers, None, false)?;
            let r = upstream.notify(&session, headers, msg, raw).await;
            gone_ends_session(state, &session, r.map_err(Error::from)).await?;
            Ok(body::status(StatusCode::ACCEPTED))
        }
    }
}

/// If the upstream ended this client's session, Tollgate's session ends too (the client gets 404
/// and initializes again).
async fn gone_ends_session<T>(state: &AppState, session: &Session, r: Result<T, Error>) -> Result<T, Error> {
    if let Err(Error::Upstream(upstream::Error::SessionGone)) = &r {
        state.sessions().remove(&session.id);
    }
    r
}

async fn with_deadline<T>(
    deadline: &Deadline,
    timeout: Duration,
    fut: impl Future<Output = Result<T, upstream::Error>>,
) -> Result<T, Error> {
    match deadline::race(deadline.alarm(), fut).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(upstream::Error::Timeout(timeout).into()),
    }
}

/// One message as the whole answer: JSON if the client takes it, else a one-event SSE stream.
fn one(m: &Message, accept: Accepts) -> Response<Body> {
    raw(m.to_bytes().into(), accept)
}

fn raw(bytes: Bytes, accept: Accepts) -> Response<Body> {
    if accept.json {
        body::json(StatusCode::OK, bytes)
    } else {
        body::sse(Body::from(sse::frame(&bytes)))
    }
}

/// The client's address for this request (the peer, or as forwarded by a trusted proxy).
pub fn client_ip_of(state: &AppState, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
    gate::client_ip(peer, headers, &state.config().server.trusted_proxies)
}

/// How a `tools/list` answer is shown to one caller.
struct ToolsView {
    gate: Gate,
    key: Option<Arc<Key>>,
}

impl ToolsView {
    fn apply(view: &Option<ToolsView>, m: Message) -> Message {
        match view {
            Some(v) => v.gate.view_tools(m, v.key.as_deref()),
            None => m,
        }
    }
}

/// A call's reserved credits, settled once its answer is known — or, if the client goes away
/// first (its request or stream is dropped mid-call), settled when it is dropped, as a call that
/// did not complete: never left charged without a record.
struct Charge {
    gate: Gate,
    /// Taken by settlement.
    reservation: Option<Reservation>,
    price: Price,
    method: CompactString,
    tool: Option<CompactString>,
    started: std::time::Instant,
    client_request_id: Option<String>,
    /// When the call was handed to the upstream: its time runs to the final answer.
    forwarded: std::time::Instant,
}

impl Charge {
    /// Keeps or refunds per the outcome (and the answer's size, for a surcharge), logs the call;
    /// durable before it returns.
    async fn settle(mut self, outcome: Outcome, answer_bytes: usize) -> Result<Settled, Error> {
        let r = self.reservation.take().expect("a charge is settled once");
        let (request_id, key_id) = (r.request_id.clone(), CompactString::from(r.key.id.as_str()));
        let record = self.record(&request_id, &key_id);
        let credits = self.gate.settle(r, self.price, answer_bytes, outcome, &record).await?;
        Ok(Settled { credits })
    }

    fn record<'a>(&'a self, request_id: &'a str, key_id: &'a str) -> CallRecord<'a> {
        CallRecord {
            request_id,
            client_request_id: self.client_request_id.as_deref(),
            upstream: Some(self.forwarded.elapsed()),
            key_id: Some(key_id),
            method: &self.method,
            tool: self.tool.as_deref(),
            started: self.started,
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let Some(r) = self.reservation.take() else { return };
        let (request_id, key_id) = (r.request_id.clone(), CompactString::from(r.key.id.as_str()));
        let record = self.record(&request_id, &key_id);
        tracing::debug!(request_id = %request_id, "the client went away before its answer");
        if let Err(e) = self.gate.settle_now(r, self.price, 0, Outcome::Abandoned, &record) {
            tracing::error!(request_id = %request_id, error = %e, "could not settle an abandoned call");
        }
    }
}

/// How an exchange that failed at the gateway counts for settlement.
fn outcome_of_error(e: &Error) -> Outcome {
    match e {
        Error::Upstream(upstream::Error::Unavailable(_) | upstream::Error::SessionGone) => Outcome::NotForwarded,
        Error::Upstream(upstream::Error::Protocol(_)) => Outcome::RpcError,
        _ => Outcome::Timeout,
    }
}

const CREDITS_HEADER: HeaderName = HeaderName::from_static("x-credits-remaining");
const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// The gateway's own request id (its ledger rows'), when the client sent an `X-Request-Id` of its own.
const GATEWAY_REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("tollgate-request-id");

/// A settled call's balance.
struct Settled {
    credits: i64,
}

fn with_credits(mut r: Response<Body>, settled: Option<Settled>) -> Response<Body> {
    if let Some(s) = settled {
        // Formatted on the stack and copied once: `HeaderValue::from(i64)` allocates a buffer and,
        // freezing it with room to spare, a shared header for it too.
        let mut digits = itoa::Buffer::new();
        let v = HeaderValue::from_str(digits.format(s.credits)).expect("digits are a valid header value");
        r.headers_mut().insert(CREDITS_HEADER, v);
    }
    r
}

async fn respond(
    reply: Reply,
    accept: Accepts,
    deadline: Deadline,
    timeout: Duration,
    id: Value,
) -> Result<Response<Body>, Error> {
    respond_charged(reply, accept, deadline, timeout, id, None, None).await
}

/// Answers the client and settles the call's charge (if any) on the final message, before the
/// client sees it.
async fn respond_charged(
    reply: Reply,
    accept: Accepts,
    deadline: Deadline,
    timeout: Duration,
    id: Value,
    charge: Option<Charge>,
    view: Option<ToolsView>,
) -> Result<Response<Body>, Error> {
    let of_message = |m: &Message| (gate::outcome_of_message(m), m.result_len());
    match reply {
        Reply::Done(m) => {
            let credits = settle(charge, || of_message(&m)).await?;
            Ok(with_credits(one(&ToolsView::apply(&view, m), accept), credits))
        }
        Reply::Raw(bytes, _) if view.is_some() => {
            let m = Message::parse(&bytes).map_err(|e| upstream::Error::Protocol(e.to_string()))?;
            let credits = settle(charge, || of_message(&m)).await?;
            Ok(with_credits(one(&ToolsView::apply(&view, m), accept), credits))
        }
        Reply::Raw(bytes, seen) => {
            let credits = settle(charge, || gate::outcome_of(&bytes, &seen)).await?;
            Ok(with_credits(raw(bytes, accept), credits))
        }
        Reply::Stream(replies) if replies.streamable && accept.sse => {
            Ok(stream(replies, deadline, timeout, id, charge, view))
        }
        Reply::Stream(mut replies) => loop {
            match deadline::race(deadline.alarm(), replies.recv()).await {
                Err(_) => {
                    settle(charge, || (Outcome::Timeout, 0)).await?;
                    return Err(upstream::Error::Timeout(timeout).into());
                }
                Ok(None) => {
                    settle(charge, || (Outcome::Timeout, 0)).await?;
                    return Err(upstream::Error::Closed.into());
                }
                Ok(Some(m)) if m.is_response() => {
                    let credits = settle(charge, || of_message(&m)).await?;
                    return Ok(with_credits(one(&ToolsView::apply(&view, m), accept), credits));
                }
                Ok(Some(_)) => continue,
            }
        },
    }
}

/// Settles `charge`, if there is one, by the outcome and answer size `outcome` reads: read only
/// then, so an unbilled call's answer is never parsed for it.
async fn settle(charge: Option<Charge>, outcome: impl FnOnce() -> (Outcome, usize)) -> Result<Option<Settled>, Error> {
    match charge {
        Some(c) => {
            let (outcome, answer_bytes) = outcome();
            c.settle(outcome, answer_bytes).await.map(Some)
        }
        None => Ok(None),
    }
}

/// Streams the replies to the client as SSE, event by event, until the final response (or the
/// deadline, or the upstream going away — each ends the stream with a JSON-RPC error). The charge
/// is settled before the final event is sent; if the client leaves first, as abandoned.
fn stream(
    mut replies: Replies,
    deadline: Deadline,
    timeout: Duration,
    id: Value,
    mut charge: Option<Charge>,
    view: Option<ToolsView>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                // The client left: dropping `replies` abandons the call upstream, and dropping the
                // charge settles it as abandoned.
                _ = tx.closed() => return,
                next = deadline::race(deadline.alarm(), replies.recv()) => next,
            };
            // The outcome when the gateway ends the stream itself; otherwise the final answer's.
            let (mut m, ended) = match next {
                Ok(Some(m)) => (m, None),
                Ok(None) => (
                    Message::error(id.clone(), code::UPSTREAM_CLOSED, &upstream::Error::Closed.to_string()),
                    Some(Outcome::Timeout),
                ),
                Err(_) => {
                    let e = upstream::Error::Timeout(timeout);
                    tracing::warn!(error = %e, "request failed");
                    (
                        Message::error(id.clone(), code::UPSTREAM_TIMEOUT, &e.to_string()),
                        Some(Outcome::Timeout),
                    )
                }
            };
            let last = m.is_response();
            let outcome = (last && charge.is_some()).then(|| ended.unwrap_or_else(|| gate::outcome_of_message(&m)));
            if last {
                m = ToolsView::apply(&view, m);
            }
            if let Some(outcome) = outcome
                && let Some(c) = charge.take()
                && let Err(e) = c.settle(outcome, m.result_len()).await
            {
                let (_, code, message, _) = e.classify();
                m = Message::error(id.clone(), code, &message);
            }
            let frame = sse::frame(&m.to_bytes());
            if tx.send(frame).await.is_err() || last {
                // The client left (dropping `replies` abandons the call upstream) or we are done.
                return;
            }
        }
    });
    body::sse(Body::Channel(rx))
}

async fn get_stream(state: &AppState, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let headers = req.headers();
    let result = async {
        check_origin(state.config(), headers)?;
        if !accepts(headers).sse {
            return Err(Error::NotAcceptable("text/event-stream"));
        }
        if let Some(v) = headers.get(VERSION_HEADER)
            && !jsonrpc::is_supported_version(v.to_str().unwrap_or(""))
        {
            return Err(Error::UnsupportedVersion(v.to_str().unwrap_or("").to_string()));
        }
        let session = session_of(state, headers, None, false)?;
        let r = state.upstream().open_stream(&session, headers).await;
        let body = gone_ends_session(state, &session, r.map_err(Error::from)).await?;
        Ok(body::sse(body))
    }
    .await;
    result.unwrap_or_else(|e| e.into_response(Value::Null))
}

async fn delete(state: &AppState, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let headers = req.headers();
    let result = async {
        check_origin(state.config(), headers)?;
        let session = session_of(state, headers, None, false)?;
        state.sessions().remove(&session.id);
        state.upstream().end_session(&session).await;
        tracing::debug!(session = %session.id, "session ended by the client");
        Ok::<_, Error>(body::status(StatusCode::NO_CONTENT))
    }
    .await;
    result.unwrap_or_else(|e| e.into_response(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn accept_headers_are_read_as_clients_send_them() {
        let a = accepts(&headers(&[("accept", "application/json, text/event-stream")]));
        assert!(a.json && a.sse);
        let a = accepts(&headers(&[("accept", "text/event-stream;q=0.9")]));
        assert!(!a.json && a.sse);
        let a = accepts(&headers(&[("accept", "*/*")]));
        assert!(a.json && a.sse);
        let a = accepts(&headers(&[("accept", "text/html")]));
        assert!(!a.json && !a.sse);
        let a = accepts(&HeaderMap::new());
        assert!(a.json && a.sse);
    }

    #[test]
    fn loopback_origins_are_recognised_and_lookalikes_are_not() {
        assert!(is_loopback_origin("http://localhost:5173"));
        assert!(is_loopback_origin("http://127.0.0.1"));
        assert!(is_loopback_origin("https://[::1]:8080"));
        assert!(!is_loopback_origin("http://localhost.evil.com"));
        assert!(!is_loopback_origin("http://evil.com"));
        assert!(!is_loopback_origin("null"));
    }

    #[test]
    fn routing_headers_must_agree_with_the_body() {
        let msg =
            Message::parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}"#).unwrap();
        assert!(check_headers(&headers(&[("mcp-method", "tools/call"), ("mcp-name", "echo")]), &msg).is_ok());
        assert!(matches!(
            check_headers(&headers(&[("mcp-method", "tools/list")]), &msg),
            Err(Error::HeaderMismatch("Mcp-Method"))
        ));
        assert!(matches!(
            check_headers(&headers(&[("mcp-name", "add")]), &msg),
            Err(Error::HeaderMismatch("Mcp-Name"))
        ));
        assert!(matches!(
            check_headers(&headers(&[("mcp-protocol-version", "2026-07-28")]), &msg),
            Err(Error::UnsupportedVersion(_))
        ));
    }
}

#[cfg(test)]
mod future_sizes {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn size_of_future<'a, A: 'a, B, C, F: Future>(_f: impl FnOnce(&'a A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A request's future is copied whole as it is built and handed to hyper, and nested futures
    /// are copied into their parents: at 6 KB (the admin API's future inside it), that was ~30 KB
    /// of copying per request. The big ones are boxed; this keeps it that way.
    #[test]
    fn a_requests_future_stays_small_because_it_is_copied_as_it_is_built() {
        type Req = Request<hyper::body::Incoming>;
        let handle = size_of_future::<AppState, Req, IpAddr, _>(handle);
        let post = size_of_future::<AppState, Req, IpAddr, _>(post);
        assert!(handle <= 2048, "the request future is {handle} bytes");
        assert!(post <= 1024, "the POST future is {post} bytes");
    }
}
