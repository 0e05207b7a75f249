//! The HTTP server: accepts connections on a bound listener, serves HTTP/1.1 with a header read
//! timeout, expires idle sessions, and shuts down gracefully (in-flight requests drain, open
//! streams end, then the upstream stops).

use std::convert::Infallible;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::proxy::{self, AppState};

/// Serves until `shutdown` completes, then drains.
pub async fn run(listener: TcpListener, state: AppState, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(state.config().server.header_read_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();

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
        let state = state.clone();
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(proxy::handle(&state, req).await) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    tracing::info!("shutting down: draining in-flight requests");
    drop(listener);
    reaper.abort();
    state.sessions().close_all();
    let grace = state.config().server.shutdown_timeout;
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(?grace, "some connections did not drain in time");
    }
    state.upstream().shutdown();
    Ok(())
}
