//! The pricing role: the `pricing-plugin` world's bindings, and one call priced by a plugin with
//! the host's checks on what it returns.

use std::sync::{Arc, OnceLock};

use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, ComponentType, Func, InstancePre, Lower, TypedFunc};

use self::lower::Fast;
use super::reuse::{Inputs, ReuseCache};
use super::sandbox::{Failure, Host, World};
use super::{Limits, Loaded, Role};
use crate::ledger::{Key, KeySettings, Status};

mod bindings {
    wasmtime::component::bindgen!({ world: "pricing-plugin", path: "../wit" });
}

mod lower;

use bindings::exports::tollgate::policy::pricing;
use bindings::tollgate::policy::types::KeyStatus;

/// The `pricing-plugin` world.
pub struct PricingWorld;

/// A pre-instantiated pricing plugin, where its exports are, and the charges it lets the host reuse.
pub struct PricingPre {
    pre: bindings::PricingPluginPre<Host>,
    price: ComponentExportIndex,
    /// `pricing-reuse`'s `reuse-ms`, if the plugin exports it.
    reuse_ms: Option<ComponentExportIndex>,
    /// What `reuse-ms` answered, asked of the first instance configured.
    reuse_window: OnceLock<u32>,
    reused: ReuseCache,
}

/// An instance's bindings, its `price` typed for arguments lowered from borrowed data, and its
/// `reuse-ms` where it has one.
pub struct PricingBindings {
    bindings: bindings::PricingPlugin,
    price: TypedFunc<(Fast<CallArg<'static>>, Fast<KeyArg<'static>>), (PriceResult,)>,
    reuse_ms: Option<TypedFunc<(), (u32,)>>,
}

type PriceResult = Result<pricing::Charge, pricing::Denial>;

/// The WIT `call` record, lowered straight from the request's own strings (no copies), in one
/// pass by [`Fast`].
#[derive(ComponentType, Lower)]
#[component(record)]
struct CallArg<'a> {
    method: &'a str,
    tool: Option<&'a str>,
    #[component(name = "argument-bytes")]
    argument_bytes: u64,
    arguments: Option<&'a str>,
    #[component(name = "now-ms")]
    now_ms: i64,
    #[component(name = "request-id")]
    request_id: &'a str,
}

/// The WIT `key-snapshot` record, lowered straight from the key's own fields, in one pass by
/// [`Fast`].
#[derive(ComponentType, Lower)]
#[component(record)]
struct KeyArg<'a> {
    id: &'a str,
    name: &'a str,
    tags: &'a [String],
    namespace: Option<&'a str>,
    credits: i64,
    spent: i64,
    calls: u64,
    status: KeyStatus,
    #[component(name = "created-ms")]
    created_ms: i64,
    #[component(name = "expires-ms")]
    expires_ms: Option<i64>,
}

impl World for PricingWorld {
    type Pre = PricingPre;
    type Bindings = PricingBindings;
    const ROLE: Role = Role::Pricing;

    fn pre(instance_pre: InstancePre<Host>) -> wasmtime::Result<Self::Pre> {
        let component = instance_pre.component();
        let export = |interface: &str, name: &str| {
            component
                .get_export_index(None, &format!("tollgate:policy/{interface}@{}", super::WIT_VERSION)[..])
                .and_then(|i| component.get_export_index(Some(&i), name))
        };
        let price = export("pricing", "price").ok_or_else(|| wasmtime::format_err!("no export named price"))?;
        let reuse_ms = export("pricing-reuse", "reuse-ms");
        Ok(PricingPre {
            pre: bindings::PricingPluginPre::new(instance_pre)?,
            price,
            reuse_ms,
            reuse_window: OnceLock::new(),
            reused: ReuseCache::default(),
        })
    }

    fn instantiate(pre: &Self::Pre, store: &mut Store<Host>) -> wasmtime::Result<Self::Bindings> {
        let instance = pre.pre.instance_pre().instantiate(&mut *store)?;
        let bindings = bindings::PricingPlugin::new(&mut *store, &instance)?;
        let func: Func = instance
            .get_func(&mut *store, pre.price)
            .ok_or_else(|| wasmtime::format_err!("no export named price"))?;
        // Checked against the component's types once, here.
        let price = func.typed(&*store)?;
        let reuse_ms = match pre.reuse_ms {
            Some(i) => Some(
                instance
                    .get_func(&mut *store, i)
                    .ok_or_else(|| wasmtime::format_err!("no export named reuse-ms"))?
                    .typed(&*store)?,
            ),
            None => None,
        };
        Ok(PricingBindings {
            bindings,
            price,
            reuse_ms,
        })
    }

