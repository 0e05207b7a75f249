//! The sandbox every plugin runs in: one wasmtime engine (pooling allocator, epoch interruption),
//! compilation with a cache of precompiled artifacts, and pools of warm instances, each in its own
//! `Store` with a memory cap, a time bound and a call budget.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap};

use super::{Limits, PolicyError};

/// How often the engine's epoch advances: the granularity of every plugin time bound.
pub const TICK: Duration = Duration::from_millis(5);

/// How many ticks without a plugin call the ticker waits before it sleeps.
const IDLE_TICKS: u32 = 20;

/// The engine and what every plugin shares. Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    /// The epoch ticker's state; the ticker stops when the last holder (this, or a pool) is gone.
    ticker: Arc<Ticker>,
}

/// Advances the engine's epoch every [`TICK`] while plugins run, and sleeps once none has run
/// for [`IDLE_TICKS`]: a gateway whose prices are reused (or that is idle) does not wake 200
/// times a second for nothing. Whoever runs plugin code first calls [`Ticker::busy`], which
/// wakes a sleeping ticker; a call's deadline counts from the epoch it starts at, which does
/// not move while the ticker sleeps.
struct Ticker {
    in_flight: AtomicUsize,
    /// Calls started so far: a ticker that sees it unchanged for a while sleeps.
    started: AtomicU64,
    /// Set before the ticker sleeps. Both sides use SeqCst: either the ticker sees a call that
    /// began, or the call sees this and wakes it.
    asleep: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
    /// Epoch increments so far (for tests).
    ticks: AtomicU64,
}

/// Held while plugin code runs.
struct Busy<'a>(&'a Ticker);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticker {
    /// Marks plugin code as running until the guard drops, and wakes the ticker if it sleeps.
    fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::Relaxed);
        if self.asleep.load(Ordering::SeqCst)
            && let Some(t) = self.thread.get()
        {
            t.unpark();
        }
        Busy(self)
    }

    #[cfg(test)]
    fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::SeqCst)
    }

    #[cfg(test)]
    fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    fn run(weak: std::sync::Weak<Ticker>, engine: Engine) {
        let mut seen = 0;
        let mut idle = 0;
        loop {
            std::thread::sleep(TICK);
            let Some(t) = weak.upgrade() else { return };
            engine.increment_epoch();
            t.ticks.fetch_add(1, Ordering::Relaxed);
            let started = t.started.load(Ordering::Relaxed);
            if started != seen || t.in_flight.load(Ordering::SeqCst) > 0 {
                (seen, idle) = (started, 0);
                continue;
            }
            idle += 1;
            if idle < IDLE_TICKS {
                continue;
            }
            t.asleep.store(true, Ordering::SeqCst);
            let mut t = t;
            while t.in_flight.load(Ordering::SeqCst) == 0 && t.started.load(Ordering::Relaxed) == seen {
                drop(t);
                // Wakes now and then to notice that the sandbox is gone.
                std::thread::park_timeout(Duration::from_secs(1));
                let Some(again) = weak.upgrade() else { return };
                t = again;
            }
            t.asleep.store(false, Ordering::SeqCst);
            idle = 0;
        }
    }
}

