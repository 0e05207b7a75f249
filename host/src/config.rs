//! Configuration: the TOML file (or `wrap` flags) read as a raw form, validated once into [`Config`].
//!
//! Nothing downstream re-checks a setting: a bad value never survives loading, and every error names
//! the config path it came from (`upstream.command: program "x" not found on PATH`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub sessions: SessionConfig,
    /// `None`: billing is off, every method is free and no key is asked for.
    pub billing: Option<BillingConfig>,
    /// The file this came from (`serve`), read again on a reload.
    pub source: Option<PathBuf>,
    /// Where usage and admin events are posted.
    pub webhooks: Vec<WebhookConfig>,
    /// `GET /metrics` on its own address, without the admin key (default: only on the main
    /// address, behind the admin key).
    pub metrics_listen: Option<SocketAddr>,
    /// The log filter from `[logging] level` (wins over `--log-level`; changes on a reload).
    pub log_level: Option<String>,
    /// `serve --listen` overrode the file's `server.listen` (a reload keeps the override).
    pub listen_from_cli: bool,
}

/// A secret that never appears in `Debug` output (and so never in a log line).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One webhook destination.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    /// Names the destination in `/admin/webhooks`, metrics and its stored cursor.
    pub name: String,
    pub url: hyper::Uri,
    /// The HMAC-SHA256 key of the `Tollgate-Signature` header.
    pub secret: Secret,
    /// Event types to send (see [`crate::webhooks::EVENT_TYPES`], or `key.*`); empty: all.
    pub events: Vec<String>,
    /// Only events about keys in these namespaces (empty: any).
    pub namespaces: Vec<String>,
    /// Only events about keys with one of these tags (empty: any).
    pub tags: Vec<String>,
    /// Events per POST at most.
    pub batch_size: usize,
    /// How long events wait for a batch to fill.
    pub flush_interval: Duration,
    /// Attempts per batch before it goes to the dead-letter queue.
    pub max_attempts: u32,
    /// The first retry's delay; each next one doubles, up to `retry_max` (with jitter).
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// One attempt's time limit.
    pub timeout: Duration,
    /// Ranges (normally refused: private, loopback, link-local, metadata) this destination may
    /// resolve to.
    pub allow_networks: Vec<ipnet::IpNet>,
    /// For `https://`: the certificates (DER) of the CA the destination's certificate must chain
    /// to, from `ca_file`; `None`: the public web roots.
    pub ca: Option<Vec<Vec<u8>>>,
}

/// The largest credit amount accepted anywhere (balances, prices, top-ups): 10^12.
pub const MAX_CREDITS: i64 = 1_000_000_000_000;

/// The most connection threads `server.threads` may ask for.
const MAX_THREADS: u64 = 1024;

/// The methods that need no key and cost nothing unless the config says otherwise.
pub const DEFAULT_FREE_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
    "server/discover",
];

#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// Where the database file lives (created on first start).
    pub data_dir: PathBuf,
    /// Credits per `tools/call` of a tool without its own price.
    pub default_price: i64,
    /// Per-tool prices.
    pub tool_prices: BTreeMap<String, i64>,
    /// Prices of other paid methods (`resources/read`, `prompts/get`, ...); default 0.
    pub method_prices: BTreeMap<String, i64>,
    /// Requests (and all notifications) with these methods pass without a key.
    pub free_methods: Vec<String>,
    /// Refund the charge when the upstream answers a JSON-RPC error.
    pub refund_on_error: bool,
    /// Refund the charge when the call times out or the upstream goes away.
    pub refund_on_timeout: bool,
    /// Refund the charge when a tool result says `isError: true`.
    pub refund_on_tool_error: bool,
    /// The admin key from the config or `TOLLGATE_ADMIN_KEY`; `None`: generated at first start.
    pub admin_key: Option<String>,
    /// fsync every ledger commit (survives power loss), not just write it (survives `kill -9`).
    pub power_safe: bool,
    /// The rate limit of keys that set none, e.g. `"100/s"`.
    pub rate_limit: Option<String>,
    /// Request-log rows older than this are pruned.
    pub log_retention_days: i64,
    /// At most this many request-log rows are kept, give or take a fifth: the oldest rows are
    /// dropped a segment (a fifth of this) at a time.
    pub log_max_rows: i64,
    /// Evaluate and log every decision, enforce none, charge none.
    pub shadow: bool,
    /// The pricing and health plugins, their configuration and limits.
    pub policy: crate::policy::PolicyConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where `/mcp` and the health endpoints listen.
    pub listen: SocketAddr,
    /// Exact `Origin` values browsers may send (scheme://host[:port]); `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Also allow any `Origin` whose host is loopback (localhost, 127.0.0.1, [::1]).
    pub allow_loopback_origins: bool,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed (the client address is the last one added by a
    /// peer outside this list). Empty: the peer address is the client address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Connection threads (each serves the connections handed to it; see `server`). Default: one
    /// per core.
    pub threads: usize,
}

