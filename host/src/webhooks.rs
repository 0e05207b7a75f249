//! Signed webhooks: usage events (one per settled call) and admin events (`key.created`, ...)
//! delivered in batches to each configured destination, at least once, from outboxes in the
//! database — so nothing is lost to a restart, a `kill -9` or an endpoint that is down for hours.
//!
//! The outboxes are the store's own tables: a settled call's request-log row (journaled with its
//! charge, see [`crate::ledger::journal`]) and the `events` table. Each destination keeps a cursor
//! into both; a task per destination reads past its cursor, filters, signs and posts a batch,
//! retries with exponential backoff and jitter, and after the last attempt moves the batch to the
//! dead-letter table. Nothing here runs on the request path: `/mcp` never waits for a webhook.
//! Usage events of calls committed while the gateway runs are handed over by the store's writer as
//! it commits them (see `UsageOutbox`): destinations that keep up read them from memory, and the
//! database only after a restart or an outage.
//!
//! `https://` destinations use rustls (ring) with the public web roots, or the CA a destination
//! names. Destinations are resolved when a batch is sent and every address is checked against private,
//! loopback, link-local and metadata ranges (SSRF); the connection goes to the address that was
//! checked, so a DNS answer cannot change between the check and the connect.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use serde_json::{Value, json};

use crate::config::WebhookConfig;
use crate::ledger::journal::{json_escaped, json_option, json_string};
use crate::ledger::{Cursor, EventRow, Key, Ledger, LogFollower, Op, RequestRow, Store, StoreError, is_usage, now_ms};

/// Every event type; a destination's filter names some of these (or `key.*`).
pub const EVENT_TYPES: &[&str] = &[
    "usage",
    "key.created",
    "key.topup",
    "key.revoked",
    "key.suspended",
    "key.resumed",
    "key.rotated",
    "key.expired",
    "plugin.reloaded",
];

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "tollgate-signature";

/// How often keys are checked for having expired (for `key.expired`), at least; a walk over many
/// keys waits 100 times its own length before the next, so sweeping stays under 1 % of a core.
const EXPIRY_SWEEP: Duration = Duration::from_secs(2);

/// Why a webhook operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("no webhook destination named {0:?}")]
    UnknownDestination(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `HMAC-SHA256(secret, "<t>.<body>")` in hex.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Why an address may not receive webhooks unless allowed, if it may not.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    fn v4(a: std::net::Ipv4Addr) -> Option<&'static str> {
        let o = a.octets();
        if a.is_loopback() {
            Some("a loopback address")
        } else if a.is_private() {
            Some("a private address")
        } else if a.is_link_local() {
            Some("a link-local address (where cloud metadata services live)")
        } else if o[0] == 0 {
            Some("an unspecified address")
        } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
            Some("a shared (carrier-grade NAT) address")
        } else if a.is_broadcast() || a.is_multicast() || o[0] >= 240 {
            Some("a broadcast, multicast or reserved address")
        } else {
            None
        }
    }
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => {
            if let Some(m) = a.to_ipv4_mapped() {
                return v4(m);
            }
            let s = a.segments();
            if a.is_loopback() {
                Some("a loopback address")
            } else if a.is_unspecified() {
                Some("an unspecified address")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("a private (unique local) address")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("a link-local address")
            } else if a.is_multicast() {
                Some("a multicast address")
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64: the IPv4 address it reaches decides.
                v4(std::net::Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ))
            } else {
                None
            }
        }
    }
}

/// One destination's counters since start (delivered events and dead letters are in the store).
#[derive(Default)]
struct Progress {
    failed_attempts: AtomicU64,
    last_delivery_at: AtomicI64,
    last_error: Mutex<Option<(i64, String)>>,
}

/// A destination as its delivery task, replays and status see it.
#[derive(Clone)]
struct Target {
    config: Arc<WebhookConfig>,
    /// The TLS client of an https destination.
    tls: Option<tokio_rustls::TlsConnector>,
    progress: Arc<Progress>,
}

struct Running {
    target: Target,
    task: tokio::task::JoinHandle<()>,
}

/// The webhook destinations and their delivery tasks; cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where delivery tasks run: the delivery thread's runtime (the current one if that thread
    /// could not start).
    runtime: tokio::runtime::Handle,
    /// Stops the delivery thread when dropped (after the tasks are aborted).
    _thread: Option<DeliveryThread>,
    ledger: Ledger,
    running: Mutex<BTreeMap<String, Running>>,
    /// Usage events read and serialized once for every destination.
    usage: Arc<UsageOutbox>,
    /// Some destination takes `key.expired` events (else keys are not swept for them).
    wants_expired: Arc<std::sync::atomic::AtomicBool>,
    sweeper: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A store has one `Webhooks` (the gateway makes it once), so its follower is this one's.
        self.usage.unfollow(self.ledger.store());
        self.sweeper.abort();
        for r in self.running.get_mut().unwrap().values() {
            r.task.abort();
        }
    }
}

/// The thread deliveries run on, with a runtime of its own. One thread wakes every destination's
/// task after a commit, with no hand-offs between a pool's workers (at c=32 with two
/// destinations, 0.8 and 2.0 points more of billing-off throughput than on the gateway's
/// two-worker runtime, in two interleaved A/B runs), and delivery never delays accepting
/// connections, which that runtime does.
struct DeliveryThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DeliveryThread {
    fn start() -> std::io::Result<DeliveryThread> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Its blocking threads (outbox reads) by name, in `top -H` and the benchmarks.
            .thread_name("tollgate-hookrd")
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tollgate-hooks".into())
            .spawn(move || rt.block_on(async move { _ = stopped.await }))?;
        Ok(DeliveryThread {
            handle,
            stop: Some(stop),
        })
    }
}

impl Drop for DeliveryThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Webhooks {
    /// Starts delivering to `destinations` (on a thread of their own, which later destinations
    /// run on too) and watching for keys that expire (on the current runtime).
    pub fn start(ledger: Ledger, destinations: &[WebhookConfig]) -> Webhooks {
        let wants_expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeper = tokio::spawn(sweep_expired(ledger.clone(), wants_expired.clone()));
        let thread = DeliveryThread::start()
            .inspect_err(
                |e| tracing::warn!(error = %e, "cannot start the webhook thread; delivering on the main runtime"),
            )
            .ok();
        let w = Webhooks {
            inner: Arc::new(Inner {
                runtime: thread
                    .as_ref()
                    .map_or_else(tokio::runtime::Handle::current, |t| t.handle.clone()),
                _thread: thread,
                ledger,
                wants_expired,
                running: Mutex::new(BTreeMap::new()),
                usage: Arc::new(UsageOutbox::new(SHARED_USAGE)),
                sweeper,
            }),
        };
        w.apply(destinations);
        w
    }