    fn configure(
        pre: &Self::Pre,
        b: &Self::Bindings,
        store: &mut Store<Host>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        let configured = b
            .bindings
            .tollgate_policy_lifecycle()
            .call_configure(&mut *store, config)?;
        if configured.is_ok()
            && let Some(f) = &b.reuse_ms
            && pre.reuse_window.get().is_none()
        {
            let (ms,) = f.call(&mut *store, ())?;
            let _ = pre.reuse_window.set(ms);
        }
        Ok(configured)
    }
}

/// What a call costs, as the plugin decided and the host accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub credits: i64,
    /// Credits per started KiB of the answer, and the most that may add.
    pub surcharge: Option<(i64, i64)>,
}

impl Price {
    pub const fn flat(credits: i64) -> Price {
        Price {
            credits,
            surcharge: None,
        }
    }

    /// What is reserved before the call: the price plus the largest surcharge.
    pub fn reserved(&self) -> i64 {
        self.credits + self.surcharge.map_or(0, |(_, max)| max)
    }

    /// What is kept once the answer, `answer_bytes` long, is known.
    pub fn kept(&self, answer_bytes: usize) -> i64 {
        let extra = self.surcharge.map_or(0, |(per_kib, max)| {
            let kib = (answer_bytes as i64 + 1023) / 1024;
            per_kib.saturating_mul(kib).min(max)
        });
        self.credits + extra
    }
}

/// The plugin's decision.
#[derive(Debug, Clone)]
pub enum Priced {
    Charge(Price),
    /// Refused by policy, with the reason shown to the client.
    Denied(String),
    /// The plugin failed; the call is refused and nothing is charged.
    Failed(Failure),
}

/// The call as the pricing plugin sees it.
pub struct CallInput<'a> {
    pub method: &'a str,
    pub tool: Option<&'a str>,
    /// The arguments as JSON text (`params.arguments` of a `tools/call`, else `params`).
    pub arguments: Option<&'a str>,
    pub request_id: &'a str,
    pub now_ms: i64,
}

/// A key as one request sees it: the key, and the settings the request read from it once.
pub type KeyView<'a> = (&'a Key, &'a Arc<KeySettings>);

/// A denial reason is cut to this many bytes.
pub const MAX_REASON_BYTES: usize = 512;

impl Loaded<PricingWorld> {
    /// Prices `input` for `key` with the settings the request read (None: no key, as when
    /// `tools/list` is called without one).
    pub fn price(&self, limits: &Limits, input: &CallInput<'_>, key: Option<KeyView<'_>>) -> Priced {
        let argument_bytes = input.arguments.map_or(0, str::len);
        // A plugin that allows it has its charges reused for the same key, method, tool and size.
        let reuse = match (self.reuse_ms(), key) {
            (Some(ms), Some((key, settings))) => Some((
                ms,
                Inputs {
                    key,
                    settings,
                    method: input.method,
                    tool: input.tool,
                    kib: (argument_bytes as u64).div_ceil(1024),
                },
            )),
            _ => None,
        };
        if let Some((_, inputs)) = &reuse
            && let Some(price) = self.pool.pre().reused.get(inputs, input.now_ms)
        {
            self.pool.stats.count_reused();
            return Priced::Charge(price);
        }
        let priced = self.call_plugin(limits, input, argument_bytes, key);
        if let (Some((ms, inputs)), Priced::Charge(price)) = (&reuse, &priced) {
            let until = input.now_ms.saturating_add(i64::from(*ms));
            self.pool.pre().reused.put(inputs, *price, until);
        }
        priced
    }

    /// How long this plugin's charges may be reused (None: not at all).
    pub fn reuse_ms(&self) -> Option<u32> {
        self.pool.pre().reuse_window.get().copied().filter(|ms| *ms > 0)
    }

    /// Prices `input` by calling the plugin, whether or not it lets the host reuse its charges
    /// (what the benchmark of a plugin call measures).
    pub fn price_by_call(&self, limits: &Limits, input: &CallInput<'_>, key: Option<KeyView<'_>>) -> Priced {
        let argument_bytes = input.arguments.map_or(0, str::len);
        self.call_plugin(limits, input, argument_bytes, key)
    }