// PartialEq: a reload compares the running upstream with the file's (header values print as
// `Sensitive`, so they are compared as values, not as text).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub kind: UpstreamKind,
    /// How long one call may take, end to end, before the client gets a timeout error.
    pub call_timeout: Duration,
    /// How long a request waits for the upstream to be (re)started and initialized.
    pub connect_timeout: Duration,
    /// The longest pause between restarts of a dying stdio child.
    pub restart_backoff_max: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamKind {
    /// A child process spoken to over stdio.
    Stdio {
        program: String,
        args: Vec<String>,
        /// The child's whole environment: nothing else of the gateway's is passed on.
        env: Vec<(String, String)>,
        cwd: Option<PathBuf>,
    },
    /// A remote MCP server spoken to over Streamable HTTP.
    Http {
        url: hyper::Uri,
        /// For `https://`: the certificates (DER) of the CA the server's certificate must chain to,
        /// from `ca_file`; `None`: the public web roots.
        ca: Option<Vec<Vec<u8>>>,
        /// Sent with every request to the server (e.g. its `Authorization`); values are marked
        /// sensitive, so they print as `Sensitive`.
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// A session unused this long is ended.
    pub idle_timeout: Duration,
    /// At most this many live sessions; `initialize` beyond it gets 503.
    pub max: usize,
}

/// A configuration error, naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}: {1}")]
    Invalid(String, String),
}

fn invalid(path: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(path.to_string(), message.into())
}

/// The variables a stdio child inherits from the gateway unless the config names others.
pub const DEFAULT_ENV_PASSTHROUGH: &[&str] = &["PATH", "HOME", "LANG", "TMPDIR"];

/// The config file's shape. Unknown fields are errors, so a typo never silently does nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub sessions: RawSessions,
    #[serde(default)]
    pub billing: RawBilling,
    #[serde(default)]
    pub plugins: RawPlugins,
    #[serde(default)]
    pub webhooks: Vec<RawWebhook>,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub logging: RawLogging,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Serve `GET /metrics` here too, without the admin key (keep it on a private address).
    pub listen: Option<String>,
}

/// `[logging]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    /// A level (`info`) or filter (`warn,tollgate=debug`).
    pub level: Option<String>,
}

/// `[[webhooks]]`: one destination.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub name: Option<String>,
    pub url: Option<String>,
    pub secret: Option<String>,
    /// The name of an environment variable holding the secret (instead of `secret`).
    pub secret_env: Option<String>,
    pub events: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
    /// Default 100.
    pub batch_size: Option<u64>,
    /// Default 1000.
    pub flush_interval_ms: Option<u64>,
    /// Default 8.
    pub max_attempts: Option<u64>,
    /// Default 500.
    pub retry_initial_ms: Option<u64>,
    /// Default 60000.
    pub retry_max_ms: Option<u64>,
    /// Default 10000.
    pub timeout_ms: Option<u64>,
    pub allow_networks: Option<Vec<String>>,
    /// A PEM file of CA certificates an `https://` destination's certificate must chain to
    /// (default: the public web roots).
    pub ca_file: Option<PathBuf>,
}

impl WebhookConfig {
    /// Whether the filter looks at the key an event is about (its namespace or tags).
    pub fn filters_keys(&self) -> bool {
        !self.namespaces.is_empty() || !self.tags.is_empty()
    }
}

