//! The command line: `tollgate wrap`, `tollgate serve`, `tollgate check`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, RawConfig};
use crate::telemetry::{self, LogFormat};

/// Tollgate: sell access to an MCP server. Agents call Tollgate's /mcp endpoint; Tollgate forwards
/// to the upstream MCP server (a stdio command or a remote Streamable HTTP server).
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level or filter (e.g. `info`, `debug`, `tollgate=debug`); RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "info", env = "TOLLGATE_LOG_LEVEL")]
    pub log_level: String,
    /// Log line format, written to stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "TOLLGATE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a gateway in front of a stdio MCP server (the command after `--`) or a remote one
    /// (`--remote-url`), with defaults for everything else.
    ///
    /// Example: tollgate wrap -- npx -y @modelcontextprotocol/server-everything
    Wrap(Box<WrapArgs>),
    /// Start a gateway from a config file.
    Serve {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Listen here instead of the config's `server.listen` (port 0 picks a free port).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Validate a config file (and that the upstream command exists), then exit: 0 if valid.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct WrapArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed when ready).
    #[arg(long, default_value = "127.0.0.1:3402")]
    pub listen: String,
    /// A remote Streamable HTTP MCP endpoint to wrap instead of a command (https://host/mcp or
    /// http://host:port/mcp; https trusts the public web roots, or `[upstream] ca_file` in a config).
    #[arg(long, conflicts_with = "command")]
    pub remote_url: Option<String>,
    /// How long one call may take before the client gets a timeout error, in milliseconds.
    #[arg(long)]
    pub call_timeout_ms: Option<u64>,
    /// A browser Origin allowed to call the gateway (repeatable; `*` for any). Loopback origins
    /// are always allowed.
    #[arg(long = "allow-origin")]
    pub allow_origins: Vec<String>,
    /// Bill nothing: every method is free and no key is asked for (the proxy alone).
    #[arg(long, conflicts_with_all = ["price", "tool_price", "data_dir"])]
    pub free: bool,
    /// Credits per `tools/call` (tools without their own price). Default 1.
    #[arg(long)]
    pub price: Option<i64>,
    /// Per-tool prices, e.g. `search:5,summarize:10`.
    #[arg(long, value_name = "TOOL:N,...")]
    pub tool_price: Option<String>,
    /// Where the database lives (created on first start). Default ./tollgate-data.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A pricing plugin (a WebAssembly component of the `pricing-plugin` world) instead of the
    /// built-in pricing-table. Prices then come from `--pricing-config`, not `--price`.
    #[arg(long, value_name = "FILE.wasm", conflicts_with_all = ["price", "tool_price", "free"])]
    pub pricing_plugin: Option<PathBuf>,
    /// The pricing plugin's configuration, as JSON (e.g. `{"default_price": 2}` for the built-in
    /// pricing-table).
    #[arg(long, value_name = "JSON", conflicts_with_all = ["price", "tool_price", "free"])]
    pub pricing_config: Option<String>,
    /// A health-scoring plugin (a component of the `health-plugin` world) instead of the built-in
    /// health-weighted.
    #[arg(long, value_name = "FILE.wasm", conflicts_with = "free")]
    pub health_plugin: Option<PathBuf>,
    /// The health plugin's configuration, as JSON.
    #[arg(long, value_name = "JSON", conflicts_with = "free")]
    pub health_config: Option<String>,
    /// The stdio MCP server to run: program and arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl WrapArgs {
    fn into_config(self) -> Result<Config, crate::config::ConfigError> {
        let mut raw = RawConfig::default();
        raw.server.listen = Some(self.listen);
        if !self.allow_origins.is_empty() {
            raw.server.allowed_origins = Some(self.allow_origins);
        }
        raw.upstream.call_timeout_ms = self.call_timeout_ms;
        raw.upstream.url = self.remote_url;
        if !self.command.is_empty() {
            raw.upstream.command = Some(self.command);
        }
        if self.free {
            raw.billing.enabled = Some(false);
        }
        raw.billing.default_price = self.price;
        raw.billing.data_dir = self.data_dir;
        if let Some(list) = self.tool_price {
            let mut prices = std::collections::BTreeMap::new();
            for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let parsed = item
                    .rsplit_once(':')
                    .and_then(|(tool, n)| n.trim().parse::<i64>().ok().map(|n| (tool.trim().to_string(), n)));
                match parsed {
                    Some((tool, n)) if !tool.is_empty() => {
                        prices.insert(tool, n);
                    }
                    _ => {
                        return Err(crate::config::ConfigError::Invalid(
                            "--tool-price".into(),
                            format!("{item:?} is not TOOL:N (e.g. search:5)"),
                        ));
                    }
                }
            }
            raw.billing.tool_prices = Some(prices);
        }
        let table = |flag: &str, json: Option<String>| -> Result<Option<toml::Table>, crate::config::ConfigError> {
            json.map(|j| {
                serde_json::from_str::<toml::Table>(&j)
                    .map_err(|e| crate::config::ConfigError::Invalid(flag.into(), format!("not a JSON object: {e}")))
            })
            .transpose()
        };
        if self.pricing_plugin.is_some() || self.pricing_config.is_some() {
            raw.plugins.pricing = Some(crate::config::RawPlugin {
                file: self.pricing_plugin,
                config: table("--pricing-config", self.pricing_config)?,
            });
        }
        if self.health_plugin.is_some() || self.health_config.is_some() {
            raw.plugins.health = Some(crate::config::RawPlugin {
                file: self.health_plugin,
                config: table("--health-config", self.health_config)?,
            });
        }
        raw.validate()
    }
}

