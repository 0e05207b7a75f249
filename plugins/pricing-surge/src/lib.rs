//! `pricing-surge`: prices that follow demand. A base table (a default and per-tool prices) is
//! multiplied by a percentage in the operator's peak hours (UTC) and another on weekends — the
//! kind of rule that changes often and should never need a new gateway build.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::Deserialize;

wit_bindgen::generate!({ world: "pricing-plugin", path: "../../wit" });

use exports::tollgate::policy::pricing::{Charge, Denial};
use tollgate::policy::types::{Call, KeySnapshot};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Surge {
    /// Credits for a `tools/call` of a tool not in `tools`.
    pub default_price: u64,
    /// Credits per tool, before surge.
    pub tools: BTreeMap<String, u64>,
    /// Hours of the day (UTC, 0–23) that are peak.
    pub peak_hours: Vec<u8>,
    /// Percent of the base price charged in peak hours (e.g. 300 = three times).
    pub peak_percent: u64,
    /// Percent of the base price charged on Saturdays and Sundays outside peak hours.
    pub weekend_percent: u64,
    /// Keys with this tag never pay surge.
    pub exempt_tag: Option<String>,
}

impl Default for Surge {
    fn default() -> Self {
        Surge {
            default_price: 1,
            tools: BTreeMap::new(),
            peak_hours: (9..17).collect(),
            peak_percent: 200,
            weekend_percent: 100,
            exempt_tag: None,
        }
    }
}

impl Surge {
    pub fn parse(config: &str) -> Result<Surge, String> {
        let s: Surge = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(config))
            .map_err(|e| format!("pricing-surge config: {e}"))?;
        if let Some(h) = s.peak_hours.iter().find(|h| **h > 23) {
            return Err(format!("pricing-surge config: peak_hours has {h}, not an hour (0-23)"));
        }
        Ok(s)
    }

    /// The price of a `tools/call` of `tool` at `now_ms` (UTC) for a key with `tags`; other
    /// methods are free.
    pub fn price(&self, method: &str, tool: Option<&str>, now_ms: i64, tags: &[String]) -> u64 {
        let base = match (method, tool) {
            ("tools/call", Some(t)) => self.tools.get(t).copied().unwrap_or(self.default_price),
            _ => return 0,
        };
        if self.exempt_tag.as_ref().is_some_and(|e| tags.contains(e)) {
            return base;
        }
        let secs = now_ms.div_euclid(1000);
        let hour = (secs.div_euclid(3600).rem_euclid(24)) as u8;
        // 1970-01-01 was a Thursday: day 0 → Thursday, so days 2 and 3 (mod 7) are Sat and Sun.
        let weekday = secs.div_euclid(86_400).rem_euclid(7);
        let pct = if self.peak_hours.contains(&hour) {
            self.peak_percent
        } else if weekday == 2 || weekday == 3 {
            self.weekend_percent
        } else {
            100
        };
        ((base as u128 * pct as u128).div_ceil(100)).min(u64::MAX as u128) as u64
    }
}

// Every string the host hands a call is one allocation here, freed when the call returns: talc
// does those faster than the standard library's dlmalloc (about 0.1 µs less per warm call).
#[cfg(all(not(target_feature = "atomics"), target_family = "wasm"))]
#[global_allocator]
static TALC: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

thread_local! {
    static SURGE: RefCell<Surge> = RefCell::new(Surge::default());
}

struct Plugin;

impl exports::tollgate::policy::lifecycle::Guest for Plugin {
    fn configure(config: String) -> Result<(), String> {
        let s = Surge::parse(&config)?;
        SURGE.with(|slot| *slot.borrow_mut() = s);
        Ok(())
    }
}

impl exports::tollgate::policy::pricing::Guest for Plugin {
    fn price(call: Call, key: KeySnapshot) -> Result<Charge, Denial> {
        let credits = SURGE.with(|s| {
            s.borrow()
                .price(&call.method, call.tool.as_deref(), call.now_ms, &key.tags)
        });
        Ok(Charge {
            credits,
            output_surcharge: None,
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

    // 2026-11-26 (a Thursday) and 2026-11-28 (a Saturday), at the given UTC hour.
    fn thursday(hour: i64) -> i64 {
        (20_783 * 86_400 + hour * 3600) * 1000
    }
    fn saturday(hour: i64) -> i64 {
        thursday(hour) + 2 * 86_400_000
    }

    #[test]
    fn peak_hours_multiply_the_base_price() {
        let s = Surge::parse(r#"{"default_price": 2, "peak_hours": [10], "peak_percent": 300}"#).unwrap();
        assert_eq!(s.price("tools/call", Some("x"), thursday(10), &[]), 6);
        assert_eq!(s.price("tools/call", Some("x"), thursday(11), &[]), 2);
    }

    #[test]
    fn weekends_have_their_own_rate_and_exempt_keys_pay_base() {
        let s = Surge::parse(r#"{"default_price": 4, "peak_hours": [], "weekend_percent": 50, "exempt_tag": "staff"}"#)
            .unwrap();
        assert_eq!(s.price("tools/call", Some("x"), saturday(3), &[]), 2);
        assert_eq!(s.price("tools/call", Some("x"), saturday(3), &["staff".into()]), 4);
        assert_eq!(s.price("tools/call", Some("x"), thursday(3), &[]), 4);
    }

    #[test]
    fn hours_past_23_are_refused() {
        assert!(Surge::parse(r#"{"peak_hours": [24]}"#).unwrap_err().contains("24"));
    }
}