impl RawWebhook {
    fn validate(self, i: usize, seen: &mut Vec<String>) -> Result<WebhookConfig, ConfigError> {
        let at = |field: &str| format!("webhooks[{i}].{field}");
        let name = self.name.ok_or_else(|| invalid(&at("name"), "is required"))?;
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                &at("name"),
                format!("{name:?}: use 1 to 64 of A-Z a-z 0-9 - _"),
            ));
        }
        if seen.contains(&name) {
            return Err(invalid(&at("name"), format!("{name:?} is used by another destination")));
        }
        seen.push(name.clone());
        let url = self.url.ok_or_else(|| invalid(&at("url"), "is required"))?;
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| invalid(&at("url"), format!("{url:?} is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => {
                return Err(invalid(
                    &at("url"),
                    format!("{url:?} must start with https:// or http://"),
                ));
            }
        }
        let ca = ca_file(&uri, self.ca_file.as_deref(), &at("ca_file"))?;
        if uri.host().is_none() {
            return Err(invalid(&at("url"), format!("{url:?} has no host")));
        }
        let secret = match (self.secret, self.secret_env) {
            (Some(_), Some(_)) => return Err(invalid(&at("secret"), "set secret or secret_env, not both")),
            (Some(s), None) => s,
            (None, Some(var)) => {
                std::env::var(&var).map_err(|_| invalid(&at("secret_env"), format!("the variable {var} is not set")))?
            }
            (None, None) => return Err(invalid(&at("secret"), "is required (or secret_env)")),
        };
        if secret.len() < 16 {
            return Err(invalid(&at("secret"), "must be at least 16 characters"));
        }
        let events = self.events.unwrap_or_default();
        for (j, e) in events.iter().enumerate() {
            if e != "key.*" && !crate::webhooks::EVENT_TYPES.contains(&e.as_str()) {
                return Err(invalid(
                    &format!("{}[{j}]", at("events")),
                    format!(
                        "{e:?} is not an event type ({} or key.*)",
                        crate::webhooks::EVENT_TYPES.join(", ")
                    ),
                ));
            }
        }
        let batch_size = positive(&at("batch_size"), self.batch_size, 100)?;
        if batch_size > 10_000 {
            return Err(invalid(&at("batch_size"), "must be at most 10000"));
        }
        let max_attempts = positive(&at("max_attempts"), self.max_attempts, 8)?;
        if max_attempts > 100 {
            return Err(invalid(&at("max_attempts"), "must be at most 100"));
        }
        let retry_initial = ms(&at("retry_initial_ms"), self.retry_initial_ms, 500)?;
        let retry_max = ms(&at("retry_max_ms"), self.retry_max_ms, 60_000)?;
        if retry_max < retry_initial {
            return Err(invalid(&at("retry_max_ms"), "must not be below retry_initial_ms"));
        }
        Ok(WebhookConfig {
            name,
            url: uri,
            secret: Secret(secret),
            events,
            namespaces: self.namespaces.unwrap_or_default(),
            tags: self.tags.unwrap_or_default(),
            batch_size: batch_size as usize,
            flush_interval: ms(&at("flush_interval_ms"), self.flush_interval_ms, 1000)?,
            max_attempts: max_attempts as u32,
            retry_initial,
            retry_max,
            timeout: ms(&at("timeout_ms"), self.timeout_ms, 10_000)?,
            allow_networks: self
                .allow_networks
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(j, n)| {
                    parse_net(n).ok_or_else(|| {
                        invalid(
                            &format!("{}[{j}]", at("allow_networks")),
                            format!("{n:?} is not an IP address or CIDR range"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            ca,
        })
    }
}

/// `[plugins]`: which WebAssembly components price calls and score health, and their limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugins {
    /// Memory cap per plugin instance, MiB (default 16).
    pub memory_mib: Option<u64>,
    /// Work bound of one pricing call, in fuel units (about one per instruction; default 5000000).
    pub pricing_fuel: Option<u64>,
    /// Work bound of one health score (default 500000000).
    pub health_fuel: Option<u64>,
    /// Wall-clock backstop of one pricing call, ms (default 250).
    pub pricing_timeout_ms: Option<u64>,
    /// Wall-clock backstop of one health score, ms (default 5000).
    pub health_timeout_ms: Option<u64>,
    /// Arguments above this size reach the pricing plugin as a size only (default 65536).
    pub max_argument_bytes: Option<u64>,
    /// The highest price a pricing plugin may set (default 1000000).
    pub max_price: Option<u64>,
    /// Warm instances per plugin (default: twice the CPU count).
    pub pool_size: Option<u64>,
    /// Replace an instance after this many calls (default 1000000).
    pub recycle_after: Option<u64>,
    /// How much of the request log health scoring looks at, e.g. "1h" (default; at most 24h).
    pub health_window: Option<String>,
    pub pricing: Option<RawPlugin>,
    pub health: Option<RawPlugin>,
}

/// One plugin: its component file (default: the embedded one) and its configuration.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    pub file: Option<PathBuf>,
    pub config: Option<toml::Table>,
}

impl RawPlugins {
    fn validate(
        self,
        default_pricing: serde_json::Value,
        prices_set: bool,
    ) -> Result<crate::policy::PolicyConfig, ConfigError> {
        let d = crate::policy::Limits::default();
        let mib = positive("plugins.memory_mib", self.memory_mib, 16)?;
        if mib > 4096 {
            return Err(invalid("plugins.memory_mib", "must be at most 4096"));
        }
        let limits = crate::policy::Limits {
            memory_bytes: (mib as usize) << 20,
            pricing_fuel: positive("plugins.pricing_fuel", self.pricing_fuel, d.pricing_fuel)?,
            health_fuel: positive("plugins.health_fuel", self.health_fuel, d.health_fuel)?,
            load_fuel: d.load_fuel,
            pricing_deadline: ms("plugins.pricing_timeout_ms", self.pricing_timeout_ms, 250)?,
            health_deadline: ms("plugins.health_timeout_ms", self.health_timeout_ms, 5000)?,
            load_deadline: d.load_deadline,
            max_argument_bytes: self.max_argument_bytes.unwrap_or(d.max_argument_bytes as u64) as usize,
            max_price: match self.max_price {
                Some(p) if p == 0 || p > MAX_CREDITS as u64 => {
                    return Err(invalid("plugins.max_price", format!("must be from 1 to {MAX_CREDITS}")));
                }
                p => p.unwrap_or(d.max_price),
            },
            pool_size: positive("plugins.pool_size", self.pool_size, d.pool_size as u64)?.min(64) as usize,
            recycle_after: positive("plugins.recycle_after", self.recycle_after, d.recycle_after)?,
        };
        let health_window = match self.health_window.as_deref() {
            None => Duration::from_secs(3600),
            Some(w) => match humantime::parse_duration(w) {
                Ok(d) if d >= Duration::from_secs(60) && d <= Duration::from_secs(86_400) => d,
                _ => {
                    return Err(invalid(
                        "plugins.health_window",
                        format!("{w:?} is not a duration from 1m to 24h"),
                    ));
                }
            },
        };
        let spec = |path: &str, raw: Option<RawPlugin>, default: serde_json::Value| {
            let raw = raw.unwrap_or_default();
            if let Some(f) = &raw.file
                && !f.is_file()
            {
                return Err(invalid(
                    &format!("{path}.file"),
                    format!("{} is not a file", f.display()),
                ));
            }
            let config = match raw.config {
                Some(t) => serde_json::to_value(t).map_err(|e| invalid(&format!("{path}.config"), e.to_string()))?,
                None if raw.file.is_none() => default,
                None => serde_json::json!({}),
            };
            Ok(crate::policy::PluginSpec {
                file: raw.file,
                config: config.to_string(),
            })
        };
        if prices_set
            && self
                .pricing
                .as_ref()
                .is_some_and(|p| p.file.is_some() || p.config.is_some())
        {
            return Err(invalid(
                "plugins.pricing",
                "prices are set in [billing] too; with a pricing plugin configured, set them in plugins.pricing.config",
            ));
        }
        Ok(crate::policy::PolicyConfig {
            limits,
            pricing: spec("plugins.pricing", self.pricing, default_pricing)?,
            health: spec("plugins.health", self.health, serde_json::json!({}))?,
            health_window,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBilling {
    /// Default true; false makes every method free (the proxy alone).
    pub enabled: Option<bool>,
    pub data_dir: Option<PathBuf>,
    pub default_price: Option<i64>,
    pub tool_prices: Option<BTreeMap<String, i64>>,
    pub method_prices: Option<BTreeMap<String, i64>>,
    pub free_methods: Option<Vec<String>>,
    /// Any of "error", "timeout", "tool_error"; default ["error", "timeout"].
    pub refund_on: Option<Vec<String>>,
    pub admin_key: Option<String>,
    /// "process" (default): a charge survives the gateway being killed; "power": it survives a
    /// power loss too (an fsync per group commit).
    pub durability: Option<String>,
    /// Calls per period per key unless the key sets its own: `"N/s"`, `"N/min"` or `"N/h"`.
    pub rate_limit: Option<String>,
    /// Days of request log kept (default 30).
    pub log_retention_days: Option<u64>,
    /// Rows of request log kept at most, give or take a fifth (default 1,000,000).
    pub log_max_rows: Option<u64>,
    /// Shadow mode: log what would be refused or charged, refuse and charge nothing.
    pub shadow: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
    pub allow_loopback_origins: Option<bool>,
    pub max_body_bytes: Option<u64>,
    pub header_read_timeout_ms: Option<u64>,
    pub shutdown_timeout_ms: Option<u64>,
    /// Proxies (addresses or CIDR ranges) whose X-Forwarded-For is believed.
    pub trusted_proxies: Option<Vec<String>>,
    pub threads: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// The stdio server's command line: program then arguments.
    pub command: Option<Vec<String>>,
    /// A remote Streamable HTTP server's endpoint, e.g. `http://127.0.0.1:3001/mcp`.
    pub url: Option<String>,
    /// Variables set for the child.
    pub env: Option<BTreeMap<String, String>>,
    /// Variables copied from the gateway's own environment (default: PATH, HOME, LANG, TMPDIR).
    pub env_passthrough: Option<Vec<String>>,
    pub cwd: Option<PathBuf>,
    /// For an `https://` url: a PEM file of CA certificates the server's certificate must chain to
    /// (default: the public web roots).
    pub ca_file: Option<PathBuf>,
    /// For a url: headers sent with every request to the server, e.g. `Authorization`.
    pub headers: Option<BTreeMap<String, String>>,
    /// For a url: headers whose values are read from the gateway's environment at start
    /// (header name → variable name), for secrets kept out of the file.
    pub headers_env: Option<BTreeMap<String, String>>,
    pub call_timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub restart_backoff_max_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    pub idle_timeout_secs: Option<u64>,
    pub max: Option<u64>,
}

impl RawConfig {
    /// Reads and parses a TOML file (not yet validated).
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Validates every setting and fills in defaults.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let s = self.server;
        let listen = s.listen.as_deref().unwrap_or("127.0.0.1:3402");
        let listen: SocketAddr = listen.parse().map_err(|_| {
            invalid(
                "server.listen",
                format!("{listen:?} is not an address like 127.0.0.1:3402"),
            )
        })?;
        let allowed_origins = s.allowed_origins.unwrap_or_default();
        for (i, o) in allowed_origins.iter().enumerate() {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(invalid(
                    &format!("server.allowed_origins[{i}]"),
                    format!("{o:?} must be \"*\" or start with http:// or https://"),
                ));
            }
        }
        let max_body_bytes = positive("server.max_body_bytes", s.max_body_bytes, 1 << 20)?;
        let threads = match s.threads {
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
            Some(n @ 1..=MAX_THREADS) => n as usize,
            Some(n) => {
                return Err(invalid(
                    "server.threads",
                    format!("{n} is out of range; give a number from 1 to {MAX_THREADS}"),
                ));
            }
        };
        let server = ServerConfig {
            threads,
            listen,
            allowed_origins: allowed_origins
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_string())
                .collect(),
            allow_loopback_origins: s.allow_loopback_origins.unwrap_or(true),
            max_body_bytes: usize::try_from(max_body_bytes)
                .map_err(|_| invalid("server.max_body_bytes", "too large"))?,
            header_read_timeout: ms("server.header_read_timeout_ms", s.header_read_timeout_ms, 10_000)?,
            shutdown_timeout: ms("server.shutdown_timeout_ms", s.shutdown_timeout_ms, 10_000)?,
            trusted_proxies: s
                .trusted_proxies
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    parse_net(p).ok_or_else(|| {
                        invalid(
                            &format!("server.trusted_proxies[{i}]"),
                            format!("{p:?} is not an IP address or CIDR range"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };

        let u = self.upstream;
        let kind = match (u.command, u.url) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "upstream",
                    "set either `command` (stdio) or `url` (HTTP), not both",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "upstream",
                    "set `command` (a stdio server) or `url` (a Streamable HTTP server)",
                ));
            }
            (Some(command), None) => {
                if u.ca_file.is_some() {
                    return Err(invalid("upstream.ca_file", "applies only to an https:// url upstream"));
                }
                if u.headers.is_some() || u.headers_env.is_some() {
                    return Err(invalid(
                        "upstream",
                        "`headers` and `headers_env` apply only to a `url` upstream",
                    ));
                }
                let mut parts = command.into_iter();
                let program = parts
                    .next()
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| invalid("upstream.command", "is empty; give the program and its arguments"))?;
                if find_program(&program).is_none() {
                    return Err(invalid(
                        "upstream.command",
                        format!("program {program:?} not found (not a file, and not on PATH)"),
                    ));
                }
                let passthrough = u
                    .env_passthrough
                    .unwrap_or_else(|| DEFAULT_ENV_PASSTHROUGH.iter().map(|s| s.to_string()).collect());
                let mut env: Vec<(String, String)> = passthrough
                    .into_iter()
                    .filter_map(|k| std::env::var(&k).ok().map(|v| (k, v)))
                    .collect();
                for (k, v) in u.env.unwrap_or_default() {
                    if k.is_empty() || k.contains('=') {
                        return Err(invalid("upstream.env", format!("{k:?} is not a valid variable name")));
                    }
                    env.retain(|(name, _)| name != &k);
                    env.push((k, v));
                }
                if let Some(cwd) = &u.cwd
                    && !cwd.is_dir()
                {
                    return Err(invalid("upstream.cwd", format!("{} is not a directory", cwd.display())));
                }
                UpstreamKind::Stdio {
                    program,
                    args: parts.collect(),
                    env,
                    cwd: u.cwd,
                }
            }
            (None, Some(url)) => {
                if u.env.is_some() || u.env_passthrough.is_some() || u.cwd.is_some() {
                    return Err(invalid(
                        "upstream",
                        "`env`, `env_passthrough` and `cwd` apply only to a `command` upstream",
                    ));
                }
                let uri: hyper::Uri = url
                    .parse()
                    .map_err(|e| invalid("upstream.url", format!("{url:?} is not a URL: {e}")))?;
                match uri.scheme_str() {
                    Some("http" | "https") => {}
                    _ => {
                        return Err(invalid(
                            "upstream.url",
                            format!("{url:?} must start with https:// or http://"),
                        ));
                    }
                }
                if uri.host().is_none() {
                    return Err(invalid("upstream.url", format!("{url:?} has no host")));
                }
                let ca = ca_file(&uri, u.ca_file.as_deref(), "upstream.ca_file")?;
                let headers = upstream_headers(u.headers.unwrap_or_default(), u.headers_env.unwrap_or_default())?;
                UpstreamKind::Http { url: uri, ca, headers }
            }
        };
        let upstream = UpstreamConfig {
            kind,
            call_timeout: ms("upstream.call_timeout_ms", u.call_timeout_ms, 60_000)?,
            connect_timeout: ms("upstream.connect_timeout_ms", u.connect_timeout_ms, 30_000)?,
            restart_backoff_max: ms("upstream.restart_backoff_max_ms", u.restart_backoff_max_ms, 5_000)?,
        };

        let sessions = SessionConfig {
            idle_timeout: Duration::from_secs(positive(
                "sessions.idle_timeout_secs",
                self.sessions.idle_timeout_secs,
                3600,
            )?),
            max: positive("sessions.max", self.sessions.max, 10_000)? as usize,
        };
        let billing = self.billing.validate(self.plugins)?;
        let mut seen = Vec::new();
        let webhooks = self
            .webhooks
            .into_iter()
            .enumerate()
            .map(|(i, w)| w.validate(i, &mut seen))
            .collect::<Result<Vec<_>, _>>()?;
        if !webhooks.is_empty() && billing.is_none() {
            return Err(invalid(
                "webhooks",
                "events come from the ledger; turn billing on (billing.enabled) to use webhooks",
            ));
        }
        let metrics_listen = match self.metrics.listen {
            None => None,
            Some(l) => Some(
                l.parse()
                    .map_err(|_| invalid("metrics.listen", format!("{l:?} is not an address like 127.0.0.1:9464")))?,
            ),
        };
        if let Some(level) = &self.logging.level
            && tracing_subscriber::EnvFilter::try_new(level).is_err()
        {
            return Err(invalid(
                "logging.level",
                format!("{level:?} is not a level (error, warn, info, debug, trace) or filter"),
            ));
        }
        Ok(Config {
            source: None,
            server,
            upstream,
            sessions,
            billing,
            webhooks,
            metrics_listen,
            log_level: self.logging.level,
            listen_from_cli: false,
        })
    }
}

impl RawBilling {
    fn validate(self, plugins: RawPlugins) -> Result<Option<BillingConfig>, ConfigError> {
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let prices_set = self.default_price.is_some() || self.tool_prices.is_some() || self.method_prices.is_some();
        let price = |path: &str, v: i64| -> Result<i64, ConfigError> {
            if !(0..=MAX_CREDITS).contains(&v) {
                return Err(invalid(path, format!("{v} is not a price from 0 to {MAX_CREDITS}")));
            }
            Ok(v)
        };
        let default_price = price("billing.default_price", self.default_price.unwrap_or(1))?;
        let mut tool_prices = BTreeMap::new();
        for (tool, p) in self.tool_prices.unwrap_or_default() {
            tool_prices.insert(tool.clone(), price(&format!("billing.tool_prices.{tool}"), p)?);
        }
        let mut method_prices = BTreeMap::new();
        for (method, p) in self.method_prices.unwrap_or_default() {
            if method == "tools/call" {
                return Err(invalid(
                    "billing.method_prices",
                    "price tools/call with default_price and tool_prices",
                ));
            }
            method_prices.insert(method.clone(), price(&format!("billing.method_prices.{method}"), p)?);
        }
        let refund_on = self.refund_on.unwrap_or_else(|| vec!["error".into(), "timeout".into()]);
        for (i, r) in refund_on.iter().enumerate() {
            if !["error", "timeout", "tool_error"].contains(&r.as_str()) {
                return Err(invalid(
                    &format!("billing.refund_on[{i}]"),
                    format!("{r:?} is not one of \"error\", \"timeout\", \"tool_error\""),
                ));
            }
        }
        let power_safe = match self.durability.as_deref() {
            None | Some("process") => false,
            Some("power") => true,
            Some(other) => {
                return Err(invalid(
                    "billing.durability",
                    format!("{other:?} is not \"process\" or \"power\""),
                ));
            }
        };
        let admin_key = self.admin_key.or_else(|| std::env::var("TOLLGATE_ADMIN_KEY").ok());
        if let Some(k) = &admin_key
            && k.len() < 16
        {
            return Err(invalid("billing.admin_key", "must be at least 16 characters"));
        }
        let default_pricing = serde_json::json!({
            "default_price": default_price,
            "tools": tool_prices,
            "methods": method_prices,
        });
        let policy = plugins.validate(default_pricing, prices_set)?;
        Ok(Some(BillingConfig {
            policy,
            data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from("tollgate-data")),
            default_price,
            tool_prices,
            method_prices,
            free_methods: self
                .free_methods
                .unwrap_or_else(|| DEFAULT_FREE_METHODS.iter().map(|m| m.to_string()).collect()),
            refund_on_error: refund_on.iter().any(|r| r == "error"),
            refund_on_timeout: refund_on.iter().any(|r| r == "timeout"),
            refund_on_tool_error: refund_on.iter().any(|r| r == "tool_error"),
            admin_key,
            power_safe,
            log_retention_days: positive("billing.log_retention_days", self.log_retention_days, 30)? as i64,
            log_max_rows: positive("billing.log_max_rows", self.log_max_rows, 1_000_000)? as i64,
            shadow: self.shadow.unwrap_or(false),
            rate_limit: match self.rate_limit {
                Some(r) if crate::gate::parse_rate(&r).is_none() => {
                    return Err(invalid(
                        "billing.rate_limit",
                        format!("{r:?} is not N/s, N/min or N/h (N from 1 to 1000000)"),
                    ));
                }
                r => r,
            },
        }))
    }
}