impl Sandbox {
    /// One engine for the process. `cache_dir`: where precompiled artifacts are kept (only this
    /// process's own writes are ever loaded from it).
    pub fn new(limits: &Limits, cache_dir: Option<PathBuf>) -> Result<Sandbox, PolicyError> {
        let mut config = wasmtime::Config::new();
        // Fuel bounds the work a call may do, whatever the machine's load (a wall-clock bound
        // alone refuses honest calls when a busy machine preempts the thread); the epoch deadline
        // is a generous wall-clock backstop on top.
        config.consume_fuel(true);
        config.epoch_interruption(true);
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(512)
            .total_core_instances(2048)
            .total_memories(512)
            .total_tables(1024)
            .max_memory_size(limits.memory_bytes);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| PolicyError::Engine(format!("{e:#}")))?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| PolicyError::Engine(format!("{}: {e}", dir.display())))?;
        }
        let ticker = Arc::new(Ticker {
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            thread: OnceLock::new(),
            ticks: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&ticker);
        let ticking = engine.clone();
        let thread = std::thread::Builder::new()
            .name("tollgate-plugin-epoch".into())
            .spawn(move || Ticker::run(weak, ticking))
            .map_err(|e| PolicyError::Engine(format!("starting the epoch ticker: {e}")))?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(Sandbox {
            engine,
            cache_dir,
            ticker,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a component, or loads it precompiled from the cache. Returns the component, whether
    /// it came from the cache, and the time taken.
    pub fn compile(&self, bytes: &[u8], hash: &str) -> Result<(Component, bool, Duration), PolicyError> {
        let started = Instant::now();
        let cached = self.cache_dir.as_ref().map(|dir| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.engine.precompile_compatibility_hash().hash(&mut h);
            env!("CARGO_PKG_VERSION").hash(&mut h);
            dir.join(format!("{hash}-{:016x}.cwasm", h.finish()))
        });
        if let Some(path) = cached.as_deref().filter(|p| p.exists()) {
            // SAFETY: the cache directory is the gateway's own (under its data directory), and the
            // artifact was written by `Component::serialize` of an engine with the same
            // compatibility hash (it is part of the file name).
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(c) => return Ok((c, true, started.elapsed())),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring an unusable precompiled plugin"),
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| PolicyError::Invalid(format!("not a usable component: {e:#}")))?;
        if let Some(path) = cached
            && let Err(e) = write_atomically(&path, &component)
        {
            tracing::warn!(path = %path.display(), error = %e, "could not cache a precompiled plugin");
        }
        Ok((component, false, started.elapsed()))
    }

    /// Links a component with no host imports: any import it has (a `wasm32-wasip2` build imports
    /// WASI for its panic path) traps if called, so a plugin can reach nothing outside itself.
    pub fn pre(&self, component: &Component) -> Result<InstancePre<Host>, PolicyError> {
        let mut linker = Linker::<Host>::new(&self.engine);
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(|e| PolicyError::Invalid(format!("{e:#}")))?;
        linker
            .instantiate_pre(component)
            .map_err(|e| PolicyError::Invalid(format!("{e:#}")))
    }
}

fn write_atomically(path: &Path, component: &Component) -> anyhow::Result<()> {
    let bytes = component.serialize().map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The SHA-256 of a component's bytes, in hex.
pub fn content_hash(bytes: &[u8]) -> String {
    crate::ledger::keys::hex(&Sha256::digest(bytes))
}

/// What each store holds: its limits, and whether the memory cap was hit.
pub struct Host {
    limits: StoreLimits,
    memory_hit: bool,
}

impl ResourceLimiter for Host {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let r = self.limits.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.memory_hit = true;
        }
        r
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
}

/// Why a plugin call failed (the plugin is at fault; the call it decided is refused).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error("ran past its wall-clock deadline")]
    Timeout,
    #[error("used up its fuel (its bound on work per call)")]
    OutOfFuel,
    #[error("hit its memory cap")]
    Memory,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned an invalid answer: {0}")]
    Invalid(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

/// A component world the host can run: how to pre-instantiate, instantiate and configure it.
pub trait World: 'static {
    type Pre: Send + Sync;
    type Bindings: Send;
    const ROLE: super::Role;
    fn pre(instance_pre: InstancePre<Host>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<Host>) -> wasmtime::Result<Self::Bindings>;
    /// Configures a fresh instance (called once per instance, before any other call).
    fn configure(
        pre: &Self::Pre,
        b: &Self::Bindings,
        store: &mut Store<Host>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>>;
}

struct Warm<W: World> {
    store: Store<Host>,
    bindings: W::Bindings,
    calls: u64,
}

/// Call counts and timings of one loaded plugin.
pub struct Stats {
    metrics: crate::metrics::PluginMetrics,
    calls: AtomicU64,
    failures: AtomicU64,
    reused: AtomicU64,
    total_ns: AtomicU64,
    histogram: Mutex<hdrhistogram::Histogram<u64>>,
}

/// A summary of [`Stats`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsView {
    pub calls: u64,
    pub failures: u64,
    /// Answers reused without calling the plugin (pricing plugins that allow it).
    pub reused: u64,
    pub mean_us: f64,
    pub p99_us: f64,
}

impl Stats {
    fn new(role: &'static str) -> Stats {
        Stats {
            metrics: crate::metrics::PluginMetrics::new(role),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            histogram: Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 600_000_000_000, 2).unwrap()),
        }
    }

    fn record(&self, elapsed: Duration, failed: bool) {
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        self.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        let _ = self.histogram.lock().unwrap().record(ns.max(1));
        self.metrics.record(elapsed, failed);
    }

    pub fn view(&self) -> StatsView {
        let calls = self.calls.load(Ordering::Relaxed);
        let total = self.total_ns.load(Ordering::Relaxed);
        let p99 = self.histogram.lock().unwrap().value_at_quantile(0.99);
        StatsView {
            calls,
            failures: self.failures.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            mean_us: if calls == 0 {
                0.0
            } else {
                total as f64 / calls as f64 / 1000.0
            },
            p99_us: p99 as f64 / 1000.0,
        }
    }

    /// Counts a failure that happened outside a call (an answer the host refused).
    pub fn count_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an answer reused instead of a call.
    pub fn count_reused(&self) {
        self.reused.fetch_add(1, Ordering::Relaxed);
        self.metrics.reused();
    }
}

