//! The yardstick: a minimal JSON-aware pass-through proxy, the floor for any gateway that parses
//! MCP messages. It reads the body, parses it as JSON, forwards it with a pooled keep-alive client
//! (passing the MCP session and version headers), and returns the upstream's answer as is.
//!
//! By default it runs on tokio's multi-threaded runtime. `--per-core N` runs N threads instead, each
//! with a single-threaded runtime and a client of its own, all accepting on the listener: the
//! floor for a gateway built that way (as Tollgate is since session 15; see BENCHMARKS.md).
//!
//! Usage: `yardstick [--per-core N] --listen 127.0.0.1:0 --upstream http://127.0.0.1:PORT/mcp`;
//! prints its address.

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    #[arg(long)]
    upstream: hyper::Uri,
    /// Threads with a single-threaded runtime each, instead of one multi-threaded runtime.
    #[arg(long)]
    per_core: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = std::net::TcpListener::bind(&args.listen)?;
    listener.set_nonblocking(true)?;
    println!("yardstick listening on http://{}/mcp", listener.local_addr()?);
    std::io::stdout().flush()?;
    let Some(n) = args.per_core else {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return rt.block_on(serve(listener, args.upstream));
    };
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (listener, upstream) = (listener.try_clone()?, args.upstream.clone());
            Ok(std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(serve(listener, upstream))
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    for t in threads {
        t.join().expect("a yardstick thread panicked")?;
    }
    Ok(())
}

async fn serve(listener: std::net::TcpListener, upstream: hyper::Uri) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let client = client.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let client = client.clone();
                let upstream = upstream.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"bad json")));
                        *r.status_mut() = StatusCode::BAD_REQUEST;
                        return Ok::<_, Infallible>(r);
                    };
                    let mut fwd = Request::post(upstream);
                    for name in ["content-type", "accept", "mcp-session-id", "mcp-protocol-version"] {
                        if let Some(v) = parts.headers.get(name) {
                            fwd = fwd.header(name, v);
                        }
                    }
                    let fwd = fwd
                        .body(Full::new(Bytes::from(serde_json::to_vec(&json).unwrap())))
                        .unwrap();
                    match client.request(fwd).await {
                        Ok(resp) => {
                            let (parts, body) = resp.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            Ok(Response::from_parts(parts, Full::new(body)))
                        }
                        Err(_) => {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"upstream error")));
                            *r.status_mut() = StatusCode::BAD_GATEWAY;
                            Ok(r)
                        }
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
