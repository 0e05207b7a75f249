//! The gate: which calls need a key, whose key it is, whether it may call, what the call costs,
//! and how a reserved charge is settled (kept, or refunded per policy) once the answer is known.

use std::path::Path;
use std::sync::Arc;

use http::HeaderMap;
use serde::Deserialize;

use crate::config::BillingConfig;
use crate::jsonrpc::Message;
use crate::ledger::keys::{self, KeyHash};
use crate::ledger::{DebitError, Key, KeySettings, Ledger, LedgerError, Reservation, Status, StoreError};
use crate::policy::pricing::{CallInput, Price, Priced};
use crate::policy::{Policy, PolicyError};
use crate::upstream::Answer;
use crate::window::Window;

/// Why a call is refused at the gate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("an API key is required: send it as X-API-Key or Authorization: Bearer")]
    MissingKey,
    #[error("unknown API key")]
    UnknownKey,
    #[error("the API key is revoked")]
    Revoked,
    #[error("the API key is suspended")]
    Suspended,
    #[error("the API key has expired")]
    Expired,
    #[error("this API key may not call the tool {0:?}")]
    ToolForbidden(String),
    #[error("this API key is not accepted from {0}")]
    IpForbidden(std::net::IpAddr),
    #[error("{0}")]
    Limit(DebitError),
    #[error("rate limit of {limit} reached{}; retry in {retry_after_ms} ms", scope.as_ref().map(|t| format!(" for tool {t:?}")).unwrap_or_default())]
    RateLimited {
        limit: String,
        scope: Option<String>,
        retry_after_ms: u64,
    },
    #[error("insufficient credits: {available} available, {needed} needed")]
    Insufficient { available: i64, needed: i64 },
    #[error("the ledger is unavailable; no charge can be recorded")]
    LedgerUnavailable,
    #[error("refused by the pricing policy: {0}")]
    PolicyDenied(String),
    /// The pricing plugin failed (details are in the log, not in the answer).
    #[error("pricing policy failed")]
    PolicyFailed,
}

impl Refusal {
    /// A short, stable name for the request log.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MissingKey => "missing_key",
            Refusal::UnknownKey => "unknown_key",
            Refusal::Revoked => "revoked",
            Refusal::Suspended => "suspended",
            Refusal::Expired => "expired",
            Refusal::ToolForbidden(_) => "tool_forbidden",
            Refusal::IpForbidden(_) => "ip_forbidden",
            Refusal::Insufficient { .. } => "insufficient_credits",
            Refusal::Limit(DebitError::SpendingLimit { .. }) => "spending_limit",
            Refusal::Limit(_) => "quota",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::LedgerUnavailable => "ledger_unavailable",
            Refusal::PolicyDenied(_) => "policy_denied",
            Refusal::PolicyFailed => "pricing_policy_failed",
        }
    }
}

impl Outcome {
    fn reason(self) -> Option<&'static str> {
        match self {
            Outcome::Ok => None,
            Outcome::ToolError => Some("tool_error"),
            Outcome::RpcError => Some("upstream_error"),
            Outcome::Timeout => Some("timeout"),
            Outcome::NotForwarded => Some("not_forwarded"),
            Outcome::Abandoned => Some("client_gone"),
        }
    }
}

/// What the request log records of one call.
pub struct CallRecord<'a> {
    pub request_id: &'a str,
    /// The client's own `X-Request-Id`, if it sent one.
    pub client_request_id: Option<&'a str>,
    /// How long the upstream took, if the call reached it.
    pub upstream: Option<std::time::Duration>,
    pub key_id: Option<&'a str>,
    pub method: &'a str,
    pub tool: Option<&'a str>,
    pub started: std::time::Instant,
}

impl From<LedgerError> for Refusal {
    fn from(e: LedgerError) -> Refusal {
        match e {
            LedgerError::Debit(DebitError::Insufficient { available, needed }) => {
                Refusal::Insufficient { available, needed }
            }
            LedgerError::Debit(d @ (DebitError::SpendingLimit { .. } | DebitError::Quota { .. })) => Refusal::Limit(d),
            LedgerError::Revoked => Refusal::Revoked,
            LedgerError::UnknownKey(_) => Refusal::UnknownKey,
            LedgerError::Store(e) => {
                tracing::error!(error = %e, "ledger write failed");
                Refusal::LedgerUnavailable
            }
        }
    }
}