/// A loaded, configured plugin and its pool of warm instances.
pub struct Pool<W: World> {
    engine: Engine,
    ticker: Arc<Ticker>,
    pre: W::Pre,
    config: String,
    limits: Limits,
    warm: Mutex<Vec<Warm<W>>>,
    pub stats: Stats,
}

impl<W: World> Pool<W> {
    /// What every instance was made from (the world's own per-plugin state lives here too).
    pub fn pre(&self) -> &W::Pre {
        &self.pre
    }

    /// Pre-instantiates `component` and warms `limits.pool_size` instances, each configured with
    /// `config`: a component of the wrong world, or one that refuses its configuration, fails here.
    pub fn new(sandbox: &Sandbox, component: &Component, config: String, limits: Limits) -> Result<Self, PolicyError> {
        let pre = W::pre(sandbox.pre(component)?).map_err(|e| {
            PolicyError::Invalid(format!(
                "it does not export the {} world of tollgate:policy@{}: {e:#}",
                W::ROLE.world(),
                super::WIT_VERSION
            ))
        })?;
        let pool = Pool {
            engine: sandbox.engine().clone(),
            ticker: sandbox.ticker.clone(),
            pre,
            config,
            limits,
            warm: Mutex::new(Vec::new()),
            stats: Stats::new(W::ROLE.name()),
        };
        let mut warm = Vec::with_capacity(limits.pool_size);
        for _ in 0..limits.pool_size.max(1) {
            warm.push(pool.fresh().map_err(|e| match e {
                FreshError::Config(m) => PolicyError::Config(m),
                FreshError::Failed(f) => PolicyError::Invalid(f.to_string()),
            })?);
        }
        *pool.warm.lock().unwrap() = warm;
        Ok(pool)
    }

    fn fresh(&self) -> Result<Warm<W>, FreshError> {
        let _busy = self.ticker.busy();
        let mut store = Store::new(
            &self.engine,
            Host {
                limits: StoreLimitsBuilder::new()
                    .memory_size(self.limits.memory_bytes)
                    .trap_on_grow_failure(true)
                    .instances(64)
                    .build(),
                memory_hit: false,
            },
        );
        store.limiter(|h| h);
        // Instantiation and configuration get the larger (load-time) bounds. Fuel is set before
        // instantiating: instantiation burns fuel too.
        store.set_epoch_deadline(ticks(self.limits.load_deadline));
        store
            .set_fuel(self.limits.load_fuel)
            .map_err(|e| FreshError::Failed(Failure::Instantiate(format!("{e:#}"))))?;
        let bindings =
            W::instantiate(&self.pre, &mut store).map_err(|e| FreshError::Failed(classify(e, &store, true)))?;
        match W::configure(&self.pre, &bindings, &mut store, &self.config) {
            Ok(Ok(())) => Ok(Warm {
                store,
                bindings,
                calls: 0,
            }),
            Ok(Err(message)) => Err(FreshError::Config(message)),
            Err(e) => Err(FreshError::Failed(classify(e, &store, false))),
        }
    }