    /// Makes `destinations` the running set: new ones start, removed ones stop (and their cursors
    /// are forgotten), changed ones restart from their stored cursor. Returns the names that
    /// changed.
    pub fn apply(&self, destinations: &[WebhookConfig]) -> Vec<String> {
        let mut running = self.inner.running.lock().unwrap();
        let mut changed = Vec::new();
        running.retain(|name, r| {
            let keep = destinations.iter().any(|d| d.name == *name);
            if !keep {
                r.task.abort();
                changed.push(name.clone());
            }
            keep
        });
        for d in destinations {
            if running.get(&d.name).is_some_and(|r| *r.target.config == *d) {
                continue;
            }
            let progress = match running.remove(&d.name) {
                Some(old) => {
                    old.task.abort();
                    old.target.progress
                }
                None => Arc::new(Progress::default()),
            };
            let tls = match tls_connector(d) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(destination = %d.name, error = %e, "cannot set up TLS; not delivering");
                    continue;
                }
            };
            let cursor = match start_cursor(self.inner.ledger.store(), &d.name) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(destination = %d.name, error = %e, "cannot read the webhook cursor; not delivering");
                    continue;
                }
            };
            let target = Target {
                config: Arc::new(d.clone()),
                tls,
                progress,
            };
            // On the delivery thread, not on a connection thread's runtime (a reload asked for
            // through the admin API runs on one).
            let task = self.inner.runtime.spawn(deliver(
                target.clone(),
                self.inner.ledger.clone(),
                self.inner.usage.clone(),
                cursor,
            ));
            running.insert(d.name.clone(), Running { target, task });
            changed.push(d.name.clone());
        }
        let names: Vec<String> = running.keys().cloned().collect();
        let wants_expired = running.values().any(|r| wanted_type(&r.target.config, "key.expired"));
        self.inner.wants_expired.store(wants_expired, Ordering::Relaxed);
        // The outbox follows the log's commits only while some destination takes usage events.
        let store = self.inner.ledger.store();
        if running.values().any(|r| wanted_type(&r.target.config, "usage")) {
            self.inner.usage.follow(store);
        } else {
            self.inner.usage.unfollow(store);
        }
        drop(running);
        if let Err(e) = self.inner.ledger.store().submit(Op::WebhookKeepOnly(names)) {
            tracing::warn!(error = %e, "could not forget removed webhook destinations");
        }
        changed
    }

    fn destination(&self, name: &str) -> Result<Target, WebhookError> {
        let running = self.inner.running.lock().unwrap();
        let r = running
            .get(name)
            .ok_or_else(|| WebhookError::UnknownDestination(name.to_string()))?;
        Ok(r.target.clone())
    }

    /// Each destination: delivered, pending, failed attempts, dead letters, last error.
    pub async fn status(&self) -> Result<Value, WebhookError> {
        let list: Vec<Target> = self
            .inner
            .running
            .lock()
            .unwrap()
            .values()
            .map(|r| r.target.clone())
            .collect();
        let store = self.inner.ledger.store().clone();
        store.sync().await?;
        let rows = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, StoreError> {
            let conn = store.reader()?;
            let mut out = Vec::new();
            for Target {
                config: c, progress: p, ..
            } in list
            {
                let cursor = Store::cursor(&conn, &c.name)?.unwrap_or_default();
                let (dead_letters, dead_events) = Store::dead_letter_counts(&conn, &c.name)?;
                let last_error = p
                    .last_error
                    .lock()
                    .unwrap()
                    .as_ref()
                    .map(|(at, m)| json!({"at": at, "message": m}));
                let last_delivery = p.last_delivery_at.load(Ordering::Relaxed);
                out.push(json!({
                    "name": c.name,
                    "url": c.url.to_string(),
                    "events": c.events,
                    "delivered": cursor.delivered,
                    "pending": Store::pending(&conn, &cursor)?,
                    "failedAttempts": p.failed_attempts.load(Ordering::Relaxed),
                    "deadLetters": dead_letters,
                    "deadLetterEvents": dead_events,
                    "lastError": last_error,
                    "lastDeliveryAt": (last_delivery > 0).then_some(last_delivery),
                }));
            }
            Ok(out)
        })
        .await
        .map_err(|_| StoreError::WriterFailed)??;
        Ok(json!({ "destinations": rows }))
    }

    /// Sends a destination's dead letters again, oldest first, once each; a delivered one leaves
    /// the queue. Stops at the first failure.
    pub async fn replay(&self, name: &str) -> Result<Value, WebhookError> {
        let Target { config, tls, progress } = self.destination(name)?;
        let store = self.inner.ledger.store().clone();
        store.sync().await?;
        let reader = store.clone();
        let owned = name.to_string();
        let letters = tokio::task::spawn_blocking(move || Store::dead_letters(&reader.reader()?, &owned))
            .await
            .map_err(|_| StoreError::WriterFailed)??;
        let mut replayed = 0;
        let mut events = 0;
        let mut kept = None;
        let mut error = None;
        for letter in &letters {
            let body = batch_body(&config.name, &letter.events);
            match send(&config, tls.as_ref(), body, &mut kept).await {
                Ok(()) => {
                    crate::metrics::webhook(&config.name, "ok", letter.count as usize);
                    progress.last_delivery_at.store(now_ms(), Ordering::Relaxed);
                    store.write(Op::DropDeadLetter(letter.seq)).await?;
                    replayed += 1;
                    events += letter.count;
                }
                Err(e) => {
                    crate::metrics::webhook(&config.name, "failed", letter.count as usize);
                    note_failure(&progress, &config.name, &e);
                    error = Some(e);
                    break;
                }
            }
        }
        Ok(json!({
            "destination": name,
            "replayed": replayed,
            "events": events,
            "remaining": letters.len() - replayed,
            "error": error,
        }))
    }
}

/// Records an admin event in the outbox; durable before it returns. Its `data` names the key (id,
/// name, namespace, tags) and whatever `extra` adds — never a secret.
pub async fn record(store: &Store, kind: &str, key: Option<&Key>, extra: Value) -> Result<(), StoreError> {
    let id = format!("evt_{:016x}{:08x}", rand::random::<u64>(), rand::random::<u32>());
    store.write(Op::Event(event_row(id, kind, key, extra))).await?;
    Ok(())
}

/// Records a `plugin.reloaded` event naming what changed; a failure to record it is logged (the
/// reload stands).
pub async fn plugins_reloaded(store: &Store, changes: &[crate::policy::Reloaded]) {
    if let Err(e) = record(store, "plugin.reloaded", None, json!({ "plugins": changes })).await {
        tracing::error!(error = %e, "could not record a plugin.reloaded event");
    }
}

