//! HTTP bodies: the response body Tollgate sends (a whole buffer, a stream of SSE frames fed by a
//! channel, or an upstream body piped through untouched), and reading a request body under a limit.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use tokio::sync::mpsc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body.
pub enum Body {
    /// The whole body at once (taken on first poll).
    Full(Option<Bytes>),
    /// Chunks as they are produced; the body ends when every sender is dropped.
    Channel(mpsc::Receiver<Bytes>),
    /// An upstream response body, passed through as it arrives.
    Upstream(hyper::body::Incoming),
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        Body::Full(Some(b))
    }
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Body {
        Body::Full(Some(Bytes::from(b)))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Channel(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
            Body::Upstream(inc) => Pin::new(inc).poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_none(),
            Body::Channel(_) => false,
            Body::Upstream(inc) => inc.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Channel(_) => SizeHint::default(),
            Body::Upstream(inc) => inc.size_hint(),
        }
    }
}

pub const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
pub const TEXT_EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");

/// Room for this many headers in every response's header map. hyper keeps a connection's last
/// response header map to parse the next request's headers into, growing it if it holds too few
/// (measured: a map grown from empty holds 6, so a request with one header more — an API key —
/// reallocated and rehashed it on every call). Clients that send a user agent, encodings and
/// the like besides the MCP headers and a key need more than the benchmark's seven.
const HEADER_ROOM: usize = 16;

/// A response with room for a request's headers in its header map (see [`HEADER_ROOM`]).
fn response(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    r.headers_mut().reserve(HEADER_ROOM);
    r
}

/// A JSON response with the given status.
pub fn json(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    let mut r = response(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, APPLICATION_JSON);
    r
}

/// A `text/event-stream` response; `no-cache` so that no intermediary buffers it.
pub fn sse(body: Body) -> Response<Body> {
    let mut r = response(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, TEXT_EVENT_STREAM);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// An empty response with the given status.
pub fn status(status: StatusCode) -> Response<Body> {
    let mut r = response(Body::empty());
    *r.status_mut() = status;
    r
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// Larger than the limit (announced or streamed).
    TooLarge,
    /// The connection failed while the body was being read.
    Failed(String),
}

/// How much of an oversize body is read and thrown away before the 413 goes out, and for how long
/// at most. A connection closed while the client is still sending makes its write fail (a broken
/// pipe), and most clients then report that instead of the answer; reading the rest first lets
/// them see the 413. Bodies announced beyond this are refused at once.
const DRAIN_BYTES: usize = 8 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads a whole request body of at most `limit` bytes. The usual one-frame body is kept as it
/// came, without a copy. An oversize one is drained (see [`DRAIN_BYTES`]) before the error returns.
pub async fn read_limited(
    headers: &HeaderMap,
    mut body: hyper::body::Incoming,
    limit: usize,
) -> Result<Bytes, ReadError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH)
        && let Some(len) = len.to_str().ok().and_then(|l| l.parse::<u64>().ok())
        && len > limit as u64
    {
        if len <= DRAIN_BYTES as u64 {
            drain(&mut body, DRAIN_BYTES).await;
        }
        return Err(ReadError::TooLarge);
    }
    // Limited over a borrow, so that an oversize body can still be drained.
    match Limited::new(&mut body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            drain(&mut body, DRAIN_BYTES.saturating_sub(limit)).await;
            Err(ReadError::TooLarge)
        }
        Err(e) => Err(ReadError::Failed(e.to_string())),
    }
}

/// Reads and discards up to `bytes` more of `body`, for at most [`DRAIN_TIME`].
async fn drain(body: &mut hyper::body::Incoming, bytes: usize) {
    let mut left = bytes;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while left > 0
            && !body.is_end_stream()
            && let Some(Ok(frame)) = body.frame().await
        {
            left = left.saturating_sub(frame.data_ref().map_or(0, Bytes::len));
        }
    })
    .await;
}
