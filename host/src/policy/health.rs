//! The health role: the `health-plugin` world's bindings, the snapshot the host builds from the
//! keys and the request-log window, and the report it returns.

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::sandbox::{Failure, Host, World};
use super::{Limits, Loaded, Role};
use crate::ledger::{Key, Status};
use crate::window::Bucket;

mod bindings {
    wasmtime::component::bindgen!({ world: "health-plugin", path: "../wit" });
}

use bindings::exports::tollgate::policy::health::{
    CreditTotals, KeyCounts, LogBucket, LowCreditCount, Report, Snapshot,
};

/// The `health-plugin` world.
pub struct HealthWorld;

impl World for HealthWorld {
    type Pre = bindings::HealthPluginPre<Host>;
    type Bindings = bindings::HealthPlugin;
    const ROLE: Role = Role::Health;

    fn pre(instance_pre: InstancePre<Host>) -> wasmtime::Result<Self::Pre> {
        bindings::HealthPluginPre::new(instance_pre)
    }

    fn instantiate(pre: &Self::Pre, store: &mut Store<Host>) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }

    fn configure(
        _: &Self::Pre,
        b: &Self::Bindings,
        store: &mut Store<Host>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        b.tollgate_policy_lifecycle().call_configure(store, config)
    }
}

/// The low-credit thresholds counted for every snapshot (the WIT documents them).
pub const LOW_CREDIT_THRESHOLDS: [i64; 7] = [0, 1, 5, 10, 50, 100, 1000];

/// The most components a report may have.
pub const MAX_COMPONENTS: usize = 32;

/// Key figures, counted in one pass over the keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFigures {
    pub total: u64,
    pub active: u64,
    pub suspended: u64,
    pub revoked: u64,
    pub expired: u64,
    pub low_credit: [u64; LOW_CREDIT_THRESHOLDS.len()],
    pub remaining: i64,
    pub spent: i64,
}

impl KeyFigures {
    pub fn add(&mut self, key: &Key, now_ms: i64) {
        self.total += 1;
        let status = key.status();
        let expired = status != Status::Revoked && key.is_expired(now_ms);
        let credits = key.credits();
        if status != Status::Revoked {
            self.remaining += credits;
            self.spent += key.spent();
        }
        if expired {
            self.expired += 1;
            return;
        }
        match status {
            Status::Active => {
                self.active += 1;
                for (i, t) in LOW_CREDIT_THRESHOLDS.iter().enumerate() {
                    if credits <= *t {
                        self.low_credit[i] += 1;
                    }
                }
            }
            Status::Suspended => self.suspended += 1,
            Status::Revoked => self.revoked += 1,
        }
    }
}

/// A report the host accepted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReportView {
    pub score: f64,
    pub level: String,
    /// By name, in the plugin's order.
    pub components: serde_json::Map<String, serde_json::Value>,
}

impl Loaded<HealthWorld> {
    /// Scores the system. Blocking for up to the health time bound: call it off the async workers.
    pub fn score(
        &self,
        limits: &Limits,
        keys: &KeyFigures,
        buckets: &[Bucket],
        window_ms: i64,
        now_ms: i64,
    ) -> Result<ReportView, Failure> {
        let snapshot = Snapshot {
            now_ms,
            keys: KeyCounts {
                total: keys.total,
                active: keys.active,
                suspended: keys.suspended,
                revoked: keys.revoked,
                expired: keys.expired,
                low_credit: LOW_CREDIT_THRESHOLDS
                    .iter()
                    .zip(keys.low_credit)
                    .map(|(t, n)| LowCreditCount { at_most: *t, keys: n })
                    .collect(),
            },
            credits: CreditTotals {
                remaining: keys.remaining,
                spent: keys.spent,
            },
            window_ms,
            buckets: buckets
                .iter()
                .map(|b| LogBucket {
                    start_ms: b.minute * 60_000,
                    allowed: b.allowed,
                    denied: b.denied,
                    refunded: b.refunded,
                    error: b.error,
                    credits: b.credits,
                    duration_us_total: b.duration_us_total,
                    duration_us_max: b.duration_us_max,
                })
                .collect(),
        };
        let report = self.pool.call(limits.health_deadline, limits.health_fuel, |b, store| {
            b.tollgate_policy_health().call_score(store, &snapshot)
        })?;
        accept(report).inspect_err(|_| self.pool.stats.count_failure())
    }
}

fn accept(r: Report) -> Result<ReportView, Failure> {
    let in_range = |v: f64| v.is_finite() && (0.0..=100.0).contains(&v);
    if !in_range(r.score) {
        return Err(Failure::Invalid(format!("score {} is not within 0..=100", r.score)));
    }
    if r.components.len() > MAX_COMPONENTS {
        return Err(Failure::Invalid(format!(
            "{} components, more than {MAX_COMPONENTS}",
            r.components.len()
        )));
    }
    if r.level.len() > 64 {
        return Err(Failure::Invalid("a level name longer than 64 bytes".into()));
    }
    let mut components = serde_json::Map::new();
    for c in r.components {
        if !in_range(c.score) || !c.weight.is_finite() {
            return Err(Failure::Invalid(format!(
                "component {:?} has a score outside 0..=100",
                c.name
            )));
        }
        let detail: String = c.detail.chars().take(1024).collect();
        components.insert(
            c.name.chars().take(64).collect(),
            serde_json::json!({"score": c.score, "weight": c.weight, "detail": detail}),
        );
    }
    Ok(ReportView {
        score: r.score,
        level: r.level,
        components,
    })
}