fn event_row(id: String, kind: &str, key: Option<&Key>, extra: Value) -> EventRow {
    let mut data = match key {
        Some(k) => {
            let s = k.settings();
            json!({"keyId": k.id, "name": k.name, "namespace": s.namespace, "tags": s.tags, "credits": k.credits()})
        }
        None => json!({}),
    };
    if let (Some(d), Value::Object(extra)) = (data.as_object_mut(), extra) {
        d.extend(extra);
    }
    EventRow {
        seq: 0,
        id,
        kind: kind.to_string(),
        key_id: key.map(|k| k.id.clone()),
        data: data.to_string(),
        created_at: now_ms(),
    }
}

/// Records `key.expired` once for each key whose expiry passes (its id is derived from the key
/// and the expiry, so a restart or a second sweep records nothing twice).
/// Only while some destination takes them: events nobody would receive are not recorded.
async fn sweep_expired(ledger: Ledger, wanted: Arc<std::sync::atomic::AtomicBool>) {
    // Keys that expired while the gateway was down (within a week) are caught on start.
    let mut since = now_ms() - 7 * 86_400_000;
    loop {
        let now = now_ms();
        if !wanted.load(Ordering::Relaxed) {
            since = now;
            tokio::time::sleep(EXPIRY_SWEEP).await;
            continue;
        }
        let started = std::time::Instant::now();
        let l = ledger.clone();
        let expired = tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            l.for_each(|k| {
                let at = k.expires_at();
                if at > since && at <= now && k.status() == crate::ledger::Status::Active {
                    found.push((l.get(&k.id), at));
                }
            });
            found
        })
        .await
        .unwrap_or_default();
        for (key, at) in expired {
            let Some(key) = key else { continue };
            let id = format!("evt_expired_{}_{at}", key.id);
            let row = event_row(id, "key.expired", Some(&key), json!({"expiresAt": at}));
            if let Err(e) = ledger.store().submit(Op::Event(row)) {
                tracing::warn!(error = %e, "could not record a key.expired event");
            }
        }
        since = now;
        tokio::time::sleep(EXPIRY_SWEEP.max(started.elapsed() * 100)).await;
    }
}

/// An admin event as receivers see it; its data is stored as JSON and passed through.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct AdminEvent<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    created_at: i64,
    data: &'a serde_json::value::RawValue,
}

/// A usage event as receivers see it, appended to `out`:
/// `{"id":"usage_<request id>","type":"usage","createdAt":..,"data":{"requestId":..,"keyId":..,
/// "method":..,"tool":..,"credits":..,"outcome":..,"reason":..,"durationMs":..}}`. Written by hand
/// (the database writer does it for every settled call; serde's generic path cost twice as much),
/// and held to what serde writes by a test.
fn write_usage_event(out: &mut Vec<u8>, r: &RequestRow) {
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(b"{\"id\":\"usage_");
    json_escaped(out, &r.request_id);
    out.extend_from_slice(b"\",\"type\":\"usage\",\"createdAt\":");
    out.extend_from_slice(n.format(r.created_at).as_bytes());
    out.extend_from_slice(b",\"data\":{\"requestId\":");
    json_string(out, &r.request_id);
    out.extend_from_slice(b",\"keyId\":");
    json_option(out, r.key_id.as_deref());
    out.extend_from_slice(b",\"method\":");
    json_string(out, &r.method);
    out.extend_from_slice(b",\"tool\":");
    json_option(out, r.tool.as_deref());
    out.extend_from_slice(b",\"credits\":");
    out.extend_from_slice(n.format(r.credits).as_bytes());
    out.extend_from_slice(b",\"outcome\":");
    json_string(out, &r.outcome);
    out.extend_from_slice(b",\"reason\":");
    json_option(out, r.reason.as_deref());
    out.extend_from_slice(b",\"durationMs\":");
    push_millis(out, r.duration_us);
    out.extend_from_slice(b"}}");
}

/// Microseconds as milliseconds, the way serde_json writes the `f64` `us / 1000.0`: the shortest
/// decimal that reads back as that number, which for fewer than 16 digits is the exact one with its
/// trailing zeros dropped (and `.0` for a whole number).
fn push_millis(out: &mut Vec<u8>, us: i64) {
    if !(0..1_000_000_000_000_000).contains(&us) {
        serde_json::to_writer(&mut *out, &(us as f64 / 1000.0)).expect("a number serializes");
        return;
    }
    out.extend_from_slice(itoa::Buffer::new().format(us / 1000).as_bytes());
    out.push(b'.');
    let frac = us % 1000;
    if frac == 0 {
        out.push(b'0');
        return;
    }
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let len = if digits[2] != b'0' {
        3
    } else if digits[1] != b'0' {
        2
    } else {
        1
    };
    out.extend_from_slice(&digits[..len]);
}

fn admin_event(e: &EventRow) -> String {
    let empty = serde_json::value::RawValue::from_string("{}".into()).expect("valid JSON");
    let data: &serde_json::value::RawValue = serde_json::from_str(&e.data).unwrap_or(&empty);
    serde_json::to_string(&AdminEvent {
        id: &e.id,
        kind: &e.kind,
        created_at: e.created_at,
        data,
    })
    .expect("an event serializes")
}

/// The POST body: `{"destination": .., "events": [..]}` around an events array.
fn batch_body(destination: &str, events_array: &str) -> Bytes {
    Bytes::from(format!("{}{events_array}}}", body_head(destination)))
}

/// A POST body's beginning, up to its events array: `{"destination":"<name>","events":`.
fn body_head(destination: &str) -> String {
    let name = serde_json::to_string(destination).expect("a string serializes");
    format!("{{\"destination\":{name},\"events\":")
}

/// Whether a destination's filter takes events of this type.
fn wanted_type(c: &WebhookConfig, kind: &str) -> bool {
    c.events.is_empty()
        || c.events
            .iter()
            .any(|f| f == kind || (f == "key.*" && kind.starts_with("key.")))
}

/// Whether a destination's filter lets an event through.
fn wanted(c: &WebhookConfig, kind: &str, key: Option<&Key>) -> bool {
    if !wanted_type(c, kind) {
        return false;
    }
    if !c.filters_keys() {
        return true;
    }
    // Key filters apply to events about a key; a key they cannot find does not pass.
    let Some(key) = key else {
        return kind == "plugin.reloaded";
    };
    let s = key.settings();
    let ns_ok = c.namespaces.is_empty() || s.namespace.as_ref().is_some_and(|n| c.namespaces.contains(n));
    let tag_ok = c.tags.is_empty() || s.tags.iter().any(|t| c.tags.contains(t));
    ns_ok && tag_ok
}

