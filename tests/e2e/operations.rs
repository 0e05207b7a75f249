//! Operating the gateway, through the real binary: signed webhooks that lose nothing (receiver
//! down, dead letters and replay, `kill -9`), Prometheus metrics that match the calls made, one
//! log line per request with its id, and config reload (HTTP and SIGHUP).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::support::*;

const SECRET: &str = "whsec-e2e-0123456789abcdef";

/// A webhook receiver on loopback that checks every signature, as an operator's would.
struct Receiver {
    addr: std::net::SocketAddr,
    /// Every event received (duplicates kept, to count them).
    events: Arc<Mutex<Vec<Value>>>,
    /// When false, it answers 503.
    up: Arc<AtomicBool>,
    bad_signatures: Arc<AtomicUsize>,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    /// The most events one POST carried.
    largest_batch: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `header` is a valid `Tollgate-Signature` of `body` under `secret`.
fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    expected == v1
}

impl Receiver {
    async fn start(up: bool) -> Receiver {
        Receiver::start_with(up, None).await
    }

    /// A receiver behind TLS, with a certificate for `localhost` from a CA of its own; returns it
    /// and that CA's certificate (PEM).
    async fn start_tls() -> (Receiver, String) {
        let (acceptor, ca_pem) = localhost_tls();
        (Receiver::start_with(true, Some(acceptor)).await, ca_pem)
    }

    async fn start_with(up: bool, tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let up = Arc::new(AtomicBool::new(up));
        let bad_signatures = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let largest_batch = Arc::new(AtomicUsize::new(0));
        let (e, u, b, n) = (events.clone(), up.clone(), bad_signatures.clone(), connections.clone());
        let l = largest_batch.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                n.fetch_add(1, Ordering::SeqCst);
                let (e, u, b, l) = (e.clone(), u.clone(), b.clone(), l.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (e, u, b, l) = (e.clone(), u.clone(), b.clone(), l.clone());
                        async move {
                            let sig = req
                                .headers()
                                .get("tollgate-signature")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let status = if !u.load(Ordering::SeqCst) {
                                503
                            } else if !verify(SECRET, &sig, &body) {
                                b.fetch_add(1, Ordering::SeqCst);
                                401
                            } else {
                                let batch: Value = serde_json::from_slice(&body).unwrap();
                                let events = batch["events"].as_array().unwrap();
                                l.fetch_max(events.len(), Ordering::SeqCst);
                                e.lock().unwrap().extend(events.iter().cloned());
                                200
                            };
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Receiver {
            addr,
            events,
            up,
            bad_signatures,
            connections,
            largest_batch,
            task,
        }
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Usage events received, by request id, with how many times each came.
    fn usage(&self) -> HashMap<String, (usize, Value)> {
        let mut m: HashMap<String, (usize, Value)> = HashMap::new();
        for e in self.events().into_iter().filter(|e| e["type"] == "usage") {
            let id = e["data"]["requestId"].as_str().unwrap().to_string();
            m.entry(id).or_insert((0, e.clone())).0 += 1;
        }
        m
    }

    /// Waits until at least `n` distinct usage events have arrived; returns them.
    async fn await_usage(&self, n: usize, what: &str) -> HashMap<String, (usize, Value)> {
        eventually(Duration::from_secs(20), what, || async {
            let u = self.usage();
            (u.len() >= n).then_some(u)
        })
        .await
    }

    /// A `[[webhooks]]` section posting here.
    fn destination(&self, name: &str, extra: &str) -> String {
        format!(
            "[[webhooks]]\nname = {name:?}\nurl = \"http://{}/hook\"\nsecret = {SECRET:?}\n\
             allow_networks = [\"127.0.0.0/8\"]\nflush_interval_ms = 50\nretry_initial_ms = 50\nretry_max_ms = 200\n{extra}\n",
            self.addr
        )
    }
}

/// A billed `serve` config in front of the stdio fixture, with its data in `data`.
fn billed_config(data: &Path, extra: &str) -> String {
    format!(
        "[upstream]\ncommand = [{FIXTURE:?}, \"--stdio\"]\n[billing]\nadmin_key = {ADMIN_KEY:?}\ndata_dir = {:?}\n{extra}\n",
        data.display()
    )
}

async fn client(g: &Gateway, secret: &str) -> McpClient {
    let mut c = g.client();
    c.api_key = Some(secret.to_string());
    c.initialize().await;
    c
}

/// A tools/call; the gateway's request id (X-Request-Id) and whether it succeeded.
async fn paid_call(c: &McpClient, tool: &str) -> (String, bool) {
    let r = c
        .post(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {"text": "hi"}}}))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let v = read_answer(r).await;
    (id, v.get("result").is_some())
}

