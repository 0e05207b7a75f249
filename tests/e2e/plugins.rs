//! Policy as WebAssembly, through the real binary: prices come from the pricing plugin's
//! configuration, plugins swap live without failing a request, broken and hostile plugins are
//! refused or contained, and system health is the health plugin's formula.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

/// A plugin built by the host's build script.
fn plugin(name: &str) -> PathBuf {
    Path::new(env!("TOLLGATE_PLUGIN_DIR")).join(format!("{name}.wasm"))
}

/// A billed gateway in front of the stdio fixture (logging its tools/calls), with `extra` flags.
struct Priced {
    gateway: Gateway,
    calls_log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Priced {
    async fn start(extra: &[&str]) -> Priced {
        let logdir = tempfile::tempdir().unwrap();
        let calls_log = logdir.path().join("calls.log");
        let log = calls_log.to_str().unwrap().to_string();
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--", FIXTURE, "--stdio", "--log", &log]);
        let gateway = Gateway::wrap_billed(&args).ready().await;
        Priced {
            gateway,
            calls_log,
            _logdir: logdir,
        }
    }

    async fn client(&self, secret: &str) -> McpClient {
        let mut c = self.gateway.client();
        c.api_key = Some(secret.to_string());
        c.initialize().await;
        c
    }

    fn upstream_calls(&self) -> usize {
        std::fs::read_to_string(&self.calls_log)
            .unwrap_or_default()
            .lines()
            .count()
    }
}

async fn credits(admin: &Admin, id: &str) -> i64 {
    admin.key(id).await["credits"].as_i64().unwrap()
}

/// A tools/call; the HTTP status and the JSON-RPC answer.
async fn call(c: &McpClient, tool: &str, args: Value) -> (u16, Value) {
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":tool,"arguments":args}}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, read_answer(r).await)
}

async fn reload(admin: &Admin, body: Value) -> (u16, Value) {
    let r = admin.post("/admin/plugins/reload", &body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn prices_from_the_pricing_table_config_are_charged_exactly() {
    let config = json!({
        "default_price": 2,
        "tools": {"add": 5},
        "per_kib_input": 1,
        "tag_percent": {"partner": 50},
        "output": {"per_kib": 1, "max": 100},
    });
    let p = Priced::start(&["--pricing-config", &config.to_string()]).await;
    let admin = p.gateway.admin();
    let (id, secret) = admin.create_key("alice", 1000).await;
    let (pid, psecret, _) = admin
        .create_key_with(json!({"name": "partner", "credits": 1000, "tags": ["partner"]}))
        .await;
    let c = p.client(&secret).await;

    // add: 5, +1 for its (started) KiB of arguments, +1 for its (started) KiB of answer.
    assert_eq!(c.call_text("add", json!({"a": 2, "b": 3})).await, "5");
    assert_eq!(credits(&admin, &id).await, 1000 - 7);
    // echo of 5000 characters: the default 2, +5 KiB of input, +5 KiB of output. The reserve was
    // 2 + 5 + 100 (the most the output may add); 95 came back as a partial refund.
    let text = "x".repeat(5000);
    assert_eq!(c.call_text("echo", json!({"text": text})).await.len(), 5000);
    assert_eq!(credits(&admin, &id).await, 1000 - 7 - 12);
    let kinds: Vec<(String, i64)> = admin
        .ledger(&id)
        .await
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().to_string(), e["amount"].as_i64().unwrap()))
        .collect();
    assert!(kinds.contains(&("partial_refund".into(), 95)), "{kinds:?}");

    // The partner pays half, rounded up: (5 + 1 + 1) × 50 % = 4 (3.5 up).
    let pc = p.client(&psecret).await;
    assert_eq!(pc.call_text("add", json!({"a": 1, "b": 1})).await, "2");
    assert_eq!(credits(&admin, &pid).await, 1000 - 4);

    // tools/list shows each tool's price for this key (no arguments, no output).
    let tools = c.request("tools/list", json!({})).await;
    let price_of = |name: &str| {
        tools["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["_meta"]["tollgate/price"].clone())
            .unwrap()
    };
    assert_eq!(price_of("add"), 6, "5 and one started KiB of the arguments {{}}");
    assert_eq!(price_of("echo"), 3);
    assert_eq!(p.upstream_calls(), 3);
}

/// The pricing plugin's figures in `GET /admin/plugins`: calls made, and charges reused instead.
async fn pricing_calls(admin: &Admin) -> (u64, u64) {
    let plugins: Value = admin.get("/admin/plugins").send_json().await;
    let p = &plugins["plugins"][0];
    assert_eq!(p["role"], "pricing");
    (p["calls"].as_u64().unwrap(), p["reused"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tables_prices_are_reused_until_the_keys_settings_change() {
    let config = json!({"default_price": 2, "per_kib_input": 1, "tag_percent": {"partner": 50}});
    let p = Priced::start(&["--pricing-config", &config.to_string()]).await;
    let admin = p.gateway.admin();
    let (id, secret) = admin.create_key("gina", 1000).await;
    let c = p.client(&secret).await;

    // Three calls of one tool and size: the plugin prices the first, the host reuses its charge.
    for text in ["a", "b", "c"] {
        c.call_text("echo", json!({"text": text})).await;
    }
    assert_eq!(
        credits(&admin, &id).await,
        1000 - 3 * 3,
        "2, and 1 for a started KiB of arguments"
    );
    assert_eq!(pricing_calls(&admin).await, (1, 2));
    // Another size in KiB is another price.
    c.call_text("echo", json!({"text": "x".repeat(2000)})).await;
    assert_eq!(credits(&admin, &id).await, 1000 - 9 - 4);
    assert_eq!(pricing_calls(&admin).await, (2, 2));

    // New tags are new settings: the next call is priced again, at the partner's half.
    let r = admin
        .http
        .patch(format!("{}/admin/keys/{id}", p.gateway.base))
        .header("x-admin-key", ADMIN_KEY)
        .header("content-type", "application/json")
        .body(json!({"tags": ["partner"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    c.call_text("echo", json!({"text": "d"})).await;
    assert_eq!(credits(&admin, &id).await, 1000 - 13 - 2, "(2 + 1) × 50 %, rounded up");
    assert_eq!(pricing_calls(&admin).await, (3, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_to_pricing_surge_takes_effect_on_the_next_call() {
    let p = Priced::start(&["--price", "2"]).await;
    let admin = p.gateway.admin();
    let (id, secret) = admin.create_key("bob", 100).await;
    let c = p.client(&secret).await;
    c.call_text("echo", json!({"text": "a"})).await;
    assert_eq!(credits(&admin, &id).await, 98);

    let surge = plugin("pricing-surge");
    let (status, v) = reload(
        &admin,
        json!({"pricing": {"file": surge, "config": {"default_price": 2, "peak_hours": (0..24).collect::<Vec<_>>(), "peak_percent": 300}}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["reloaded"][0]["role"], "pricing");
    c.call_text("echo", json!({"text": "b"})).await;
    assert_eq!(credits(&admin, &id).await, 98 - 6, "surge: 2 × 300 %");

    let plugins: Value = admin.get("/admin/plugins").send_json().await;
    let pricing = &plugins["plugins"][0];
    assert_eq!(pricing["role"], "pricing");
    assert_eq!(pricing["file"], surge.display().to_string());
    assert_eq!(pricing["witVersion"], "0.1.0");
    assert_eq!(pricing["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(pricing["calls"], 1, "the new plugin counts its own calls");
    // pricing-surge does not let the host reuse its prices (they follow the clock): every call
    // reaches it.
    c.call_text("echo", json!({"text": "c"})).await;
    assert_eq!(pricing_calls(&admin).await, (2, 0));
    assert_eq!(plugins["plugins"][1]["file"], "embedded:health-weighted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_or_wrong_component_is_refused_and_the_old_plugin_keeps_serving() {
    let p = Priced::start(&["--price", "3"]).await;
    let admin = p.gateway.admin();
    let (id, secret) = admin.create_key("carol", 100).await;
    let c = p.client(&secret).await;

    let junk = p.gateway.dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm this is not a component").unwrap();
    let (status, v) = reload(&admin, json!({"pricing": {"file": junk}})).await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a usable component"),
        "{v}"
    );

    let (status, v) = reload(&admin, json!({"pricing": {"file": plugin("health-weighted")}})).await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("pricing-plugin"),
        "{v}"
    );

    let (status, v) = reload(&admin, json!({"pricing": {"config": {"default_prise": 1}}})).await;
    assert_eq!(status, 422, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("default_prise"), "{v}");

    let (status, v) = reload(&admin, json!({"pricing": {"file": "/no/such/file.wasm"}})).await;
    assert_eq!(status, 422, "{v}");

    c.call_text("echo", json!({"text": "still"})).await;
    assert_eq!(
        credits(&admin, &id).await,
        97,
        "the old plugin (3 per call) still prices"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_under_concurrent_load_fails_zero_requests() {
    let p = Priced::start(&["--price", "1"]).await;
    let admin = p.gateway.admin();
    let (id, secret) = admin.create_key("dave", 1_000_000).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(p.client(&secret).await);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in clients {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match call(&c, "echo", json!({"text": "load"})).await {
                    (200, v) if v.get("result").is_some() => ok += 1,
                    other => failed.push(other),
                }
            }
            (ok, failed)
        }));
    }
    let surge = plugin("pricing-surge");
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let body = if i % 2 == 0 {
            json!({"pricing": {"file": surge, "config": {"default_price": 2, "peak_hours": []}}})
        } else {
            json!({"pricing": {"config": {"default_price": 1}}})
        };
        let (status, v) = reload(&admin, body).await;
        assert_eq!(status, 200, "{v}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        let (ok, failed) = t.await.unwrap();
        assert!(failed.is_empty(), "requests failed during reloads: {failed:?}");
        total += ok;
    }
    assert!(total > 50, "the load ran ({total} calls)");
    // Every call was charged 1 or 2 by whichever plugin was serving, and the ledger agrees with
    // the balance to the credit.
    let charges: Vec<i64> = admin
        .ledger(&id)
        .await
        .iter()
        .filter(|e| e["kind"] == "charge")
        .map(|e| e["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(charges.len() as u64, total);
    assert!(charges.iter().all(|c| *c == 1 || *c == 2));
    assert!(charges.contains(&2) && charges.contains(&1), "both plugins served");
    assert_eq!(credits(&admin, &id).await, 1_000_000 - charges.iter().sum::<i64>());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_file_reload_changes_prices_and_an_invalid_file_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let config = |price: &str| {
        format!(
            "[upstream]\ncommand = [{FIXTURE:?}, \"--stdio\"]\n[billing]\nadmin_key = {ADMIN_KEY:?}\n\
             data_dir = {:?}\n[plugins.pricing.config]\ndefault_price = {price}\n",
            data.path()
        )
    };
    let g = Gateway::serve(&config("3")).ready().await;
    let admin = g.admin();
    let (id, secret) = admin.create_key("erin", 100).await;
    let mut c = g.client();
    c.api_key = Some(secret);
    c.initialize().await;
    c.call_text("echo", json!({"text": "a"})).await;
    assert_eq!(credits(&admin, &id).await, 97);

    let path = g.dir.path().join("tollgate.toml");
    std::fs::write(&path, config("4")).unwrap();
    let r = admin
        .http
        .post(format!("{}/admin/plugins/reload", g.base))
        .header("x-admin-key", ADMIN_KEY);
    assert_eq!(r.send().await.unwrap().status(), 200);
    c.call_text("echo", json!({"text": "b"})).await;
    assert_eq!(credits(&admin, &id).await, 93);

    std::fs::write(&path, config("\"four\"")).unwrap();
    let r = admin
        .http
        .post(format!("{}/admin/plugins/reload", g.base))
        .header("x-admin-key", ADMIN_KEY);
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("default_price"), "{v}");
    c.call_text("echo", json!({"text": "c"})).await;
    assert_eq!(credits(&admin, &id).await, 89, "still 4");
}

#[tokio::test(flavor = "multi_thread")]
async fn system_health_is_the_reference_formula_and_weights_change_it() {
    let p = Priced::start(&[]).await;
    let admin = p.gateway.admin();
    // Ten keys: six healthy, two low on credits (5 and 10), one suspended, one revoked.
    let mut healthy = Vec::new();
    for i in 0..6 {
        healthy.push(admin.create_key(&format!("k{i}"), 100).await);
    }
    admin.create_key("low5", 5).await;
    admin.create_key("low10", 10).await;
    let (sid, ssecret) = admin.create_key("suspended", 100).await;
    let (rid, _) = admin.create_key("revoked", 100).await;
    assert_eq!(admin.action(&sid, "suspend").await.status(), 200);
    assert_eq!(admin.action(&rid, "revoke").await.status(), 200);
    // 10 paid calls (1 credit each) and 5 denied ones.
    let c = p.client(&healthy[0].1).await;
    for _ in 0..10 {
        c.call_text("echo", json!({"text": "x"})).await;
    }
    let mut s = p.gateway.client();
    s.initialize().await;
    s.api_key = Some(ssecret);
    for _ in 0..5 {
        assert_eq!(call(&s, "echo", json!({"text": "x"})).await.0, 403);
    }

    // keyHealth = 100 − 100 × 4/10 = 60; errorRate = 100 − 200 × 5/15 = 33.33;
    // creditUtilization: 10 spent of 715 (revoked keys left out) → 100.
    // score = 0.4 × 60 + 0.35 × 33.33 + 0.25 × 100 = 60.67 → 61, "good".
    let health = eventually(Duration::from_secs(5), "the request log to hold 15 calls", || async {
        let v: Value = admin.get("/admin/system-health").send_json().await;
        (v["components"]["errorRate"]["score"] == 33.33).then_some(v)
    })
    .await;
    assert_eq!(health["components"]["keyHealth"]["score"], 60.0);
    assert_eq!(health["components"]["keyHealth"]["weight"], 0.4);
    assert_eq!(health["components"]["creditUtilization"]["score"], 100.0);
    assert_eq!(health["score"], 61.0);
    assert_eq!(health["level"], "good");
    assert!(health["generatedAt"].as_str().unwrap().ends_with('Z'));

    // Weights 0.1 / 0.1 / 0.8: 6 + 3.33 + 80 = 89.33 → 89, "healthy".
    let (status, v) = reload(
        &admin,
        json!({"health": {"config": {"weights": {"keyHealth": 0.1, "errorRate": 0.1, "creditUtilization": 0.8}}}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let v: Value = admin.get("/admin/system-health").send_json().await;
    assert_eq!(
        (v["score"].clone(), v["level"].clone()),
        (json!(89.0), json!("healthy"))
    );
}

/// The gateway's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_pricing_plugins_deny_only_their_calls_charge_nothing_and_stay_bounded() {
    let hostile = plugin("hostile");
    for mode in ["loop", "memory", "trap", "absurd", "huge"] {
        let config = json!({"mode": mode, "only_tag": "evil"}).to_string();
        let p = Priced::start(&[
            "--pricing-plugin",
            hostile.to_str().unwrap(),
            "--pricing-config",
            &config,
        ])
        .await;
        let admin = p.gateway.admin();
        let (eid, esecret, _) = admin
            .create_key_with(json!({"name": "evil", "credits": 100, "tags": ["evil"]}))
            .await;
        let (gid, gsecret) = admin.create_key("good", 100).await;
        let evil = p.client(&esecret).await;
        let good = p.client(&gsecret).await;

        // The evil key's calls run alongside a stream of the good key's calls.
        let good_calls = tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..20 {
                answers.push(call(&good, "echo", json!({"text": "fine"})).await);
            }
            answers
        });
        for _ in 0..5 {
            let started = Instant::now();
            let (status, v) = call(&evil, "echo", json!({"text": "x"})).await;
            let took = started.elapsed();
            assert!(took < Duration::from_secs(2), "{mode}: denied after {took:?}");
            if mode == "huge" {
                // An 8 MiB denial reason: refused either way — cut short if the plugin finished
                // it within its fuel, a plugin failure if not.
                match status {
                    403 => assert_eq!(v["error"]["code"], -32014, "{mode}: {v}"),
                    _ => assert_eq!(
                        (status, v["error"]["code"].clone()),
                        (500, json!(-32603)),
                        "{mode}: {v}"
                    ),
                }
                assert!(v.to_string().len() < 2048, "{mode}: the reason was not cut");
            } else {
                assert_eq!(status, 500, "{mode}: {v}");
                assert_eq!(v["error"]["code"], -32603, "{mode}: {v}");
                assert_eq!(v["error"]["message"], "pricing policy failed", "{mode}: {v}");
            }
        }
        for (status, v) in good_calls.await.unwrap() {
            assert_eq!(status, 200, "{mode}: a good key's call failed: {v}");
        }
        assert_eq!(credits(&admin, &eid).await, 100, "{mode}: nothing charged");
        assert_eq!(credits(&admin, &gid).await, 80, "{mode}: the good key paid 1 per call");
        assert_eq!(p.upstream_calls(), 20, "{mode}: no evil call reached the upstream");
        let rss = rss_kib(p.gateway.proc.pid());
        assert!(rss < 400 * 1024, "{mode}: the gateway grew to {rss} KiB");
        if mode != "huge" {
            let plugins: Value = admin.get("/admin/plugins").send_json().await;
            assert_eq!(plugins["plugins"][0]["failures"], 5, "{mode}: failures are counted");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_health_plugin_fails_the_report_not_the_gateway() {
    let hostile = plugin("hostile");
    for mode in ["loop", "nan", "huge", "memory"] {
        let config = json!({"mode": mode}).to_string();
        let p = Priced::start(&["--health-plugin", hostile.to_str().unwrap(), "--health-config", &config]).await;
        let admin = p.gateway.admin();
        let started = Instant::now();
        let r = admin.get("/admin/system-health").send().await.unwrap();
        assert_eq!(r.status(), 500, "{mode}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["message"], "health policy failed", "{mode}: {v}");
        assert!(started.elapsed() < Duration::from_secs(6), "{mode}");
        let (_, secret) = admin.create_key("k", 10).await;
        let c = p.client(&secret).await;
        assert_eq!(c.call_text("echo", json!({"text": "ok"})).await, "ok", "{mode}");
    }
}

/// `tollgate check` on a config naming pricing-surge with these peak hours.
fn check_surge(dir: &Path, peak_hours: &str) -> std::process::Output {
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\ncommand = [{FIXTURE:?}]\n[plugins.pricing]\nfile = {:?}\n[plugins.pricing.config]\npeak_hours = {peak_hours}\n",
            plugin("pricing-surge")
        ),
    )
    .unwrap();
    std::process::Command::new(TOLLGATE)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap()
}

#[test]
fn check_compiles_the_plugins_a_config_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = check_surge(dir.path(), "[9]");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("pricing-surge.wasm ok"), "{stdout}");

    let out = check_surge(dir.path(), "[25]");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("peak_hours has 25"), "{stderr}");
}
