//! The HTTP server: accepts connections on a bound listener, serves HTTP/1.1 with a header read
//! timeout, expires idle sessions, and shuts down gracefully (in-flight requests drain, open
//! streams end, then the upstream stops).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
///
/// Connections are accepted here and each is handed to one of the connection threads (see
/// [`IoThreads`]), which serves it to the end.
pub async fn run(listener: TcpListener, state: AppState, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let conns = Connections::default();
    let io = IoThreads::start(state.config().server.threads, &state)?;

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
        match stream.into_std() {
            Ok(stream) => io.hand_over(stream, peer, conns.track()),
            Err(e) => tracing::warn!(%peer, error = %e, "could not hand over a connection"),
        }
    }

    tracing::info!("shutting down: draining in-flight requests");
    drop(listener);
    reaper.abort();
    state.sessions().close_all();
    let grace = state.config().server.shutdown_timeout;
    if tokio::time::timeout(grace, conns.shutdown()).await.is_err() {
        tracing::warn!(?grace, "some connections did not drain in time");
    }
    // What is still open after the grace period ends with the threads' runtimes.
    let _ = tokio::task::spawn_blocking(move || io.stop()).await;
    state.upstream().shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// A connection handed to a connection thread.
type Handover = (std::net::TcpStream, SocketAddr, ConnectionWatch);

/// The connection threads. Each runs a single-threaded runtime and serves the connections handed
/// to it, from their first request to their close: a request, its upstream call (through the
/// thread's own pool of upstream connections) and its answer all run on one thread, without
/// waking another. On this project's two-core test machine, waking a thread on the other core
/// was most of what a call through the gateway cost at concurrency 1 (see BENCHMARKS.md,
/// session 15). A new connection goes to the thread with the fewest open ones.
struct IoThreads {
    threads: Vec<IoThread>,
    next: AtomicUsize,
}

struct IoThread {
    tx: tokio::sync::mpsc::UnboundedSender<Handover>,
    open: Arc<AtomicUsize>,
    handle: std::thread::JoinHandle<()>,
}

impl IoThreads {
    fn start(n: usize, state: &AppState) -> std::io::Result<IoThreads> {
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Handover>();
            let open = Arc::new(AtomicUsize::new(0));
            let (state, count) = (state.clone(), open.clone());
            let handle = std::thread::Builder::new()
                .name(format!("tollgate-io-{i}"))
                .spawn(move || {
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.keep_alive(true);
                    rt.block_on(async move {
                        while let Some((stream, peer, watch)) = rx.recv().await {
                            let stream = match tokio::net::TcpStream::from_std(stream) {
                                Ok(s) => s,
                                Err(e) => {
                                    count.fetch_sub(1, Ordering::Relaxed);
                                    tracing::warn!(%peer, error = %e, "could not take over a connection");
                                    continue;
                                }
                            };
                            let conn = serve_connection(&http, stream, peer, state.clone(), watch);
                            let count = count.clone();
                            tokio::spawn(async move {
                                conn.await;
                                count.fetch_sub(1, Ordering::Relaxed);
                            });
                        }
                    });
                })?;
            threads.push(IoThread { tx, open, handle });
        }
        Ok(IoThreads {
            threads,
            next: AtomicUsize::new(0),
        })
    }

    /// Hands a connection to the thread with the fewest open ones (ties go round).
    fn hand_over(&self, stream: std::net::TcpStream, peer: SocketAddr, watch: ConnectionWatch) {
        let n = self.threads.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let t = (0..n)
            .map(|k| &self.threads[(first + k) % n])
            .min_by_key(|t| t.open.load(Ordering::Relaxed))
            .expect("at least one connection thread");
        t.open.fetch_add(1, Ordering::Relaxed);
        if t.tx.send((stream, peer, watch)).is_err() {
            t.open.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(%peer, "a connection thread has stopped; connection dropped");
        }
    }

    /// Ends the threads: each drops what it still serves.
    fn stop(self) {
        for t in self.threads {
            drop(t.tx);
            let _ = t.handle.join();
        }
    }
}

/// Serves one connection to its end, under the header read timeout and the graceful shutdown.
fn serve_connection(
    http: &hyper::server::conn::http1::Builder,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: AppState,
    watch: ConnectionWatch,
) -> impl Future<Output = ()> + use<> {
    let timer = Arc::new(HeaderTimer {
        reading: AtomicBool::new(false),
        deadline: state.deadlines().register(NEVER),
        timeout: state.config().server.header_read_timeout,
    });
    let io = TimedIo {
        io: stream,
        timer: timer.clone(),
    };
    let ip = peer.ip();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        // The request's headers are in: the header clock stops.
        timer.reading.store(false, Ordering::Release);
        let state = state.clone();
        async move { Ok::<_, Infallible>(proxy::handle(&state, req, ip).await) }
    });
    let conn = http.serve_connection(TokioIo::new(io), svc);
    async move {
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
    }
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
