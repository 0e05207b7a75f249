//! Keys, credits and the ledger, through the real binary with a real database file: every paid call
//! charged exactly once, refused calls never reaching the upstream.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

/// A billed gateway in front of the stdio fixture, which logs every tools/call it receives.
struct Billed {
    gateway: Gateway,
    calls_log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Billed {
    fn start(extra: &[&str]) -> Billed {
        let logdir = tempfile::tempdir().unwrap();
        let calls_log = logdir.path().join("calls.log");
        let log = calls_log.to_str().unwrap().to_string();
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--", FIXTURE, "--stdio", "--log", &log]);
        Billed {
            gateway: Gateway::wrap_billed(&args),
            calls_log,
            _logdir: logdir,
        }
    }

    /// How many tools/call of `tool` reached the upstream.
    fn upstream_saw(&self, tool: &str) -> usize {
        count_calls(&self.calls_log, tool)
    }

    async fn client_with(&self, secret: &str) -> McpClient {
        let mut c = self.gateway.client();
        c.api_key = Some(secret.to_string());
        c.initialize().await;
        c
    }
}

fn count_calls(log: &Path, tool: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["tool"] == tool))
        .count()
}

async fn error_of(c: &McpClient, tool: &str) -> (u16, Value) {
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":tool,"arguments":{"text":"x"}}}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_pays_for_calls_until_it_runs_out_and_a_topup_restores_it() {
    let b = Billed::start(&["--tool-price", "add:3"]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (id, secret) = admin.create_key("alice", 5).await;
    let c = b.client_with(&secret).await;

    let r = c
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-credits-remaining"], "4", "echo costs the default 1");
    assert_eq!(c.call_text("add", json!({"a": 1, "b": 1})).await, "2");
    assert_eq!(admin.key(&id).await["credits"], 1, "add costs 3");

    let (status, v) = error_of(&c, "add").await;
    assert_eq!(status, 402);
    assert_eq!(v["error"]["code"], -32402);
    assert_eq!(v["error"]["data"], json!({"available": 1, "needed": 3}));
    assert_eq!(b.upstream_saw("add"), 1, "the refused call never reached the upstream");

    assert_eq!(admin.topup(&id, 10).await, 11);
    assert_eq!(c.call_text("add", json!({"a": 2, "b": 2})).await, "4");
    let balance: Value = reqwest::Client::new()
        .get(format!("{}/balance", g.base))
        .header("authorization", format!("Bearer {secret}"))
        .send_json()
        .await;
    assert_eq!(balance["credits"], 8);
    assert_eq!(balance["spent"], 7);
    assert_eq!(balance["calls"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_concurrent_calls_on_ten_credits_succeed_exactly_ten_times() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let (id, secret) = g.admin().create_key("racer", 10).await;
    let clients: Vec<McpClient> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(b.client_with(&secret).await);
        }
        v
    };
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move { error_of(&c, "echo").await }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, v) if v.get("result").is_some() => ok += 1,
            (402, v) if v["error"]["code"] == -32402 => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(refused, 54);
    assert_eq!(g.admin().key(&id).await["credits"], 0);
    assert_eq!(b.upstream_saw("echo"), 10, "the upstream saw exactly the paid calls");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_a_valid_key_are_refused_and_free_methods_pass() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let mut anon = g.client();
    anon.initialize().await;
    let tools = anon.request("tools/list", json!({})).await;
    assert!(tools["result"]["tools"].is_array(), "tools/list is free");
    let (status, v) = error_of(&anon, "echo").await;
    assert_eq!((status, v["error"]["code"].clone()), (401, json!(-32003)));
    let (status, v) = {
        let mut c = anon.clone();
        c.api_key = Some("tg_not_a_real_key".into());
        error_of(&c, "echo").await
    };
    assert_eq!((status, v["error"]["code"].clone()), (401, json!(-32004)));
    let (status, _) = {
        let mut c = anon.clone();
        c.api_key = Some(ADMIN_KEY.into());
        error_of(&c, "echo").await
    };
    assert_eq!(status, 401, "the admin key is not a client key");
    let r = anon
        .request("resources/read", json!({"uri": "fixture://greeting"}))
        .await;
    assert_eq!(r["error"]["code"], -32003, "resources/read needs a key too");
    assert_eq!(b.upstream_saw("echo"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn suspended_and_revoked_keys_are_refused_at_once_even_inside_an_open_session() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (id, secret) = admin.create_key("bob", 100).await;
    let c = b.client_with(&secret).await;
    assert_eq!(c.call_text("echo", json!({"text": "ok"})).await, "ok");

    assert_eq!(admin.action(&id, "suspend").await.status(), 200);
    let (status, v) = error_of(&c, "echo").await;
    assert_eq!((status, v["error"]["code"].clone()), (403, json!(-32006)));
    assert_eq!(admin.action(&id, "resume").await.status(), 200);
    assert_eq!(c.call_text("echo", json!({"text": "back"})).await, "back");

    assert_eq!(admin.action(&id, "revoke").await.status(), 200);
    let (status, v) = error_of(&c, "echo").await;
    assert_eq!((status, v["error"]["code"].clone()), (403, json!(-32005)));
    assert_eq!(
        admin.action(&id, "resume").await.status(),
        409,
        "a revoked key stays revoked"
    );
    assert_eq!(b.upstream_saw("echo"), 2, "refused calls never reached the upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_answers_only_to_the_key_that_started_it() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (a_id, a_secret) = admin.create_key("a", 10).await;
    let (b_id, b_secret) = admin.create_key("b", 10).await;
    let mut a = b.client_with(&a_secret).await;

    // Another valid key, or no key, with a's session id: to them the session does not exist.
    let mut intruder = a.clone();
    intruder.api_key = Some(b_secret);
    let (status, v) = error_of(&intruder, "echo").await;
    assert_eq!((status, v["error"]["code"].clone()), (404, json!(-32034)));
    assert_eq!(
        intruder.open_stream().await.status(),
        404,
        "nor can it take the session's stream"
    );
    let cancel = json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}});
    let r = intruder.post(&cancel).send().await.unwrap();
    assert_eq!(r.status(), 404, "nor send into it");
    assert_eq!(intruder.delete().await.status(), 404, "nor end it");
    // Without a valid key, the request is refused for that, as anywhere.
    let mut anonymous = a.clone();
    anonymous.api_key = None;
    let (status, v) = error_of(&anonymous, "echo").await;
    assert_eq!((status, v["error"]["code"].clone()), (401, json!(-32003)));
    assert_eq!(anonymous.open_stream().await.status(), 401);

    // The session is still a's, and nobody paid for what was refused.
    assert_eq!(a.call_text("echo", json!({"text": "still mine"})).await, "still mine");
    assert_eq!(admin.key(&a_id).await["credits"], 9);
    assert_eq!(admin.key(&b_id).await["credits"], 10);
    assert_eq!(
        b.upstream_saw("echo"),
        1,
        "the refused calls never reached the upstream"
    );

    // A rotated key is the same key: its new secret goes on using the session.
    let rotated: Value = admin.action(&a_id, "rotate").await.json().await.unwrap();
    a.api_key = Some(rotated["key"].as_str().expect("the new secret").to_string());
    assert_eq!(a.call_text("echo", json!({"text": "rotated"})).await, "rotated");
    assert_eq!(a.delete().await.status(), 204, "and its owner can end it");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_error_is_refunded_and_a_tool_error_is_kept_by_default() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (id, secret) = admin.create_key("c", 10).await;
    let c = b.client_with(&secret).await;
    let failed = c.call("fail", json!({})).await;
    assert_eq!(failed["error"]["code"], -32050);
    assert_eq!(admin.key(&id).await["credits"], 10, "refunded");
    let tool_failed = c.call("fail_tool", json!({})).await;
    assert_eq!(tool_failed["result"]["isError"], true);
    assert_eq!(
        admin.key(&id).await["credits"],
        9,
        "an isError result is charged by default"
    );
    let ledger = admin.ledger(&id).await;
    let kinds: Vec<&str> = ledger.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["grant", "charge", "refund", "charge"]);
    assert_eq!(
        ledger[1]["requestId"], ledger[2]["requestId"],
        "the refund names the charged request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_before_its_answer_is_refunded_and_the_call_is_recorded() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (id, secret) = admin.create_key("leaver", 10).await;
    let c = b.client_with(&secret).await;
    let slow = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "sleep", "arguments": {"ms": 3000}}});
    // Once waiting for a JSON answer, once on an SSE stream: the client gives up after 300 ms.
    for accept in ["application/json", ACCEPT_BOTH] {
        let gave_up = c
            .http
            .post(&c.url)
            .header("content-type", "application/json")
            .header("accept", accept)
            .header("mcp-session-id", c.session.as_deref().unwrap())
            .header("mcp-protocol-version", &c.version)
            .header("x-api-key", &secret)
            .body(slow.to_string())
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .and_then(|r| r.error_for_status());
        let gave_up = match gave_up {
            Ok(r) => r.bytes().await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(gave_up.is_err(), "the client should have timed out ({accept})");
    }
    let rows = eventually(Duration::from_secs(10), "both abandoned calls settled", || async {
        let rows = admin.requests(&format!("keyId={id}")).await;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    for r in &rows {
        assert_eq!(
            (r["outcome"].as_str(), r["reason"].as_str()),
            (Some("refunded"), Some("client_gone")),
            "{r}"
        );
    }
    assert_eq!(admin.key(&id).await["credits"], 10, "both charges came back");
    let kinds: Vec<String> = admin
        .ledger(&id)
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["grant", "charge", "refund", "charge", "refund"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn balances_survive_a_kill_and_restart_on_the_same_database() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let start = || Gateway::billed_on(&data_dir, &[]);
    let g = start().ready().await;
    let (id, secret) = g.admin().create_key("durable", 50).await;
    let mut c = g.client();
    c.api_key = Some(secret.clone());
    c.initialize().await;
    for _ in 0..7 {
        assert_eq!(c.call_text("echo", json!({"text": "x"})).await, "x");
    }
    // SIGKILL: no chance to flush anything that was not already durable.
    let mut g = g;
    g.proc.child.kill().unwrap();
    g.proc.child.wait().unwrap();

    let g = start().ready().await;
    assert_eq!(
        g.admin().key(&id).await["credits"],
        43,
        "every charge the client saw survived"
    );
    let mut c = g.client();
    c.api_key = Some(secret);
    c.initialize().await;
    assert_eq!(
        c.call_text("echo", json!({"text": "again"})).await,
        "again",
        "the old secret still works"
    );
    assert_eq!(g.admin().key(&id).await["credits"], 42);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_refuses_bad_input_with_a_clear_error_and_changes_nothing() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let cases = [
        (json!({"name": "x", "credits": -1}), "credits"),
        (json!({"name": "x", "credits": 1.5}), "credits"),
        (json!({"name": "x", "credits": "10"}), "credits"),
        (json!({"name": "x", "credits": 10_000_000_000_000i64}), "credits"),
        (json!({"credits": 10}), "name"),
        (json!({"name": "", "credits": 10}), "name"),
        (json!({"name": "x", "credits": 1, "colour": "red"}), "colour"),
    ];
    for (body, field) in cases {
        let r = admin.post("/admin/keys", &body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{body}: the message names {field}: {msg}");
    }
    let r = admin
        .http
        .post(format!("{}/admin/keys", g.base))
        .header("x-admin-key", ADMIN_KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = admin
        .http
        .post(format!("{}/admin/keys", g.base))
        .header("x-admin-key", ADMIN_KEY)
        .header("content-type", "text/plain")
        .body(r#"{"name":"x","credits":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let big = format!(r#"{{"name":"{}","credits":1}}"#, "x".repeat(6 << 20));
    for _ in 0..3 {
        let r = admin
            .http
            .post(format!("{}/admin/keys", g.base))
            .header("x-admin-key", ADMIN_KEY)
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .expect("the client sees the answer, not a broken pipe");
        assert_eq!(r.status(), 413);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("larger than"), "{v}");
    }
    for wrong in ["", "wrong-admin-key-000000"] {
        let r = reqwest::Client::new()
            .post(format!("{}/admin/keys", g.base))
            .header("x-admin-key", wrong)
            .header("content-type", "application/json")
            .body(r#"{"name":"x","credits":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let (id, secret) = admin.create_key("real", 1).await;
    let r = reqwest::Client::new()
        .get(format!("{}/admin/keys/{id}", g.base))
        .header("x-admin-key", secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a client key is not an admin key");
    let r = admin
        .post(&format!("/admin/keys/{id}/topup"), &json!({"credits": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let ledger: Value = admin.get("/admin/ledger").send_json().await;
    assert_eq!(
        ledger["entries"].as_array().unwrap().len(),
        1,
        "only the one valid key's grant was written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_configured_admin_key_one_is_generated_and_shown_only_at_first_start() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let start = || {
        let mut cmd = std::process::Command::new(TOLLGATE);
        cmd.args(["wrap", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(["--", FIXTURE, "--stdio"])
            .env_remove("TOLLGATE_ADMIN_KEY");
        Proc::spawn_collecting(cmd, "listening on ", Duration::from_secs(30))
    };
    let (proc, before, rest) = start();
    let shown: Vec<&String> = before.iter().filter(|l| l.contains("admin key")).collect();
    assert_eq!(shown.len(), 1, "{before:?}");
    let secret = shown[0].rsplit(' ').next().unwrap().to_string();
    let base = rest.trim_end_matches("/mcp").to_string();
    let r = reqwest::Client::new()
        .post(format!("{base}/admin/keys"))
        .header("x-admin-key", &secret)
        .header("content-type", "application/json")
        .body(r#"{"name":"first","credits":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "the generated admin key works");
    drop(proc);
    let (_proc, before, _) = start();
    assert!(
        before.iter().all(|l| !l.contains("admin key")),
        "shown only once: {before:?}"
    );
    let stored = std::fs::read_to_string(data_dir.join("admin-key.sha256")).unwrap();
    assert!(!stored.contains(&secret), "only the hash is stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_charge_a_client_saw_survives_a_sigkill_at_a_random_moment() {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};

    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let start = || Gateway::billed_on(&data_dir, &[]);
    const GRANT: i64 = 1_000_000;
    let mut g = start().ready().await;
    let (id, secret) = g.admin().create_key("crash", GRANT).await;
    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));

    for round in 0..4 {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let mut c = g.client();
            c.api_key = Some(secret.clone());
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                c.initialize().await;
                loop {
                    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call",
                        "params":{"name":"echo","arguments":{"text":"x"}}});
                    let Ok(r) = c.post(&call).send().await else { return };
                    let request_id = r.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string());
                    let Ok(v) = r.json::<Value>().await else { return };
                    if v["result"]["content"][0]["text"] == "x" {
                        seen.lock()
                            .unwrap()
                            .insert(request_id.expect("a charged call names its request id"));
                    }
                }
            }));
        }
        let wait_ms = 150 + rand::random::<u64>() % 500;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        g.proc.child.kill().unwrap();
        g.proc.child.wait().unwrap();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }

        g = start().ready().await;
        let rows = g.admin().ledger(&id).await;
        let mut kinds_by_request: HashMap<String, Vec<String>> = HashMap::new();
        let mut sum = 0;
        for r in rows {
            let kind = r["kind"].as_str().unwrap().to_string();
            sum += if kind == "charge" {
                -r["amount"].as_i64().unwrap()
            } else {
                r["amount"].as_i64().unwrap()
            };
            kinds_by_request
                .entry(r["requestId"].as_str().unwrap().to_string())
                .or_default()
                .push(kind);
        }
        for (req, kinds) in &kinds_by_request {
            let mut sorted = kinds.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                kinds.len(),
                "round {round}: a duplicated ledger row for {req}: {kinds:?}"
            );
        }
        let seen_now = seen.lock().unwrap().clone();
        assert!(!seen_now.is_empty(), "round {round}: the load made no successful call");
        for req in &seen_now {
            assert_eq!(
                kinds_by_request.get(req).map(Vec::as_slice),
                Some(&["charge".to_string()][..]),
                "round {round}: a call the client saw succeed is not charged exactly once in the ledger"
            );
        }
        let key = g.admin().key(&id).await;
        assert_eq!(
            key["credits"], sum,
            "round {round}: balance = grant - charges + refunds"
        );
        let charged = kinds_by_request.values().filter(|k| k.as_slice() == ["charge"]).count();
        assert!(
            charged >= seen_now.len() && charged <= seen_now.len() + 8 * (round + 1),
            "round {round}: {charged} kept charges for {} seen successes (at most the in-flight calls may differ)",
            seen_now.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_gives_a_new_secret_keeps_the_credits_and_stops_the_old_secret_at_once() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (id, old) = admin.create_key("rot", 10).await;
    let c_old = b.client_with(&old).await;
    assert_eq!(c_old.call_text("echo", json!({"text": "before"})).await, "before");
    let r = admin.action(&id, "rotate").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let new = v["key"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["credits"], 9, "credits kept");
    let (status, e) = error_of(&c_old, "echo").await;
    assert_eq!(
        (status, e["error"]["code"].clone()),
        (401, json!(-32004)),
        "the old secret is refused at once"
    );
    let c_new = b.client_with(&new).await;
    assert_eq!(c_new.call_text("echo", json!({"text": "after"})).await, "after");
    assert_eq!(admin.key(&id).await["credits"], 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_lists_limit_what_a_key_may_call_and_see_and_tools_list_shows_prices() {
    let b = Billed::start(&["--tool-price", "add:3"]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (id, secret, _) = admin
        .create_key_with(
            json!({"name": "narrow", "credits": 10, "allowedTools": ["echo", "add"], "deniedTools": ["add"]}),
        )
        .await;
    let c = b.client_with(&secret).await;

    let tools = c.request("tools/list", json!({})).await;
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo"], "only the tools the key may call");
    assert_eq!(tools["result"]["tools"][0]["_meta"]["tollgate/price"], 1);

    let (status, v) = error_of(&c, "add").await;
    assert_eq!((status, v["error"]["code"].clone()), (403, json!(-32009)));
    assert_eq!(b.upstream_saw("add"), 0);

    let r = admin
        .http
        .patch(format!("{}/admin/keys/{id}", g.base))
        .header("x-admin-key", ADMIN_KEY)
        .header("content-type", "application/json")
        .body(json!({"allowedTools": null, "deniedTools": []}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        c.call_text("add", json!({"a": 1, "b": 2})).await,
        "3",
        "the change applies to the next call"
    );
    assert_eq!(admin.key(&id).await["credits"], 7);

    let mut anon = g.client();
    anon.initialize().await;
    let all = anon.request("tools/list", json!({})).await;
    let add = all["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "add")
        .unwrap()
        .clone();
    assert_eq!(
        add["_meta"]["tollgate/price"], 3,
        "prices are shown to anyone who lists"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_key_is_refused_and_shown_as_expired() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (id, secret, _) = admin
        .create_key_with(json!({"name": "brief", "credits": 5, "expiresIn": 1}))
        .await;
    let c = b.client_with(&secret).await;
    assert_eq!(c.call_text("echo", json!({"text": "in time"})).await, "in time");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, e) = error_of(&c, "echo").await;
    assert_eq!((status, e["error"]["code"].clone()), (403, json!(-32008)));
    assert_eq!(admin.key(&id).await["status"], "expired");
    assert_eq!(b.upstream_saw("echo"), 1);

    for bad in [
        json!({"name": "x", "credits": 1, "expiresIn": -5}),
        json!({"name": "x", "credits": 1, "expiresAt": "next tuesday"}),
        json!({"name": "x", "credits": 1, "expiresAt": "2030-01-01T00:00:00Z", "expiresIn": 5}),
        json!({"name": "x", "credits": 1, "allowedTools": [""]}),
        json!({"name": "x", "credits": 1, "tags": vec!["t"; 1001]}),
    ] {
        let r = admin.post("/admin/keys", &bad).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let r = admin
        .post("/admin/keys", &json!({"name": "dated", "credits": 1, "expiresAt": "2030-01-01T00:00:00Z", "tags": ["gold"], "namespace": "acme"}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["expiresAt"], "2030-01-01T00:00:00.000Z");
    assert_eq!(v["tags"], json!(["gold"]));
    assert_eq!(v["namespace"], "acme");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_listed_with_filters_and_a_cursor() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    for i in 0..5 {
        let ns = if i % 2 == 0 { "even" } else { "odd" };
        let r = admin
            .post(
                "/admin/keys",
                &json!({"name": format!("team-{i}"), "credits": i, "namespace": ns, "tags": ["t"]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let (other, _) = admin.create_key("solo", 1).await;
    assert_eq!(admin.action(&other, "suspend").await.status(), 200);

    let list = |q: String| {
        let admin = &admin;
        async move {
            let r = admin.get(&format!("/admin/keys?{q}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{q}");
            r.json::<Value>().await.unwrap()
        }
    };
    let even = list("namespace=even".into()).await;
    assert_eq!(even["keys"].as_array().unwrap().len(), 3);
    let suspended = list("status=suspended".into()).await;
    assert_eq!(suspended["keys"][0]["id"], other.as_str());
    assert_eq!(
        list("namePrefix=team-".into()).await["keys"].as_array().unwrap().len(),
        5
    );
    assert!(
        list("tag=t".into()).await["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["name"] != "solo")
    );

    // Page through all six, two at a time, seeing each once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let q = if cursor.is_empty() {
            "limit=2".to_string()
        } else {
            format!("limit=2&cursor={cursor}")
        };
        let page = list(q).await;
        for k in page["keys"].as_array().unwrap() {
            seen.push(k["id"].as_str().unwrap().to_string());
            assert!(k.get("key").is_none(), "a listing never shows a secret");
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (6, 6));
    let r = admin.get("/admin/keys?limit=0").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = admin.get("/admin/keys?colour=red").send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ip_allowlist_admits_only_its_addresses_and_forwarded_for_counts_only_from_trusted_proxies() {
    let data = tempfile::tempdir().unwrap();
    let config = |trusted: &str| {
        format!(
            "[server]\ntrusted_proxies = [{trusted}]\n[upstream]\ncommand = [{FIXTURE:?}, \"--stdio\"]\n\
             [billing]\ndata_dir = {:?}\nadmin_key = {ADMIN_KEY:?}\n",
            data.path().join("data")
        )
    };
    let g = Gateway::serve(&config("")).ready().await;
    let admin = g.admin();
    let r = admin
        .post(
            "/admin/keys",
            &json!({"name": "office", "credits": 10, "ipAllowlist": ["10.0.0.0/8", "192.0.2.7"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ipAllowlist"], json!(["10.0.0.0/8", "192.0.2.7/32"]));
    let (id, secret) = (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    );
    let mut c = g.client();
    c.api_key = Some(secret.clone());
    c.initialize().await;
    let (status, e) = error_of(&c, "echo").await;
    assert_eq!(
        (status, e["error"]["code"].clone()),
        (403, json!(-32010)),
        "127.0.0.1 is not on the list"
    );
    let spoofed = c
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}))
        .header("x-forwarded-for", "10.9.9.9")
        .send()
        .await
        .unwrap();
    assert_eq!(
        spoofed.status(),
        403,
        "X-Forwarded-For from an untrusted peer is ignored"
    );
    let bad = admin
        .post(
            "/admin/keys",
            &json!({"name": "x", "credits": 1, "ipAllowlist": ["10.0.0.0/33"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    drop(g);

    // Behind a trusted proxy (the test client on 127.0.0.1), the forwarded address counts.
    let g = Gateway::serve(&config("\"127.0.0.1\"")).ready().await;
    let mut c = g.client();
    c.api_key = Some(secret);
    c.initialize().await;
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"via proxy"}}}))
        .header("x-forwarded-for", "10.9.9.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}))
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(g.admin().key(&id).await["credits"], 9);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_per_key_and_per_tool_refuse_with_when_to_retry_and_charge_nothing() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (id, secret, _) = admin
        .create_key_with(
            json!({"name": "limited", "credits": 100, "rateLimit": "3/min", "toolRateLimits": {"add": "1/min"}}),
        )
        .await;
    let c = b.client_with(&secret).await;
    assert_eq!(c.call_text("add", json!({"a": 1, "b": 1})).await, "2");
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":1}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "the per-tool limit");
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], -32011);
    assert!(v["error"]["data"]["retryAfterMs"].as_u64().unwrap() > 0);
    assert!(v["error"]["message"].as_str().unwrap().contains("add"));
    assert_eq!(
        c.call_text("echo", json!({"text": "a"})).await,
        "a",
        "other tools still pass"
    );
    let (status, v) = error_of(&c, "echo").await;
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (429, json!(-32011)),
        "the key limit (3/min) is used up"
    );
    assert_eq!(admin.key(&id).await["credits"], 98, "refused calls cost nothing");
    assert_eq!(b.upstream_saw("add") + b.upstream_saw("echo"), 2);
    let bad = admin
        .post("/admin/keys", &json!({"name": "x", "credits": 1, "rateLimit": "lots"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_and_spending_limits_hold_across_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let start = || Gateway::billed_on(&data_dir, &["--price", "2"]);
    let g = start().ready().await;
    let admin = g.admin();
    let create = |body: Value| {
        let admin = &admin;
        async move {
            let r = admin.post("/admin/keys", &body).send().await.unwrap();
            assert_eq!(r.status(), 201, "{body}");
            let v: Value = r.json().await.unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                v["key"].as_str().unwrap().to_string(),
            )
        }
    };
    let (q_id, q_secret) = create(json!({"name": "quota", "credits": 100, "quota": {"dailyCalls": 2}})).await;
    let (s_id, s_secret) = create(json!({"name": "budget", "credits": 100, "spendingLimit": 3})).await;
    let client = |g: &Gateway, secret: &str| {
        let mut c = g.client();
        c.api_key = Some(secret.to_string());
        c
    };
    let mut q = client(&g, &q_secret);
    q.initialize().await;
    let mut s = client(&g, &s_secret);
    s.initialize().await;
    assert_eq!(q.call_text("echo", json!({"text": "1"})).await, "1");
    assert_eq!(q.call_text("echo", json!({"text": "2"})).await, "2");
    let (status, v) = error_of(&q, "echo").await;
    assert_eq!((status, v["error"]["code"].clone()), (429, json!(-32013)), "{v}");
    assert_eq!(s.call_text("echo", json!({"text": "1"})).await, "1");
    let (status, v) = error_of(&s, "echo").await;
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (402, json!(-32012)),
        "2 spent, 2 more would pass 3: {v}"
    );
    let balance: Value = reqwest::Client::new()
        .get(format!("{}/balance", g.base))
        .header("x-api-key", &q_secret)
        .send_json()
        .await;
    assert_eq!(balance["quotaUsage"]["dailyCalls"], 2);
    assert_eq!(balance["quota"]["dailyCalls"], 2);
    drop(g);

    let g = start().ready().await;
    let mut q = client(&g, &q_secret);
    q.initialize().await;
    let (status, _) = error_of(&q, "echo").await;
    assert_eq!(
        status, 429,
        "the day's usage is counted again from the ledger after a restart"
    );
    let mut s = client(&g, &s_secret);
    s.initialize().await;
    let (status, _) = error_of(&s, "echo").await;
    assert_eq!(status, 402);
    assert_eq!(g.admin().key(&q_id).await["credits"], 96);
    assert_eq!(g.admin().key(&s_id).await["credits"], 98);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_guessing_admin_keys_is_refused_for_a_while_even_with_the_right_one() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let http = reqwest::Client::new();
    let attempt = |key: &'static str| {
        http.get(format!("{}/admin/keys", g.base))
            .header("x-admin-key", key)
            .send()
    };
    for _ in 0..10 {
        assert_eq!(attempt("guess-guess-guess-guess").await.unwrap().status(), 401);
    }
    assert_eq!(
        attempt("guess-guess-guess-guess").await.unwrap().status(),
        401,
        "the 11th failure blocks"
    );
    let r = attempt(ADMIN_KEY).await.unwrap();
    assert_eq!(r.status(), 429, "blocked, even with the right key");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_log_and_consumer_insights_report_what_was_actually_charged() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (a_id, a_secret) = admin.create_key("alice", 10).await;
    let (b_id, b_secret) = admin.create_key("bob", 10).await;
    let a = b.client_with(&a_secret).await;
    let bob = b.client_with(&b_secret).await;
    let r = a
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"1"}}}))
        .send()
        .await
        .unwrap();
    let first_request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(a.call_text("echo", json!({"text": "2"})).await, "2");
    assert_eq!(a.call_text("add", json!({"a": 1, "b": 2})).await, "3");
    assert_eq!(a.call("fail", json!({})).await["error"]["code"], -32050);
    assert_eq!(bob.call_text("echo", json!({"text": "b"})).await, "b");
    let mut anon = g.client();
    anon.initialize().await;
    assert_eq!(error_of(&anon, "echo").await.0, 401);

    let get = |q: &'static str| {
        let admin = &admin;
        async move {
            let r = admin.get(&format!("/admin/requests?{q}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{q}");
            r.json::<Value>().await.unwrap()["requests"].as_array().unwrap().clone()
        }
    };
    let all = eventually(Duration::from_secs(5), "six request-log rows", || async {
        let rows = get("").await;
        (rows.len() == 6).then_some(rows)
    })
    .await;
    assert_eq!(all[0]["outcome"], "denied", "newest first");
    assert_eq!(all[0]["reason"], "missing_key");
    let refunded = get("outcome=refunded").await;
    assert_eq!(refunded.len(), 1);
    assert_eq!(refunded[0]["tool"], "fail");
    assert_eq!(refunded[0]["reason"], "upstream_error");
    assert_eq!(
        refunded[0]["credits"], 0,
        "the log records what was charged, not the list price"
    );
    let alices: Vec<Value> = all.iter().filter(|r| r["keyId"] == a_id.as_str()).cloned().collect();
    assert_eq!(alices.len(), 4);
    assert!(alices.iter().any(|r| r["requestId"] == first_request_id.as_str()));
    assert!(
        admin
            .ledger(&a_id)
            .await
            .iter()
            .any(|e| e["requestId"] == first_request_id.as_str()),
        "log and ledger share the request id"
    );
    let page1 = get("limit=4").await;
    let cursor = {
        let r = admin.get("/admin/requests?limit=4").send().await.unwrap();
        r.json::<Value>().await.unwrap()["nextCursor"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let r = admin
        .get(&format!("/admin/requests?limit=4&cursor={cursor}"))
        .send()
        .await
        .unwrap();
    let page2 = r.json::<Value>().await.unwrap()["requests"].as_array().unwrap().clone();
    assert_eq!(page1.len() + page2.len(), 6);
    assert_eq!(
        admin
            .get("/admin/requests?outcome=maybe")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );

    let insights: Value = admin.get("/admin/consumer-insights").send_json().await;
    assert_eq!(insights["summary"]["totalConsumers"], 2);
    assert_eq!(insights["summary"]["totalCreditsSpent"], 4);
    assert_eq!(insights["topSpenders"][0]["id"], a_id.as_str());
    assert_eq!(insights["topSpenders"][0]["totalSpent"], 3);
    assert_eq!(
        insights["topSpenders"][0]["uniqueTools"], 2,
        "echo and add succeeded; fail did not"
    );
    assert_eq!(insights["topSpenders"][1]["id"], b_id.as_str());
    assert_eq!(insights["mostActive"][0]["totalCalls"], 4);
    assert!(insights["generatedAt"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_is_read_a_page_at_a_time_and_filtered_by_key_kind_and_request_id() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();
    let (a_id, a_secret) = admin.create_key("alice", 100).await;
    let (b_id, b_secret) = admin.create_key("bob", 100).await;
    let (a, bob) = (b.client_with(&a_secret).await, b.client_with(&b_secret).await);
    for i in 0..5 {
        assert_eq!(a.call_text("echo", json!({"text": i.to_string()})).await, i.to_string());
        assert_eq!(bob.call_text("echo", json!({"text": "b"})).await, "b");
    }
    let r = a
        .post(&json!({"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"fail","arguments":{}}}))
        .send()
        .await
        .unwrap();
    let refunded_request = r.headers()["x-request-id"].to_str().unwrap().to_string();

    // Two grants, eleven charges, one refund: fourteen rows, in pages of four.
    let pages = admin.ledger_pages("limit=4").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 4, 2]);
    let rows = pages.concat();
    let seqs: Vec<i64> = rows.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "oldest first, each row once: {seqs:?}"
    );
    let r: Value = admin.get("/admin/ledger").send_json().await;
    assert_eq!(
        r["entries"].as_array().unwrap().len(),
        14,
        "a page holds 100 rows by default"
    );
    assert_eq!(r["nextCursor"], Value::Null, "and there is no next page");

    let alices = admin.ledger(&a_id).await;
    assert_eq!(alices.len(), 1 + 6 + 1);
    assert!(alices.iter().all(|r| r["keyId"] == a_id.as_str()));
    let bobs_charges = admin
        .ledger_pages(&format!("keyId={b_id}&kind=charge&limit=2"))
        .await
        .concat();
    assert_eq!(bobs_charges.len(), 5);
    assert!(
        bobs_charges
            .iter()
            .all(|r| r["kind"] == "charge" && r["keyId"] == b_id.as_str())
    );
    let one: Value = admin
        .get(&format!("/admin/ledger?requestId={refunded_request}"))
        .send_json()
        .await;
    let kinds: Vec<&str> = one["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["charge", "refund"],
        "the failed call's charge and its refund, by request id"
    );

    for (query, named) in [
        ("kind=gift", "kind"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=-1", "cursor"),
        ("cursor=abc", "cursor"),
        ("key=x", "key"),
    ] {
        let r = admin.get(&format!("/admin/ledger?{query}")).send().await.unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body.to_string().contains(named),
            "{query}: the error names {named}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_mode_logs_every_decision_and_enforces_and_charges_nothing() {
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::serve(&format!(
        "[upstream]\ncommand = [{FIXTURE:?}, \"--stdio\"]\n[billing]\nshadow = true\ndata_dir = {:?}\nadmin_key = {ADMIN_KEY:?}\n",
        data.path().join("data")
    ))
    .ready()
    .await;
    let (id, secret) = g.admin().create_key("shadowed", 1).await;
    let mut c = g.client();
    c.api_key = Some(secret);
    c.initialize().await;
    for i in 0..3 {
        assert_eq!(
            c.call_text("echo", json!({"text": i.to_string()})).await,
            i.to_string(),
            "never refused"
        );
    }
    let mut anon = g.client();
    anon.initialize().await;
    assert_eq!(anon.call_text("echo", json!({"text": "no key"})).await, "no key");
    assert_eq!(g.admin().key(&id).await["credits"], 1, "nothing charged");
    let rows = eventually(Duration::from_secs(5), "four log rows", || async {
        let rows = g.admin().requests("").await;
        (rows.len() == 4).then_some(rows)
    })
    .await;
    let reasons: Vec<&str> = rows.iter().map(|r| r["reason"].as_str().unwrap_or("")).collect();
    assert!(reasons.contains(&"missing_key"), "{reasons:?}");
    // Nothing is ever charged in shadow mode, so the one credit would pay for each call.
    assert_eq!(
        reasons.iter().filter(|r| **r == "shadow: would charge 1").count(),
        3,
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn topups_racing_spends_end_exact_and_twenty_keys_in_parallel_stay_isolated() {
    let b = Billed::start(&[]);
    let g = b.gateway.ready_ref().await;
    let admin = g.admin();

    // One key: 40 calls race 20 top-ups of 3 credits; it starts with 10.
    let (id, secret) = admin.create_key("racing", 10).await;
    let c = b.client_with(&secret).await;
    let mut calls = Vec::new();
    for _ in 0..40 {
        let c = c.clone();
        calls.push(tokio::spawn(async move { error_of(&c, "echo").await.0 }));
    }
    let mut topups = Vec::new();
    for _ in 0..20 {
        let admin = g.admin();
        let id = id.clone();
        topups.push(tokio::spawn(async move { admin.topup(&id, 3).await }));
    }
    let mut ok = 0i64;
    for t in calls {
        match t.await.unwrap() {
            200 => ok += 1,
            402 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    for t in topups {
        t.await.unwrap();
    }
    assert_eq!(
        admin.key(&id).await["credits"],
        10 + 20 * 3 - ok,
        "granted + top-ups - successful calls"
    );

    // Twenty keys, each spending its own credits at once: no key pays for another.
    let mut keys = Vec::new();
    for i in 0..20 {
        keys.push(admin.create_key(&format!("k{i}"), 5 + i).await);
    }
    let mut tasks = Vec::new();
    for (i, (_, secret)) in keys.iter().enumerate() {
        let c = b.client_with(secret).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..(i % 5 + 1) {
                assert_eq!(c.call_text("echo", json!({"text": "x"})).await, "x");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for (i, (id, _)) in keys.iter().enumerate() {
        let spent = (i % 5 + 1) as i64;
        let key = admin.key(id).await;
        assert_eq!(key["credits"], 5 + i as i64 - spent, "key {i}");
        assert_eq!(key["spent"], spent, "key {i}");
    }
}
