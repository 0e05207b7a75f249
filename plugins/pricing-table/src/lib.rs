//! `pricing-table`, Tollgate's default pricing plugin: a price per tool and per method, a default
//! price for other tools, a per-KiB surcharge on input, an optional surcharge on output, and
//! per-tag percentages for keys, all from the operator's configuration.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::Deserialize;

// The reusable world: a table's price depends only on the method, the tool, the started KiB of
// arguments and the key's tags, so the host may reuse it (`pricing-reuse`).
wit_bindgen::generate!({ world: "reusable-pricing-plugin", path: "../../wit" });

use exports::tollgate::policy::pricing::{Charge, Denial, OutputSurcharge};
use tollgate::policy::types::{Call, KeySnapshot};

/// The configuration, as the operator writes it (every field optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// Credits for a `tools/call` of a tool not in `tools` (default 1).
    #[serde(default = "one")]
    pub default_price: u64,
    /// Credits per tool.
    #[serde(default)]
    pub tools: BTreeMap<String, u64>,
    /// Credits per method other than `tools/call` (default 0).
    #[serde(default)]
    pub methods: BTreeMap<String, u64>,
    /// Credits added per started KiB of arguments (default 0).
    #[serde(default)]
    pub per_kib_input: u64,
    /// Credits per started KiB of the answer, and the most that may add (default none).
    #[serde(default)]
    pub output: Option<Output>,
    /// Percent of the price paid by keys with a tag, e.g. `{"partner": 50}`; several matching
    /// tags multiply. The result is rounded up to a whole credit (a price of zero stays zero).
    #[serde(default)]
    pub tag_percent: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub per_kib: u64,
    pub max: u64,
}

fn one() -> u64 {
    1
}

impl Table {
    pub fn parse(config: &str) -> Result<Table, String> {
        let table: Table = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(config))
            .map_err(|e| format!("pricing-table config: {e}"))?;
        if let Some((tag, _)) = table.tag_percent.iter().find(|(_, p)| **p > 10_000) {
            return Err(format!("pricing-table config: tag_percent.{tag} is above 10000"));
        }
        Ok(table)
    }

    /// The price of a call of `method` (`tool` for a `tools/call`) with `argument_bytes` of
    /// arguments, by a key with `tags`.
    pub fn price(&self, method: &str, tool: Option<&str>, argument_bytes: u64, tags: &[String]) -> u64 {
        let base = match (method, tool) {
            ("tools/call", Some(t)) => self.tools.get(t).copied().unwrap_or(self.default_price),
            (m, _) => self.methods.get(m).copied().unwrap_or(0),
        };
        let input = self.per_kib_input.saturating_mul(argument_bytes.div_ceil(1024));
        let mut price = base.saturating_add(input) as u128;
        for tag in tags {
            if let Some(pct) = self.tag_percent.get(tag) {
                price = (price * *pct as u128).div_ceil(100);
            }
        }
        price.min(u64::MAX as u128) as u64
    }
}

#[cfg(any(test, all(not(target_feature = "atomics"), target_family = "wasm")))]
mod arena;

// Every string the host hands a call is one allocation here, all freed when the call returns: a
// per-call arena bumps them (talc, the general allocator behind it, took ~0.3 µs of a warm call
// for the same work).
#[cfg(all(not(target_feature = "atomics"), target_family = "wasm"))]
#[global_allocator]
static ALLOC: arena::CallArena<talc::wasm::WasmDynamicTalc, 16384> =
    arena::CallArena::new(talc::wasm::new_wasm_dynamic_allocator());

thread_local! {
    static TABLE: RefCell<Option<Table>> = const { RefCell::new(None) };
}

struct Plugin;

impl exports::tollgate::policy::lifecycle::Guest for Plugin {
    fn configure(config: String) -> Result<(), String> {
        let table = Table::parse(&config)?;
        TABLE.with(|t| *t.borrow_mut() = Some(table));
        #[cfg(all(not(target_feature = "atomics"), target_family = "wasm"))]
        ALLOC.start();
        Ok(())
    }
}

impl exports::tollgate::policy::pricing::Guest for Plugin {
    fn price(call: Call, key: KeySnapshot) -> Result<Charge, Denial> {
        TABLE.with(|t| {
            let t = t.borrow();
            let Some(table) = t.as_ref() else {
                return Err(Denial {
                    reason: "pricing-table was not configured".into(),
                });
            };
            Ok(Charge {
                credits: table.price(&call.method, call.tool.as_deref(), call.argument_bytes, &key.tags),
                output_surcharge: table.output.as_ref().map(|o| OutputSurcharge {
                    per_kib: o.per_kib,
                    max: o.max,
                }),
            })
        })
    }
}

impl exports::tollgate::policy::pricing_reuse::Guest for Plugin {
    /// As long as the host keeps this configuration loaded: a reload or swap drops every reused
    /// charge, and a key's new settings are priced afresh.
    fn reuse_ms() -> u32 {
        u32::MAX
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

    fn table(json: &str) -> Table {
        Table::parse(json).unwrap()
    }

    #[test]
    fn a_listed_tool_costs_its_price_and_others_the_default() {
        let t = table(r#"{"default_price": 2, "tools": {"add": 5}}"#);
        assert_eq!(t.price("tools/call", Some("add"), 10, &[]), 5);
        assert_eq!(t.price("tools/call", Some("echo"), 10, &[]), 2);
    }

    #[test]
    fn other_methods_are_free_unless_listed() {
        let t = table(r#"{"methods": {"resources/read": 3}}"#);
        assert_eq!(t.price("resources/read", None, 0, &[]), 3);
        assert_eq!(t.price("prompts/get", None, 0, &[]), 0);
    }

    #[test]
    fn input_is_charged_per_started_kib() {
        let t = table(r#"{"default_price": 1, "per_kib_input": 2}"#);
        assert_eq!(t.price("tools/call", Some("x"), 0, &[]), 1);
        assert_eq!(t.price("tools/call", Some("x"), 1, &[]), 3);
        assert_eq!(t.price("tools/call", Some("x"), 1025, &[]), 5);
    }

    #[test]
    fn tag_percentages_multiply_and_round_up() {
        let t = table(r#"{"default_price": 3, "tag_percent": {"partner": 50, "vip": 50}}"#);
        assert_eq!(t.price("tools/call", Some("x"), 0, &["partner".into()]), 2);
        assert_eq!(
            t.price("tools/call", Some("x"), 0, &["partner".into(), "vip".into()]),
            1
        );
        assert_eq!(t.price("tools/call", Some("x"), 0, &["other".into()]), 3);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = Table::parse(r#"{"default_prise": 1}"#).unwrap_err();
        assert!(e.contains("default_prise"), "{e}");
    }
}