/// How a call ended, for settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A result.
    Ok,
    /// A result with `isError: true`.
    ToolError,
    /// A JSON-RPC error from the upstream.
    RpcError,
    /// No answer in time, or the upstream went away mid-call.
    Timeout,
    /// The call never reached the upstream.
    NotForwarded,
    /// The client went away before its answer (settled as a timeout is: refunded unless
    /// `refund_on` leaves out "timeout").
    Abandoned,
}

/// Why the gate could not start.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read or write the admin key hash {path}: {source}")]
    AdminKey {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("loading the policy plugins: {0}")]
    Policy(#[from] PolicyError),
    #[error("setting up the upstream's TLS client: {0}")]
    UpstreamTls(String),
}

/// The gate and its ledger; cheap to clone.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swapped whole by a config reload; a request reads one snapshot.
    config: arc_swap::ArcSwap<BillingConfig>,
    ledger: Ledger,
    admin_hash: KeyHash,
    /// Peers that sent wrong admin keys: a limiter of failures, and when they may try again.
    admin_failures: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, AdminFailures>>,
    /// Rate limiters per key id, rebuilt when the key's settings change.
    limits: std::sync::RwLock<foldhash::HashMap<String, Arc<Limits>>>,
    /// The pricing and health plugins.
    policy: Policy,
    /// Per-minute totals of the request log, for health scoring.
    window: Window,
}

/// Wrong admin keys from one peer.
struct AdminFailures {
    limiter: governor::DefaultDirectRateLimiter,
    blocked_until: Option<std::time::Instant>,
}

/// Wrong admin keys one peer may send per minute before it is refused for a while.
const ADMIN_FAILURES_PER_MINUTE: u32 = 10;

/// A key's rate limiters (governor's GCRA: a call costs one cell; the error says when to retry).
struct Limits {
    /// The settings these were built from.
    settings: Arc<KeySettings>,
    key: Option<(String, governor::DefaultDirectRateLimiter)>,
    tools: foldhash::HashMap<String, (String, governor::DefaultDirectRateLimiter)>,
}

/// Parses `N/s`, `N/min` or `N/h` (N from 1 to 1,000,000) into a quota.
pub fn parse_rate(spec: &str) -> Option<governor::Quota> {
    let (n, per) = spec.trim().split_once('/')?;
    let n: u32 = n.trim().parse().ok().filter(|n| (1..=1_000_000).contains(n))?;
    let n = std::num::NonZeroU32::new(n)?;
    match per.trim() {
        "s" | "sec" | "second" => Some(governor::Quota::per_second(n)),
        "m" | "min" | "minute" => Some(governor::Quota::per_minute(n)),
        "h" | "hour" => Some(governor::Quota::per_hour(n)),
        _ => None,
    }
}

fn limiter(spec: &str) -> Option<(String, governor::DefaultDirectRateLimiter)> {
    parse_rate(spec).map(|q| (spec.to_string(), governor::RateLimiter::direct(q)))
}

fn check_limiter(l: &(String, governor::DefaultDirectRateLimiter), scope: Option<&str>) -> Result<(), Refusal> {
    use governor::clock::Clock;
    l.1.check().map_err(|not_until| {
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        Refusal::RateLimited {
            limit: l.0.clone(),
            scope: scope.map(str::to_string),
            retry_after_ms: wait.as_millis().max(1) as u64,
        }
    })
}

/// The file under the data directory that holds the generated admin key's hash.
const ADMIN_HASH_FILE: &str = "admin-key.sha256";