/// Runs the command line; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main, so that every queued log line is written before exit.
    let log = telemetry::init(&cli.log_level, cli.log_format);
    let config = match cli.command {
        Command::Check { config } => {
            return match RawConfig::from_file(&config).and_then(RawConfig::validate) {
                Ok(c) => match check_plugins(&c) {
                    Ok(()) => {
                        println!("{}: ok", config.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {}: plugins: {e}", config.display());
                        ExitCode::from(2)
                    }
                },
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Serve { config: path, listen } => RawConfig::from_file(&path).and_then(|mut raw| {
            if listen.is_some() {
                raw.server.listen.clone_from(&listen);
            }
            let mut config = raw.validate()?;
            config.source = Some(path);
            config.listen_from_cli = listen.is_some();
            Ok(config)
        }),
        Command::Wrap(args) => args.into_config(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // After what was logged before it.
            if let Some(log) = &log {
                log.flush();
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Compiles and configures the plugins a config names, as start-up would (without the cache).
fn check_plugins(config: &Config) -> Result<(), crate::policy::PolicyError> {
    if let Some(b) = &config.billing {
        let policy = crate::policy::Policy::load(&b.policy, None)?;
        for p in policy.describe(crate::policy::DEFAULT_TENANT) {
            println!(
                "plugin {}: {} ok",
                p["role"].as_str().unwrap_or("?"),
                p["file"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

async fn serve(config: Config) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.server.listen)))?;
    let addr = listener.local_addr()?;
    if let Some(level) = &config.log_level
        && let Err(e) = telemetry::set_level(level)
    {
        tracing::warn!(error = %e, "logging.level from the config not applied");
    }
    let metrics = match config.metrics_listen {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {at} (metrics.listen): {e}")))?,
        ),
        None => None,
    };
    let (state, admin_key) = crate::proxy::AppState::new(config).map_err(std::io::Error::other)?;
    if let Some(k) = admin_key {
        // Shown this once; only its hash is kept.
        println!("tollgate admin key (shown once, store it now): {k}");
    }
    if let Some(m) = metrics {
        println!("tollgate metrics on http://{}/metrics", m.local_addr()?);
        tokio::spawn(crate::server::run_metrics(m));
    }
    // SIGHUP reloads the config file (`serve`); without one (`wrap`) it is logged and ignored
    // rather than ending the process.
    #[cfg(unix)]
    tokio::spawn(crate::reload::on_sighup(state.clone()));
    // The line scripts and tests wait for.
    println!("tollgate listening on http://{addr}/mcp");
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, "listening");
    crate::run(state, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
