//! Tollgate: a gateway that sells access to an MCP server.
//!
//! # Layout
//! - [`cli`]: the command line (`wrap`, `serve`, `check`).
//! - [`config`]: the TOML config (or `wrap` flags), validated once at start-up.
//! - [`deadline`]: coarse deadlines (call and slow-client timeouts) without a timer per request.
//! - [`jsonrpc`]: JSON-RPC messages and the error-code table.
//! - [`error`]: every client-facing error mapped to an HTTP status and JSON-RPC error, in one place.
//! - [`ledger`]: API keys, balances and the durable ledger (SQLite), see [`ledger::sqlite`].
//! - [`gate`]: which calls need a key, the price, reserve and settle.
//! - [`admin`]: the admin API (`/admin/...`) and the client's `/balance`.
//! - [`proxy`]: the `/mcp` endpoint (Streamable HTTP) and the health endpoints.
//! - [`session`]: client sessions (`Mcp-Session-Id`).
//! - [`upstream`]: the upstream MCP server, a stdio child ([`upstream::stdio`]) or a remote
//!   Streamable HTTP server ([`upstream::http`]).
//! - [`sse`]: Server-Sent Events framing and parsing.
//! - [`body`]: the response body type.
//! - [`server`]: the HTTP server loop and graceful shutdown.
//! - [`telemetry`]: logging set-up (and its live level).
//! - [`metrics`]: Prometheus metrics (`GET /metrics`).
//! - [`webhooks`]: signed usage and admin-event webhooks from persisted outboxes.
//! - [`reload`]: the config file read again and applied live (`POST /admin/config/reload`, SIGHUP).

pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod deadline;
pub mod error;
pub mod gate;
pub mod jsonrpc;
pub mod ledger;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod session;
pub mod sse;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod webhooks;
pub mod window;

use tokio::net::TcpListener;

pub use config::Config;

/// Runs the gateway with its state (see [`proxy::AppState::new`]) on an already-bound listener until
/// `shutdown` completes.
pub async fn run(
    state: proxy::AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    server::run(listener, state, shutdown).await
}