impl Gate {
    /// Opens the ledger. The admin key comes from the config (or `TOLLGATE_ADMIN_KEY`); without
    /// one, a key is generated at first start, returned here to be shown once, and only its hash
    /// is kept.
    pub fn open(config: &BillingConfig) -> Result<(Gate, Option<String>), GateError> {
        let retention = crate::ledger::Retention::new(config.log_retention_days * 86_400_000, config.log_max_rows);
        let ledger = Ledger::open(&config.data_dir, config.power_safe, retention)?;
        let (admin_hash, shown_once) = match &config.admin_key {
            Some(k) => (keys::hash(k), None),
            None => admin_key_from_file(&config.data_dir)?,
        };
        let policy = Policy::load(&config.policy, Some(config.data_dir.join("plugin-cache")))?;
        let window = Window::default();
        let since = crate::ledger::now_ms() - crate::window::MAX_MINUTES as i64 * 60_000;
        for (minute, outcome, n, credits, total_us, max_us) in ledger.store().request_minutes(since)? {
            window.add(minute, &outcome, n, credits, total_us, max_us);
        }
        Ok((
            Gate {
                inner: Arc::new(Inner {
                    config: arc_swap::ArcSwap::from_pointee(config.clone()),
                    ledger,
                    admin_hash,
                    limits: std::sync::RwLock::new(foldhash::HashMap::default()),
                    admin_failures: std::sync::Mutex::new(std::collections::HashMap::new()),
                    policy,
                    window,
                }),
            },
            shown_once,
        ))
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// The billing settings in force now.
    pub fn config(&self) -> Arc<BillingConfig> {
        self.inner.config.load_full()
    }

    /// Puts new billing settings in force (a config reload): free methods, refund rules, the
    /// default rate limit and shadow mode apply to the next request. When the default rate limit
    /// changes, keys' rate limiters are rebuilt, so it takes effect at once (otherwise they keep
    /// their state).
    pub fn set_config(&self, config: BillingConfig) {
        let rate_changed = self.inner.config.load().rate_limit != config.rate_limit;
        self.inner.config.store(Arc::new(config));
        if rate_changed {
            self.inner.limits.write().unwrap().clear();
        }
    }

    /// Whether a request with this method passes without a key and without a charge.
    pub fn is_free(&self, method: &str) -> bool {
        self.inner.config.load().free_methods.iter().any(|m| m == method)
    }

    /// Whether `secret` is the admin key (compared in constant time).
    pub fn is_admin(&self, secret: &str) -> bool {
        keys::same_hash(&keys::hash(secret), &self.inner.admin_hash)
    }

    /// How long `peer` must wait before trying an admin key again, if it is blocked.
    pub fn admin_blocked(&self, peer: std::net::IpAddr) -> Option<std::time::Duration> {
        let map = self.inner.admin_failures.lock().unwrap();
        let until = map.get(&peer)?.blocked_until?;
        until.checked_duration_since(std::time::Instant::now())
    }

    /// Counts a wrong admin key from `peer`; past the limit, the peer is blocked for a while.
    pub fn admin_failed(&self, peer: std::net::IpAddr) {
        use governor::clock::Clock;
        let mut map = self.inner.admin_failures.lock().unwrap();
        if map.len() >= 100_000 {
            // Bounded memory under a spray of addresses: forget the oldest state wholesale.
            map.clear();
        }
        let entry = map.entry(peer).or_insert_with(|| AdminFailures {
            limiter: governor::RateLimiter::direct(governor::Quota::per_minute(
                std::num::NonZeroU32::new(ADMIN_FAILURES_PER_MINUTE).expect("non-zero"),
            )),
            blocked_until: None,
        });
        if let Err(not_until) = entry.limiter.check() {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            entry.blocked_until = Some(std::time::Instant::now() + wait.max(std::time::Duration::from_secs(1)));
        }
    }

    /// The client key a request carries (`X-API-Key`, or `Authorization: Bearer`), if it may be
    /// served.
    pub fn key_of(&self, headers: &HeaderMap) -> Result<Arc<Key>, Refusal> {
        self.admit(self.holder_of(headers)?)
    }

    /// The key whose secret the request carries (`X-API-Key`, or `Authorization: Bearer`),
    /// whatever its status: who sends the request, not whether it may be served.
    pub fn holder_of(&self, headers: &HeaderMap) -> Result<Arc<Key>, Refusal> {
        let secret = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            })
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(Refusal::MissingKey)?;
        self.inner.ledger.authenticate(secret).ok_or(Refusal::UnknownKey)
    }

    /// `key` if its status lets it be served: active and not expired.
    pub fn admit(&self, key: Arc<Key>) -> Result<Arc<Key>, Refusal> {
        self.admit_at(key, crate::ledger::now_ms())
    }

    /// [`Gate::admit`] at `now_ms` (read once for the whole call).
    pub fn admit_at(&self, key: Arc<Key>, now_ms: i64) -> Result<Arc<Key>, Refusal> {
        match key.status() {
            Status::Active if key.is_expired(now_ms) => Err(Refusal::Expired),
            Status::Active => Ok(key),
            Status::Suspended => Err(Refusal::Suspended),
            Status::Revoked => Err(Refusal::Revoked),
        }
    }

    /// Whether a key with `settings` is accepted from the client address `ip`.
    pub fn check_ip(&self, settings: &KeySettings, ip: std::net::IpAddr) -> Result<(), Refusal> {
        if settings.allows_ip(ip) {
            Ok(())
        } else {
            Err(Refusal::IpForbidden(keys::canonical(ip)))
        }
    }

    /// Whether `key` may make this call (`tool`: the tool of a `tools/call`, "" if it names none):
    /// its tool lists, then its rate limits (the key's, then the key×tool one).
    pub fn check_call(&self, key: &Key, settings: &Arc<KeySettings>, tool: Option<&str>) -> Result<(), Refusal> {
        if let Some(tool) = tool
            && !settings.allows_tool(tool)
        {
            return Err(Refusal::ToolForbidden(tool.to_string()));
        }
        // No limit set for the key, its tools or the gateway: no limiter to look up.
        if settings.rate_limit.is_none()
            && settings.tool_rate_limits.is_empty()
            && self.inner.config.load().rate_limit.is_none()
        {
            return Ok(());
        }
        let limits = self.limits_of(key, settings);
        if let Some(l) = &limits.key {
            check_limiter(l, None)?;
        }
        if let Some(tool) = tool
            && let Some(l) = limits.tools.get(tool)
        {
            check_limiter(l, Some(tool))?;
        }
        Ok(())
    }

    fn limits_of(&self, key: &Key, settings: &Arc<KeySettings>) -> Arc<Limits> {
        if let Some(l) = self.inner.limits.read().unwrap().get(&key.id)
            && Arc::ptr_eq(&l.settings, settings)
        {
            return l.clone();
        }
        let spec = settings
            .rate_limit
            .as_deref()
            .or(self.inner.config.load().rate_limit.as_deref())
            .map(str::to_string);
        let built = Arc::new(Limits {
            settings: settings.clone(),
            key: spec.as_deref().and_then(limiter),
            tools: settings
                .tool_rate_limits
                .iter()
                .filter_map(|(t, s)| limiter(s).map(|l| (t.clone(), l)))
                .collect(),
        });
        self.inner.limits.write().unwrap().insert(key.id.clone(), built.clone());
        built
    }

    /// A `tools/list` answer as a key should see it: only the tools it may call, each with its
    /// price for a call without arguments in `_meta["tollgate/price"]` (omitted where the pricing
    /// plugin refuses or fails).
    pub fn view_tools(&self, m: Message, key: Option<&Key>) -> Message {
        if !m.is_response() || m.is_error() {
            return m;
        }
        let Some(mut result) = m.result_value() else { return m };
        let Some(tools) = result.get_mut("tools").and_then(|t| t.as_array_mut()) else {
            return m;
        };
        crate::metrics::learn_tools(tools.iter().filter_map(|t| t.get("name").and_then(|n| n.as_str())));
        let settings = key.map(|k| k.settings());
        tools.retain(|t| {
            let name = t.get("name").and_then(|n| n.as_str()).unwrap_or_default();
            settings.as_ref().is_none_or(|s| s.allows_tool(name))
        });
        let now_ms = crate::ledger::now_ms();
        let plugin = self.inner.policy.default_tenant().pricing.load();
        let key = key.zip(settings.as_ref());
        for t in tools.iter_mut() {
            let name = t.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
            let input = CallInput {
                method: "tools/call",
                tool: Some(&name),
                arguments: Some("{}"),
                request_id: "",
                now_ms,
            };
            let price = match plugin.price(self.inner.policy.limits(), &input, key) {
                Priced::Charge(p) => Some(p.credits),
                _ => None,
            };
            if let (Some(obj), Some(price)) = (t.as_object_mut(), price) {
                let meta = obj.entry("_meta").or_insert_with(|| serde_json::json!({}));
                if let Some(meta) = meta.as_object_mut() {
                    meta.insert("tollgate/price".into(), price.into());
                }
            }
        }
        let id = m.id().cloned().unwrap_or(serde_json::Value::Null);
        Message::from_value(&crate::jsonrpc::result_response(id, serde_json::Value::Object(result)))
    }

    /// What a paid request costs, as the pricing plugin decides. A plugin that fails refuses the
    /// call (fail closed); the details go to the log only.
    pub fn price(&self, key: &Key, settings: &Arc<KeySettings>, input: &CallInput<'_>) -> Result<Price, Refusal> {
        let plugin = self.inner.policy.default_tenant().pricing.load();
        match plugin.price(self.inner.policy.limits(), input, Some((key, settings))) {
            Priced::Charge(p) => Ok(p),
            Priced::Denied(reason) => Err(Refusal::PolicyDenied(reason)),
            Priced::Failed(f) => {
                tracing::error!(plugin = %plugin.info.file, error = %f, request_id = input.request_id, "pricing plugin failed; call refused");
                Err(Refusal::PolicyFailed)
            }
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    pub fn window(&self) -> &Window {
        &self.inner.window
    }

    /// Reserves the price of a call on `key` under `request_id`, at `now_ms`.
    pub fn reserve(&self, key: Arc<Key>, amount: i64, request_id: &str, now_ms: i64) -> Result<Reservation, Refusal> {
        Ok(self.inner.ledger.reserve_at(key, amount, request_id, now_ms)?)
    }

    /// Settles a reservation by the call's outcome and waits until the result is durable. Returns
    /// the key's balance after settlement.
    /// `price`: what was reserved for; `answer_bytes`: the size of the answer, for a surcharge.
    pub async fn settle(
        &self,
        r: Reservation,
        price: Price,
        answer_bytes: usize,
        outcome: Outcome,
        record: &CallRecord<'_>,
    ) -> Result<i64, Refusal> {
        let key = r.key.clone();
        let seq = self.settle_now(r, price, answer_bytes, outcome, record)?;
        self.inner.ledger.durable(seq).await?;
        Ok(key.credits())
    }

    /// Settles a reservation without waiting: the charge's fate, the refund (if any) and the call's
    /// request-log row are handed to the ledger (journaled, unless `durability = "power"`). Returns
    /// the sequence number that makes it durable.
    pub fn settle_now(
        &self,
        r: Reservation,
        price: Price,
        answer_bytes: usize,
        outcome: Outcome,
        record: &CallRecord<'_>,
    ) -> Result<u64, Refusal> {
        let c = self.inner.config.load();
        let keep = match outcome {
            Outcome::Ok => true,
            Outcome::ToolError => !c.refund_on_tool_error,
            Outcome::RpcError => !c.refund_on_error,
            Outcome::Timeout | Outcome::Abandoned => !c.refund_on_timeout,
            Outcome::NotForwarded => false,
        };
        let kept = if keep {
            price.kept(answer_bytes).min(r.amount)
        } else {
            0
        };
        let (outcome_name, credits) = if keep { ("allowed", kept) } else { ("refunded", 0) };
        let row = self.row(
            record,
            outcome_name,
            if keep { None } else { outcome.reason() },
            credits,
        );
        Ok(self.inner.ledger.settle(r, kept, row)?)
    }

    /// Shadow mode: the gate decides and logs, but refuses and charges nothing.
    pub fn is_shadow(&self) -> bool {
        self.inner.config.load().shadow
    }

    /// Shadow mode: whether a charge would pass, changing nothing.
    pub fn would_reserve(&self, key: &Key, amount: i64) -> Result<(), Refusal> {
        key.would_charge(amount, crate::ledger::now_ms())
            .map_err(|e| Refusal::from(LedgerError::Debit(e)))
    }

    /// Shadow mode: records a call that would have been allowed (and charged `would_cost`).
    pub fn log_shadow_allowed(&self, record: &CallRecord<'_>, would_cost: i64) {
        self.log(
            record,
            "allowed",
            Some(&format!("shadow: would charge {would_cost}")),
            0,
        );
    }

    /// Records a refused call in the request log.
    pub fn log_denied(&self, record: &CallRecord<'_>, refusal: &Refusal) {
        let outcome = if matches!(refusal, Refusal::PolicyFailed) {
            "error"
        } else {
            "denied"
        };
        self.log(record, outcome, Some(refusal.reason()), 0);
    }

    fn log(&self, r: &CallRecord<'_>, outcome: &str, reason: Option<&str>, credits: i64) {
        let row = self.row(r, outcome, reason, credits);
        // The log of a call that was not charged is not money: it is not waited for, and a failure
        // to queue it is only logged.
        if let Err(e) = self.inner.ledger.store().submit(crate::ledger::Op::Request(row)) {
            tracing::warn!(error = %e, "request log row dropped");
        }
    }

    /// A call's request-log row, counted in the health window and the metrics, and logged as the
    /// request's one line.
    fn row(&self, r: &CallRecord<'_>, outcome: &str, reason: Option<&str>, credits: i64) -> crate::ledger::RequestRow {
        let row = crate::ledger::RequestRow {
            seq: 0,
            request_id: r.request_id.into(),
            key_id: r.key_id.map(Into::into),
            method: r.method.into(),
            tool: r.tool.map(Into::into),
            outcome: outcome.into(),
            reason: reason.map(Into::into),
            credits,
            duration_us: r.started.elapsed().as_micros() as i64,
            created_at: crate::ledger::now_ms(),
        };
        self.inner
            .window
            .record(row.created_at, outcome, credits, row.duration_us as u64);
        crate::metrics::call(r, &row);
        // The request's one log line (the key's id, never its secret).
        tracing::info!(
            target: "tollgate::request",
            request_id = r.request_id,
            client_request_id = r.client_request_id,
            key_id = r.key_id,
            method = r.method,
            tool = r.tool,
            outcome,
            reason,
            credits,
            duration_us = row.duration_us,
            upstream_us = r.upstream.map(|d| d.as_micros() as u64),
            "request"
        );
        row
    }
}

/// A new gateway request id: `req_` and 16 hex digits, increasing. The count starts at the process's
/// start time in microseconds, so ids stay unique across restarts (a process would need a million
/// calls a second to reach the next one's start), and the ledger's and request log's indexes on
/// them grow at one end instead of being written all over.
pub fn next_request_id() -> compact_str::CompactString {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        std::sync::atomic::AtomicU64::new(start)
    });
    // 20 characters: kept inline, never allocated, however often a call copies it.
    compact_str::format_compact!("req_{:016x}", next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The client's address: the peer's, unless the peer is a trusted proxy, in which case the last
/// `X-Forwarded-For` entry that a trusted proxy did not add.
pub fn client_ip(peer: std::net::IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> std::net::IpAddr {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut ip = keys::canonical(peer);
    if !is_trusted(&ip) {
        return ip;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for entry in entries.into_iter().rev() {
        match entry.parse::<std::net::IpAddr>() {
            Ok(a) => {
                ip = keys::canonical(a);
                if !is_trusted(&ip) {
                    return ip;
                }
            }
            // Garbage in the header: believe nothing further left of it.
            Err(_) => return ip,
        }
    }
    ip
}

/// The tool a `tools/call` names, and its arguments as JSON text.
pub fn tool_call(msg: &Message) -> (Option<compact_str::CompactString>, Option<&str>) {
    #[derive(Deserialize)]
    struct Call<'a> {
        // Inline when short (most tool names): no allocation. (`#[serde(borrow)]` on an
        // `Option<Cow<str>>` still allocates.)
        name: Option<compact_str::CompactString>,
        #[serde(borrow)]
        arguments: Option<&'a serde_json::value::RawValue>,
    }
    let Some(raw) = msg.raw_params() else {
        return (None, None);
    };
    match serde_json::from_str::<Call>(raw.get()) {
        Ok(c) => (c.name, c.arguments.map(|a| a.get())),
        Err(_) => (None, None),
    }
}

#[derive(Deserialize)]
struct ResultPeek {
    #[serde(rename = "isError")]
    is_error: Option<bool>,
}

/// The outcome a response message stands for.
pub fn outcome_of_message(m: &Message) -> Outcome {
    if m.is_error() {
        return Outcome::RpcError;
    }
    match m.raw_result().map(|r| serde_json::from_str::<ResultPeek>(r.get())) {
        Some(Ok(ResultPeek { is_error: Some(true) })) => Outcome::ToolError,
        _ => Outcome::Ok,
    }
}

/// The outcome an answer (JSON-RPC response text, as the upstream's check saw it) stands for, and
/// the size of its `result` text.
pub fn outcome_of(body: &[u8], seen: &Answer) -> (Outcome, usize) {
    if seen.error {
        return (Outcome::RpcError, 0);
    }
    let Some(result) = seen.result.clone().and_then(|r| body.get(r)) else {
        return (Outcome::Ok, 0);
    };
    // Most results are no tool error: parsed only if the member's name (or an escape that could
    // spell it) is in the text.
    let may_be = memchr::memmem::find(result, b"isError").is_some() || memchr::memchr(b'\\', result).is_some();
    let tool_error = may_be
        && matches!(
            serde_json::from_slice::<ResultPeek>(result),
            Ok(ResultPeek { is_error: Some(true) })
        );
    let outcome = if tool_error { Outcome::ToolError } else { Outcome::Ok };
    (outcome, result.len())
}

fn admin_key_from_file(dir: &Path) -> Result<(KeyHash, Option<String>), GateError> {
    let path = dir.join(ADMIN_HASH_FILE);
    let io = |source| GateError::AdminKey {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = unhex(text.trim()).ok_or_else(|| {
                io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a hex SHA-256",
                ))
            })?;
            Ok((bytes, None))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = format!("tga_{}", &keys::new_secret()[keys::SECRET_PREFIX.len()..]);
            let hash = keys::hash(&secret);
            std::fs::write(&path, format!("{}\n", keys::hex(&hash))).map_err(io)?;
            Ok((hash, Some(secret)))
        }
        Err(e) => Err(io(e)),
    }
}

