//! The upstream MCP server: a closed set of kinds (a stdio child or a remote Streamable HTTP server)
//! behind one interface the proxy calls.

pub mod http;
pub mod stdio;

use std::time::Duration;

use ::http::HeaderMap;
use tokio::sync::mpsc;

use crate::body::Body;
use crate::config::{Config, UpstreamKind};
use crate::jsonrpc::Message;
use crate::session::{Session, Sessions};

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream answered with invalid MCP: {0}")]
    Protocol(String),
    #[error("upstream closed while the call was in flight")]
    Closed,
    #[error("the upstream ended this session")]
    SessionGone,
    #[error("the upstream offers no server-to-client stream")]
    NoStream,
}

/// What the upstream answered to a request.
pub enum Reply {
    /// The final response, with the client's id.
    Done(Message),
    /// The final response as the upstream sent it: checked to be a JSON-RPC response and passed
    /// through without re-encoding (an HTTP upstream's session is this client's alone, so the id is
    /// already the client's), with what the check saw.
    Raw(bytes::Bytes, Answer),
    /// Messages as they arrive (progress, server requests), ending with the final response.
    Stream(Replies),
}

/// What checking a passed-through response saw, so that settling a paid call need not read it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// It is a JSON-RPC error.
    pub error: bool,
    /// Where its `result` text is in the response's bytes.
    pub result: Option<std::ops::Range<usize>>,
}

/// A stream of messages belonging to one client request. Dropping it abandons the call: a stdio
/// upstream is told `notifications/cancelled`, an HTTP upstream's response is dropped.
pub struct Replies {
    rx: mpsc::UnboundedReceiver<Message>,
    /// The client should get these as SSE as they come (there is something to stream).
    pub streamable: bool,
    _guard: Option<stdio::CallGuard>,
}

impl Replies {
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

/// The configured upstream.
pub enum Upstream {
    Stdio(stdio::StdioUpstream),
    Http(Box<http::HttpUpstream>),
}

impl Upstream {
    /// Starts the upstream named by the config (a stdio child is spawned and initialized in the
    /// background; `is_ready` says when it is up). Fails only if an https client cannot be set up.
    pub fn start(config: &Config, sessions: Sessions) -> Result<Upstream, String> {
        Ok(match &config.upstream.kind {
            UpstreamKind::Stdio { .. } => Upstream::Stdio(stdio::StdioUpstream::start(&config.upstream, sessions)),
            UpstreamKind::Http { url, ca, headers } => Upstream::Http(Box::new(http::HttpUpstream::new(
                url.clone(),
                ca.as_deref(),
                headers.clone(),
                &config.upstream,
            )?)),
        })
    }

    /// Answers a client's `initialize` on a new session.
    pub async fn initialize(
        &self,
        session: &Session,
        headers: &HeaderMap,
        msg: Message,
        raw: bytes::Bytes,
    ) -> Result<Reply, Error> {
        match self {
            Upstream::Stdio(s) => s.initialize(session, msg).await,
            Upstream::Http(h) => h.send(Some(session), headers, msg, raw, true).await,
        }
    }

    /// Forwards a client request and returns what the upstream answers.
    pub async fn request(
        &self,
        session: &Session,
        headers: &HeaderMap,
        msg: Message,
        raw: bytes::Bytes,
    ) -> Result<Reply, Error> {
        match self {
            Upstream::Stdio(s) => s.request(session, msg).await,
            Upstream::Http(h) => h.send(Some(session), headers, msg, raw, false).await,
        }
    }

    /// Forwards a client notification or a client's response to a server request.
    pub async fn notify(
        &self,
        session: &Session,
        headers: &HeaderMap,
        msg: Message,
        raw: bytes::Bytes,
    ) -> Result<(), Error> {
        match self {
            Upstream::Stdio(s) => {
                s.notify(session, msg);
                Ok(())
            }
            Upstream::Http(h) => h.notify(session, headers, raw).await,
        }
    }

    /// Opens the session's server-to-client stream (`GET /mcp`).
    pub async fn open_stream(&self, session: &Session, headers: &HeaderMap) -> Result<Body, Error> {
        match self {
            Upstream::Stdio(s) => Ok(s.open_stream(session)),
            Upstream::Http(h) => h.open_stream(session, headers).await,
        }
    }

    /// The session has ended (DELETE, expiry): release what the upstream holds for it.
    pub async fn end_session(&self, session: &Session) {
        match self {
            Upstream::Stdio(s) => s.end_session(session),
            Upstream::Http(h) => h.end_session(session).await,
        }
    }

    /// Whether the upstream can take calls now (`/readyz`).
    pub async fn is_ready(&self) -> bool {
        match self {
            Upstream::Stdio(s) => s.is_ready(),
            Upstream::Http(h) => h.is_reachable().await,
        }
    }

    /// Answers `server/discover` (which needs no session): a stdio upstream's is built from the
    /// child's initialize result; an HTTP upstream is asked.
    pub async fn discover(&self, headers: &HeaderMap, msg: Message, raw: bytes::Bytes) -> Result<Reply, Error> {
        match self {
            Upstream::Stdio(s) => s.discover(&msg).await,
            Upstream::Http(h) => h.send(None, headers, msg, raw, false).await,
        }
    }

    /// Stops the upstream (kills a stdio child).
    pub fn shutdown(&self) {
        if let Upstream::Stdio(s) = self {
            s.shutdown();
        }
    }
}