fn note_failure(p: &Progress, destination: &str, e: &str) {
    p.failed_attempts.fetch_add(1, Ordering::Relaxed);
    *p.last_error.lock().unwrap() = Some((now_ms(), e.to_string()));
    tracing::warn!(destination, error = e, "webhook delivery failed");
}

/// The delivery loop of one destination, from `cursor` on.
async fn deliver(target: Target, ledger: Ledger, outbox: Arc<UsageOutbox>, mut cursor: Cursor) {
    let Target {
        config: c,
        tls,
        progress,
    } = target;
    let store = ledger.store().clone();
    let reader: Arc<Mutex<Option<rusqlite::Connection>>> = Arc::new(Mutex::new(None));
    // The connection to the destination, kept open between batches.
    let mut kept = None;
    // Whole batches, as many as fit in a read of READ_AHEAD events (at least one).
    let limit = c.batch_size * (READ_AHEAD / c.batch_size).max(1);
    // The key an event is about, when the destination filters by key.
    let key_of = |id: Option<&str>| c.filters_keys().then(|| id.and_then(|id| ledger.get(id))).flatten();
    // Whether a batch that is not whole may go (the flush interval is up), and when it will be.
    let mut flush = true;
    let mut flush_at: Option<tokio::time::Instant> = None;
    // What the last read of the admin events found, when it found all there were: the events
    // version before it and the last event read. While the version stays and the cursor is past
    // that event, there is no admin event to send, and usage events in the window are read from
    // memory on this task, not on a blocking thread.
    let mut events_seen: Option<(u64, i64)> = None;
    // Each batch's body is written in place after this (see `batch_body`).
    let head = body_head(&c.name);
    loop {
        let version = store.events_version();
        let in_memory = match events_seen {
            Some((seen, last)) if seen == version && cursor.event_seq >= last => {
                outbox.in_window(cursor.request_seq, limit)
            }
            _ => None,
        };
        let (usage, events) = match in_memory {
            Some(usage) => (usage, Vec::new()),
            None => {
                let (r, s, o) = (reader.clone(), store.clone(), outbox.clone());
                let read = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                    let mut guard = r.lock().unwrap();
                    if guard.is_none() {
                        *guard = Some(s.reader()?);
                    }
                    let conn = guard.as_ref().expect("opened");
                    let usage = o.after(conn, cursor.request_seq, limit)?;
                    let events = Store::events_after(conn, cursor.event_seq, limit as i64)?;
                    Ok((usage, events))
                })
                .await;
                match read {
                    Ok(Ok((usage, events))) => {
                        events_seen = (events.len() < limit)
                            .then(|| (version, events.last().map_or(cursor.event_seq, |e| e.seq)));
                        (usage, events)
                    }
                    Ok(Err(e)) => {
                        tracing::error!(destination = %c.name, error = %e, "cannot read the webhook outbox; retrying");
                        *reader.lock().unwrap() = None;
                        events_seen = None;
                        tokio::time::sleep(c.flush_interval).await;
                        continue;
                    }
                    Err(_) => return,
                }
            }
        };
        // Oldest first across both outboxes, a batch at a time; each cursor moves past what it took.
        // Only whole batches go until the flush interval has passed: then what there is goes too.
        // A read that came back short has everything there is.
        let (mut u, mut e) = (usage.iter().peekable(), events.iter().peekable());
        let read = (usage.len() + events.len()).min(limit);
        let mut left = if flush { read } else { read - read % c.batch_size };
        let mut caught_up = read < limit || left < read;
        // How far this read's batches went and how many events they delivered, recorded once
        // after them: a kill before the record sends them again, which receivers de-duplicate.
        let read_from = cursor;
        let mut delivered = 0;
        while left > 0 {
            let mut next = cursor;
            let mut body = Vec::with_capacity(head.len() + 3 + c.batch_size.min(left) * 256);
            body.extend_from_slice(head.as_bytes());
            body.push(b'[');
            let mut count = 0;
            let mut push = |body: &mut Vec<u8>, json: &[u8]| {
                if count > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(json);
                count += 1;
            };
            let mut taken = 0;
            while taken < c.batch_size.min(left) {
                let take_usage = match (u.peek(), e.peek()) {
                    (Some(a), Some(b)) => a.created_at <= b.created_at,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                taken += 1;
                if take_usage {
                    let row = u.next().expect("peeked");
                    next.request_seq = row.seq;
                    if wanted(&c, "usage", key_of(row.key_id).as_deref()) {
                        push(&mut body, row.json);
                    }
                } else {
                    let row = e.next().expect("peeked");
                    next.event_seq = row.seq;
                    if wanted(&c, &row.kind, key_of(row.key_id.as_deref()).as_deref()) {
                        push(&mut body, admin_event(row).as_bytes());
                    }
                }
            }
            body.extend_from_slice(b"]}");
            left -= taken;
            if count > 0 {
                let body = Bytes::from(body);
                match send_with_retries(&c, tls.as_ref(), &mut kept, &progress, body.clone(), count).await {
                    Ok(()) => delivered += count as i64,
                    Err((error, attempts)) => {
                        crate::metrics::webhook(&c.name, "dead", count);
                        tracing::error!(destination = %c.name, events = count, attempts, "webhook batch moved to the dead-letter queue");
                        // The events array, as a dead letter keeps it.
                        let events = String::from_utf8_lossy(&body[head.len()..body.len() - 1]).into_owned();
                        let op = Op::DeadLetter {
                            destination: c.name.clone(),
                            events,
                            count: count as i64,
                            error,
                            attempts: attempts as i64,
                            at: now_ms(),
                        };
                        if let Err(e) = store.write(op).await {
                            // Not recorded: the cursor stays, and the batch is read and tried again.
                            tracing::error!(destination = %c.name, error = %e, "cannot record a dead letter");
                            tokio::time::sleep(c.retry_max).await;
                            caught_up = false;
                            break;
                        }
                    }
                }
            }
            cursor = next;
        }
        if cursor.request_seq != read_from.request_seq || cursor.event_seq != read_from.event_seq {
            let op = Op::WebhookCursor {
                destination: c.name.clone(),
                request_seq: cursor.request_seq,
                event_seq: cursor.event_seq,
                delivered,
            };
            if let Err(e) = store.submit(op) {
                tracing::error!(destination = %c.name, error = %e, "cannot record webhook progress");
            }
        }
        if caught_up {
            // Until a whole batch of usage events has come in, or the flush interval is up (from
            // when the destination first had nothing whole to send).
            let deadline = *flush_at.get_or_insert_with(|| tokio::time::Instant::now() + c.flush_interval);
            flush = outbox.wait(cursor.request_seq, c.batch_size, deadline).await;
            if flush {
                flush_at = None;
            }
        }
    }
}

