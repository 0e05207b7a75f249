//! One shared stdio child behind many clients: ids, progress, notifications, crashes, timeouts.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn tools_resources_and_prompts_pass_through() {
    let g = Gateway::stdio_fixture("").ready().await;
    let mut c = g.client();
    c.initialize().await;
    let tools = c.request("tools/list", json!({})).await;
    assert!(
        tools["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "echo")
    );
    assert_eq!(c.call_text("echo", json!({"text": "hello"})).await, "hello");
    assert_eq!(c.call_text("add", json!({"a": 2, "b": 3})).await, "5");
    let read = c.request("resources/read", json!({"uri": "fixture://greeting"})).await;
    assert_eq!(read["result"]["contents"][0]["text"], "hello from the fixture");
    let prompt = c
        .request("prompts/get", json!({"name": "greet", "arguments": {"who": "Ada"}}))
        .await;
    assert_eq!(prompt["result"]["messages"][0]["content"]["text"], "Say hello to Ada");
    let failed = c.call("fail", json!({})).await;
    assert_eq!(
        failed["error"]["code"], -32050,
        "the upstream's own error reaches the client: {failed}"
    );
    assert_eq!(failed["id"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_clients_using_the_same_ids_receive_only_their_own_answers() {
    let g = Gateway::stdio_fixture("").ready().await;
    let mut tasks = Vec::new();
    for client in 0..50u64 {
        let mut c = g.client();
        tasks.push(tokio::spawn(async move {
            c.initialize().await;
            for id in 1..=20u64 {
                // Every client uses ids 1..=20; some calls sleep so replies come back out of order.
                let args = if id % 5 == 0 {
                    json!({"ms": (client % 7) * 3})
                } else {
                    json!({"a": client, "b": id})
                };
                let tool = if id % 5 == 0 { "sleep" } else { "add" };
                let v = c
                    .request_with_id(json!(id), "tools/call", json!({"name": tool, "arguments": args}))
                    .await;
                assert_eq!(v["id"], id, "client {client} got an answer for another id: {v}");
                let text = v["result"]["content"][0]["text"].as_str().unwrap().to_string();
                let expected = if tool == "sleep" {
                    "slept".to_string()
                } else {
                    (client + id).to_string()
                };
                assert_eq!(text, expected, "client {client} call {id} got someone else's answer");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_reaches_only_the_requesting_client_while_the_call_runs() {
    let g = Gateway::stdio_fixture("").ready().await;
    let mut a = g.client();
    a.initialize().await;
    let mut b = g.client();
    b.initialize().await;
    let call = |c: &McpClient, steps: u64| {
        // Both clients use the same request id and the same progress token.
        c.post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{
            "name":"progress","arguments":{"steps":steps,"ms":150},"_meta":{"progressToken":"tok"}}}))
            .send()
    };
    let (ra, rb) = tokio::join!(call(&a, 4), call(&b, 2));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(
        ra.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (ma, mb) = tokio::join!(timed_messages(ra), timed_messages(rb));
    let progress = |m: &[(Instant, serde_json::Value)]| {
        m.iter()
            .filter(|(_, v)| v["method"] == "notifications/progress")
            .count()
    };
    assert_eq!(progress(&ma), 4, "A sees its own 4 steps and none of B's");
    assert_eq!(progress(&mb), 2, "B sees its own 2 steps and none of A's");
    for (_, v) in ma.iter().chain(mb.iter()) {
        if v["method"] == "notifications/progress" {
            assert_eq!(
                v["params"]["progressToken"], "tok",
                "the client's own token is restored"
            );
        }
    }
    let (first, _) = ma.first().unwrap();
    let (last, final_msg) = ma.last().unwrap();
    assert_eq!(final_msg["result"]["content"][0]["text"], "done in 4 steps");
    assert!(
        *last - *first >= Duration::from_millis(300),
        "progress arrived while the call was running, not all at the end"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_child_fails_in_flight_calls_at_once_and_service_resumes() {
    let g = Gateway::stdio_fixture("").ready().await;
    let mut c = g.client();
    c.initialize().await;
    let pid_before = c.call_text("pid", json!({})).await;
    let slow = tokio::spawn({
        let c = c.clone();
        async move {
            let started = Instant::now();
            (c.call("sleep", json!({"ms": 10_000})).await, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid_before])
        .status()
        .unwrap();
    assert!(killed.success());
    let (answer, took) = slow.await.unwrap();
    assert_eq!(answer["error"]["code"], -32033, "a clean JSON-RPC error: {answer}");
    assert_eq!(answer["id"], 1);
    assert!(
        took < Duration::from_secs(3),
        "the error came at once, not at the timeout ({took:?})"
    );

    let pid_after = eventually(Duration::from_secs(15), "the child to be restarted", || {
        let c = c.clone();
        async move {
            let v = c.call("pid", json!({})).await;
            v["result"]["content"][0]["text"].as_str().map(str::to_string)
        }
    })
    .await;
    assert_ne!(pid_before, pid_after, "a new child serves");
    assert_eq!(
        c.call_text("echo", json!({"text": "back"})).await,
        "back",
        "the same session keeps working"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_past_the_timeout_gets_a_timeout_error_and_others_are_unaffected() {
    let g = Gateway::stdio_fixture("call_timeout_ms = 400").ready().await;
    let mut c = g.client();
    c.initialize().await;
    let started = Instant::now();
    let v = c.call("sleep", json!({"ms": 5_000})).await;
    assert_eq!(v["error"]["code"], -32031, "{v}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(c.call_text("echo", json!({"text": "still here"})).await, "still here");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_request_ends_at_once() {
    let g = Gateway::stdio_fixture("").ready().await;
    let mut c = g.client();
    c.initialize().await;
    let slow = tokio::spawn({
        let c = c.clone();
        async move {
            c.request_with_id(
                json!("slow-1"),
                "tools/call",
                json!({"name":"sleep","arguments":{"ms":10_000}}),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let r = c
        .post(&json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"slow-1","reason":"user"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v = slow.await.unwrap();
    assert_eq!(v["id"], "slow-1");
    assert_eq!(v["error"]["code"], -32038, "{v}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn list_changes_reach_every_open_stream() {
    let g = Gateway::stdio_fixture("").ready().await;
    let mut listener = g.client();
    listener.initialize().await;
    let stream = listener.open_stream().await;
    assert_eq!(stream.status(), 200);
    let mut caller = g.client();
    caller.initialize().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(caller.call_text("notify_list_changed", json!({})).await, "sent");
    assert!(
        stream_shows(stream, "notifications/tools/list_changed", Duration::from_secs(5)).await,
        "the GET stream carried tools/list_changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_childs_own_requests_are_answered_by_the_gateway_not_routed_to_clients() {
    let g = Gateway::stdio_fixture("").ready().await;
    let mut c = g.client();
    c.initialize().await;
    let roots = c.call_text("ask_roots", json!({})).await;
    assert_eq!(roots, r#"{"roots":[]}"#);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_child_sees_only_the_environment_the_config_names() {
    // SAFETY-free: the variable is set on the gateway process only, through Command.
    let g = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            format!(
                "[upstream]\ncommand = [{FIXTURE:?}]\nenv_passthrough = [\"PATH\"]\nenv = {{ GREETING = \"hi\" }}\n[billing]\nenabled = false\n"
            ),
        )
        .unwrap();
        let mut cmd = std::process::Command::new(TOLLGATE);
        cmd.arg("serve")
            .arg("--config")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0"]);
        cmd.env("TOLLGATE_ADMIN_SECRET_FOR_TEST", "do-not-leak");
        let (proc, rest) = Proc::spawn(cmd, "listening on ", Duration::from_secs(30));
        Gateway {
            proc,
            base: rest.trim_end_matches("/mcp").to_string(),
            dir,
        }
        .ready()
        .await
    };
    let mut c = g.client();
    c.initialize().await;
    let names = c.call_text("env", json!({})).await;
    assert_eq!(names, "GREETING,PATH");
}

#[tokio::test(flavor = "multi_thread")]
async fn ending_a_session_ends_its_open_stream() {
    let g = Gateway::stdio_fixture("").ready().await;
    let mut c = g.client();
    c.initialize().await;
    let stream = c.open_stream().await;
    assert_eq!(stream.status(), 200);
    assert_eq!(c.delete().await.status(), 204);
    let ended = tokio::time::timeout(Duration::from_secs(3), stream.bytes()).await;
    assert!(ended.is_ok(), "the GET stream ended with its session");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_writing_garbage_is_logged_and_the_gateway_keeps_serving() {
    let g = Gateway::stdio_fixture("").ready().await;
    let mut c = g.client();
    c.initialize().await;
    assert_eq!(c.call_text("garbage", json!({})).await, "after garbage");
    assert_eq!(c.call_text("echo", json!({"text": "fine"})).await, "fine");
    eventually(Duration::from_secs(5), "the garbage line to be logged", || async {
        g.proc.stderr().contains("not a JSON-RPC message").then_some(())
    })
    .await;
}
