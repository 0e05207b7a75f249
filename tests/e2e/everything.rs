//! The official `@modelcontextprotocol/server-everything` (pinned in tests/npm) as a real upstream,
//! over stdio and over its Streamable HTTP mode, driven by our client and by the official SDKs.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

fn everything_js() -> PathBuf {
    npm_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js")
}

/// A gateway wrapping server-everything over stdio.
pub async fn everything_stdio() -> Gateway {
    let js = everything_js();
    Gateway::wrap(&["--", "node", js.to_str().unwrap(), "stdio"])
        .ready()
        .await
}

/// server-everything in its streamableHttp mode, on a free port.
pub fn everything_http() -> (Proc, String) {
    let port = free_port();
    let mut cmd = Command::new("node");
    cmd.arg(everything_js())
        .arg("streamableHttp")
        .env("PORT", port.to_string());
    let (proc, _) = Proc::spawn(cmd, "Starting Streamable HTTP server", Duration::from_secs(30));
    let url = format!("http://127.0.0.1:{port}/mcp");
    // It prints before it listens; wait for the port.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "server-everything did not listen; stderr:\n{}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (proc, url)
}

async fn exercise(g: &Gateway) {
    let mut c = g.client();
    let init = c.initialize().await;
    assert!(
        init["serverInfo"]["name"].as_str().unwrap().contains("everything"),
        "{init}"
    );
    let tools = c.request("tools/list", json!({})).await;
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"echo") && names.contains(&"get-sum"), "{names:?}");
    let echo = c.call_text("echo", json!({"message": "through tollgate"})).await;
    assert!(echo.contains("through tollgate"), "{echo}");
    let sum = c.call_text("get-sum", json!({"a": 19, "b": 23})).await;
    assert!(sum.contains("42"), "{sum}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_everything_over_stdio_serves_through_the_gateway() {
    let g = everything_stdio().await;
    exercise(&g).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_everything_over_streamable_http_serves_through_the_gateway() {
    let (_server, url) = everything_http();
    let g = Gateway::wrap(&["--remote-url", &url]).ready().await;
    exercise(&g).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_everything_over_stdio_does_not_see_the_gateways_environment() {
    // Billing on: the gateway holds its admin key in its environment.
    let js = everything_js();
    let g = Gateway::wrap_billed(&["--", "node", js.to_str().unwrap(), "stdio"])
        .ready()
        .await;
    let (_, secret) = g.admin().create_key("env-check", 10).await;
    let mut c = g.client();
    c.api_key = Some(secret);
    c.initialize().await;
    let env: Value = serde_json::from_str(&c.call_text("get-env", json!({})).await).unwrap();
    assert!(
        env.get("TOLLGATE_ADMIN_KEY").is_none(),
        "a gateway secret leaked to the child"
    );
    assert!(env.get("PATH").is_some());
}

fn run_sdk(program: &str, args: &[&str]) -> Value {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{program} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON summary line");
    serde_json::from_str(line).unwrap()
}

async fn typescript_sdk_against(g: &Gateway) -> Value {
    let script = npm_dir().join("sdk-client.mjs");
    let url = g.mcp_url();
    let script = script.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || run_sdk("node", &[&script, &url]))
        .await
        .unwrap()
}

fn assert_typescript_summary(out: &Value) {
    assert!(out["server"].as_str().unwrap().contains("everything"), "{out}");
    assert_eq!(
        out["sessionId"].as_str().unwrap().len(),
        32,
        "the gateway's own session id"
    );
    assert!(out["echo"].as_str().unwrap().contains("hi from ts"));
    assert!(out["sum"].as_str().unwrap().contains("42"));
    assert_eq!(out["progress"], 4, "every progress notification reached the SDK: {out}");
    assert!(out["resourceCount"].as_u64().unwrap() > 0);
    assert_eq!(out["readOk"], true);
    assert!(out["promptMessages"].as_u64().unwrap() > 0);
    assert_eq!(out["cancelled"], "aborted");
    assert!(out["cancelMs"].as_u64().unwrap() < 5_000, "{out}");
    assert!(out["afterCancel"].as_str().unwrap().contains("after"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_typescript_sdk_uses_every_feature_through_a_stdio_upstream() {
    let g = everything_stdio().await;
    let out = typescript_sdk_against(&g).await;
    assert_typescript_summary(&out);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_typescript_sdk_uses_every_feature_through_an_http_upstream() {
    let (_server, url) = everything_http();
    let g = Gateway::wrap(&["--remote-url", &url]).ready().await;
    let out = typescript_sdk_against(&g).await;
    assert_typescript_summary(&out);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_sdk_in_auto_mode_falls_back_to_initialize_and_works() {
    let python = repo_root().join("tests/sdk/.venv/bin/python");
    assert!(
        python.is_file(),
        "tests/sdk/.venv is missing: tests/run creates it (pip install mcp==2.3.0)"
    );
    let g = everything_stdio().await;
    let script = repo_root().join("tests/sdk/client.py");
    let url = g.mcp_url();
    let out = tokio::task::spawn_blocking(move || run_sdk(python.to_str().unwrap(), &[script.to_str().unwrap(), &url]))
        .await
        .unwrap();
    assert_eq!(out["protocolVersion"], "2025-11-25", "{out}");
    assert!(out["echo"].as_str().unwrap().contains("hi from python"));
    assert_eq!(out["progress"], 3, "{out}");
    assert_eq!(out["readOk"], true);
}
