//! One pricing call through the plugin host: on a warm pooled instance, on a fresh instance every
//! time (the cold path: new `Store`, instantiate, configure, call), and a charge reused without a
//! call (the gateway's path for a plugin that allows it). Also one health score over a full day of
//! request-log buckets.
//!
//! `cargo bench -p tollgate-bench --bench plugin`

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::ledger::Key;
use tollgate::policy::health::KeyFigures;
use tollgate::policy::pricing::{CallInput, Priced};
use tollgate::policy::{Limits, PluginSpec, Policy, PolicyConfig};
use tollgate::window::Bucket;

fn policy(limits: Limits) -> Policy {
    let config = PolicyConfig {
        limits,
        pricing: PluginSpec {
            file: None,
            config: r#"{"default_price": 1, "tools": {"search": 5}, "per_kib_input": 1}"#.into(),
        },
        health: PluginSpec {
            file: None,
            config: "{}".into(),
        },
        health_window: std::time::Duration::from_secs(86_400),
    };
    Policy::load(&config, None).expect("the embedded plugins load")
}

fn key() -> Arc<Key> {
    let key = Key::new(
        "key_bench".into(),
        "bench".into(),
        tollgate::ledger::keys::hash("tg_bench"),
        "tg_be".into(),
        0,
        1_000,
    );
    key.set_settings(tollgate::ledger::KeySettings {
        tags: vec!["partner".into()],
        ..Default::default()
    });
    Arc::new(key)
}

fn pricing(c: &mut Criterion) {
    let key = key();
    let settings = key.settings();
    let key = Some((&*key, &settings));
    let input = CallInput {
        method: "tools/call",
        tool: Some("search"),
        arguments: Some(r#"{"query":"what is the weather in Lisbon","limit":10}"#),
        request_id: "req_0123456789abcdef",
        now_ms: 1_764_000_000_000,
    };
    let warm = policy(Limits::default());
    c.bench_function("price/warm instance", |b| {
        let plugin = warm.default_tenant().pricing.load();
        b.iter(|| match plugin.price_by_call(warm.limits(), &input, key) {
            Priced::Charge(p) => assert_eq!(p.credits, 6),
            other => panic!("{other:?}"),
        })
    });
    // What the gateway does for pricing-table, which lets the host reuse its charges: a lookup.
    c.bench_function("price/reused charge", |b| {
        let plugin = warm.default_tenant().pricing.load();
        b.iter(|| match plugin.price(warm.limits(), &input, key) {
            Priced::Charge(p) => assert_eq!(p.credits, 6),
            other => panic!("{other:?}"),
        })
    });
    let cold = policy(Limits {
        pool_size: 0,
        ..Limits::default()
    });
    c.bench_function("price/fresh instance", |b| {
        let plugin = cold.default_tenant().pricing.load();
        b.iter(|| match plugin.price_by_call(cold.limits(), &input, key) {
            Priced::Charge(p) => assert_eq!(p.credits, 6),
            other => panic!("{other:?}"),
        })
    });
}

fn health(c: &mut Criterion) {
    let policy = policy(Limits::default());
    let buckets: Vec<Bucket> = (0..1440)
        .map(|m| Bucket {
            minute: 29_000_000 + m,
            allowed: 700,
            denied: 20,
            refunded: 5,
            error: 0,
            credits: 700,
            duration_us_total: 700 * 150,
            duration_us_max: 2_000,
        })
        .collect();
    let figures = KeyFigures {
        total: 1_000_000,
        active: 990_000,
        suspended: 5_000,
        revoked: 5_000,
        remaining: 900_000_000,
        spent: 100_000_000,
        ..KeyFigures::default()
    };
    c.bench_function("score/one day of minute buckets", |b| {
        let plugin = policy.default_tenant().health.load();
        b.iter(|| {
            let r = plugin
                .score(policy.limits(), &figures, &buckets, 86_400_000, 29_001_440 * 60_000)
                .unwrap();
            assert!(r.score > 0.0);
        })
    });
}

criterion_group!(benches, pricing, health);
criterion_main!(benches);