    fn call_plugin(
        &self,
        limits: &Limits,
        input: &CallInput<'_>,
        argument_bytes: usize,
        key: Option<KeyView<'_>>,
    ) -> Priced {
        let call = CallArg {
            method: input.method,
            tool: input.tool,
            argument_bytes: argument_bytes as u64,
            arguments: input.arguments.filter(|a| a.len() <= limits.max_argument_bytes),
            now_ms: input.now_ms,
            request_id: input.request_id,
        };
        let snapshot = match key {
            Some((key, settings)) => KeyArg {
                id: &key.id,
                name: &key.name,
                tags: &settings.tags,
                namespace: settings.namespace.as_deref(),
                credits: key.credits(),
                spent: key.spent(),
                calls: key.calls(),
                status: match key.status() {
                    Status::Active => KeyStatus::Active,
                    Status::Suspended => KeyStatus::Suspended,
                    Status::Revoked => KeyStatus::Revoked,
                },
                created_ms: key.created_at,
                expires_ms: settings.expires_at,
            },
            None => KeyArg {
                id: "",
                name: "",
                tags: &[],
                namespace: None,
                credits: 0,
                spent: 0,
                calls: 0,
                status: KeyStatus::Active,
                created_ms: input.now_ms,
                expires_ms: None,
            },
        };
        let answer = self
            .pool
            .call(limits.pricing_deadline, limits.pricing_fuel, |b, store| {
                // SAFETY: the same function type as `b.price`, which was checked against the
                // component when the instance was made; the records differ only in the lifetime
                // of the borrowed data they are lowered from, which outlives the call.
                let price = unsafe {
                    TypedFunc::<(Fast<CallArg<'_>>, Fast<KeyArg<'_>>), (PriceResult,)>::new_unchecked(*b.price.func())
                };
                price.call(store, (Fast(call), Fast(snapshot))).map(|(r,)| r)
            });
        match answer {
            Err(f) => Priced::Failed(f),
            Ok(Err(pricing::Denial { mut reason })) => {
                if reason.len() > MAX_REASON_BYTES {
                    let mut cut = MAX_REASON_BYTES;
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                }
                Priced::Denied(reason)
            }
            Ok(Ok(charge)) => match accept(&charge, limits.max_price) {
                Ok(p) => Priced::Charge(p),
                Err(why) => {
                    self.pool.stats.count_failure();
                    Priced::Failed(Failure::Invalid(why))
                }
            },
        }
    }
}

