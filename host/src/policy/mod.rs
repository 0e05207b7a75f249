//! Policy as WebAssembly: the registry of loaded plugins (pricing and health scoring, per tenant),
//! loading and atomic hot swap, and the limits every plugin call runs under. The plugins implement
//! the WIT package in `wit/` (`tollgate:policy@0.1.0`); the sandbox itself is in [`sandbox`].

pub mod health;
pub mod pricing;
pub mod reuse;
pub mod sandbox;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

pub use sandbox::{Failure, Sandbox, StatsView};

/// The WIT package version the host implements.
pub const WIT_VERSION: &str = "0.1.0";

/// The default plugins, built from `plugins/` by the build script and embedded in the binary.
pub const EMBEDDED_PRICING: (&str, &[u8]) = (
    "pricing-table",
    include_bytes!(concat!(env!("TOLLGATE_PLUGIN_DIR"), "/pricing-table.wasm")),
);
pub const EMBEDDED_HEALTH: (&str, &[u8]) = (
    "health-weighted",
    include_bytes!(concat!(env!("TOLLGATE_PLUGIN_DIR"), "/health-weighted.wasm")),
);

/// What a plugin decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Pricing,
    Health,
}

impl Role {
    pub fn world(self) -> &'static str {
        match self {
            Role::Pricing => "pricing-plugin",
            Role::Health => "health-plugin",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Pricing => "pricing",
            Role::Health => "health",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "pricing" => Some(Role::Pricing),
            "health" => Some(Role::Health),
            _ => None,
        }
    }
}

/// The bounds every plugin call runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory cap per instance.
    pub memory_bytes: usize,
    /// Work bound of one `price` call, in wasmtime fuel units (about one per instruction).
    pub pricing_fuel: u64,
    /// Work bound of one `score` call.
    pub health_fuel: u64,
    /// Work bound of instantiating and configuring an instance.
    pub load_fuel: u64,
    /// Wall-clock backstop of one `price` call.
    pub pricing_deadline: Duration,
    /// Wall-clock backstop of one `score` call.
    pub health_deadline: Duration,
    /// Wall-clock backstop of instantiating and configuring an instance.
    pub load_deadline: Duration,
    /// Arguments larger than this are not copied into the pricing plugin (it gets their size).
    pub max_argument_bytes: usize,
    /// The highest price (credits, surcharge included) a pricing plugin may return.
    pub max_price: u64,
    /// Warm instances kept per plugin.
    pub pool_size: usize,
    /// An instance is replaced by a fresh one after this many calls.
    pub recycle_after: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 16 << 20,
            pricing_fuel: 5_000_000,
            health_fuel: 500_000_000,
            load_fuel: 100_000_000,
            pricing_deadline: Duration::from_millis(250),
            health_deadline: Duration::from_millis(5000),
            load_deadline: Duration::from_millis(5000),
            max_argument_bytes: 64 << 10,
            max_price: 1_000_000,
            pool_size: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) * 2,
            recycle_after: 1_000_000,
        }
    }
}

/// Which component serves a role, and its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    /// A component file; `None` for the embedded default.
    pub file: Option<PathBuf>,
    /// The configuration handed to the plugin's `configure` (JSON text).
    pub config: String,
}

/// Everything the policy host is configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub limits: Limits,
    pub pricing: PluginSpec,
    pub health: PluginSpec,
    /// How much of the request log a health score looks at.
    pub health_window: Duration,
}

/// Why a plugin could not be loaded (nothing is swapped when this happens).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    #[error("the WebAssembly engine could not start: {0}")]
    Engine(String),
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("the component is refused: {0}")]
    Invalid(String),
    #[error("the plugin refused its configuration: {0}")]
    Config(String),
}

/// Where a loaded plugin came from, and when.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginInfo {
    pub role: Role,
    /// The component file, or `embedded:<name>`.
    pub file: String,
    /// SHA-256 of the component.
    pub sha256: String,
    pub wit_version: &'static str,
    /// Unix milliseconds.
    pub loaded_at: i64,
    /// Compile (or precompiled-load) time.
    pub compile_ms: f64,
    pub from_cache: bool,
    /// Instantiating and configuring the warm pool.
    pub warm_ms: f64,
}

/// A plugin ready to call.
pub struct Loaded<W: sandbox::World> {
    pub info: PluginInfo,
    pub pool: sandbox::Pool<W>,
}

