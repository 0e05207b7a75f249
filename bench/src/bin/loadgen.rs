//! A closed-loop load generator for MCP `tools/call` over Streamable HTTP.
//!
//! `loadgen --url URL --concurrency C --seconds S` opens C keep-alive connections, initializes one
//! MCP session, then has each connection send `tools/call echo` back to back for S seconds (after a
//! warm-up). Prints one JSON line: throughput, p50/p90/p99 latency (µs), errors.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
struct Args {
    /// The MCP endpoint, e.g. http://127.0.0.1:3402/mcp
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// A label for the output.
    #[arg(long, default_value = "")]
    label: String,
    /// Extra header `name: value` (repeatable), e.g. an API key.
    #[arg(long = "header")]
    headers: Vec<String>,
}

struct Target {
    host: String,
    authority: String,
    path: String,
    session: Option<String>,
    headers: Vec<(String, String)>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(t: &Target) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(&t.host).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn post(sender: &mut Sender, t: &Target, body: Bytes) -> anyhow::Result<(hyper::http::HeaderMap, Bytes)> {
    let mut req = Request::post(&t.path)
        .header("host", &t.authority)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(s) = &t.session {
        req = req
            .header("mcp-session-id", s)
            .header("mcp-protocol-version", "2025-11-25");
    }
    for (k, v) in &t.headers {
        req = req.header(k, v);
    }
    sender.ready().await?;
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok((headers, body))
}

async fn worker(t: &Target, until_warm: Instant, until: Instant) -> anyhow::Result<(Histogram<u64>, u64, u64)> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut sender = connect(t).await?;
    let mut errors = 0;
    let mut n = 0u64;
    loop {
        n += 1;
        let body = Bytes::from(format!(
            r#"{{"jsonrpc":"2.0","id":{n},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"hello"}}}}}}"#
        ));
        let start = Instant::now();
        let ok = match post(&mut sender, t, body).await {
            Ok((_, b)) => memchr_hello(&b),
            Err(_) => {
                sender = connect(t).await?;
                false
            }
        };
        let end = Instant::now();
        if end >= until {
            break;
        }
        if start >= until_warm {
            if ok {
                hist.record((end - start).as_nanos() as u64)?;
            } else {
                errors += 1;
            }
        }
    }
    let count = hist.len();
    Ok((hist, count, errors))
}

fn memchr_hello(b: &[u8]) -> bool {
    b.windows(5).any(|w| w == b"hello") && !b.windows(8).any(|w| w == b"\"error\":")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let uri: hyper::Uri = args.url.parse()?;
    let authority = uri.authority().context("url needs host:port")?.to_string();
    let mut target = Target {
        host: authority.clone(),
        authority,
        path: uri.path().to_string(),
        session: None,
        headers: args
            .headers
            .iter()
            .map(|h| {
                let (k, v) = h.split_once(':').expect("header as name: value");
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect(),
    };
    // One thread: the load generator shares the machine's two cores with what it measures.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut s = connect(&target).await?;
        let (headers, _) = post(
            &mut s,
            &target,
            Bytes::from_static(
                br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"loadgen","version":"1"}}}"#,
            ),
        )
        .await?;
        target.session = headers
            .get("mcp-session-id")
            .map(|v| v.to_str().unwrap().to_string());
        post(&mut s, &target, Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#))
            .await?;
        let start = Instant::now();
        let until_warm = start + Duration::from_secs_f64(args.warmup);
        let until = until_warm + Duration::from_secs_f64(args.seconds);
        let target = std::rc::Rc::new(target);
        let local = tokio::task::LocalSet::new();
        let results = local
            .run_until(async move {
                let handles: Vec<_> = (0..args.concurrency)
                    .map(|_| {
                        let t = target.clone();
                        tokio::task::spawn_local(async move { worker(&t, until_warm, until).await })
                    })
                    .collect();
                let mut out = Vec::new();
                for h in handles {
                    out.push(h.await.expect("worker panicked"));
                }
                out
            })
            .await;
        let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
        let mut errors = 0;
        for r in results {
            let (h, _, e) = r?;
            total.add(h)?;
            errors += e;
        }
        let rps = total.len() as f64 / args.seconds;
        println!(
            r#"{{"label":"{}","concurrency":{},"requests":{},"errors":{},"rps":{:.1},"p50_us":{:.1},"p90_us":{:.1},"p99_us":{:.1}}}"#,
            args.label,
            args.concurrency,
            total.len(),
            errors,
            rps,
            total.value_at_quantile(0.5) as f64 / 1000.0,
            total.value_at_quantile(0.9) as f64 / 1000.0,
            total.value_at_quantile(0.99) as f64 / 1000.0,
        );
        Ok(())
    })
}
