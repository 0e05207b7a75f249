//! The Streamable HTTP server side: sessions, headers, limits and refusals, as a client meets them.

use serde_json::{Value, json};

use crate::support::*;

async fn gateway() -> Gateway {
    Gateway::stdio_fixture("").ready().await
}

fn raw_post(g: &Gateway) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(g.mcp_url())
        .header("content-type", "application/json")
        .header("accept", ACCEPT_BOTH)
}

#[tokio::test(flavor = "multi_thread")]
async fn initialize_mints_a_session_and_negotiates_the_clients_version() {
    let g = gateway().await;
    let mut c = g.client();
    c.version = "2025-06-18".into();
    let result = c.initialize().await;
    assert_eq!(result["protocolVersion"], "2025-06-18");
    assert_eq!(result["serverInfo"]["name"], "tollgate-fixture");
    assert_eq!(c.session.as_ref().unwrap().len(), 32);

    let mut unknown = g.client();
    unknown.version = "1999-01-01".into();
    let result = unknown.initialize().await;
    assert_eq!(
        result["protocolVersion"], "2025-11-25",
        "an unknown version gets the newest"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_or_ended_session_gets_404() {
    let g = gateway().await;
    let mut c = g.client();
    c.initialize().await;
    let mut stranger = c.clone();
    stranger.session = Some("0123456789abcdef0123456789abcdef".into());
    let r = stranger
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], 1);
    assert_eq!(v["error"]["code"], -32034);

    assert_eq!(c.delete().await.status(), 204);
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "a deleted session is dead");
    assert_eq!(c.delete().await.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_without_a_session_is_refused_but_ping_and_discover_are_answered() {
    let g = gateway().await;
    let r = raw_post(&g)
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("Mcp-Session-Id"));

    let r = raw_post(&g)
        .body(r#"{"jsonrpc":"2.0","id":"p","method":"ping"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"jsonrpc":"2.0","id":"p","result":{}}));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsupported_protocol_version_gets_400_naming_the_supported_ones() {
    let g = gateway().await;
    let mut c = g.client();
    c.initialize().await;
    c.version = "2099-01-01".into();
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":7,"method":"tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], 7);
    assert_eq!(v["error"]["code"], -32022);
    assert_eq!(v["error"]["data"]["requested"], "2099-01-01");
    assert!(
        v["error"]["data"]["supported"]
            .as_array()
            .unwrap()
            .contains(&json!("2025-11-25"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_discover_is_answered_at_once_and_a_modern_probe_is_refused_so_clients_fall_back() {
    let g = gateway().await;
    let started = std::time::Instant::now();
    let r = raw_post(&g)
        .body(r#"{"jsonrpc":"2.0","id":"d","method":"server/discover","params":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["result"]["serverInfo"]["name"], "tollgate-fixture");
    assert!(
        v["result"]["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("2025-11-25"))
    );

    // What the Python SDK's `auto` mode sends first.
    let r = raw_post(&g)
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "server/discover")
        .body(r#"{"jsonrpc":"2.0","id":"d2","method":"server/discover","params":{"_meta":{}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], "d2");
    assert_eq!(v["error"]["code"], -32022);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_headers_that_disagree_with_the_body_get_400() {
    let g = gateway().await;
    let mut c = g.client();
    c.initialize().await;
    let call = json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}});
    let r = c.post(&call).header("mcp-method", "tools/list").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], -32020);
    let r = c
        .post(&call)
        .header("mcp-method", "tools/call")
        .header("mcp-name", "add")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .post(&call)
        .header("mcp-method", "tools/call")
        .header("mcp-name", "echo")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "agreeing headers pass");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_body_gets_413_whether_announced_or_streamed() {
    let g = Gateway::stdio_fixture("").ready().await;
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"pad":"{}"}}}}"#,
        "x".repeat(6 << 20)
    );
    let r = raw_post(&g).body(big.clone()).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], -32036);

    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(String::from_utf8(c.to_vec()).unwrap()))
        .collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = raw_post(&g).body(body).send().await.unwrap();
    assert_eq!(r.status(), 413, "a chunked body without Content-Length is limited too");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_origin_gets_403_while_loopback_and_configured_origins_pass() {
    let g = Gateway::serve(&format!(
        "[server]\nallowed_origins = [\"https://app.example.com\"]\n[upstream]\ncommand = [{FIXTURE:?}, \"--stdio\"]\n"
    ))
    .ready()
    .await;
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let r = raw_post(&g)
        .header("origin", "https://evil.example")
        .body(ping)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], -32035);
    for ok in ["https://app.example.com", "http://localhost:5173", "http://127.0.0.1"] {
        let r = raw_post(&g).header("origin", ok).body(ping).send().await.unwrap();
        assert_eq!(r.status(), 200, "{ok}");
    }
    let r = reqwest::Client::new()
        .get(g.mcp_url())
        .header("origin", "http://attacker.test")
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "GET streams check the origin too");
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_and_malformed_messages_get_400_with_the_right_code() {
    let g = gateway().await;
    let cases = [
        (r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#, -32600),
        (r#"{"jsonrpc":"2.0","id":1,"method":"#, -32700),
        (r#"{"id":1,"method":"ping"}"#, -32600),
        (r#""just a string""#, -32600),
    ];
    for (body, code) in cases {
        let r = raw_post(&g).body(body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_media_types_are_refused() {
    let g = gateway().await;
    let r = reqwest::Client::new()
        .post(g.mcp_url())
        .header("content-type", "text/plain")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = reqwest::Client::new()
        .post(g.mcp_url())
        .header("content-type", "application/json")
        .header("accept", "text/html")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 406);
}

#[tokio::test(flavor = "multi_thread")]
async fn notifications_and_client_responses_get_202_with_no_body() {
    let g = gateway().await;
    let mut c = g.client();
    c.initialize().await;
    let r = c
        .post(&json!({"jsonrpc":"2.0","method":"notifications/roots/list_changed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":"srv-1","result":{}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_unknown_routes() {
    let g = gateway().await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{}/healthz", g.base)).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        http.get(format!("{}/readyz", g.base)).send().await.unwrap().status(),
        200
    );
    assert_eq!(http.get(format!("{}/nope", g.base)).send().await.unwrap().status(), 404);
    let r = http.put(g.mcp_url()).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers()["allow"].to_str().unwrap().contains("POST"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let g = Gateway::serve(&format!(
        "[server]\nheader_read_timeout_ms = 300\n[upstream]\ncommand = [{FIXTURE:?}, \"--stdio\"]\n"
    ))
    .ready()
    .await;
    let addr = g.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /mcp HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection should be closed after the header timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_an_in_flight_call_before_exiting() {
    let g = gateway().await;
    let mut c = g.client();
    c.initialize().await;
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.call_text("sleep", json!({"ms": 500})).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let pid = g.proc.pid();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(call.await.unwrap(), "slept", "the in-flight call completes");
    let mut g = g;
    let (g, status) = tokio::task::spawn_blocking(move || {
        let status = g.proc.child.wait().unwrap();
        (g, status)
    })
    .await
    .unwrap();
    assert!(status.success(), "a graceful shutdown exits 0, got {status}");
    // The last line logged, just before exit, was written out (log lines are queued).
    let log = g.proc.stderr();
    assert!(
        log.lines().any(|l| l.ends_with(" stopped")),
        "the gateway's last line is missing from the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_validates_a_config_and_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, format!("[upstream]\ncommand = [{FIXTURE:?}]\n")).unwrap();
    let out = std::process::Command::new(TOLLGATE)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[upstream]\ncommand = [\"definitely-not-a-program\"]\n").unwrap();
    let out = std::process::Command::new(TOLLGATE)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstream.command"), "{err}");

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[server]\nlisen = \"x\"\n").unwrap();
    let out = std::process::Command::new(TOLLGATE)
        .args(["check", "--config"])
        .arg(&typo)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));
}

#[test]
fn every_command_documents_its_options_in_its_help() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(TOLLGATE).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let wanted: [(&[&str], &[&str]); 4] = [
        (
            &["--help"],
            &[
                "wrap",
                "serve",
                "check",
                "--log-level",
                "--log-format",
                "json",
                "pretty",
            ],
        ),
        (
            &["wrap", "--help"],
            &[
                "--listen",
                "--remote-url",
                "--price",
                "--tool-price",
                "--data-dir",
                "--log-level",
                "--log-format",
                "server-everything",
            ],
        ),
        (
            &["serve", "--help"],
            &["--config", "--listen", "--log-level", "--log-format"],
        ),
        (&["check", "--help"], &["--config", "--log-level", "--log-format"]),
    ];
    for (args, options) in wanted {
        let text = help(args);
        for option in options {
            assert!(
                text.contains(option),
                "`tollgate {}` does not mention {option}:\n{text}",
                args.join(" ")
            );
        }
        // Every option says what it does: no option line stands alone before the next one.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("--") || line.trim_start().starts_with("-c, --") {
                let described = line.trim_end().split("  ").filter(|s| !s.trim().is_empty()).count() > 1
                    || lines.get(i + 1).is_some_and(|next| {
                        let next = next.trim_start();
                        !next.is_empty() && !next.starts_with('-')
                    });
                assert!(
                    described,
                    "`tollgate {}`: {line:?} has no description:\n{text}",
                    args.join(" ")
                );
            }
        }
    }
}
