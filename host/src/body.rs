//! The HTTP response body Tollgate sends: a whole buffer, a stream of SSE frames fed by a channel, or
//! an upstream body piped through untouched.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
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

/// A JSON response with the given status.
pub fn json(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, APPLICATION_JSON);
    r
}

/// A `text/event-stream` response; `no-cache` so that no intermediary buffers it.
pub fn sse(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, TEXT_EVENT_STREAM);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// An empty response with the given status.
pub fn status(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}
