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
    Wrap(WrapArgs),
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
    /// A remote Streamable HTTP MCP endpoint to wrap instead of a command (http://host:port/mcp).
    #[arg(long, conflicts_with = "command")]
    pub remote_url: Option<String>,
    /// How long one call may take before the client gets a timeout error, in milliseconds.
    #[arg(long)]
    pub call_timeout_ms: Option<u64>,
    /// A browser Origin allowed to call the gateway (repeatable; `*` for any). Loopback origins
    /// are always allowed.
    #[arg(long = "allow-origin")]
    pub allow_origins: Vec<String>,
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
        raw.validate()
    }
}

/// Runs the command line; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(&cli.log_level, cli.log_format);
    let config = match cli.command {
        Command::Check { config } => {
            return match RawConfig::from_file(&config).and_then(RawConfig::validate) {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Serve { config, listen } => RawConfig::from_file(&config).and_then(|mut raw| {
            if listen.is_some() {
                raw.server.listen = listen;
            }
            raw.validate()
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
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.server.listen)))?;
    let addr = listener.local_addr()?;
    // The one line on stdout: scripts and tests wait for it.
    println!("tollgate listening on http://{addr}/mcp");
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, "listening");
    crate::run(config, listener, shutdown_signal()).await
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
