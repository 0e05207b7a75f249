//! `health-weighted`, Tollgate's default health-scoring plugin: the reference formula (key health,
//! error rate, credit utilisation, weighted 0.40 / 0.35 / 0.25, levels at 80 / 60 / 40), with every
//! weight and threshold configurable.

use std::cell::RefCell;

use serde::Deserialize;

wit_bindgen::generate!({ world: "health-plugin", path: "../../wit" });

use exports::tollgate::policy::health::{Component, Report, Snapshot};

/// The low-credit thresholds the host counts (see `key-counts` in the WIT).
pub const THRESHOLDS: [i64; 7] = [0, 1, 5, 10, 50, 100, 1000];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    #[serde(rename = "keyHealth")]
    pub key_health: f64,
    #[serde(rename = "errorRate")]
    pub error_rate: f64,
    #[serde(rename = "creditUtilization")]
    pub credit_utilization: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            key_health: 0.40,
            error_rate: 0.35,
            credit_utilization: 0.25,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Levels {
    pub healthy: f64,
    pub good: f64,
    pub warning: f64,
}

impl Default for Levels {
    fn default() -> Self {
        Levels {
            healthy: 80.0,
            good: 60.0,
            warning: 40.0,
        }
    }
}

/// The configuration, as the operator writes it (every field optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Formula {
    pub weights: Weights,
    pub levels: Levels,
    /// An active key with at most this many credits counts as unhealthy (one of 0, 1, 5, 10,
    /// 50, 100, 1000).
    pub low_credit_threshold: i64,
    /// Points of error-rate score lost per unit of denied share (200: 50 % denied scores 0).
    pub error_penalty: f64,
    /// Credit utilisation up to which the component scores 100.
    pub utilization_ok: f64,
}

impl Default for Formula {
    fn default() -> Self {
        Formula {
            weights: Weights::default(),
            levels: Levels::default(),
            low_credit_threshold: 10,
            error_penalty: 200.0,
            utilization_ok: 0.8,
        }
    }
}

/// What the formula reads from a snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub total: u64,
    pub suspended: u64,
    pub revoked: u64,
    pub expired: u64,
    pub low_credit: u64,
    pub requests: u64,
    pub denied: u64,
    pub remaining: i64,
    pub spent: i64,
}