fn unhex(s: &str) -> Option<KeyHash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9, 10.1.1.1".parse().unwrap());
        let peer: std::net::IpAddr = "10.2.2.2".parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "203.0.113.9".parse::<std::net::IpAddr>().unwrap()
        );
        let stranger: std::net::IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(
            client_ip(stranger, &h, &trusted),
            stranger,
            "an untrusted peer's header is ignored"
        );
        assert_eq!(client_ip(peer, &h, &[]), peer);
    }

    #[test]
    fn answers_are_read_for_settlement() {
        let outcome = |body: &str| {
            let seen = crate::upstream::http::check_answer(body.as_bytes()).expect("a JSON-RPC response");
            outcome_of(body.as_bytes(), &seen)
        };
        assert_eq!(
            outcome(r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#),
            (Outcome::Ok, r#"{"content":[]}"#.len())
        );
        assert_eq!(
            outcome(r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#).0,
            Outcome::ToolError
        );
        assert_eq!(
            outcome(r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"is\u0045rror":true}}"#).0,
            Outcome::ToolError,
            "the member's name escaped"
        );
        assert_eq!(
            outcome(r#"{"id":1,"result":{"content":[{"type":"text","text":"isError"}],"isError":false}}"#).0,
            Outcome::Ok
        );
        assert_eq!(
            outcome(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}}"#),
            (Outcome::RpcError, 0)
        );
    }

    #[test]
    fn a_generated_admin_key_is_shown_once_and_only_its_hash_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (hash, shown) = admin_key_from_file(dir.path()).unwrap();
        let secret = shown.expect("shown at first start");
        assert_eq!(keys::hash(&secret), hash);
        let stored = std::fs::read_to_string(dir.path().join(ADMIN_HASH_FILE)).unwrap();
        assert!(!stored.contains(&secret));
        let (again, shown_again) = admin_key_from_file(dir.path()).unwrap();
        assert_eq!(again, hash);
        assert!(shown_again.is_none(), "never shown twice");
    }
}