/// Usage events serialized together, oldest first: one commit's, or one read of the database. Their
/// JSON is one buffer, so a commit's events cost the writer one allocation and the window one free,
/// not two of each per event.
struct UsageChunk {
    /// The events' JSON, back to back.
    json: Vec<u8>,
    events: Vec<UsageMeta>,
}

/// What a destination's filter and the merge with admin events need of a usage event.
struct UsageMeta {
    seq: i64,
    created_at: i64,
    key_id: Option<compact_str::CompactString>,
    /// Where its JSON ends in the chunk's buffer; it starts where the event before it ends.
    end: usize,
}

impl UsageChunk {
    /// The usage events of these request rows (each a settled call's, see [`is_usage`]).
    fn of<'a>(rows: impl Iterator<Item = (i64, &'a RequestRow)>) -> UsageChunk {
        // Room for every row's event at about 256 bytes each (the rows of refused calls are few).
        let rows_at_most = rows.size_hint().1.unwrap_or(0).min(8192);
        let mut json = Vec::with_capacity(rows_at_most * 256);
        let mut events = Vec::with_capacity(rows_at_most);
        for (seq, r) in rows {
            write_usage_event(&mut json, r);
            events.push(UsageMeta {
                seq,
                created_at: r.created_at,
                key_id: r.key_id.clone(),
                end: json.len(),
            });
        }
        UsageChunk { json, events }
    }

    fn event(&self, i: usize) -> UsageRef<'_> {
        let m = &self.events[i];
        let start = if i == 0 { 0 } else { self.events[i - 1].end };
        UsageRef {
            seq: m.seq,
            created_at: m.created_at,
            key_id: m.key_id.as_deref(),
            json: &self.json[start..m.end],
        }
    }

    fn last_seq(&self) -> i64 {
        self.events.last().map_or(i64::MIN, |m| m.seq)
    }
}

/// One usage event of a chunk.
#[derive(Clone, Copy)]
struct UsageRef<'a> {
    seq: i64,
    created_at: i64,
    key_id: Option<&'a str>,
    json: &'a [u8],
}

/// Usage events read at once, oldest first: runs of consecutive events of shared chunks.
#[derive(Default)]
struct UsageRead {
    runs: Vec<(Arc<UsageChunk>, std::ops::Range<usize>)>,
    len: usize,
}

impl UsageRead {
    fn of(chunk: UsageChunk) -> UsageRead {
        let mut read = UsageRead::default();
        let all = 0..chunk.events.len();
        read.push(Arc::new(chunk), all);
        read
    }

    fn push(&mut self, chunk: Arc<UsageChunk>, events: std::ops::Range<usize>) {
        if !events.is_empty() {
            self.len += events.len();
            self.runs.push((chunk, events));
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = UsageRef<'_>> {
        self.runs
            .iter()
            .flat_map(|(chunk, events)| events.clone().map(|i| chunk.event(i)))
    }

    #[cfg(test)]
    fn last(&self) -> Option<UsageRef<'_>> {
        self.runs.last().map(|(chunk, events)| chunk.event(events.end - 1))
    }
}

/// How many events a destination reads from its outboxes at once (in whole batches, at least one):
/// each read is a hand-off to a blocking thread, which costs more than reading the rows.
const READ_AHEAD: usize = 1_000;

/// How many usage events the shared window keeps (about 5 MiB), and one commit's more: more than a
/// few commits' worth at any rate the gateway reaches (the writer commits ten times a second), so
/// destinations that keep up never read the database. One that trails further reads the database
/// itself.
const SHARED_USAGE: usize = 16_384;

/// The usage outbox as every destination reads it. It follows the request log (see
/// [`LogFollower`]): the writer hands it each commit's rows, which it serializes once, into one
/// chunk, and keeps in a window of the newest events, shared by every destination. Destinations
/// that keep up cost no database read and one serialization per call, however many there are. It
/// holds every usage row with `lo < seq <= hi`; a destination behind it (after a restart, or after
/// its endpoint was down) reads the database until it catches up.
struct UsageOutbox {
    /// How many events the window keeps (it drops a chunk only while the rest hold this many).
    cap: usize,
    shared: Mutex<SharedUsage>,
    /// Woken after each commit that added usage events.
    grown: tokio::sync::Notify,
}

#[derive(Default)]
struct SharedUsage {
    /// The store tells it of commits. A commit told after it stopped (the writer had already
    /// taken it as its follower) is ignored: every read then goes to the database, and a window
    /// no longer kept up to date must not answer a read.
    following: bool,
    /// Told of a commit since it last started: until then it holds nothing and every read goes to
    /// the database.
    started: bool,
    lo: i64,
    hi: i64,
    /// Non-empty chunks, oldest first, each with how many events were kept before it since the
    /// window started (so that counting the events after a seq takes no walk over the chunks).
    chunks: std::collections::VecDeque<(u64, Arc<UsageChunk>)>,
    /// How many events were kept since the window started.
    kept: u64,
}

impl SharedUsage {
    /// The first chunk holding events after `after`, and the first of them in it.
    fn first_after(&self, after: i64) -> (usize, usize) {
        let c = self.chunks.partition_point(|(_, chunk)| chunk.last_seq() <= after);
        let e = self
            .chunks
            .get(c)
            .map_or(0, |(_, chunk)| chunk.events.partition_point(|m| m.seq <= after));
        (c, e)
    }

    /// Up to `limit` usage events after `after`, if the window reaches back that far.
    fn read(&self, after: i64, limit: usize) -> Option<UsageRead> {
        (self.started && after >= self.lo).then(|| {
            let mut read = UsageRead::default();
            let (first, mut from) = self.first_after(after);
            for (_, chunk) in self.chunks.range(first..) {
                if read.len() >= limit {
                    break;
                }
                let to = chunk.events.len().min(from.saturating_add(limit - read.len()));
                read.push(chunk.clone(), from..to);
                from = 0;
            }
            read
        })
    }

    /// How many usage events after `after` the chunks hold.
    fn count_after(&self, after: i64) -> usize {
        let (c, e) = self.first_after(after);
        self.chunks
            .get(c)
            .map_or(0, |(before, _)| (self.kept - before) as usize - e)
    }
}

impl UsageOutbox {
    fn new(cap: usize) -> UsageOutbox {
        UsageOutbox {
            cap,
            shared: Mutex::new(SharedUsage::default()),
            grown: tokio::sync::Notify::new(),
        }
    }

    /// Up to `limit` usage events after `after`, oldest first: from the window if it reaches back
    /// that far, else from the database.
    fn after(&self, conn: &rusqlite::Connection, after: i64, limit: usize) -> Result<UsageRead, StoreError> {
        match self.in_window(after, limit) {
            Some(read) => Ok(read),
            None => read_usage(conn, after, limit),
        }
    }

