//! A closed-loop load generator for MCP `tools/call` over Streamable HTTP.
//!
//! `loadgen --url URL --concurrency C --seconds S` opens C keep-alive connections, initializes one
//! MCP session, then has each connection send `tools/call echo` back to back for S seconds (after a
//! warm-up). Prints one JSON line: throughput, p50/p90/p99 latency (µs), errors.
//!
//! `loadgen --target LABEL=URL --target LABEL2=URL2 … --slice 1` compares targets *interleaved*:
//! each target gets its own session and C connections, and the load moves from target to target
//! every slice (the order rotated each pass, a short idle gap between slices, the first 0.1 s of
//! each slice not measured), until each target has had S measured seconds. This machine's speed swings by ±20 % within seconds and drifts over
//! tens of seconds: five copies of one gateway, each loaded for 2 s in turn, six rounds, had
//! medians from 83 to 102 % of a sixth copy's. Slices of half a second spread the swings evenly
//! over all targets: two copies then agree within ±3 % (three runs of 15 s each). Prints
//! one JSON line per target. `--target-header LABEL=name: value` adds a header to one target's
//! requests. With `LOADGEN_SLICES=1` in the environment, each slice's calls/s go to stderr.

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
    /// The MCP endpoint, e.g. http://127.0.0.1:3402/mcp (one target; or use --target).
    #[arg(long, required_unless_present = "targets")]
    url: Option<String>,
    /// A target to compare, `LABEL=URL` (repeatable): the targets are loaded interleaved.
    #[arg(long = "target", conflicts_with = "url")]
    targets: Vec<String>,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured seconds (per target).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up seconds (per target, not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// With --target: the seconds each target is loaded before the load moves to the next.
    #[arg(long, default_value_t = 1.0)]
    slice: f64,
    /// With --target: idle seconds between slices (the last target's after-work settles).
    #[arg(long, default_value_t = 0.1)]
    gap: f64,
    /// With --target: seconds at the start of each slice that are not measured (a target that sat
    /// idle while the others were loaded answers its first calls from cold caches and parked
    /// threads: at c=1 that alone moved p99 from ~0.6 to ~1.4 ms).
    #[arg(long, default_value_t = 0.1)]
    slice_warmup: f64,
    /// A label for the output (with --url).
    #[arg(long, default_value = "")]
    label: String,
    /// Extra header `name: value` (repeatable), e.g. an API key (with --url).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Extra header for one target, `LABEL=name: value` (repeatable; with --target).
    #[arg(long = "target-header")]
    target_headers: Vec<String>,
    /// Calls from N consumers: `{n}` in a header value becomes, call by call, each of 0..N in a
    /// scrambled order (so consecutive calls come from keys far apart), e.g.
    /// `--key-cycle 100000 --header "x-api-key: tg_bench_{n}"` over `seed --known 100000` keys.
    #[arg(long, default_value_t = 1)]
    key_cycle: u64,
}

/// `--key-cycle`, and how many calls have taken a number from it.
static KEY_CYCLE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
static KEY_NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `value` with `{n}` replaced by the next consumer's number: a multiplication by a prime modulo
/// N visits every number below N once per N calls.
fn next_consumer(value: &str) -> String {
    let n = *KEY_CYCLE.get().unwrap_or(&1);
    let i = KEY_NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    value.replace("{n}", &((i % n) * 2_654_435_761 % n).to_string())
}

struct Target {
    label: String,
    host: String,
    authority: String,
    path: String,
    session: Option<String>,
    headers: Vec<(String, String)>,
}

impl Target {
    fn new(label: &str, url: &str) -> anyhow::Result<Target> {
        let uri: hyper::Uri = url.parse().with_context(|| format!("target {label}: bad url {url}"))?;
        let authority = uri.authority().context("url needs host:port")?.to_string();
        Ok(Target {
            label: label.to_string(),
            host: authority.clone(),
            authority,
            path: uri.path().to_string(),
            session: None,
            headers: Vec::new(),
        })
    }

    /// Initializes the target's MCP session.
    async fn initialize(&mut self) -> anyhow::Result<()> {
        let mut s = connect(self).await?;
        let (headers, _) = post(
            &mut s,
            self,
            Bytes::from_static(
                br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"loadgen","version":"1"}}}"#,
            ),
            true,
        )
        .await
        .with_context(|| format!("initializing {}", self.label))?;
        self.session = headers.get("mcp-session-id").map(|v| v.to_str().unwrap().to_string());
        post(
            &mut s,
            self,
            Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            true,
        )
        .await?;
        Ok(())
    }
}

fn header(h: &str) -> (String, String) {
    let (k, v) = h.split_once(':').expect("header as name: value");
    (k.trim().to_string(), v.trim().to_string())
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(t: &Target) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(&t.host).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::task::spawn_local(conn);
    Ok(sender)
}

/// Posts `body` with the target's headers; `opening`: the session's initialize, which goes without
/// the `--key-cycle` headers (a session started with a key answers to that key alone, and one
/// session carries every consumer's calls here).
async fn post(
    sender: &mut Sender,
    t: &Target,
    body: Bytes,
    opening: bool,
) -> anyhow::Result<(hyper::http::HeaderMap, Bytes)> {
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
        if v.contains("{n}") {
            if !opening {
                req = req.header(k, next_consumer(v));
            }
        } else {
            req = req.header(k, v);
        }
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

/// One target's tally: latencies of the calls that succeeded within measured time, and errors.
struct Tally {
    hist: Histogram<u64>,
    errors: u64,
    measured: Duration,
}

impl Tally {
    fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3)?,
            errors: 0,
            measured: Duration::ZERO,
        })
    }

    fn print(&self, label: &str, concurrency: usize) {
        let secs = self.measured.as_secs_f64();
        println!(
            r#"{{"label":"{}","concurrency":{},"requests":{},"errors":{},"rps":{:.1},"p50_us":{:.1},"p90_us":{:.1},"p99_us":{:.1}}}"#,
            label,
            concurrency,
            self.hist.len(),
            self.errors,
            self.hist.len() as f64 / secs,
            self.hist.value_at_quantile(0.5) as f64 / 1000.0,
            self.hist.value_at_quantile(0.9) as f64 / 1000.0,
            self.hist.value_at_quantile(0.99) as f64 / 1000.0,
        );
    }
}

