//! Prometheus metrics: what is counted and timed, under which names, with label values taken only
//! from bounded sets (known methods, outcomes and refusal reasons, the upstream's own tool names up
//! to a cap, configured webhook destinations) — never from what a client sends.
//!
//! The `metrics` crate's facade records; `metrics-exporter-prometheus` renders the text format for
//! `GET /metrics`. Until [`install`] runs (unit tests), every record is a no-op.
//!
//! The per-request counters are counted per thread first ([`Counts`]) and summed into the
//! exporter's counters when `/metrics` is rendered: a paid call counted straight into the shared
//! counters made five atomic read-modify-writes on cache lines the other connection thread writes
//! too, ~1 µs of its CPU at c=32 (measured with the counting skipped). Latency samples likewise go
//! to the histograms in runs, and whatever a thread still holds is handed over at render.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram, counter, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::gate::CallRecord;
use crate::ledger::RequestRow;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(1);

/// Latency buckets, seconds: 50 µs to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        describe();
        let _ = HANDLES.set(register());
        // Histogram samples pile up until upkeep drains them into their buckets; with a recorder
        // built by hand (no exporter task of its own), that is ours to run.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("tollgate-metrics".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP);
                    upkeep.run_upkeep();
                }
            })
            .expect("spawning the metrics upkeep thread");
        handle
    })
}

/// The metrics in the Prometheus text format.
pub fn render() -> String {
    let handle = install();
    if let Some(h) = handles() {
        publish(h);
    }
    handle.render()
}

fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        "tollgate_requests_total",
        "MCP requests by method and outcome (free, allowed, refunded, denied, error)"
    );
    describe_counter!("tollgate_refusals_total", "Requests refused at the gate, by reason");
    describe_counter!("tollgate_credits_charged_total", "Credits kept from settled calls");
    describe_counter!("tollgate_tool_calls_total", "tools/call requests by tool and outcome");
    describe_histogram!(
        "tollgate_upstream_latency_seconds",
        "Time the upstream took to answer a forwarded request"
    );
    describe_histogram!(
        "tollgate_gateway_latency_seconds",
        "Time the gateway added to a request (its whole time minus the upstream's)"
    );
    describe_counter!("tollgate_plugin_calls_total", "Policy plugin calls by role and result");
    describe_histogram!("tollgate_plugin_latency_seconds", "Policy plugin call time by role");
    describe_counter!(
        "tollgate_webhook_deliveries_total",
        "Webhook batch delivery attempts by destination and result"
    );
    describe_counter!("tollgate_webhook_events_total", "Events delivered by destination");
    describe_counter!(
        "tollgate_webhook_dead_letters_total",
        "Batches moved to the dead-letter queue by destination"
    );
    describe_histogram!(
        "tollgate_store_commit_seconds",
        "Database commit time (one commit holds many changes)"
    );
    describe_histogram!("tollgate_store_commit_ops", "Changes per database commit");
}

/// The methods a label may name; any other is `other`.
const METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "server/discover",
    "notification",
    "response",
    "other",
];

/// Refusal reasons a label may name.
const REASONS: &[&str] = &[
    "missing_key",
    "unknown_key",
    "revoked",
    "suspended",
    "expired",
    "tool_forbidden",
    "ip_forbidden",
    "insufficient_credits",
    "spending_limit",
    "quota",
    "rate_limited",
    "ledger_unavailable",
    "policy_denied",
    "pricing_policy_failed",
    "other",
];

const OUTCOMES: &[&str] = &["free", "allowed", "refunded", "denied", "error", "other"];

/// The position of `v` in `set`, or of its last entry (`other`).
fn index(v: &str, set: &[&'static str]) -> usize {
    set.iter().position(|s| *s == v).unwrap_or(set.len() - 1)
}

/// The method label of a request.
pub fn method_label(method: &str) -> &'static str {
    METHODS[index(method, METHODS)]
}

/// Handles registered once for every label combination of the per-request metrics, so that
/// summing the per-thread counts into them is a store, not a registry lookup with its allocations.
struct Handles {
    /// `[method][outcome]`
    requests: Vec<Vec<Counter>>,
    refusals: Vec<Counter>,
    credits: Counter,
    upstream: Histogram,
    gateway: Histogram,
    /// The tools the upstream listed (index 0: `other`), read on every call without a lock.
    tool_index: arc_swap::ArcSwap<foldhash::HashMap<String, usize>>,
    /// Per tool index: one counter per outcome. Written only when a tool is learned.
    tools: Mutex<Vec<Vec<Counter>>>,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

fn handles() -> Option<&'static Handles> {
    HANDLES.get()
}

fn tool_counters(tool: &str) -> Vec<Counter> {
    let t = tool.to_string();
    OUTCOMES
        .iter()
        .map(|o| counter!("tollgate_tool_calls_total", "tool" => t.clone(), "outcome" => *o))
        .collect()
}