fn positive(path: &str, v: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(0) => Err(invalid(path, "must be greater than 0")),
        Some(n) => Ok(n),
    }
}

fn ms(path: &str, v: Option<u64>, default: u64) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(positive(path, v, default)?))
}

/// An address (`10.1.2.3`, `::1`) or CIDR range (`10.0.0.0/8`).
pub fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
}

/// Finds a program the way a shell would: a path with a slash as is, else on `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The CA certificates `path` names for an `https://` `url` (config field `at`); `None` without
/// one. A CA file for an `http://` url is an error.
fn ca_file(url: &hyper::Uri, path: Option<&Path>, at: &str) -> Result<Option<Vec<Vec<u8>>>, ConfigError> {
    match path {
        None => Ok(None),
        Some(_) if url.scheme_str() != Some("https") => Err(invalid(at, "applies only to an https:// url")),
        Some(path) => crate::tls::read_ca_file(path).map(Some).map_err(|e| invalid(at, e)),
    }
}

/// Headers the gateway sets itself on upstream requests; the config may not set them.
const MANAGED_HEADERS: &[&str] = &[
    "accept",
    "connection",
    "content-length",
    "content-type",
    "host",
    "last-event-id",
    "mcp-protocol-version",
    "mcp-session-id",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// The upstream's extra headers, from literal values and from environment variables; values are
/// marked sensitive and never appear in an error.
fn upstream_headers(
    literal: BTreeMap<String, String>,
    from_env: BTreeMap<String, String>,
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, ConfigError> {
    let mut out: Vec<(http::HeaderName, http::HeaderValue)> = Vec::new();
    let named = |table: &str, name: &str| -> Result<http::HeaderName, ConfigError> {
        let at = format!("upstream.{table}.{name}");
        let header = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(&at, format!("{name:?} is not a header name")))?;
        if MANAGED_HEADERS.contains(&header.as_str()) {
            return Err(invalid(&at, "is set by the gateway itself"));
        }
        Ok(header)
    };
    for (name, value) in &literal {
        let header = named("headers", name)?;
        if out.iter().any(|(h, _)| *h == header) {
            // Names differing only in case (`Authorization`, `authorization`) are one header.
            return Err(invalid(&format!("upstream.headers.{name}"), "is set twice"));
        }
        let mut value = http::HeaderValue::from_str(value)
            .map_err(|_| invalid(&format!("upstream.headers.{name}"), "is not a valid header value"))?;
        value.set_sensitive(true);
        out.push((header, value));
    }
    for (name, var) in &from_env {
        let at = format!("upstream.headers_env.{name}");
        let header = named("headers_env", name)?;
        if out.iter().any(|(h, _)| *h == header) {
            return Err(invalid(&at, "is also set in upstream.headers"));
        }
        let value = std::env::var(var).map_err(|_| invalid(&at, format!("the variable {var} is not set")))?;
        let mut value = http::HeaderValue::from_str(&value)
            .map_err(|_| invalid(&at, format!("the variable {var} does not hold a valid header value")))?;
        value.set_sensitive(true);
        out.push((header, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "t.toml".into(),
            message: e.to_string(),
        })?;
        raw.validate()
    }

    #[test]
    fn a_minimal_stdio_config_gets_the_defaults() {
        let c = parse("[upstream]\ncommand = [\"sh\", \"-c\", \"cat\"]").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:3402");
        assert_eq!(c.server.max_body_bytes, 1 << 20);
        assert_eq!(
            c.server.threads,
            std::thread::available_parallelism().unwrap().get(),
            "one connection thread per core"
        );
        assert!(matches!(c.upstream.kind, UpstreamKind::Stdio { ref program, .. } if program == "sh"));
    }

    #[test]
    fn unknown_fields_are_errors_that_name_the_field() {
        let e = parse("[upstream]\ncommand = [\"sh\"]\ncomand = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("comand"), "{e}");
    }

    #[test]
    fn a_missing_program_is_named() {
        let e = parse("[upstream]\ncommand = [\"no-such-program-xyz\"]")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("upstream.command:"), "{e}");
        assert!(e.contains("no-such-program-xyz"), "{e}");
    }

    #[test]
    fn zero_limits_and_bad_addresses_are_refused() {
        let e = parse("[server]\nmax_body_bytes = 0\n[upstream]\ncommand = [\"sh\"]").unwrap_err();
        assert!(e.to_string().starts_with("server.max_body_bytes:"), "{e}");
        let e = parse("[server]\nlisten = \"nowhere\"\n[upstream]\ncommand = [\"sh\"]").unwrap_err();
        assert!(e.to_string().starts_with("server.listen:"), "{e}");
        for threads in [0, 1025] {
            let e = parse(&format!(
                "[server]\nthreads = {threads}\n[upstream]\ncommand = [\"sh\"]"
            ))
            .unwrap_err();
            assert!(e.to_string().starts_with("server.threads:"), "{e}");
        }
        let c = parse("[server]\nthreads = 3\n[upstream]\ncommand = [\"sh\"]").unwrap();
        assert_eq!(c.server.threads, 3);
    }

    #[test]
    fn an_upstream_must_be_exactly_one_kind() {
        assert!(parse("").unwrap_err().to_string().starts_with("upstream:"));
        let both = "[upstream]\ncommand = [\"sh\"]\nurl = \"http://127.0.0.1:1/mcp\"";
        assert!(parse(both).unwrap_err().to_string().starts_with("upstream:"));
        let ftp = "[upstream]\nurl = \"ftp://example.com/mcp\"";
        assert!(parse(ftp).unwrap_err().to_string().starts_with("upstream.url:"));
    }

    #[test]
    fn upstream_headers_come_from_the_file_or_the_environment_and_never_show() {
        // A variable the test process already has (setting one would race other tests' reads).
        let (var, secret) = std::env::vars()
            .find(|(_, v)| v.len() >= 16 && http::HeaderValue::from_str(v).is_ok())
            .expect("some environment variable");
        let c = parse(&format!(
            "[upstream]\nurl = \"https://example.com/mcp\"\nheaders = {{ X-Team = \"blue\" }}\n\
             headers_env = {{ Authorization = {var:?} }}"
        ))
        .unwrap();
        let UpstreamKind::Http { headers, .. } = &c.upstream.kind else {
            panic!("a url upstream")
        };
        assert_eq!(headers.len(), 2);
        assert_eq!(headers[1].0, "authorization");
        assert_eq!(headers[1].1, secret.as_str());
        assert!(
            !format!("{:?}", c.upstream).contains(&secret),
            "a header value never prints"
        );

        let err = |extra: &str| {
            parse(&format!("[upstream]\nurl = \"http://x/mcp\"\n{extra}"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("headers = { Content-Type = \"text/plain\" }").starts_with("upstream.headers.Content-Type:"));
        assert!(err("headers = { \"bad name\" = \"x\" }").starts_with("upstream.headers.bad name:"));
        let bad_value = err("headers = { X-A = \"secret\\nline\" }");
        assert!(
            bad_value.starts_with("upstream.headers.X-A:") && !bad_value.contains("secret"),
            "{bad_value}"
        );
        assert!(
            err("headers_env = { X-A = \"TOLLGATE_TEST_NOT_SET_ANYWHERE\" }")
                .contains("TOLLGATE_TEST_NOT_SET_ANYWHERE is not set")
        );
        assert!(err("headers = { X-A = \"1\", x-a = \"2\" }").contains("is set twice"));
        let stdio = "[upstream]\ncommand = [\"sh\"]\nheaders = { X-A = \"1\" }";
        assert!(parse(stdio).unwrap_err().to_string().starts_with("upstream:"));
    }

    #[test]
    fn an_https_upstream_trusts_the_web_roots_or_a_named_ca_file() {
        let web = parse("[upstream]\nurl = \"https://example.com/mcp\"").unwrap();
        assert!(matches!(web.upstream.kind, UpstreamKind::Http { ca: None, .. }));
        let missing = "[upstream]\nurl = \"https://example.com/mcp\"\nca_file = \"/nonexistent/ca.pem\"";
        let e = parse(missing).unwrap_err().to_string();
        assert!(
            e.starts_with("upstream.ca_file:") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let plain = "[upstream]\nurl = \"http://example.com/mcp\"\nca_file = \"/etc/hostname\"";
        assert!(parse(plain).unwrap_err().to_string().starts_with("upstream.ca_file:"));
        let stdio = "[upstream]\ncommand = [\"sh\"]\nca_file = \"/etc/hostname\"";
        assert!(parse(stdio).unwrap_err().to_string().starts_with("upstream.ca_file:"));
    }

    #[test]
    fn billing_is_on_by_default_at_one_credit_per_call_and_bad_prices_are_named() {
        let c = parse("[upstream]\ncommand = [\"sh\"]").unwrap();
        let b = c.billing.unwrap();
        assert_eq!(b.default_price, 1);
        assert!(b.refund_on_error && b.refund_on_timeout && !b.refund_on_tool_error);
        let off = parse("[upstream]\ncommand = [\"sh\"]\n[billing]\nenabled = false").unwrap();
        assert!(off.billing.is_none());
        let e = parse("[upstream]\ncommand = [\"sh\"]\n[billing]\ntool_prices = { echo = -1 }").unwrap_err();
        assert!(e.to_string().starts_with("billing.tool_prices.echo:"), "{e}");
        let e = parse("[upstream]\ncommand = [\"sh\"]\n[billing]\nrefund_on = [\"never\"]").unwrap_err();
        assert!(e.to_string().starts_with("billing.refund_on[0]:"), "{e}");
    }

    #[test]
    fn the_child_environment_holds_only_what_is_named() {
        let c = parse("[upstream]\ncommand = [\"sh\"]\nenv_passthrough = []\nenv = { A = \"1\" }").unwrap();
        let UpstreamKind::Stdio { env, .. } = c.upstream.kind else {
            panic!()
        };
        assert_eq!(env, vec![("A".to_string(), "1".to_string())]);
    }

    #[test]
    fn webhook_destinations_are_checked_field_by_field() {
        let base = "[upstream]\nurl = \"http://127.0.0.1:9/mcp\"\n[billing]\ndata_dir = \"/tmp/x\"\n";
        let hook = |extra: &str| {
            format!(
                "{base}[[webhooks]]\nname = \"b\"\nurl = \"https://hooks.example.com/t\"\nsecret = \"0123456789abcdef\"\n{extra}"
            )
        };
        let ok = parse(&hook("events = [\"usage\", \"key.*\"]")).unwrap();
        assert_eq!(ok.webhooks[0].url.scheme_str(), Some("https"));
        assert!(
            format!("{:?}", ok.webhooks[0]).contains("Secret(..)"),
            "the secret is not printed"
        );
        let err = |extra: &str| parse(&hook(extra)).unwrap_err().to_string();
        assert!(err("events = [\"usage.everything\"]").starts_with("webhooks[0].events[0]:"));
        assert!(err("ca_file = \"/nonexistent/ca.pem\"").starts_with("webhooks[0].ca_file:"));
        assert!(err("allow_networks = [\"nope\"]").starts_with("webhooks[0].allow_networks[0]:"));
        let short = format!("{base}[[webhooks]]\nname = \"b\"\nurl = \"http://h/\"\nsecret = \"short\"\n");
        assert!(
            parse(&short)
                .unwrap_err()
                .to_string()
                .starts_with("webhooks[0].secret:")
        );
        let ftp = format!("{base}[[webhooks]]\nname = \"b\"\nurl = \"ftp://h/\"\nsecret = \"0123456789abcdef\"\n");
        assert!(parse(&ftp).unwrap_err().to_string().starts_with("webhooks[0].url:"));
        let off = "[upstream]\nurl = \"http://127.0.0.1:9/mcp\"\n[billing]\nenabled = false\n[[webhooks]]\nname = \"b\"\nurl = \"http://h/\"\nsecret = \"0123456789abcdef\"\n";
        assert!(parse(off).unwrap_err().to_string().starts_with("webhooks:"));
    }
}