    /// Runs `f` on a warm instance (or a fresh one when all are busy) within `fuel` units of work
    /// and `deadline` of wall-clock time. An
    /// instance that fails in any way is dropped, never reused.
    pub fn call<T>(
        &self,
        deadline: Duration,
        fuel: u64,
        f: impl FnOnce(&W::Bindings, &mut Store<Host>) -> wasmtime::Result<T>,
    ) -> Result<T, Failure> {
        let started = Instant::now();
        let popped = self.warm.lock().unwrap().pop();
        let mut warm = match popped {
            Some(w) => w,
            None => match self.fresh() {
                Ok(w) => w,
                Err(e) => {
                    let f = match e {
                        FreshError::Config(m) => Failure::Instantiate(format!("configure failed: {m}")),
                        FreshError::Failed(f) => f,
                    };
                    self.stats.record(started.elapsed(), true);
                    return Err(f);
                }
            },
        };
        let busy = self.ticker.busy();
        warm.store.set_epoch_deadline(ticks(deadline));
        if let Err(e) = warm.store.set_fuel(fuel) {
            self.stats.record(started.elapsed(), true);
            return Err(Failure::Instantiate(format!("{e:#}")));
        }
        let result = f(&warm.bindings, &mut warm.store);
        drop(busy);
        let out = match result {
            Ok(v) => {
                warm.calls += 1;
                if warm.calls < self.limits.recycle_after {
                    let mut pool = self.warm.lock().unwrap();
                    if pool.len() < self.limits.pool_size {
                        pool.push(warm);
                    }
                }
                Ok(v)
            }
            Err(e) => Err(classify(e, &warm.store, false)),
        };
        self.stats.record(started.elapsed(), out.is_err());
        out
    }
}

enum FreshError {
    Config(String),
    Failed(Failure),
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() / TICK.as_micros()).max(1) as u64 + 1
}

fn classify(e: wasmtime::Error, store: &Store<Host>, instantiating: bool) -> Failure {
    if store.data().memory_hit {
        return Failure::Memory;
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Failure::Timeout,
        Some(Trap::OutOfFuel) => Failure::OutOfFuel,
        Some(t) => Failure::Trap(t.to_string()),
        None if instantiating => Failure::Instantiate(format!("{e:#}")),
        None => Failure::Trap(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `cond` every millisecond for up to two seconds.
    fn eventually(cond: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        cond()
    }

    #[test]
    fn the_epoch_ticker_sleeps_while_no_plugin_runs_and_ticks_through_a_long_call() {
        let sandbox = Sandbox::new(&Limits::default(), None).unwrap();
        let ticker = sandbox.ticker.clone();
        assert!(eventually(|| ticker.is_asleep()), "an idle ticker goes to sleep");
        let asleep_at = ticker.ticks();
        // Past its once-a-second look at whether the sandbox is still there, too.
        std::thread::sleep(Duration::from_millis(1_100));
        assert_eq!(ticker.ticks(), asleep_at, "no epoch moves while it sleeps");

        // A call that runs longer than the idle period keeps the epoch moving the whole time.
        let call = ticker.busy();
        assert!(eventually(|| !ticker.is_asleep()), "a call wakes the ticker");
        let woke_at = ticker.ticks();
        std::thread::sleep(TICK * (IDLE_TICKS + 10));
        assert!(!ticker.is_asleep(), "the ticker slept during a call");
        assert!(
            ticker.ticks() >= woke_at + 10,
            "the epoch moved {} ticks",
            ticker.ticks() - woke_at
        );
        drop(call);
        assert!(eventually(|| ticker.is_asleep()), "idle again, it sleeps again");
    }
}
