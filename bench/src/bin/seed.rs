//! Seeds a Tollgate data directory for the scale benchmark: N keys (the first K with known
//! secrets `tg_bench_<i>`, all active) and M request-log rows spread over the last hour, written
//! straight into the database in one transaction (the admin API would take minutes for a million
//! keys).
//!
//! `seed --data-dir DIR --keys 1000000 --requests 1000000 --known 16`

use std::path::PathBuf;

use clap::Parser;
use rusqlite::params;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    keys: u64,
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// Keys whose secret is `tg_bench_<i>` (the first K).
    #[arg(long, default_value_t = 16)]
    known: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Opening the store creates the database and runs the migrations.
    let retention = tollgate::ledger::Retention::new(30 * 86_400_000, 10_000_000);
    drop(tollgate::ledger::Store::open(&args.data_dir, false, retention)?);
    let mut conn = rusqlite::Connection::open(args.data_dir.join("tollgate.db"))?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let tx = conn.transaction()?;
    let mut ids = Vec::with_capacity(args.keys as usize);
    {
        let mut key = tx.prepare(
            "INSERT INTO keys (id, name, hash, prefix, status, credits, spent, calls, created_at, settings)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut grant = tx.prepare(
            "INSERT INTO ledger (request_id, key_id, kind, amount, created_at) VALUES (?1, ?2, 'grant', ?3, ?4)",
        )?;
        for i in 0..args.keys {
            // 24 characters, as the gateway's own ids (`keys::new_id`), so kept inline as theirs are.
            let id = format!("key_{i:020x}");
            let secret = if i < args.known {
                format!("tg_bench_{i}")
            } else {
                format!("tg_unknown_{i}_{}", rand::random::<u64>())
            };
            let hash = tollgate::ledger::keys::hash(&secret);
            // Known keys are all active (a load spread over them is never refused).
            let status = match i % 100 {
                _ if i < args.known => "active",
                98 => "suspended",
                99 => "revoked",
                _ => "active",
            };
            let credits: i64 = if i < args.known {
                1_000_000_000_000
            } else {
                (i % 1000) as i64
            };
            let spent = (i % 50) as i64;
            key.execute(params![
                id,
                format!("consumer {i}"),
                &hash[..],
                "tg_bench",
                status,
                credits,
                spent,
                spent,
                now - 86_400_000,
                "{}"
            ])?;
            grant.execute(params![format!("grant_{id}"), id, credits + spent, now - 86_400_000])?;
            ids.push(id);
        }
        let mut request = tx.prepare(
            "INSERT INTO requests_0 (request_id, key_id, method, tool, outcome, reason, credits, duration_us, created_at)
             VALUES (?1, ?2, 'tools/call', ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for i in 0..args.requests {
            let key = &ids[(rand::random::<u64>() % ids.len().max(1) as u64) as usize];
            let denied = i % 20 == 0;
            request.execute(params![
                format!("req_seed_{i:016x}"),
                key,
                format!("tool_{}", i % 20),
                if denied { "denied" } else { "allowed" },
                denied.then_some("quota"),
                if denied { 0 } else { 1 },
                100 + (i % 400) as i64,
                now - (rand::random::<u64>() % 3_600_000) as i64
            ])?;
        }
    }
    // What the database writer keeps alongside the log it writes: each key's successful tools;
    // and that the balances written above hold every ledger row (else a start-up adds the grants
    // to them again), and `key_tools` every request row.
    tx.execute_batch(
        "INSERT INTO key_tools (key_id, tool, last_seq)
            SELECT key_id, tool, MAX(seq) FROM requests
            WHERE outcome = 'allowed' AND key_id IS NOT NULL AND tool IS NOT NULL GROUP BY key_id, tool;
         UPDATE balance_mark SET ledger_seq = (SELECT COALESCE(MAX(seq), 0) FROM ledger),
            tools_seq = (SELECT COALESCE(MAX(seq), 0) FROM requests);",
    )?;
    tx.commit()?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    eprintln!("seeded {} keys and {} request rows", args.keys, args.requests);
    Ok(())
}
