//! Config hot reload (`POST /admin/config/reload`, SIGHUP): the config file is read and validated
//! whole; if anything in it is wrong nothing changes. Otherwise what can change live does — prices
//! and plugin configuration, refund rules, the default rate limit, free methods, shadow mode,
//! webhook destinations, the log level — and the report names what changed and what waits for a
//! restart (listen address, upstream, sessions, data directory, durability, admin key, plugin
//! limits, the metrics address).

use serde_json::{Value, json};

use crate::config::{BillingConfig, RawConfig};
use crate::proxy::AppState;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this gateway was started without a config file (`wrap`); there is nothing to reload")]
    NoFile,
    #[error("the config file is invalid, nothing changed: {0}")]
    Invalid(String),
    #[error("the plugins in the config file cannot be loaded, nothing changed: {0}")]
    Plugins(String),
}

/// One reload at a time.
static RELOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Reads the config file again and applies it; see the module doc.
pub async fn reload(state: &AppState) -> Result<Value, ReloadError> {
    let _one = RELOADING.lock().await;
    let path = state.config().source.clone().ok_or(ReloadError::NoFile)?;
    let mut new = RawConfig::from_file(&path)
        .and_then(RawConfig::validate)
        .map_err(|e| ReloadError::Invalid(e.to_string()))?;
    new.source = Some(path);
    let old = state.live_config().clone();
    if old.listen_from_cli {
        new.server.listen = old.server.listen;
        new.listen_from_cli = true;
    }
    let mut changed: Vec<String> = Vec::new();
    let mut restart: Vec<String> = Vec::new();
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    for (name, d) in [
        ("server", differs(&old.server, &new.server)),
        ("upstream", old.upstream != new.upstream),
        ("sessions", differs(&old.sessions, &new.sessions)),
        ("metrics.listen", old.metrics_listen != new.metrics_listen),
    ] {
        if d {
            restart.push(name.into());
        }
    }
    // What is applied: the new file, except what needs a restart, which keeps its running value.
    let mut applied = new.clone();
    applied.server = old.server.clone();
    applied.upstream = old.upstream.clone();
    applied.sessions = old.sessions.clone();
    applied.metrics_listen = old.metrics_listen;

    match (&old.billing, &new.billing, state.gate()) {
        (Some(ob), Some(nb), Some(gate)) => {
            let (kept, restart_billing) = keep_restart_only(ob, nb);
            restart.extend(restart_billing);
            // The plugins first: they are the part that can still fail.
            let (running_pricing, running_health) = gate
                .policy()
                .specs(crate::policy::DEFAULT_TENANT)
                .expect("the default tenant exists");
            let pricing = (running_pricing != kept.policy.pricing).then(|| kept.policy.pricing.clone());
            let health = (running_health != kept.policy.health).then(|| kept.policy.health.clone());
            if pricing.is_some() || health.is_some() {
                let g = gate.clone();
                let (p, h) = (pricing.clone(), health.clone());
                let reloaded =
                    tokio::task::spawn_blocking(move || g.policy().reload(crate::policy::DEFAULT_TENANT, p, h))
                        .await
                        .map_err(|e| ReloadError::Plugins(e.to_string()))?
                        .map_err(|e| ReloadError::Plugins(e.to_string()))?;
                if pricing.is_some() {
                    changed.push("plugins.pricing (prices)".into());
                }
                if health.is_some() {
                    changed.push("plugins.health".into());
                }
                crate::webhooks::plugins_reloaded(gate.ledger().store(), &reloaded).await;
            }
            for (name, d) in [
                ("billing.free_methods", ob.free_methods != kept.free_methods),
                (
                    "billing.refund_on",
                    (ob.refund_on_error, ob.refund_on_timeout, ob.refund_on_tool_error)
                        != (kept.refund_on_error, kept.refund_on_timeout, kept.refund_on_tool_error),
                ),
                ("billing.rate_limit", ob.rate_limit != kept.rate_limit),
                ("billing.shadow", ob.shadow != kept.shadow),
            ] {
                if d {
                    changed.push(name.into());
                }
            }
            gate.set_config(kept.clone());
            applied.billing = Some(kept);
        }
        (ob, nb, _) => {
            if ob.is_some() != nb.is_some() {
                restart.push("billing.enabled".into());
            }
            applied.billing = old.billing.clone();
        }
    }
    if let Some(w) = state.webhooks() {
        for name in w.apply(&applied.webhooks) {
            changed.push(format!("webhooks.{name}"));
        }
    } else if !applied.webhooks.is_empty() {
        restart.push("webhooks".into());
    }
    if old.log_level != applied.log_level {
        match crate::telemetry::set_level(applied.log_level.as_deref().unwrap_or("info")) {
            Ok(()) => changed.push("logging.level".into()),
            Err(e) => restart.push(format!("logging.level ({e})")),
        }
    }
    *state.live_config() = applied;
    tracing::info!(?changed, ?restart, "config reloaded");
    Ok(json!({ "changed": changed, "restartRequired": restart }))
}

/// The new billing settings with the ones that need a restart kept at their running values, and
/// the names of those that differ.
fn keep_restart_only(old: &BillingConfig, new: &BillingConfig) -> (BillingConfig, Vec<String>) {
    let mut kept = new.clone();
    let mut restart = Vec::new();
    if old.data_dir != new.data_dir {
        restart.push("billing.data_dir".into());
        kept.data_dir = old.data_dir.clone();
    }
    if old.power_safe != new.power_safe {
        restart.push("billing.durability".into());
        kept.power_safe = old.power_safe;
    }
    if old.admin_key != new.admin_key {
        restart.push("billing.admin_key".into());
        kept.admin_key = old.admin_key.clone();
    }
    if (old.log_retention_days, old.log_max_rows) != (new.log_retention_days, new.log_max_rows) {
        restart.push("billing.log_retention".into());
        kept.log_retention_days = old.log_retention_days;
        kept.log_max_rows = old.log_max_rows;
    }
    if old.policy.limits != new.policy.limits || old.policy.health_window != new.policy.health_window {
        restart.push("plugins limits".into());
        kept.policy.limits = old.policy.limits;
        kept.policy.health_window = old.policy.health_window;
    }
    (kept, restart)
}

/// Reloads on every SIGHUP, logging what happened.
#[cfg(unix)]
pub async fn on_sighup(state: AppState) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/config/reload");
        return;
    };
    while hup.recv().await.is_some() {
        match reload(&state).await {
            Ok(report) => tracing::info!(%report, "SIGHUP: config reloaded"),
            Err(e) => tracing::error!(error = %e, "SIGHUP: config reload refused"),
        }
    }
}
