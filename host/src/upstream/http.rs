//! The Streamable HTTP upstream: one upstream session per Tollgate session (never one shared), the
//! client's `MCP-Protocol-Version` forwarded, SSE answers streamed through event by event.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use thread_local::ThreadLocal;
use tokio::sync::mpsc;

use super::{Answer, Error, Replies, Reply};
use crate::body::Body;
use crate::config::UpstreamConfig;
use crate::jsonrpc::Message;
use crate::session::Session;
use crate::sse;

const SESSION_HEADER: HeaderName = HeaderName::from_static("mcp-session-id");
const VERSION_HEADER: HeaderName = HeaderName::from_static("mcp-protocol-version");
/// The largest JSON answer read from the upstream (an SSE stream is not limited as a whole).
const MAX_JSON_ANSWER: usize = 64 << 20;

/// Just enough of an answer to know it is a JSON-RPC response, read without building a tree.
#[derive(serde::Deserialize)]
struct Peek<'a> {
    #[serde(default)]
    method: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    result: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

/// Checks that `body` is a JSON-RPC response (a result or an error, no method); what it saw.
pub fn check_answer(body: &[u8]) -> Option<Answer> {
    let p = serde_json::from_slice::<Peek>(body).ok()?;
    if p.method.is_some() || (p.result.is_none() && p.error.is_none()) {
        return None;
    }
    Some(Answer {
        error: p.error.is_some(),
        // A borrowed raw value is a slice of the bytes it was read from.
        result: p.result.map(|r| {
            let start = r.get().as_ptr() as usize - body.as_ptr() as usize;
            start..start + r.get().len()
        }),
    })
}

/// A pooled client for one remote MCP endpoint (`http://`, or `https://` over rustls).
pub struct HttpUpstream {
    pools: Pools,
    url: hyper::Uri,
    /// Sent with every request (from `[upstream] headers`), e.g. the server's own credentials.
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl HttpUpstream {
    /// A client for `url` that sends `headers` with every request; an `https://` server's
    /// certificate must chain to `ca` (DER certificates), or to the public web roots when `None`.
    pub fn new(
        url: hyper::Uri,
        ca: Option<&[Vec<u8>]>,
        headers: Vec<(HeaderName, HeaderValue)>,
        cfg: &UpstreamConfig,
    ) -> Result<HttpUpstream, String> {
        let tls = if url.scheme_str() == Some("https") {
            Some(crate::tls::client_config(ca)?)
        } else {
            None
        };
        Ok(HttpUpstream {
            pools: Pools {
                tls,
                connect_timeout: cfg.connect_timeout,
                by_thread: ThreadLocal::new(),
            },
            url,
            headers,
        })
    }

    fn build(
        &self,
        method: Method,
        session: Option<&Session>,
        client_headers: &HeaderMap,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = self.url.clone();
        let h = req.headers_mut();
        if method == Method::POST {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(
                header::ACCEPT,
                HeaderValue::from_static("application/json, text/event-stream"),
            );
        } else if method == Method::GET {
            h.insert(header::ACCEPT, HeaderValue::from_static("text/event-stream"));
            if let Some(v) = client_headers.get("last-event-id") {
                h.insert("last-event-id", v.clone());
            }
        }
        if let Some(v) = client_headers.get(&VERSION_HEADER) {
            h.insert(VERSION_HEADER, v.clone());
        }
        if let Some(id) = session.and_then(|s| s.upstream_session.get()) {
            h.insert(SESSION_HEADER, id.clone());
        }
        for (name, value) in &self.headers {
            h.append(name.clone(), value.clone());
        }
        req
    }

    async fn call(&self, req: Request<Full<Bytes>>) -> Result<http::Response<hyper::body::Incoming>, Error> {
        self.pools.get().request(req).await.map_err(|e| {
            // hyper-util's error says only "client error (Connect)"; the cause (refused, TLS
            // certificate not trusted, ...) is in its sources.
            let mut error = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                error.push_str(": ");
                error.push_str(&s.to_string());
                source = s.source();
            }
            tracing::warn!(%error, url = %self.url, "HTTP upstream request failed");
            Error::Unavailable(format!("cannot reach {}", self.url))
        })
    }

    /// Sends one client request; on `initialize`, remembers the upstream's session id for this
    /// client's session.
    pub async fn send(
        &self,
        session: Option<&Session>,
        client_headers: &HeaderMap,
        msg: Message,
        raw: Bytes,
        is_init: bool,
    ) -> Result<Reply, Error> {
        let had_session = session.is_some_and(|s| s.upstream_session.get().is_some());
        let resp = self
            .call(self.build(Method::POST, session, client_headers, raw))
            .await?;
        let status = resp.status();
        if is_init
            && status.is_success()
            && let (Some(s), Some(id)) = (session, resp.headers().get(&SESSION_HEADER))
        {
            let _ = s.upstream_session.set(id.clone());
        }
        if status == StatusCode::NOT_FOUND && had_session {
            return Err(Error::SessionGone);
        }
        let client_id = msg.id().cloned().unwrap_or(Value::Null);
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if status.is_success() && is_sse {
            return Ok(Reply::Stream(pump(resp.into_body(), client_id)));
        }
        let body = Limited::new(resp.into_body(), MAX_JSON_ANSWER)
            .collect()
            .await
            .map_err(|e| Error::Protocol(format!("reading the answer failed: {e}")))?
            .to_bytes();
        if status.is_success() && is_init {
            // The proxy looks inside an initialize answer (a failed one ends the session).
            return match Message::parse(&body) {
                Ok(m) if m.is_response() => Ok(Reply::Done(m)),
                _ => Err(Error::Protocol("the answer is not a JSON-RPC response".into())),
            };
        }
        if status.is_success() {
            return match check_answer(&body) {
                Some(answer) => Ok(Reply::Raw(body, answer)),
                None => Err(Error::Protocol("the answer is not a JSON-RPC response".into())),
            };
        }
        match serde_json::from_slice::<Value>(&body) {
            // (Only a JSON-RPC error object: `{"error": "unauthorized"}` is not one.)
            Ok(Value::Object(mut obj))
                if obj
                    .get("error")
                    .is_some_and(|e| e.get("code").is_some_and(Value::is_i64)) =>
            {
                // An error answered at a non-2xx status: keep the upstream's error, with our id.
                obj.insert("id".into(), client_id);
                obj.insert("jsonrpc".into(), Value::from("2.0"));
                obj.remove("result");
                Ok(Reply::Done(Message::from_value(&Value::Object(obj))))
            }
            _ => Err(Error::Protocol(format!("the upstream answered HTTP {status}"))),
        }
    }

