//! The database writer's cost per settled call: settles N calls (charge + request row, one in ten
//! refunded) as fast as one thread can, then reports the time each `settle` took on that thread and
//! the writer thread's CPU time per call.
//!
//! `cargo run --release -p tollgate-bench --bin storebench -- [calls]`; with `SQL=...` in the
//! environment, those statements run on the fresh database first (to try a schema change, e.g.
//! `SQL="CREATE INDEX requests_by_tool ON requests_0 (tool)"`; the request log is eight segment
//! tables, `requests_0` … `requests_7`, behind the view `requests`); with `KEEP_ROWS=N`, the
//! request log keeps N rows (give or take a fifth), so pruning runs throughout and its cost shows
//! in the checkpoint thread's figure.

use std::time::Instant;

use tollgate::ledger::{KeySettings, Ledger, RequestRow, Retention, now_ms};

fn thread_cpu_ms(name: &str) -> f64 {
    let tick = 100.0; // USER_HZ
    let mut total = 0.0;
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = t.unwrap().path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(p.join("stat")).unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = after.split(' ').collect();
            total += (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) * 1000.0 / tick;
        }
    }
    total
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // KEEP_ROWS=N: the request log keeps N rows, so pruning runs throughout (its cost included).
    let retention = match std::env::var("KEEP_ROWS").ok().and_then(|v| v.parse().ok()) {
        Some(max_rows) => Retention::new(Retention::keep_all().max_age_ms, max_rows),
        None => Retention::keep_all(),
    };
    let ledger = Ledger::open(dir.path(), false, retention).unwrap();
    let (key, _) = rt
        .block_on(ledger.create_key("bench", 1_000_000_000_000, KeySettings::default()))
        .unwrap();
    if let Ok(sql) = std::env::var("SQL") {
        let c = rusqlite::Connection::open(dir.path().join("tollgate.db")).unwrap();
        c.execute_batch(&sql).unwrap();
    }
    let before = thread_cpu_ms("tollgate-db-wri");
    let before_pruner = thread_cpu_ms("tollgate-db-che");
    let started = Instant::now();
    // Time spent in `settle` itself, on this thread (the hand-over to the writer, as a paid call's
    // connection thread makes it).
    let mut settling = std::time::Duration::ZERO;
    for i in 0..n {
        let request_id = format!("req_{i:016x}");
        let r = ledger.reserve(key.clone(), 2, &request_id).unwrap();
        let refunded = i % 10 == 0;
        let row = RequestRow {
            seq: 0,
            request_id: request_id.into(),
            key_id: Some(key.id.as_str().into()),
            method: "tools/call".into(),
            tool: Some(if i % 3 == 0 { "search" } else { "echo" }.into()),
            outcome: if refunded { "refunded" } else { "allowed" }.into(),
            reason: refunded.then(|| "upstream_error".into()),
            credits: if refunded { 0 } else { 2 },
            duration_us: 250,
            created_at: now_ms(),
        };
        let t = Instant::now();
        ledger.settle(r, if refunded { 0 } else { 2 }, row).unwrap();
        settling += t.elapsed();
        // Paced a little, as calls arrive: the writer's batches are what they are under load.
        if i % 64 == 63 {
            std::thread::sleep(std::time::Duration::from_micros(1500));
        }
    }
    rt.block_on(ledger.store().sync()).unwrap();
    let wall = started.elapsed();
    let cpu = thread_cpu_ms("tollgate-db-wri") - before;
    let pruner = thread_cpu_ms("tollgate-db-che") - before_pruner;
    // Give the writer a tick to delete committed segments.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let segments = std::fs::read_dir(dir.path().join("journal")).unwrap().count();
    println!(
        "{n} calls in {:.2} s; settle {:.2} us per call; writer CPU {:.0} ms = {:.1} us per call; checkpoints and pruning {:.1} us per call; {segments} journal segments left",
        wall.as_secs_f64(),
        settling.as_secs_f64() * 1e6 / n as f64,
        cpu,
        cpu * 1000.0 / n as f64,
        pruner * 1000.0 / n as f64
    );
}