/// The host's checks on a charge: within the cap, surcharge included.
fn accept(c: &pricing::Charge, cap: u64) -> Result<Price, String> {
    let max = c.output_surcharge.as_ref().map_or(0, |s| s.max);
    let total = c.credits.checked_add(max);
    match total {
        Some(t) if t <= cap => Ok(Price {
            credits: c.credits as i64,
            surcharge: c
                .output_surcharge
                .as_ref()
                .map(|s| (s.per_kib.min(cap) as i64, s.max as i64)),
        }),
        _ => Err(format!(
            "a price of {} credits (surcharge up to {max}) is above the cap of {cap}",
            c.credits
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PluginSpec, Policy, PolicyConfig};

    /// The embedded `pricing-table`, with one warm instance so that every call reuses it.
    fn table(config: &str) -> Policy {
        let config = PolicyConfig {
            limits: Limits {
                pool_size: 1,
                ..Limits::default()
            },
            pricing: PluginSpec {
                file: None,
                config: config.into(),
            },
            health: PluginSpec {
                file: None,
                config: "{}".into(),
            },
            health_window: std::time::Duration::from_secs(60),
        };
        Policy::load(&config, None).expect("the embedded plugins load")
    }

    #[test]
    fn a_plugin_receives_every_field_of_the_call_and_the_key_as_the_host_holds_them() {
        let config = PolicyConfig {
            limits: Limits::default(),
            pricing: PluginSpec {
                file: Some(concat!(env!("TOLLGATE_PLUGIN_DIR"), "/hostile.wasm").into()),
                config: r#"{"mode": "echo"}"#.into(),
            },
            health: PluginSpec {
                file: None,
                config: "{}".into(),
            },
            health_window: std::time::Duration::from_secs(60),
        };
        let policy = Policy::load(&config, None).expect("the hostile plugin loads");
        let plugin = policy.default_tenant().pricing.load();
        let key = Key::new(
            "key_7".into(),
            "Ünïcode name".into(),
            crate::ledger::keys::hash("tg_x"),
            "tg_x".into(),
            1_700_000_000_000,
            0,
        );
        key.restore(-5, 42, 9, Status::Suspended);
        key.set_settings(crate::ledger::KeySettings {
            tags: vec!["a".into(), "".into(), "partner".into()],
            namespace: Some("team-1".into()),
            expires_at: Some(-1),
            ..Default::default()
        });
        // Lowered in one pass (the plugin takes UTF-8), and field by field as for a plugin that
        // takes another string encoding: the plugin sees the same either way.
        for derived in [false, true] {
            lower::DERIVED_ONLY.with(|d| d.set(derived));
            echoes_the_call_and_key(&policy, &plugin, &key);
        }
        lower::DERIVED_ONLY.with(|d| d.set(false));
    }

    fn echoes_the_call_and_key(policy: &Policy, plugin: &Loaded<PricingWorld>, key: &Key) {
        let settings = key.settings();
        let input = CallInput {
            method: "tools/call",
            tool: Some("search"),
            arguments: Some(r#"{"q":"é"}"#),
            request_id: "req_00000000000000ff",
            now_ms: i64::MIN,
        };
        let echoed =
            |input: &CallInput<'_>, key: Option<KeyView<'_>>| match plugin.price_by_call(policy.limits(), input, key) {
                Priced::Denied(reason) => reason,
                other => panic!("{other:?}"),
            };
        assert_eq!(
            echoed(&input, Some((key, &settings))),
            r#"tools/call Some("search") 10 Some("{\"q\":\"é\"}") -9223372036854775808 req_00000000000000ff | key_7 Ünïcode name ["a", "", "partner"] Some("team-1") -5 42 9 KeyStatus::Suspended 1700000000000 Some(-1)"#
        );
        // No key, no tool, arguments over the host's cap (their size only), no expiry.
        let big = "x".repeat(policy.limits().max_argument_bytes + 1);
        let input = CallInput {
            method: "resources/read",
            tool: None,
            arguments: Some(&big),
            request_id: "",
            now_ms: 7,
        };
        assert_eq!(
            echoed(&input, None),
            format!(
                r#"resources/read None {} None 7  |   [] None 0 0 0 KeyStatus::Active 7 None"#,
                big.len()
            )
        );
    }

    #[test]
    fn one_warm_instance_prices_thousands_of_calls_of_every_size_exactly() {
        let policy =
            table(r#"{"default_price": 2, "tools": {"search": 7}, "per_kib_input": 3, "tag_percent": {"half": 50}}"#);
        let plugin = policy.default_tenant().pricing.load();
        let key = Key::new(
            "key_1".into(),
            "k".into(),
            crate::ledger::keys::hash("tg_x"),
            "tg_x".into(),
            0,
            0,
        );
        let mut tags = Vec::new();
        // Sizes from empty to past the plugin's own 16 KiB call arena and up to the host's cap,
        // with a growing list of tags: each call's strings land wherever the last call's freed.
        for i in 0..4_000usize {
            let size = [0, 1, 700, 1024, 1025, 15_000, 17_000, 64 << 10][i % 8] + i % 3;
            let arguments = "x".repeat(size);
            if i % 500 == 0 {
                tags.push(if tags.is_empty() {
                    "half".to_string()
                } else {
                    format!("tag{i}")
                });
            }
            key.set_settings(crate::ledger::KeySettings {
                tags: tags.clone(),
                ..Default::default()
            });
            let settings = key.settings();
            let tool = if i % 2 == 0 { "search" } else { "other" };
            let input = CallInput {
                method: "tools/call",
                tool: Some(tool),
                arguments: Some(&arguments),
                request_id: &format!("req_{i}"),
                now_ms: 0,
            };
            let base = if tool == "search" { 7 } else { 2 } + 3 * (size as u64).div_ceil(1024) as i64;
            match plugin.price_by_call(policy.limits(), &input, Some((&key, &settings))) {
                Priced::Charge(p) => assert_eq!(p.credits, (base + 1) / 2, "call {i}, {size} bytes"),
                other => panic!("call {i}, {size} bytes: {other:?}"),
            }
        }
        let stats = plugin.pool.stats.view();
        assert_eq!((stats.calls, stats.failures), (4_000, 0));
    }
}