    /// Forwards a client notification or response; the upstream answers 202.
    pub async fn notify(&self, session: &Session, client_headers: &HeaderMap, raw: Bytes) -> Result<(), Error> {
        let resp = self
            .call(self.build(Method::POST, Some(session), client_headers, raw))
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(Error::SessionGone),
            s => Err(Error::Protocol(format!(
                "the upstream answered HTTP {s} to a notification"
            ))),
        }
    }

    /// Opens the upstream's server-to-client stream for this session and pipes it through as is.
    pub async fn open_stream(&self, session: &Session, client_headers: &HeaderMap) -> Result<Body, Error> {
        let resp = self
            .call(self.build(Method::GET, Some(session), client_headers, Bytes::new()))
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(Body::Upstream(resp.into_body())),
            StatusCode::METHOD_NOT_ALLOWED => Err(Error::NoStream),
            StatusCode::NOT_FOUND => Err(Error::SessionGone),
            s => Err(Error::Protocol(format!("the upstream answered HTTP {s} to GET"))),
        }
    }

    /// Ends the upstream session that belonged to this Tollgate session.
    pub async fn end_session(&self, session: &Session) {
        if session.upstream_session.get().is_none() {
            return;
        }
        let req = self.build(Method::DELETE, Some(session), &HeaderMap::new(), Bytes::new());
        match tokio::time::timeout(self.pools.connect_timeout, self.pools.get().request(req)).await {
            Ok(Ok(resp)) => tracing::debug!(status = %resp.status(), "ended the upstream session"),
            Ok(Err(e)) => tracing::warn!(error = %e, "ending the upstream session failed"),
            Err(_) => tracing::warn!("ending the upstream session timed out"),
        }
    }

    /// Whether the upstream accepts connections.
    pub async fn is_reachable(&self) -> bool {
        let host = self
            .url
            .host()
            .unwrap_or("127.0.0.1")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let https = self.url.scheme_str() == Some("https");
        let port = self.url.port_u16().unwrap_or(if https { 443 } else { 80 });
        matches!(
            tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((host.as_str(), port))
            )
            .await,
            Ok(Ok(_))
        )
    }
}

/// One pooled client per thread: a connection thread (see `server`) keeps its upstream
/// connections to itself, so that a call and its upstream exchange run on one thread.
struct Pools {
    /// The rustls config of an `https://` upstream.
    tls: Option<tokio_rustls::rustls::ClientConfig>,
    /// For a new connection, and for ending an upstream session.
    connect_timeout: Duration,
    by_thread: ThreadLocal<Pool>,
}

impl Pools {
    fn get(&self) -> &Pool {
        self.by_thread.get_or(|| {
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.set_connect_timeout(Some(self.connect_timeout));
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(256);
            match &self.tls {
                Some(tls) => {
                    http.enforce_http(false);
                    let connector = HttpsConnectorBuilder::new()
                        .with_tls_config(tls.clone())
                        .https_only()
                        .enable_http1()
                        .wrap_connector(http);
                    Pool::Https(builder.build(connector))
                }
                None => Pool::Http(builder.build(http)),
            }
        })
    }
}

/// The pooled client: plain TCP for an `http://` upstream (no TLS connector to clone and drop on
/// every request), rustls for an `https://` one.
enum Pool {
    Http(Client<HttpConnector, Full<Bytes>>),
    Https(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
}

impl Pool {
    fn request(&self, req: Request<Full<Bytes>>) -> hyper_util::client::legacy::ResponseFuture {
        match self {
            Pool::Http(c) => c.request(req),
            Pool::Https(c) => c.request(req),
        }
    }
}

/// Reads an upstream SSE answer in a task of its own and hands on each JSON-RPC message as it
/// arrives; stops after the response to `client_id`. Empty (priming) events are skipped, never parsed.
fn pump(mut body: hyper::body::Incoming, client_id: Value) -> Replies {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut parser = sse::Parser::new();
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "the upstream's event stream broke");
                    return;
                }
            };
            let Some(data) = frame.data_ref() else { continue };
            for event in parser.push(data) {
                if event.data.trim().is_empty() {
                    continue;
                }
                let msg = match Message::parse(event.data.as_bytes()) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "the upstream sent an event that is not a JSON-RPC message; skipped");
                        continue;
                    }
                };
                let done = msg.is_response() && msg.id() == Some(&client_id);
                if tx.send(msg).is_err() || done {
                    return;
                }
            }
        }
    });
    Replies {
        rx,
        streamable: true,
        _guard: None,
    }
}