    /// Up to `limit` usage events after `after` from the window, if it reaches back that far.
    fn in_window(&self, after: i64, limit: usize) -> Option<UsageRead> {
        self.shared.lock().unwrap().read(after, limit)
    }

    /// How many usage events after `after` the window holds.
    fn available_after(&self, after: i64) -> usize {
        self.shared.lock().unwrap().count_after(after)
    }

    /// Waits until the window holds at least `wanted` usage events after `after` (`false`), or
    /// until `deadline` (`true`).
    async fn wait(&self, after: i64, wanted: usize, deadline: tokio::time::Instant) -> bool {
        loop {
            let grown = self.grown.notified();
            tokio::pin!(grown);
            // Registered before looking, so that a commit between the look and the wait wakes it.
            grown.as_mut().enable();
            if self.available_after(after) >= wanted {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return true,
                _ = grown => {}
            }
        }
    }

    /// Has `store` tell it of each commit from the next one on.
    fn follow(self: &Arc<Self>, store: &Store) {
        self.shared.lock().unwrap().following = true;
        store.follow(Some(self.clone()));
    }

    /// Stops following `store`'s commits, and forgets what it holds.
    fn unfollow(&self, store: &Store) {
        store.follow(None);
        *self.shared.lock().unwrap() = SharedUsage::default();
    }
}

impl LogFollower for UsageOutbox {
    fn committed(&self, after: i64, last: i64, rows: &mut dyn Iterator<Item = (i64, &RequestRow)>) {
        // Serialized before taking the lock: readers wait only for the hand-over.
        let fresh = UsageChunk::of(rows.filter(|(_, r)| is_usage(r)));
        let mut shared = self.shared.lock().unwrap();
        if !shared.following {
            return;
        }
        if !shared.started || shared.hi != after {
            // The first commit it is told of: what came before is in the database only.
            *shared = SharedUsage {
                following: true,
                started: true,
                lo: after,
                ..SharedUsage::default()
            };
        }
        shared.hi = last;
        let grew = !fresh.events.is_empty();
        if grew {
            let before = shared.kept;
            shared.kept += fresh.events.len() as u64;
            shared.chunks.push_back((before, Arc::new(fresh)));
        }
        // The oldest chunk goes while the chunks after it still hold `cap` events (every event
        // kept from the second chunk on).
        while shared.chunks.len() > 1 && shared.kept - shared.chunks[1].0 >= self.cap as u64 {
            let (_, dropped) = shared.chunks.pop_front().expect("more than one");
            shared.lo = dropped.last_seq();
        }
        drop(shared);
        if grew {
            self.grown.notify_waiters();
        }
    }
}

/// The usage events after `after` in the database, serialized.
fn read_usage(conn: &rusqlite::Connection, after: i64, limit: usize) -> Result<UsageRead, StoreError> {
    let rows = Store::usage_after(conn, after, limit as i64)?;
    Ok(UsageRead::of(UsageChunk::of(rows.iter().map(|r| (r.seq, r)))))
}

/// A destination's stored cursor. A new destination starts at the end of the outboxes (it receives
/// what happens from now on), recorded at once, before any call can slip past it.
fn start_cursor(store: &Store, name: &str) -> Result<Cursor, StoreError> {
    let conn = store.reader()?;
    if let Some(c) = Store::cursor(&conn, name)? {
        return Ok(c);
    }
    let (request_seq, event_seq) = Store::outbox_ends(&conn)?;
    store.submit(Op::WebhookCursor {
        destination: name.to_string(),
        request_seq,
        event_seq,
        delivered: 0,
    })?;
    Ok(Cursor {
        request_seq,
        event_seq,
        delivered: 0,
    })
}

/// Posts a batch, retrying with exponential backoff and full jitter; `Err` carries the last error
/// and the number of attempts once they are used up.
async fn send_with_retries(
    c: &WebhookConfig,
    tls: Option<&tokio_rustls::TlsConnector>,
    kept: &mut Option<Kept>,
    p: &Progress,
    body: Bytes,
    events: usize,
) -> Result<(), (String, u32)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match send(c, tls, body.clone(), kept).await {
            Ok(()) => {
                crate::metrics::webhook(&c.name, "ok", events);
                p.last_delivery_at.store(now_ms(), Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => {
                crate::metrics::webhook(&c.name, "failed", events);
                note_failure(p, &c.name, &e);
                if attempt >= c.max_attempts {
                    return Err((e, attempt));
                }
                let exp = c
                    .retry_initial
                    .saturating_mul(1 << (attempt - 1).min(20))
                    .min(c.retry_max);
                let jittered = exp.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                tokio::time::sleep(jittered).await;
            }
        }
    }
}

/// The TLS client of an `https://` destination (its own CA, or the public web roots); `None`
/// for `http://`.
fn tls_connector(c: &WebhookConfig) -> Result<Option<tokio_rustls::TlsConnector>, String> {
    if c.url.scheme_str() != Some("https") {
        return Ok(None);
    }
    let config = crate::tls::client_config(c.ca.as_deref())?;
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
}

/// A destination's open connection, kept between batches. It is used again only while the
/// destination still resolves to the same address: every batch is resolved and checked first.
struct Kept {
    addr: SocketAddr,
    sender: SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One signed POST of `body` to the destination, within its timeout, over the connection in
/// `kept` when it still fits (it is left there for the next batch once the exchange ends cleanly).
async fn send(
    c: &WebhookConfig,
    tls: Option<&tokio_rustls::TlsConnector>,
    body: Bytes,
    kept: &mut Option<Kept>,
) -> Result<(), String> {
    match tokio::time::timeout(c.timeout, send_once(c, tls, body, kept)).await {
        Ok(r) => r,
        // A connection in use when time ran out was taken from `kept` and is dropped with the
        // exchange; one still in `kept` (time ran out resolving the destination) is still good.
        Err(_) => Err(format!("no answer within {} ms", c.timeout.as_millis())),
    }
}

async fn send_once(
    c: &WebhookConfig,
    tls: Option<&tokio_rustls::TlsConnector>,
    body: Bytes,
    kept: &mut Option<Kept>,
) -> Result<(), String> {
    let authority = c.url.authority().ok_or("the URL has no host")?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let addr = pick_address(&addrs, &c.allow_networks)?;
    let t = now_ms() / 1000;
    let signature = format!("t={t},v1={}", sign(c.secret.expose(), t, &body));
    let path = c.url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let request = || {
        http::Request::post(path)
            .header(http::header::HOST, authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("tollgate/", env!("CARGO_PKG_VERSION")),
            )
            .header(SIGNATURE_HEADER, signature.as_str())
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())
    };
    // The kept connection, if it goes to the same address and is still open. The receiver may
    // have closed it while it was idle, racing this batch: then the batch goes once more, over
    // a new connection (receivers de-duplicate by event id).
    if let Some(mut k) = kept.take()
        && k.addr == addr
        && k.sender.ready().await.is_ok()
        && let Ok((status, reusable)) = exchange(&mut k.sender, request()?, addr).await
    {
        return answered(kept, k, status, reusable);
    }
    let mut k = connect(tls, &host, addr).await?;
    let (status, reusable) = exchange(&mut k.sender, request()?, addr).await?;
    answered(kept, k, status, reusable)
}