fn register() -> Handles {
    let mut index = foldhash::HashMap::default();
    index.insert(OTHER.to_string(), 0);
    Handles {
        requests: METHODS
            .iter()
            .map(|m| {
                OUTCOMES
                    .iter()
                    .map(|o| counter!("tollgate_requests_total", "method" => *m, "outcome" => *o))
                    .collect()
            })
            .collect(),
        refusals: REASONS
            .iter()
            .map(|r| counter!("tollgate_refusals_total", "reason" => *r))
            .collect(),
        credits: counter!("tollgate_credits_charged_total"),
        upstream: histogram!("tollgate_upstream_latency_seconds"),
        gateway: histogram!("tollgate_gateway_latency_seconds"),
        tool_index: arc_swap::ArcSwap::from_pointee(index),
        tools: Mutex::new(vec![tool_counters(OTHER)]),
    }
}

const OTHER: &str = "other";
/// At most this many tool labels.
const MAX_TOOLS: usize = 256;

/// Learns tool names from an upstream `tools/list` answer: the only ones a label may carry.
pub fn learn_tools<'a>(names: impl IntoIterator<Item = &'a str>) {
    let Some(h) = handles() else { return };
    let names: Vec<&str> = names.into_iter().collect();
    if names.iter().all(|n| h.tool_index.load().contains_key(*n)) {
        return;
    }
    // One learner at a time: the lock orders the index's copies.
    let mut tools = h.tools.lock().unwrap();
    let mut index = (**h.tool_index.load()).clone();
    for n in names {
        if tools.len() > MAX_TOOLS {
            break;
        }
        if n.len() <= 128 && !index.contains_key(n) {
            index.insert(n.to_string(), tools.len());
            tools.push(tool_counters(n));
        }
    }
    h.tool_index.store(std::sync::Arc::new(index));
}

/// One thread's per-request counts since start, summed into the exporter's counters at render.
struct Counts {
    /// `[method][outcome]`
    requests: [[u64; OUTCOMES.len()]; METHODS.len()],
    refusals: [u64; REASONS.len()],
    credits: u64,
    /// Per tool index, per outcome.
    tools: Vec<[u64; OUTCOMES.len()]>,
    /// Latency samples (upstream, gateway added; seconds) not yet handed to the histograms: they
    /// go in runs of [`SAMPLES`], so that the histograms' shared lines are written by one thread
    /// at a time, not by both connection threads on every call.
    samples: Vec<(f64, f64)>,
}

/// Latency samples a thread holds before recording them (and at most that many per thread that
/// wait for the next render).
const SAMPLES: usize = 64;

impl Counts {
    const fn new() -> Counts {
        Counts {
            requests: [[0; OUTCOMES.len()]; METHODS.len()],
            refusals: [0; REASONS.len()],
            credits: 0,
            tools: Vec::new(),
            samples: Vec::new(),
        }
    }

    /// Holds a forwarded request's latency sample; a full run goes to the histograms.
    fn sample(&mut self, h: &Handles, total: Duration, upstream: Option<Duration>) {
        let Some(u) = upstream else { return };
        self.samples
            .push((u.as_secs_f64(), total.saturating_sub(u).as_secs_f64()));
        if self.samples.len() >= SAMPLES {
            self.record_samples(h);
        }
    }

    fn record_samples(&mut self, h: &Handles) {
        for (upstream, gateway) in self.samples.drain(..) {
            h.upstream.record(upstream);
            h.gateway.record(gateway);
        }
    }
}

/// Every thread's counts. A thread's lock is taken by that thread on each request and by
/// [`render`] (rarely), so it is almost never contended and its line stays with its thread.
static COUNTS: std::sync::LazyLock<thread_local::ThreadLocal<Mutex<Counts>>> =
    std::sync::LazyLock::new(thread_local::ThreadLocal::new);

fn count(f: impl FnOnce(&mut Counts)) {
    f(&mut COUNTS.get_or(|| Mutex::new(Counts::new())).lock().unwrap());
}

/// Sums every thread's counts into the exporter's counters (which only ever grow to the sums), and
/// hands the histograms every sample still held.
fn publish(h: &Handles) {
    let mut total = Counts::new();
    for shard in COUNTS.iter() {
        let mut c = shard.lock().unwrap();
        c.record_samples(h);
        for (t, s) in total.requests.iter_mut().zip(&c.requests) {
            add(t, s);
        }
        add(&mut total.refusals, &c.refusals);
        total.credits += c.credits;
        if total.tools.len() < c.tools.len() {
            total.tools.resize(c.tools.len(), [0; OUTCOMES.len()]);
        }
        for (t, s) in total.tools.iter_mut().zip(&c.tools) {
            add(t, s);
        }
    }
    for (counters, sums) in h.requests.iter().zip(&total.requests) {
        set(counters, sums);
    }
    set(&h.refusals, &total.refusals);
    h.credits.absolute(total.credits);
    let tools = h.tools.lock().unwrap();
    for (counters, sums) in tools.iter().zip(&total.tools) {
        set(counters, sums);
    }
}