/// One connection's calls, back to back, from now until `until`; a call that ends at or after
/// `until` is not counted. Calls that start before `until_warm` are not counted either. Returns
/// the connection for the next slice.
async fn worker(
    t: &Target,
    mut sender: Sender,
    until_warm: Instant,
    until: Instant,
    tally: &std::cell::RefCell<Tally>,
) -> anyhow::Result<Sender> {
    let mut n = 0u64;
    loop {
        n += 1;
        let body = Bytes::from(format!(
            r#"{{"jsonrpc":"2.0","id":{n},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"hello"}}}}}}"#
        ));
        let start = Instant::now();
        let ok = match post(&mut sender, t, body, false).await {
            Ok((_, b)) => memchr_hello(&b),
            Err(_) => {
                sender = connect(t).await?;
                false
            }
        };
        let end = Instant::now();
        if end >= until {
            return Ok(sender);
        }
        if start >= until_warm {
            let mut tally = tally.borrow_mut();
            if ok {
                tally.hist.record((end - start).as_nanos() as u64)?;
            } else {
                tally.errors += 1;
            }
        }
    }
}

/// One target, its connections and its tally.
struct Slot {
    target: std::rc::Rc<Target>,
    senders: Vec<Sender>,
    tally: std::rc::Rc<std::cell::RefCell<Tally>>,
}

impl Slot {
    /// Loads the target with all its connections for `warm + measured`, counting only `measured`.
    async fn slice(&mut self, warm: Duration, measured: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let until_warm = start + warm;
        let until = until_warm + measured;
        let handles: Vec<_> = std::mem::take(&mut self.senders)
            .into_iter()
            .map(|s| {
                let t = self.target.clone();
                let tally = self.tally.clone();
                tokio::task::spawn_local(async move { worker(&t, s, until_warm, until, &tally).await })
            })
            .collect();
        let before = self.tally.borrow().hist.len();
        for h in handles {
            self.senders.push(h.await.expect("worker panicked")?);
        }
        let mut tally = self.tally.borrow_mut();
        if std::env::var_os("LOADGEN_SLICES").is_some() && !measured.is_zero() {
            let calls = tally.hist.len() - before;
            eprintln!("{} {:.0}", self.target.label, calls as f64 / measured.as_secs_f64());
        }
        tally.measured += measured;
        Ok(())
    }

    fn measured(&self) -> Duration {
        self.tally.borrow().measured
    }
}

fn memchr_hello(b: &[u8]) -> bool {
    b.windows(5).any(|w| w == b"hello") && !b.windows(8).any(|w| w == b"\"error\":")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    KEY_CYCLE.set(args.key_cycle.max(1)).expect("set once");
    let mut targets = Vec::new();
    if let Some(url) = &args.url {
        let mut t = Target::new(&args.label, url)?;
        t.headers = args.headers.iter().map(|h| header(h)).collect();
        targets.push(t);
    }
    for spec in &args.targets {
        let (label, url) = spec.split_once('=').context("--target LABEL=URL")?;
        targets.push(Target::new(label, url)?);
    }
    for spec in &args.target_headers {
        let (label, h) = spec.split_once('=').context("--target-header LABEL=name: value")?;
        let t = targets
            .iter_mut()
            .find(|t| t.label == label)
            .with_context(|| format!("no target {label}"))?;
        t.headers.push(header(h));
    }
    let interleaved = args.url.is_none();
    // One thread: the load generator shares the machine's two cores with what it measures.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut slots = Vec::with_capacity(targets.len());
        for mut t in targets {
            t.initialize().await?;
            let mut senders = Vec::with_capacity(args.concurrency);
            for _ in 0..args.concurrency {
                senders.push(connect(&t).await?);
            }
            let tally = std::rc::Rc::new(std::cell::RefCell::new(Tally::new()?));
            slots.push(Slot {
                target: std::rc::Rc::new(t),
                senders,
                tally,
            });
        }
        let warm = Duration::from_secs_f64(args.warmup);
        let measured = Duration::from_secs_f64(args.seconds);
        if !interleaved {
            slots[0].slice(warm, measured).await?;
        } else {
            // A warm-up slice for each target, then passes of one slice each, the order rotated.
            let slice_len = Duration::from_secs_f64(args.slice).min(measured);
            let gap = Duration::from_secs_f64(args.gap);
            let slice_warm = Duration::from_secs_f64(args.slice_warmup);
            for slot in &mut slots {
                slot.slice(warm, Duration::ZERO).await?;
                tokio::time::sleep(gap).await;
            }
            let n = slots.len();
            let mut pass = 0;
            while slots.iter().any(|s| s.measured() < measured) {
                for k in 0..n {
                    let slot = &mut slots[(pass + k) % n];
                    let left = measured.saturating_sub(slot.measured());
                    if left.is_zero() {
                        continue;
                    }
                    slot.slice(slice_warm, slice_len.min(left)).await?;
                    tokio::time::sleep(gap).await;
                }
                pass += 1;
            }
        }
        for slot in &slots {
            slot.tally.borrow().print(&slot.target.label, args.concurrency);
        }
        Ok(())
    })
}