impl<W: sandbox::World> Loaded<W> {
    fn load(sandbox: &Sandbox, spec: &PluginSpec, limits: Limits) -> Result<Loaded<W>, PolicyError> {
        let (file, bytes): (String, std::borrow::Cow<'static, [u8]>) = match &spec.file {
            Some(path) => (
                path.display().to_string(),
                std::fs::read(path)
                    .map_err(|e| PolicyError::Read {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?
                    .into(),
            ),
            None => {
                let (name, bytes) = match W::ROLE {
                    Role::Pricing => EMBEDDED_PRICING,
                    Role::Health => EMBEDDED_HEALTH,
                };
                (format!("embedded:{name}"), bytes.into())
            }
        };
        let sha256 = sandbox::content_hash(&bytes);
        let (component, from_cache, compile) = sandbox.compile(&bytes, &sha256)?;
        let warm_started = std::time::Instant::now();
        let pool = sandbox::Pool::new(sandbox, &component, spec.config.clone(), limits)?;
        let info = PluginInfo {
            role: W::ROLE,
            file,
            sha256,
            wit_version: WIT_VERSION,
            loaded_at: crate::ledger::now_ms(),
            compile_ms: compile.as_secs_f64() * 1000.0,
            from_cache,
            warm_ms: warm_started.elapsed().as_secs_f64() * 1000.0,
        };
        tracing::info!(role = ?W::ROLE, file = %info.file, sha256 = %info.sha256, compile_ms = info.compile_ms, from_cache, "plugin loaded");
        Ok(Loaded { info, pool })
    }
}

/// A tenant's plugins. Each slot swaps atomically; a call in flight keeps the plugin it started
/// with.
pub struct TenantPolicy {
    pub pricing: ArcSwap<Loaded<pricing::PricingWorld>>,
    pub health: ArcSwap<Loaded<health::HealthWorld>>,
    specs: Mutex<(PluginSpec, PluginSpec)>,
}

/// The tenant every key belongs to until tenants exist.
pub const DEFAULT_TENANT: &str = "default";

/// All loaded plugins, keyed by tenant.
pub struct Policy {
    sandbox: Sandbox,
    limits: Limits,
    /// foldhash, not SipHash: every paid call looks its tenant up here (SipHash cost ~0.1 µs a
    /// call at c=32); tenant ids are the operator's, never a client's.
    tenants: foldhash::HashMap<String, TenantPolicy>,
    /// Serialises reloads (calls never wait for it).
    reloading: Mutex<()>,
    pub health_window: Duration,
}

/// What a reload changed.
#[derive(Debug, Clone, Serialize)]
pub struct Reloaded {
    pub role: Role,
    pub before: String,
    pub after: String,
}

impl Policy {
    /// Starts the engine and loads the default tenant's plugins. `cache_dir`: precompiled artifacts.
    pub fn load(config: &PolicyConfig, cache_dir: Option<PathBuf>) -> Result<Policy, PolicyError> {
        let sandbox = Sandbox::new(&config.limits, cache_dir)?;
        let pricing = Loaded::load(&sandbox, &config.pricing, config.limits)?;
        let health = Loaded::load(&sandbox, &config.health, config.limits)?;
        let mut tenants = foldhash::HashMap::default();
        tenants.insert(
            DEFAULT_TENANT.to_string(),
            TenantPolicy {
                pricing: ArcSwap::from_pointee(pricing),
                health: ArcSwap::from_pointee(health),
                specs: Mutex::new((config.pricing.clone(), config.health.clone())),
            },
        );
        Ok(Policy {
            sandbox,
            limits: config.limits,
            tenants,
            reloading: Mutex::new(()),
            health_window: config.health_window,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn tenant(&self, id: &str) -> Option<&TenantPolicy> {
        self.tenants.get(id)
    }

    /// The default tenant's plugins.
    pub fn default_tenant(&self) -> &TenantPolicy {
        &self.tenants[DEFAULT_TENANT]
    }

    /// Loads the plugins `pricing` and `health` describe (unchanged specs: the same files read
    /// again) for `tenant`, validates them, and only then swaps them in, both or neither. Blocking:
    /// compiling takes tens of milliseconds; call it off the async workers.
    /// The pricing and health plugins a tenant runs now, as they were specified.
    pub fn specs(&self, tenant: &str) -> Option<(PluginSpec, PluginSpec)> {
        Some(self.tenants.get(tenant)?.specs.lock().unwrap().clone())
    }

    pub fn reload(
        &self,
        tenant: &str,
        pricing: Option<PluginSpec>,
        health: Option<PluginSpec>,
    ) -> Result<Vec<Reloaded>, PolicyError> {
        let _one_at_a_time = self.reloading.lock().unwrap();
        let t = self
            .tenants
            .get(tenant)
            .ok_or_else(|| PolicyError::Invalid(format!("no tenant {tenant:?}")))?;
        let (old_pricing, old_health) = t.specs.lock().unwrap().clone();
        let pricing = pricing.unwrap_or(old_pricing);
        let health = health.unwrap_or(old_health);
        let new_pricing = Loaded::load(&self.sandbox, &pricing, self.limits)?;
        let new_health = Loaded::load(&self.sandbox, &health, self.limits)?;
        let describe = |i: &PluginInfo| format!("{} ({})", i.file, &i.sha256[..12]);
        let changes = vec![
            Reloaded {
                role: Role::Pricing,
                before: describe(&t.pricing.load().info),
                after: describe(&new_pricing.info),
            },
            Reloaded {
                role: Role::Health,
                before: describe(&t.health.load().info),
                after: describe(&new_health.info),
            },
        ];
        t.pricing.store(Arc::new(new_pricing));
        t.health.store(Arc::new(new_health));
        *t.specs.lock().unwrap() = (pricing, health);
        Ok(changes)
    }

    /// What `GET /admin/plugins` shows for `tenant`.
    pub fn describe(&self, tenant: &str) -> Vec<serde_json::Value> {
        let Some(t) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        let (pricing_spec, health_spec) = t.specs.lock().unwrap().clone();
        let p = t.pricing.load();
        let h = t.health.load();
        vec![
            describe_one(&p.info, p.pool.stats.view(), &pricing_spec),
            describe_one(&h.info, h.pool.stats.view(), &health_spec),
        ]
    }
}

fn describe_one(info: &PluginInfo, stats: StatsView, spec: &PluginSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(info).unwrap_or_default();
    if let (Some(o), Ok(s)) = (v.as_object_mut(), serde_json::to_value(stats)) {
        if let Some(so) = s.as_object() {
            o.extend(so.clone());
        }
        o.insert(
            "config".into(),
            serde_json::from_str(&spec.config).unwrap_or(serde_json::Value::String(spec.config.clone())),
        );
    }
    v
}
