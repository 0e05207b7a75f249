//! The billing chain's own work for one paid call, in process and on one thread: the key from its
//! header (SHA-256, lookup, constant-time compare), the IP and tool checks and rate limits, the
//! price (a reused charge of the default plugin), the reservation, and the settlement (the request
//! row, the charge journaled and handed to the database writer, which commits on its own thread).
//! Everything a paid call adds to a proxied one but the network and the writer's commits, measured
//! without the noise of a load test, so a change of a fraction of a microsecond shows.
//!
//! `cargo bench -p tollgate-bench --bench gate`

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hyper::http::{HeaderMap, HeaderValue};
use tollgate::config::RawConfig;
use tollgate::gate::{CallRecord, Gate, Outcome, next_request_id};
use tollgate::ledger::{KeySettings, now_ms};
use tollgate::policy::pricing::CallInput;

fn paid_call(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tollgate.toml");
    std::fs::write(
        &file,
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:9/mcp\"\n[billing]\ndata_dir = {:?}\nadmin_key = \"bench-admin-key-0123456789\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let config = RawConfig::from_file(&file).unwrap().validate().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let (gate, _) = Gate::open(config.billing.as_ref().expect("billing on")).unwrap();
    let (_, secret) = rt
        .block_on(
            gate.ledger()
                .create_key("bench", 1_000_000_000_000, KeySettings::default()),
        )
        .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", HeaderValue::from_str(&secret).unwrap());
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let arguments = r#"{"text":"hello"}"#;
    let call = || {
        let started = Instant::now();
        let request_id = next_request_id();
        let key = gate.key_of(&headers).unwrap();
        let settings = key.settings_now();
        gate.check_ip(&settings, ip).unwrap();
        gate.check_call(&key, &settings, Some("echo")).unwrap();
        let input = CallInput {
            method: "tools/call",
            tool: Some("echo"),
            arguments: Some(arguments),
            request_id: &request_id,
            now_ms: now_ms(),
        };
        let price = gate.price(&key, &settings, &input).unwrap();
        let reservation = gate
            .reserve(key.clone(), price.reserved(), &request_id, input.now_ms)
            .unwrap();
        let record = CallRecord {
            request_id: &request_id,
            client_request_id: None,
            upstream: Some(Duration::from_micros(150)),
            key_id: Some(&key.id),
            method: "tools/call",
            tool: Some("echo"),
            started,
        };
        gate.settle_now(reservation, price, 60, Outcome::Ok, &record).unwrap()
    };
    c.bench_function("gate/paid call (admit, price, reserve, settle)", |b| {
        // Calls come far faster here than through a network: every thousand, the writer (on its
        // own thread, as in the gateway) is let catch up, untimed, so its queue stays as short as
        // under real load.
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(1000);
                let t = Instant::now();
                for _ in 0..n {
                    std::hint::black_box(call());
                }
                timed += t.elapsed();
                rt.block_on(gate.ledger().store().sync()).unwrap();
                left -= n;
            }
            timed
        })
    });
}

criterion_group!(benches, paid_call);
criterion_main!(benches);