/// What an answered POST means; its connection is kept if it can carry the next batch.
fn answered(kept: &mut Option<Kept>, k: Kept, status: http::StatusCode, reusable: bool) -> Result<(), String> {
    if reusable {
        *kept = Some(k);
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the destination answered HTTP {}", status.as_u16()))
    }
}

/// A new connection to the destination at `addr` (TLS for `https://`).
async fn connect(tls: Option<&tokio_rustls::TlsConnector>, host: &str, addr: SocketAddr) -> Result<Kept, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    match tls {
        Some(connector) => {
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
            let stream = connector
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS with {host} ({addr}): {e}"))?;
            handshake(stream, addr).await
        }
        None => handshake(stream, addr).await,
    }
}

/// HTTP/1.1 over an open connection (plain or TLS), driven by a task of its own.
async fn handshake<S>(io: S, addr: SocketAddr) -> Result<Kept, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Kept { addr, sender, task })
}

/// One POST and its answer's status. The answer's body is read to its end (up to 64 KiB) so the
/// connection can carry the next request; whether it can is the second value.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
    addr: SocketAddr,
) -> Result<(http::StatusCode, bool), String> {
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("POST to {addr}: {e}"))?;
    let status = resp.status();
    let drained = Limited::new(resp.into_body(), 64 * 1024).collect().await.is_ok();
    Ok((status, drained && !sender.is_closed()))
}

