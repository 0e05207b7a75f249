//! The HTTP server: accepts connections on a bound listener, serves HTTP/1.1 with a header read
//! timeout, expires idle sessions, and shuts down gracefully (in-flight requests drain, open
//! streams end, then the upstream stops).

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::deadline::Deadline;
use crate::proxy::{self, AppState};

/// A deadline far enough away to mean "not armed".
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Serves until `shutdown` completes, then drains.
pub async fn run(listener: TcpListener, state: AppState, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true);
    let header_timeout = state.config().server.header_read_timeout;
    let conns = Connections::default();

    let reaper = {
        let state = state.clone();
        let every =
            (state.config().sessions.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                state.expire_idle_sessions().await;
            }
        })
    };

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let timer = Arc::new(HeaderTimer {
            reading: AtomicBool::new(false),
            deadline: state.deadlines().register(NEVER),
            timeout: header_timeout,
        });
        let io = TimedIo {
            io: stream,
            timer: timer.clone(),
        };
        let state = state.clone();
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            // The request's headers are in: the header clock stops.
            timer.reading.store(false, Ordering::Release);
            let state = state.clone();
            async move { Ok::<_, Infallible>(proxy::handle(&state, req, peer.ip()).await) }
        });
        let conn = http.serve_connection(TokioIo::new(io), svc);
        let watch = conns.track();
        tokio::spawn(async move {
            let mut conn = pin!(conn);
            let mut closing = false;
            let result = std::future::poll_fn(|cx| {
                // One atomic load per poll: no lock shared by every connection on the hot path.
                watch.waker.register(cx.waker());
                if !closing && watch.shutting_down() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                conn.as_mut().poll(cx)
            })
            .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(watch);
        });
    }

    tracing::info!("shutting down: draining in-flight requests");
    drop(listener);
    reaper.abort();
    state.sessions().close_all();
    let grace = state.config().server.shutdown_timeout;
    if tokio::time::timeout(grace, conns.shutdown()).await.is_err() {
        tracing::warn!(?grace, "some connections did not drain in time");
    }
    state.upstream().shutdown();
    Ok(())
}

/// The live connections, so that a shutdown can ask each to finish its request and close.
///
/// Each connection polls an `AtomicBool` and registers its waker in its own `AtomicWaker`, so the
/// hot path takes no lock; the map is touched only when a connection opens or closes.
#[derive(Default)]
struct Connections {
    inner: Arc<ConnectionsInner>,
}

#[derive(Default)]
struct ConnectionsInner {
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    wakers: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
    /// Notified when the last connection closes.
    drained: Notify,
}

/// One connection's membership; dropping it removes the connection.
struct ConnectionWatch {
    id: u64,
    waker: Arc<AtomicWaker>,
    inner: Arc<ConnectionsInner>,
}

impl ConnectionWatch {
    fn shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionWatch {
    fn drop(&mut self) {
        let mut map = self.inner.wakers.lock().unwrap();
        map.remove(&self.id);
        if map.is_empty() {
            self.inner.drained.notify_waiters();
        }
    }
}

impl Connections {
    fn track(&self) -> ConnectionWatch {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        self.inner.wakers.lock().unwrap().insert(id, waker.clone());
        ConnectionWatch {
            id,
            waker,
            inner: self.inner.clone(),
        }
    }

    /// Asks every connection to close after its in-flight request, and waits until all have.
    async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        loop {
            let drained = self.inner.drained.notified();
            let mut drained = pin!(drained);
            drained.as_mut().enable();
            {
                let map = self.inner.wakers.lock().unwrap();
                if map.is_empty() {
                    return;
                }
                for w in map.values() {
                    w.wake();
                }
            }
            // Re-check now and then in case a connection was mid-poll when woken.
            let _ = tokio::time::timeout(Duration::from_millis(100), drained).await;
        }
    }
}

/// The header read timeout of one connection: armed when the first bytes of a request arrive,
/// stopped when the request reaches the service. A client that trickles its headers is cut off.
struct HeaderTimer {
    reading: AtomicBool,
    deadline: Deadline,
    timeout: Duration,
}

pin_project_lite::pin_project! {
    /// A connection's socket, read under its [`HeaderTimer`].
    struct TimedIo<T> {
        #[pin]
        io: T,
        timer: Arc<HeaderTimer>,
    }
}

impl<T: AsyncRead> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let timer = &**this.timer;
        if timer.reading.load(Ordering::Acquire) && timer.deadline.alarm().poll_fired(cx) {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request headers did not arrive in time",
            )));
        }
        let before = buf.filled().len();
        let r = this.io.poll_read(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && !timer.reading.swap(true, Ordering::AcqRel)
        {
            timer.deadline.reset(timer.timeout);
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Serves `GET /metrics` (and nothing else) on its own listener, without the admin key: for a
/// Prometheus on a private network. Runs until the process ends.
pub async fn run_metrics(listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let r = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                crate::admin::metrics_text()
            } else {
                crate::body::status(hyper::StatusCode::NOT_FOUND)
            };
            Ok::<_, Infallible>(r)
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