fn add(total: &mut [u64], counts: &[u64]) {
    for (t, c) in total.iter_mut().zip(counts) {
        *t += c;
    }
}

fn set(counters: &[Counter], sums: &[u64]) {
    for (c, s) in counters.iter().zip(sums) {
        c.absolute(*s);
    }
}

/// One request that went through the gate (its request-log row), with its latency if it was
/// forwarded.
pub fn call(r: &CallRecord<'_>, row: &RequestRow) {
    let Some(h) = handles() else { return };
    let outcome = index(&row.outcome, OUTCOMES);
    let method = index(r.method, METHODS);
    let refusal =
        matches!(OUTCOMES[outcome], "denied" | "error").then(|| index(row.reason.as_deref().unwrap_or(""), REASONS));
    let tool = r
        .tool
        .filter(|_| r.method == "tools/call")
        .map(|tool| h.tool_index.load().get(tool).copied().unwrap_or(0));
    count(|c| {
        c.requests[method][outcome] += 1;
        if let Some(reason) = refusal {
            c.refusals[reason] += 1;
        }
        if row.credits > 0 {
            c.credits += row.credits as u64;
        }
        if let Some(t) = tool {
            if c.tools.len() <= t {
                c.tools.resize(t + 1, [0; OUTCOMES.len()]);
            }
            c.tools[t][outcome] += 1;
        }
        c.sample(h, Duration::from_micros(row.duration_us as u64), r.upstream);
    });
}

/// A request that did not go through the gate (free methods, notifications, refused early): its
/// whole time, and the upstream's if it was forwarded.
pub fn free(method: &str, failed: bool, total: Duration, upstream: Option<Duration>) {
    let Some(h) = handles() else { return };
    let outcome = index(if failed { "error" } else { "free" }, OUTCOMES);
    let method = index(method, METHODS);
    count(|c| {
        c.requests[method][outcome] += 1;
        c.sample(h, total, upstream);
    });
}

/// A plugin role's call counters and timer, registered once.
pub struct PluginMetrics {
    ok: Counter,
    failed: Counter,
    reused: Counter,
    latency: Histogram,
}

impl PluginMetrics {
    pub fn new(role: &'static str) -> PluginMetrics {
        PluginMetrics {
            ok: counter!("tollgate_plugin_calls_total", "role" => role, "result" => "ok"),
            failed: counter!("tollgate_plugin_calls_total", "role" => role, "result" => "failed"),
            reused: counter!("tollgate_plugin_reused_total", "role" => role),
            latency: histogram!("tollgate_plugin_latency_seconds", "role" => role),
        }
    }

    /// One call.
    pub fn record(&self, elapsed: Duration, failed: bool) {
        if failed { &self.failed } else { &self.ok }.increment(1);
        self.latency.record(elapsed.as_secs_f64());
    }

    /// One answer reused instead of a call.
    pub fn reused(&self) {
        self.reused.increment(1);
    }
}

/// One database commit of `ops` changes.
pub fn commit(elapsed: Duration, ops: usize) {
    histogram!("tollgate_store_commit_seconds").record(elapsed.as_secs_f64());
    histogram!("tollgate_store_commit_ops").record(ops as f64);
}

/// One webhook delivery attempt (`result`: ok, failed, dead) of `events` events.
pub fn webhook(destination: &str, result: &'static str, events: usize) {
    let d = destination.to_string();
    counter!("tollgate_webhook_deliveries_total", "destination" => d.clone(), "result" => result).increment(1);
    match result {
        "ok" => counter!("tollgate_webhook_events_total", "destination" => d).increment(events as u64),
        "dead" => counter!("tollgate_webhook_dead_letters_total", "destination" => d).increment(1),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_only_from_known_sets() {
        assert_eq!(method_label("tools/call"), "tools/call");
        assert_eq!(method_label("x/../evil{label=\"1\"}"), "other");
        assert_eq!(REASONS[index("rate_limited", REASONS)], "rate_limited");
        assert_eq!(REASONS[index("shadow: would charge 3", REASONS)], "other");
        assert_eq!(OUTCOMES[index("weird", OUTCOMES)], "other");
    }

    #[test]
    fn counts_and_samples_made_on_many_threads_are_all_rendered() {
        install();
        let samples = |text: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with("tollgate_upstream_latency_seconds_count"));
            line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
        };
        let before = samples(&render());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for i in 0..1000 {
                        // Ten forwarded: fewer than a run, all still held by the thread when it ends.
                        let upstream = (i < 10).then_some(Duration::from_micros(200));
                        free("resources/unsubscribe", true, Duration::from_micros(300), upstream);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = render();
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("tollgate_requests_total{")
                    && l.contains("resources/unsubscribe")
                    && l.contains("\"error\"")
            })
            .expect("the counter is rendered");
        assert_eq!(line.rsplit(' ').next(), Some("4000"), "{line}");
        assert!(samples(&text) >= before + 40.0, "{text}");
        // Rendering again neither loses nor doubles anything.
        assert!(render().contains(line));
    }
}