/// The first resolved address the destination may use: one outside the forbidden ranges, or
/// inside a range the config allows.
fn pick_address(addrs: &[SocketAddr], allowed: &[ipnet::IpNet]) -> Result<SocketAddr, String> {
    let mut refused = None;
    for a in addrs {
        let ip = crate::ledger::keys::canonical(a.ip());
        match forbidden(ip) {
            Some(why) if !allowed.iter().any(|n| n.contains(&ip)) => refused = Some((ip, why)),
            _ => return Ok(*a),
        }
    }
    Err(match refused {
        Some((ip, why)) => format!(
            "refused: the destination resolves to {ip}, {why}; add it to the destination's allow_networks to allow it"
        ),
        None => "the destination's host resolved to no address".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{RequestRow, Retention};

    /// A store with no rows, a reader of its database, and a read-write connection for what the
    /// gateway would never do (the directory lives as long as the first value).
    fn empty_store() -> (tempfile::TempDir, Store, rusqlite::Connection, rusqlite::Connection) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), false, Retention::keep_all()).unwrap();
        let reader = store.reader().unwrap();
        let rw = rusqlite::Connection::open(dir.path().join("tollgate.db")).unwrap();
        (dir, store, reader, rw)
    }

    async fn settle_calls(store: &Store, from: usize, n: usize) {
        settle(store, from, n, |_| "allowed").await;
    }

    /// Settles `n` calls, every third one denied (not a usage event).
    async fn settle_calls_some_denied(store: &Store, from: usize, n: usize) {
        settle(store, from, n, |i| if i % 3 == 2 { "denied" } else { "allowed" }).await;
    }

    /// Settles calls `from..from + n` with the outcome `outcome(i)` and waits for their commit.
    async fn settle(store: &Store, from: usize, n: usize, outcome: impl Fn(usize) -> &'static str) {
        for i in from..from + n {
            store
                .submit(Op::Request(RequestRow {
                    created_at: i as i64,
                    outcome: outcome(i).into(),
                    ..RequestRow::sample(&format!("req_{i:08}"))
                }))
                .unwrap();
        }
        store.sync().await.unwrap();
    }

    #[tokio::test]
    async fn destinations_sharing_the_usage_outbox_each_read_every_usage_event_once_and_in_order() {
        let (_dir, store, conn, _) = empty_store();
        // Calls settled before the outbox follows the log are in the database only.
        settle_calls_some_denied(&store, 0, 50).await;
        // A small window, so that destinations trail it, catch up with it and run past it.
        let outbox = Arc::new(UsageOutbox::new(40));
        outbox.follow(&store);
        let mut cursors = [0i64; 3];
        let mut seen: [Vec<i64>; 3] = Default::default();
        let mut settled = 50;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..3000 {
            match next(4) {
                0 => {
                    let n = next(60) as usize;
                    settle_calls_some_denied(&store, settled, n).await;
                    settled += n;
                }
                d => {
                    let d = d as usize - 1;
                    let limit = 1 + next(70) as usize;
                    let read = outbox.after(&conn, cursors[d], limit).unwrap();
                    assert!(read.len() <= limit);
                    // Counted and read under one lock: the writer may tell of a commit in between.
                    let shared = outbox.shared.lock().unwrap();
                    if let Some(held) = shared.read(cursors[d], usize::MAX) {
                        assert_eq!(shared.count_after(cursors[d]), held.len());
                    }
                    drop(shared);
                    if let Some(last) = read.last() {
                        cursors[d] = last.seq;
                    }
                    seen[d].extend(read.iter().map(|u| u.seq));
                }
            }
        }
        let usage: Vec<i64> = (1..=settled as i64).filter(|seq| seq % 3 != 0).collect();
        for d in 0..3 {
            loop {
                let read = outbox.after(&conn, cursors[d], 50).unwrap();
                let Some(last) = read.last() else { break };
                cursors[d] = last.seq;
                seen[d].extend(read.iter().map(|u| u.seq));
            }
            assert_eq!(seen[d], usage, "destination {d}");
        }
        // Each event is the row's, serialized.
        let first = outbox.after(&conn, 0, 1).unwrap();
        let event: Value = serde_json::from_slice(first.iter().next().unwrap().json).unwrap();
        assert_eq!(event["id"], "usage_req_00000000");
        assert_eq!(event["data"]["keyId"], "key_1");
    }

    #[tokio::test]
    async fn committed_calls_are_served_from_memory_serialized_once() {
        let (_dir, store, conn, rw) = empty_store();
        settle_calls(&store, 0, 5).await;
        let outbox = Arc::new(UsageOutbox::new(SHARED_USAGE));
        outbox.follow(&store);
        settle_calls(&store, 5, 10).await;
        // Gone from the database, the rows committed since the outbox followed the log are still
        // read, from memory ...
        assert_eq!(rw.execute("DELETE FROM requests_0", []).unwrap(), 15);
        let first = outbox.after(&conn, 5, 100).unwrap();
        let second = outbox.after(&conn, 5, 100).unwrap();
        assert_eq!(
            second.iter().map(|u| u.seq).collect::<Vec<_>>(),
            (6..=15).collect::<Vec<_>>()
        );
        let (a, b) = (first.iter().nth(3).unwrap().json, second.iter().nth(3).unwrap().json);
        assert!(std::ptr::eq(a, b), "serialized once");
        assert_eq!(outbox.available_after(5), 10);
        assert_eq!(outbox.available_after(12), 3);
        // ... and a destination behind them reads the database.
        assert!(outbox.after(&conn, 0, 100).unwrap().is_empty());
        // Once it no longer follows the log, it holds nothing, and a commit it is told of
        // anyway (the writer took it as its follower just before) is ignored.
        outbox.unfollow(&store);
        assert!(outbox.after(&conn, 5, 100).unwrap().is_empty());
        let late = RequestRow::sample("late");
        outbox.committed(15, 16, &mut [(16, &late)].into_iter());
        assert_eq!(outbox.available_after(0), 0);
    }

    #[tokio::test]
    async fn a_destination_waits_for_a_whole_batch_or_the_flush_interval() {
        let (_dir, store, _conn, _) = empty_store();
        let outbox = Arc::new(UsageOutbox::new(SHARED_USAGE));
        outbox.follow(&store);
        let far = tokio::time::Instant::now() + Duration::from_secs(600);
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.wait(0, 10, far).await }
        });
        settle_calls(&store, 0, 9).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "nine events are not a batch of ten");
        settle_calls(&store, 9, 1).await;
        let flush = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(!flush, "woken by a whole batch, not by the flush interval");
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(
            outbox.wait(10, 10, soon).await,
            "nothing new: the flush interval ends the wait"
        );
    }

    #[test]
    fn the_delivery_thread_runs_tasks_until_dropped_and_then_stops_them() {
        let thread = DeliveryThread::start().unwrap();
        let (ran_tx, ran_rx) = std::sync::mpsc::channel();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
        thread.handle.spawn(async move {
            ran_tx.send(std::thread::current().name().map(String::from)).unwrap();
            // Holds its sender until the task is dropped.
            let _held = held_tx;
            std::future::pending::<()>().await;
        });
        let name = ran_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("tollgate-hooks"));
        drop(thread);
        let stopped = std::thread::spawn(move || held_rx.blocking_recv());
        let waited = std::time::Instant::now();
        while !stopped.is_finished() {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "the task outlived its thread"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(stopped.join().unwrap().is_err(), "dropped, not completed");
    }

    /// A usage event as serde writes it: what the hand-written one must be, byte for byte.
    fn usage_event(r: &RequestRow) -> String {
        let mut out = Vec::new();
        write_usage_event(&mut out, r);
        String::from_utf8(out).unwrap()
    }

    fn usage_event_by_serde(r: &RequestRow) -> String {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct UsageEvent<'a> {
            id: String,
            #[serde(rename = "type")]
            kind: &'static str,
            created_at: i64,
            data: UsageData<'a>,
        }
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct UsageData<'a> {
            request_id: &'a str,
            key_id: Option<&'a str>,
            method: &'a str,
            tool: Option<&'a str>,
            credits: i64,
            outcome: &'a str,
            reason: Option<&'a str>,
            duration_ms: f64,
        }
        serde_json::to_string(&UsageEvent {
            id: format!("usage_{}", r.request_id),
            kind: "usage",
            created_at: r.created_at,
            data: UsageData {
                request_id: &r.request_id,
                key_id: r.key_id.as_deref(),
                method: &r.method,
                tool: r.tool.as_deref(),
                credits: r.credits,
                outcome: &r.outcome,
                reason: r.reason.as_deref(),
                duration_ms: r.duration_us as f64 / 1000.0,
            },
        })
        .unwrap()
    }

    #[test]
    fn a_usage_event_is_written_exactly_as_serde_writes_it() {
        let durations = [
            0,
            1,
            10,
            100,
            999,
            1_000,
            1_001,
            1_010,
            1_500,
            12_345,
            123_456_789,
            999_999_999_999_999,
            1_000_000_000_000_000,
            i64::MAX,
            -1,
            -1_500,
        ];
        for (i, us) in durations.into_iter().enumerate() {
            let r = RequestRow {
                duration_us: us,
                credits: i as i64 * 7 - 20,
                created_at: 1_764_000_000_000 + i as i64,
                ..RequestRow::sample(&format!("req_{i}"))
            };
            assert_eq!(usage_event(&r), usage_event_by_serde(&r), "{us} µs");
        }
        let odd = RequestRow {
            request_id: "id \"quoted\" \\ tab\t nl\n \u{1} é 日本 /".into(),
            key_id: None,
            tool: None,
            outcome: "refunded".into(),
            reason: Some("upstream said \"no\"\r\n".into()),
            ..RequestRow::sample("x")
        };
        assert_eq!(usage_event(&odd), usage_event_by_serde(&odd));
        let parsed: Value = serde_json::from_str(&usage_event(&odd)).unwrap();
        assert_eq!(parsed["data"]["requestId"], odd.request_id.as_str());
        assert_eq!(parsed["data"]["keyId"], Value::Null);
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body_in_hex() {
        // RFC 4231 test case 2, with the message split as "<t>.<body>" would be.
        assert_eq!(
            sign("Jefe", 0, b"what do ya want for nothing?").len(),
            64,
            "hex of 32 bytes"
        );
        let whole = {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
            mac.update(b"17.{\"a\":1}");
            mac.finalize().into_bytes()
        };
        let hex: String = whole.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sign("Jefe", 17, b"{\"a\":1}"), hex);
        assert_ne!(sign("Jefe", 18, b"{\"a\":1}"), hex, "the time is signed");
    }

    #[test]
    fn private_loopback_link_local_and_metadata_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(forbidden(ip.parse().unwrap()).is_some(), "{ip} must be refused");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"] {
            assert!(forbidden(ip.parse().unwrap()).is_none(), "{ip} is public");
        }
    }

    #[test]
    fn an_allowed_network_lets_a_forbidden_address_through_and_nothing_else() {
        let local: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let meta: SocketAddr = "169.254.169.254:80".parse().unwrap();
        let allow = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(pick_address(&[local], &allow).unwrap(), local);
        assert!(pick_address(&[local], &[]).unwrap_err().contains("127.0.0.1"));
        assert!(pick_address(&[meta], &allow).unwrap_err().contains("metadata"));
    }
}