/// A billed gateway posting to one destination, a key, and the paid calls made with it.
struct Hooked {
    gateway: Gateway,
    /// The config it runs with (to restart on the same data).
    config: String,
    client: McpClient,
    /// The request ids of the calls made.
    made: HashSet<String>,
    _data: tempfile::TempDir,
}

impl Hooked {
    /// Starts a gateway posting to `rx` as `name` (with `extra` settings) and makes `calls` calls.
    async fn start(rx: &Receiver, name: &str, extra: &str, calls: usize) -> Hooked {
        let data = tempfile::tempdir().unwrap();
        let config = billed_config(data.path(), &rx.destination(name, extra));
        let gateway = Gateway::serve(&config).ready().await;
        let (_, secret) = gateway.admin().create_key("hooked", 1000).await;
        let client = client(&gateway, &secret).await;
        let mut made = HashSet::new();
        for _ in 0..calls {
            made.insert(paid_call(&client, "echo").await.0);
        }
        Hooked {
            gateway,
            config,
            client,
            made,
            _data: data,
        }
    }
}

/// `POST /admin/webhooks/{name}/replay`'s answer.
async fn replay(admin: &Admin, name: &str) -> Value {
    let r = admin
        .post(&format!("/admin/webhooks/{name}/replay"), &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn balance(admin: &Admin, id: &str) -> i64 {
    admin.key(id).await["credits"].as_i64().unwrap()
}

async fn webhooks_status(admin: &Admin) -> Value {
    let r = admin.get("/admin/webhooks").send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Waits until destination `name`'s status in `GET /admin/webhooks` passes `ready`; returns it.
async fn await_destination(admin: &Admin, name: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(20), what, || async {
        let s = webhooks_status(admin).await;
        let d = destination(&s, name).clone();
        ready(&d).then_some(d)
    })
    .await
}

fn destination<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no destination {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_settled_call_and_key_event_reaches_the_receiver_once_signed_and_filtered() {
    let all = Receiver::start(true).await;
    let partners = Receiver::start(true).await;
    let data = tempfile::tempdir().unwrap();
    let config = billed_config(
        data.path(),
        &format!(
            "{}{}",
            all.destination("all", "batch_size = 7"),
            partners.destination("partners", "events = [\"usage\"]\ntags = [\"partner\"]")
        ),
    );
    let g = Gateway::serve(&config).ready().await;
    let admin = g.admin();
    let (id, secret) = admin.create_key("alice", 1000).await;
    let (pid, psecret, _) = admin
        .create_key_with(json!({"name": "partner", "credits": 100, "tags": ["partner"]}))
        .await;
    let (short, _, _) = admin
        .create_key_with(json!({"name": "short-lived", "credits": 1, "expiresIn": 1}))
        .await;
    assert_eq!(admin.topup(&id, 50).await, 1050);
    let c = client(&g, &secret).await;
    let pc = client(&g, &psecret).await;

    // 30 kept calls, 5 refunded (the upstream fails them), 4 by the partner.
    let mut kept = HashSet::new();
    let mut refunded = HashSet::new();
    for i in 0..35 {
        let (rid, ok) = paid_call(&c, if i % 7 == 6 { "fail" } else { "echo" }).await;
        if ok {
            kept.insert(rid)
        } else {
            refunded.insert(rid)
        };
    }
    let mut partner_calls = HashSet::new();
    for _ in 0..4 {
        partner_calls.insert(paid_call(&pc, "echo").await.0);
    }
    assert_eq!((kept.len(), refunded.len()), (30, 5));
    for action in ["suspend", "resume", "rotate"] {
        assert_eq!(admin.action(&id, action).await.status(), 200);
    }
    let reload = admin.post("/admin/plugins/reload", &json!({})).send().await.unwrap();
    assert_eq!(reload.status(), 200);

    let want = 35 + 4;
    let usage = all.await_usage(want, "every usage event at the receiver").await;
    assert_eq!(usage.len(), want);
    for (rid, (times, e)) in &usage {
        assert_eq!(*times, 1, "usage event of {rid} delivered {times} times");
        assert_eq!(e["id"], format!("usage_{rid}"));
        let expected = if kept.contains(rid) || partner_calls.contains(rid) {
            ("allowed", 1)
        } else {
            assert!(refunded.contains(rid), "an event for a call nobody made: {rid}");
            ("refunded", 0)
        };
        assert_eq!(
            (
                e["data"]["outcome"].as_str().unwrap(),
                e["data"]["credits"].as_i64().unwrap()
            ),
            expected
        );
        assert!(!e["data"]["tool"].as_str().unwrap().is_empty());
    }
    let kinds = eventually(Duration::from_secs(10), "the key events", || async {
        let kinds: Vec<String> = all
            .events()
            .iter()
            .filter(|e| e["type"] != "usage" && e["data"]["keyId"] == id.as_str())
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        (kinds.len() >= 5).then_some(kinds)
    })
    .await;
    assert_eq!(
        kinds,
        [
            "key.created",
            "key.topup",
            "key.suspended",
            "key.resumed",
            "key.rotated"
        ]
    );
    eventually(Duration::from_secs(10), "the short-lived key's expiry", || async {
        all.events()
            .iter()
            .any(|e| e["type"] == "key.expired" && e["data"]["keyId"] == short.as_str())
            .then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "the plugin reload event", || async {
        all.events()
            .iter()
            .any(|e| e["type"] == "plugin.reloaded")
            .then_some(())
    })
    .await;
    let all_events = all.events();
    let ids: HashSet<&str> = all_events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all_events.len(), "every event id is unique");
    assert!(
        !all_events.iter().any(|e| e.to_string().contains(&secret)),
        "no event carries a key's secret"
    );

    // The filtered destination got the partner's usage and nothing else.
    let got = partners.await_usage(4, "the partner's usage").await;
    assert_eq!(got.keys().cloned().collect::<HashSet<_>>(), partner_calls);
    assert!(
        partners
            .events()
            .iter()
            .all(|e| e["data"]["keyId"] == pid.as_str() && e["type"] == "usage")
    );
    assert_eq!(all.bad_signatures.load(Ordering::SeqCst), 0);

    let received = all.events().len();
    let d = await_destination(&admin, "all", "the delivered count", |d| {
        d["delivered"].as_u64() == Some(received as u64)
    })
    .await;
    assert_eq!((d["pending"].as_i64(), d["deadLetters"].as_i64()), (Some(0), Some(0)));
    let m = scrape(&format!("{}/metrics", g.base), Some(ADMIN_KEY)).await;
    assert_eq!(
        sample(&m, "tollgate_webhook_events_total", &[("destination", "all")]),
        received as f64
    );
    assert_eq!(
        sample(
            &m,
            "tollgate_webhook_deliveries_total",
            &[("destination", "all"), ("result", "failed")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destination_that_resolves_to_loopback_is_refused_unless_allowed() {
    let rx = Receiver::start(true).await;
    let data = tempfile::tempdir().unwrap();
    let config = billed_config(
        data.path(),
        &format!(
            "[[webhooks]]\nname = \"unguarded\"\nurl = \"http://localhost:{}/hook\"\nsecret = {SECRET:?}\n\
             flush_interval_ms = 50\nretry_initial_ms = 50\nretry_max_ms = 100\nmax_attempts = 2\n",
            rx.addr.port()
        ),
    );
    let g = Gateway::serve(&config).ready().await;
    let admin = g.admin();
    admin.create_key("mallory", 10).await;
    let d = await_destination(&admin, "unguarded", "the refused delivery", |d| d["deadLetters"] == 1).await;
    let error = d["lastError"]["message"].as_str().unwrap();
    assert!(
        error.contains("loopback") && error.contains("allow_networks"),
        "{error}"
    );
    assert!(rx.events().is_empty(), "nothing reached the loopback receiver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_destinations_verify_the_receivers_certificate() {
    let (rx, ca_pem) = Receiver::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let port = rx.addr.port();
    let hook = |name: &str, extra: &str| {
        format!(
            "[[webhooks]]\nname = {name:?}\nurl = \"https://localhost:{port}/hook\"\nsecret = {SECRET:?}\n\
             allow_networks = [\"127.0.0.0/8\", \"::1\"]\nflush_interval_ms = 50\nretry_initial_ms = 50\n\
             retry_max_ms = 100\nmax_attempts = 2\n{extra}\n"
        )
    };
    let config = billed_config(
        dir.path(),
        &format!(
            "{}{}",
            hook("trusting", &format!("ca_file = {:?}", ca.display().to_string())),
            hook("public-roots", "")
        ),
    );
    let g = Gateway::serve(&config).ready().await;
    let admin = g.admin();
    let (_, secret) = admin.create_key("tls", 10).await;
    let c = client(&g, &secret).await;
    let mut made = HashSet::new();
    for _ in 0..3 {
        made.insert(paid_call(&c, "echo").await.0);
    }
    // The destination that trusts the receiver's CA delivers; the one on the public roots refuses
    // the certificate and dead-letters: every event arrived once, over TLS, verified.
    let usage = rx.await_usage(3, "the events over TLS").await;
    assert_eq!(usage.keys().cloned().collect::<HashSet<_>>(), made);
    assert!(usage.values().all(|(n, _)| *n == 1));
    let refused = await_destination(&admin, "public-roots", "the untrusted certificate refused", |d| {
        d["deadLetterEvents"].as_i64() >= Some(4)
    })
    .await;
    let error = refused["lastError"]["message"].as_str().unwrap();
    assert!(
        error.contains("TLS") && error.to_lowercase().contains("certificate"),
        "{error}"
    );
    assert_eq!(rx.bad_signatures.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_to_a_destination_come_over_one_kept_connection() {
    let rx = Receiver::start(true).await;
    // One event a batch: twelve POSTs.
    let h = Hooked::start(&rx, "ops", "batch_size = 1\nevents = [\"usage\"]", 12).await;
    let usage = rx.await_usage(12, "every event, a batch each").await;
    assert_eq!(usage.keys().cloned().collect::<HashSet<_>>(), h.made);
    assert_eq!(
        rx.connections.load(Ordering::SeqCst),
        1,
        "one connection carried every batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_down_for_a_while_then_back_loses_nothing() {
    let rx = Receiver::start(false).await;
    let h = Hooked::start(&rx, "ops", "max_attempts = 100\nbatch_size = 6", 20).await;
    let admin = h.gateway.admin();
    // Down: attempts fail and are counted; nothing is delivered yet.
    let d = await_destination(&admin, "ops", "failed attempts", |d| {
        d["failedAttempts"].as_u64().unwrap() >= 3
    })
    .await;
    assert!(d["lastError"]["message"].as_str().unwrap().contains("503"));
    assert!(rx.usage().is_empty());
    rx.up.store(true, Ordering::SeqCst);
    let usage = rx.await_usage(20, "every event after the receiver is back").await;
    assert_eq!(usage.keys().cloned().collect::<HashSet<_>>(), h.made);
    assert!(usage.values().all(|(n, _)| *n == 1));
    // The backlog went in full batches, none over the destination's size.
    assert_eq!(rx.largest_batch.load(Ordering::SeqCst), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_retry_limit_batches_become_dead_letters_and_replay_delivers_them() {
    let rx = Receiver::start(false).await;
    let h = Hooked::start(&rx, "billing", "max_attempts = 2\nevents = [\"usage\"]", 10).await;
    let admin = h.gateway.admin();
    let status = await_destination(&admin, "billing", "all ten events in dead letters", |d| {
        d["deadLetterEvents"] == 10 && d["pending"] == 0
    })
    .await;
    assert!(status["deadLetters"].as_i64().unwrap() >= 1);
    assert!(rx.usage().is_empty());

    // Replaying while it is still down changes nothing and says why.
    let r = replay(&admin, "billing").await;
    assert_eq!(r["replayed"], 0);
    assert!(r["error"].as_str().unwrap().contains("503"), "{r}");
    rx.up.store(true, Ordering::SeqCst);
    let r = replay(&admin, "billing").await;
    assert_eq!(
        (r["events"].as_i64(), r["remaining"].as_i64()),
        (Some(10), Some(0)),
        "{r}"
    );
    assert_eq!(rx.usage().keys().cloned().collect::<HashSet<_>>(), h.made);
    assert_eq!(destination(&webhooks_status(&admin).await, "billing")["deadLetters"], 0);
    let unknown = admin
        .post("/admin/webhooks/nope/replay", &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // And new calls flow again as they happen.
    let (next, _) = paid_call(&h.client, "echo").await;
    eventually(Duration::from_secs(10), "a new call's event", || async {
        rx.usage().contains_key(&next).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_of_calls_charged_before_a_kill_9_are_delivered_after_the_restart() {
    let rx = Receiver::start(false).await;
    let mut h = Hooked::start(&rx, "ops", "max_attempts = 100", 25).await;
    // Charged and answered, never delivered (the receiver is down): now SIGKILL.
    h.gateway.proc.child.kill().unwrap();
    h.gateway.proc.child.wait().unwrap();
    rx.up.store(true, Ordering::SeqCst);
    let again = Gateway::serve(&h.config).ready().await;
    let usage = rx.await_usage(25, "the events of the killed gateway").await;
    assert_eq!(usage.keys().cloned().collect::<HashSet<_>>(), h.made);
    drop(again);
}

/// The value of a sample with exactly these labels (0 when absent).
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

async fn scrape(url: &str, admin_key: Option<&str>) -> prometheus_parse::Scrape {
    let mut r = reqwest::Client::new().get(url);
    if let Some(k) = admin_key {
        r = r.header("x-admin-key", k);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_as_prometheus_text_and_count_the_calls_made() {
    let g = Gateway::wrap_billed(&["--price", "3", "--", FIXTURE, "--stdio"])
        .ready()
        .await;
    let admin = g.admin();
    let anonymous = reqwest::get(format!("{}/metrics", g.base)).await.unwrap();
    assert_eq!(anonymous.status(), 401, "metrics are not public");

    let (_, secret) = admin.create_key("erin", 10).await;
    let c = client(&g, &secret).await;
    c.request("tools/list", json!({})).await;
    for _ in 0..3 {
        assert!(paid_call(&c, "echo").await.1);
    }
    // 10 - 9 = 1 credit left: the fourth is refused.
    assert!(!paid_call(&c, "echo").await.1);
    let mut stranger = g.client();
    stranger.initialize().await;
    stranger.api_key = Some("tg_not_a_key".into());
    assert!(!paid_call(&stranger, "echo").await.1);

    let m = scrape(&format!("{}/metrics", g.base), Some(ADMIN_KEY)).await;
    let calls = |outcome| {
        sample(
            &m,
            "tollgate_requests_total",
            &[("method", "tools/call"), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("allowed"), 3.0);
    assert_eq!(calls("denied"), 2.0);
    assert_eq!(
        sample(&m, "tollgate_refusals_total", &[("reason", "insufficient_credits")]),
        1.0
    );
    assert_eq!(sample(&m, "tollgate_refusals_total", &[("reason", "unknown_key")]), 1.0);
    assert_eq!(sample(&m, "tollgate_credits_charged_total", &[]), 9.0);
    assert_eq!(
        sample(
            &m,
            "tollgate_requests_total",
            &[("method", "tools/list"), ("outcome", "free")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "tollgate_tool_calls_total",
            &[("tool", "echo"), ("outcome", "allowed")]
        ),
        3.0
    );
    assert!(sample(&m, "tollgate_upstream_latency_seconds_count", &[]) >= 3.0);
    assert!(sample(&m, "tollgate_gateway_latency_seconds_count", &[]) >= 3.0);
    assert!(
        sample(
            &m,
            "tollgate_plugin_calls_total",
            &[("role", "pricing"), ("result", "ok")]
        ) >= 4.0
    );
    assert!(sample(&m, "tollgate_store_commit_seconds_count", &[]) >= 1.0);
    // A client's method name never becomes a label.
    let r = c
        .post(&json!({"jsonrpc": "2.0", "id": 9, "method": "x/evil{label}", "params": {}}))
        .send()
        .await
        .unwrap();
    drop(r);
    let m = scrape(&format!("{}/metrics", g.base), Some(ADMIN_KEY)).await;
    assert!(m.samples.iter().all(|s| !s.labels.values().any(|v| v.contains("evil"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_request_logs_one_line_with_its_id_and_never_the_secret() {
    let g = Gateway::wrap_billed(&["--", FIXTURE, "--stdio"]).ready().await;
    let admin = g.admin();
    let (id, secret) = admin.create_key("frank", 10).await;
    let c = client(&g, &secret).await;
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}});

    let r = c
        .post(&call)
        .header("x-request-id", "trace-abc.123")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-request-id"],
        "trace-abc.123",
        "the client's id comes back"
    );
    let ours = r.headers()["tollgate-request-id"].to_str().unwrap().to_string();
    assert!(ours.starts_with("req_"));
    read_answer(r).await;
    let r = c.post(&call).send().await.unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(generated.starts_with("req_") && generated != ours);
    read_answer(r).await;
    let bad = c
        .post(&call)
        .header("x-request-id", "no spaces or \"quotes\"")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let v: Value = bad.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("X-Request-Id"));

    let log = eventually(Duration::from_secs(5), "the request lines", || async {
        let log = g.proc.stderr();
        log.contains(&generated).then_some(log)
    })
    .await;
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("tollgate::request")).collect();
    let about = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(about(&ours), 1, "one line per request:\n{}", lines.join("\n"));
    assert_eq!(about("trace-abc.123"), 1);
    assert_eq!(about(&generated), 1);
    let line = lines.iter().find(|l| l.contains(&generated)).unwrap();
    for field in [id.as_str(), "tools/call", "echo", "allowed", "credits"] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    assert!(!log.contains(&secret), "the key's secret reached the log");
    assert!(
        !log.contains('\u{1b}'),
        "a log written to a file carries terminal colour codes:\n{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_config_reload_applies_prices_and_webhooks_live_and_refuses_an_invalid_file() {
    let rx = Receiver::start(true).await;
    let data = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let config = |price: &str, extra: &str| {
        billed_config(
            data.path(),
            &format!("default_price = {price}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{extra}"),
        )
    };
    let g = Gateway::serve(&config("2", "")).ready().await;
    let path = g.dir.path().join("tollgate.toml");
    let admin = g.admin();
    let (id, secret) = admin.create_key("gina", 100).await;
    let c = client(&g, &secret).await;
    paid_call(&c, "echo").await;
    assert_eq!(balance(&admin, &id).await, 98);
    // The metrics address serves without the admin key.
    let m = scrape(&format!("http://127.0.0.1:{metrics_port}/metrics"), None).await;
    assert_eq!(sample(&m, "tollgate_credits_charged_total", &[]), 2.0);

    // A new price and a new webhook destination, live; a new session limit needs a restart.
    std::fs::write(
        &path,
        config("5", &rx.destination("late", "")) + "[sessions]\nmax = 5\n",
    )
    .unwrap();
    let r = admin.post("/admin/config/reload", &json!({})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    let names = |k: &str| {
        report[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(
        names("changed").iter().any(|n| n.starts_with("plugins.pricing")),
        "{report}"
    );
    assert!(names("changed").contains(&"webhooks.late".to_string()), "{report}");
    assert_eq!(names("restartRequired"), ["sessions"], "{report}");
    let (rid, _) = paid_call(&c, "echo").await;
    assert_eq!(balance(&admin, &id).await, 93);
    eventually(Duration::from_secs(10), "the new destination's first event", || async {
        rx.usage().contains_key(&rid).then_some(())
    })
    .await;

    // An invalid file changes nothing and says where it is wrong.
    std::fs::write(&path, config("-1", "")).unwrap();
    let r = admin.post("/admin/config/reload", &json!({})).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("billing.default_price"),
        "{v}"
    );
    paid_call(&c, "echo").await;
    assert_eq!(balance(&admin, &id).await, 88, "the price stayed 5");

    // SIGHUP reloads too.
    std::fs::write(&path, config("7", "")).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &g.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually(Duration::from_secs(10), "the SIGHUP reload", || async {
        g.proc.stderr().contains("SIGHUP: config reloaded").then_some(())
    })
    .await;
    paid_call(&c, "echo").await;
    assert_eq!(balance(&admin, &id).await, 81);
    assert!(
        webhooks_status(&admin).await["destinations"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the destination left with the file"
    );

    // A default rate limit applies at once.
    std::fs::write(
        &path,
        config("7", "").replace("default_price", "rate_limit = \"1/h\"\ndefault_price"),
    )
    .unwrap();
    let r = admin.post("/admin/config/reload", &json!({})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(paid_call(&c, "echo").await.1);
    let limited = c
        .post(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_json_logs_every_line_is_one_json_object_and_a_request_line_carries_its_fields() {
    let g = Gateway::wrap_billed(&["--log-format", "json", "--", FIXTURE, "--stdio"])
        .ready()
        .await;
    let (id, secret) = g.admin().create_key("hana", 10).await;
    let c = client(&g, &secret).await;
    let (request_id, ok) = paid_call(&c, "echo").await;
    assert!(ok);

    let log = eventually(Duration::from_secs(5), "the request line", || async {
        let log = g.proc.stderr();
        log.contains(&request_id).then_some(log)
    })
    .await;
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON object ({e}): {l}")))
        .collect();
    let request = lines
        .iter()
        .find(|v| v["target"] == "tollgate::request" && v["fields"]["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("no request line for {request_id}:\n{log}"));
    assert_eq!(request["fields"]["key_id"], id.as_str());
    assert_eq!(request["fields"]["method"], "tools/call");
    assert_eq!(request["fields"]["tool"], "echo");
    assert_eq!(request["fields"]["outcome"], "allowed");
    assert_eq!(request["fields"]["credits"], 1);
    assert!(!log.contains(&secret), "the key's secret reached the log");
}