/// One computed component: name, score, weight, detail.
pub type Part = (&'static str, f64, f64, String);

impl Formula {
    pub fn parse(config: &str) -> Result<Formula, String> {
        let f: Formula = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(config))
            .map_err(|e| format!("health-weighted config: {e}"))?;
        if !THRESHOLDS.contains(&f.low_credit_threshold) {
            return Err(format!(
                "health-weighted config: low_credit_threshold must be one of {THRESHOLDS:?}, not {}",
                f.low_credit_threshold
            ));
        }
        let w = &f.weights;
        for (name, v) in [
            ("keyHealth", w.key_health),
            ("errorRate", w.error_rate),
            ("creditUtilization", w.credit_utilization),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!(
                    "health-weighted config: weights.{name} must be between 0 and 1"
                ));
            }
        }
        if ((w.key_health + w.error_rate + w.credit_utilization) - 1.0).abs() > 1e-6 {
            return Err("health-weighted config: the weights must sum to 1".into());
        }
        Ok(f)
    }

    /// The three components and the overall score and level.
    pub fn score(&self, i: &Inputs) -> (f64, &'static str, Vec<Part>) {
        let unhealthy = i.suspended + i.revoked + i.expired + i.low_credit;
        let key_health = if i.total == 0 {
            100.0
        } else {
            (100.0 - 100.0 * unhealthy as f64 / i.total as f64).clamp(0.0, 100.0)
        };
        let error_rate = if i.requests == 0 {
            100.0
        } else {
            (100.0 - self.error_penalty * i.denied as f64 / i.requests as f64).max(0.0)
        };
        let total_credits = i.remaining.saturating_add(i.spent);
        let u = if total_credits <= 0 {
            0.0
        } else {
            i.spent as f64 / total_credits as f64
        };
        let ok = self.utilization_ok;
        let mid = ok + (1.0 - ok) / 2.0;
        let utilization = if u <= ok {
            100.0
        } else if u <= mid {
            80.0 - 300.0 * (u - ok)
        } else {
            50.0 - 500.0 * (u - mid)
        }
        .clamp(0.0, 100.0);
        let w = &self.weights;
        let parts = vec![
            (
                "keyHealth",
                round2(key_health),
                w.key_health,
                format!(
                    "{unhealthy} of {} keys unhealthy: {} suspended, {} revoked, {} expired, {} active with at most {} credits",
                    i.total, i.suspended, i.revoked, i.expired, i.low_credit, self.low_credit_threshold
                ),
            ),
            (
                "errorRate",
                round2(error_rate),
                w.error_rate,
                format!("{} of {} requests in the window denied", i.denied, i.requests),
            ),
            (
                "creditUtilization",
                round2(utilization),
                w.credit_utilization,
                format!("{} of {} credits spent ({:.1} %)", i.spent, total_credits, u * 100.0),
            ),
        ];
        let score = (key_health * w.key_health + error_rate * w.error_rate + utilization * w.credit_utilization)
            .round()
            .clamp(0.0, 100.0);
        let l = &self.levels;
        let level = if score >= l.healthy {
            "healthy"
        } else if score >= l.good {
            "good"
        } else if score >= l.warning {
            "warning"
        } else {
            "critical"
        };
        (score, level, parts)
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

thread_local! {
    static FORMULA: RefCell<Formula> = RefCell::new(Formula::default());
}

struct Plugin;

impl exports::tollgate::policy::lifecycle::Guest for Plugin {
    fn configure(config: String) -> Result<(), String> {
        let f = Formula::parse(&config)?;
        FORMULA.with(|slot| *slot.borrow_mut() = f);
        Ok(())
    }
}

impl exports::tollgate::policy::health::Guest for Plugin {
    fn score(s: Snapshot) -> Report {
        FORMULA.with(|f| {
            let f = f.borrow();
            let low_credit = s
                .keys
                .low_credit
                .iter()
                .find(|c| c.at_most == f.low_credit_threshold)
                .map(|c| c.keys)
                .unwrap_or(0);
            let (mut requests, mut denied) = (0u64, 0u64);
            for b in &s.buckets {
                requests += b.allowed + b.denied + b.refunded + b.error;
                denied += b.denied;
            }
            let inputs = Inputs {
                total: s.keys.total,
                suspended: s.keys.suspended,
                revoked: s.keys.revoked,
                expired: s.keys.expired,
                low_credit,
                requests,
                denied,
                remaining: s.credits.remaining,
                spent: s.credits.spent,
            };
            let (score, level, parts) = f.score(&inputs);
            Report {
                score,
                level: level.into(),
                components: parts
                    .into_iter()
                    .map(|(name, score, weight, detail)| Component {
                        name: name.into(),
                        score,
                        weight,
                        detail,
                    })
                    .collect(),
            }
        })
    }
}

// Exported only in the component: on the build machine's own target the export names
// (`tollgate:policy/...`) are not valid linker symbols, and `cargo build` there would fail to link.
// The unit tests call `Plugin` directly.
#[cfg(target_arch = "wasm32")]
export!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_healthy_system_scores_100() {
        let (score, level, _) = Formula::default().score(&Inputs {
            total: 4,
            remaining: 100,
            ..Inputs::default()
        });
        assert_eq!((score, level), (100.0, "healthy"));
    }

    #[test]
    fn the_reference_formula_on_a_known_dataset() {
        // 10 keys: 1 suspended, 1 revoked, 2 low → keyHealth 60; 100 requests, 10 denied →
        // errorRate 80; spent 850 of 1000 → u = 0.85 → 80 − 300 × 0.05 = 65.
        // score = 0.4 × 60 + 0.35 × 80 + 0.25 × 65 = 24 + 28 + 16.25 = 68.25 → 68, good.
        let (score, level, parts) = Formula::default().score(&Inputs {
            total: 10,
            suspended: 1,
            revoked: 1,
            low_credit: 2,
            requests: 100,
            denied: 10,
            remaining: 150,
            spent: 850,
            ..Inputs::default()
        });
        assert_eq!(parts[0].1, 60.0);
        assert_eq!(parts[1].1, 80.0);
        assert_eq!(parts[2].1, 65.0);
        assert_eq!((score, level), (68.0, "good"));
    }

    #[test]
    fn utilisation_past_ninety_percent_falls_steeply() {
        let f = Formula::default();
        let at = |spent| {
            f.score(&Inputs {
                remaining: 1000 - spent,
                spent,
                ..Inputs::default()
            })
            .2[2]
                .1
        };
        assert_eq!(at(800), 100.0);
        assert_eq!(at(900), 50.0);
        assert_eq!(at(950), 25.0);
        assert_eq!(at(1000), 0.0);
    }

    #[test]
    fn weights_that_do_not_sum_to_one_are_refused() {
        let e = Formula::parse(r#"{"weights": {"keyHealth": 0.5}}"#).unwrap_err();
        assert!(e.contains("sum to 1"), "{e}");
    }
}
