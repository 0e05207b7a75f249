//! A remote Streamable HTTP upstream: one upstream session per client, SSE streamed through,
//! GET and DELETE forwarded, failures turned into clean errors.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::support::*;

async fn gateway(fx: &HttpFixture) -> Gateway {
    Gateway::wrap(&["--remote-url", &fx.url]).ready().await
}

#[tokio::test(flavor = "multi_thread")]
async fn initialize_list_and_call_pass_through() {
    let fx = HttpFixture::start();
    let g = gateway(&fx).await;
    let mut c = g.client();
    let init = c.initialize().await;
    assert_eq!(init["serverInfo"]["name"], "tollgate-fixture");
    let tools = c.request("tools/list", json!({})).await;
    assert!(tools["result"]["tools"].as_array().unwrap().len() > 5);
    assert_eq!(c.call_text("echo", json!({"text": "over http"})).await, "over http");
    let prompt = c
        .request("prompts/get", json!({"name": "greet", "arguments": {"who": "Bob"}}))
        .await;
    assert_eq!(prompt["result"]["messages"][0]["content"]["text"], "Say hello to Bob");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_client_session_gets_its_own_upstream_session_and_delete_ends_it() {
    let fx = HttpFixture::start();
    let g = gateway(&fx).await;
    let mut a = g.client();
    a.initialize().await;
    let mut b = g.client();
    b.initialize().await;
    let sa = a.call_text("session", json!({})).await;
    let sb = b.call_text("session", json!({})).await;
    assert!(sa.starts_with("fx-") && sb.starts_with("fx-"));
    assert_ne!(sa, sb, "two clients never share an upstream session");
    assert_eq!(
        a.call_text("session", json!({})).await,
        sa,
        "a client keeps its upstream session"
    );
    assert_eq!(b.call_text("session_count", json!({})).await, "2");

    assert_eq!(a.delete().await.status(), 204);
    assert_eq!(
        b.call_text("session_count", json!({})).await,
        "1",
        "DELETE ended the upstream session too"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_answers_stream_through_event_by_event_and_priming_events_are_harmless() {
    let fx = HttpFixture::start();
    let g = gateway(&fx).await;
    let mut c = g.client();
    c.initialize().await;
    let resp = c
        .post(&json!({"jsonrpc":"2.0","id":"p1","method":"tools/call","params":{
            "name":"progress","arguments":{"steps":3,"ms":200},"_meta":{"progressToken":42}}}))
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let msgs = timed_messages(resp).await;
    let progress: Vec<_> = msgs
        .iter()
        .filter(|(_, m)| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3);
    assert_eq!(progress[0].1["params"]["progressToken"], 42);
    let (last_at, last) = msgs.last().unwrap();
    assert_eq!(last["id"], "p1");
    assert_eq!(last["result"]["content"][0]["text"], "done in 3 steps");
    assert!(
        *last_at - progress[0].0 >= Duration::from_millis(350),
        "the first progress event was not held back until the end"
    );

    // A client that only takes JSON gets the final answer alone.
    let resp = c
        .http
        .post(&c.url)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("mcp-session-id", c.session.as_deref().unwrap())
        .body(
            json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{
            "name":"progress","arguments":{"steps":2,"ms":10},"_meta":{"progressToken":1}}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["result"]["content"][0]["text"], "done in 2 steps");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_stream_is_forwarded() {
    let fx = HttpFixture::start();
    let g = gateway(&fx).await;
    let mut c = g.client();
    c.initialize().await;
    let stream = c.open_stream().await;
    assert_eq!(stream.status(), 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(c.call_text("notify_list_changed", json!({})).await, "sent");
    assert!(stream_shows(stream, "notifications/tools/list_changed", Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_request_reaches_the_client_and_its_answer_reaches_the_server() {
    let fx = HttpFixture::start();
    let g = gateway(&fx).await;
    let mut c = g.client();
    c.initialize().await;
    let resp = c
        .post(&json!({"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"ask_roots","arguments":{}}}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let mut answered = false;
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            for m in sse_messages(&text) {
                if m["method"] == "roots/list" && !answered {
                    answered = true;
                    let r = c
                        .post(&json!({"jsonrpc":"2.0","id":m["id"],"result":{"roots":[{"uri":"file:///work","name":"work"}]}}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 202);
                }
                if m["id"] == 9 {
                    return m;
                }
            }
        }
        panic!("stream ended: {text}");
    })
    .await
    .unwrap();
    assert!(
        result["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("file:///work"),
        "{result}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_gives_a_clean_error_with_the_clients_id() {
    let port = free_port();
    let g = Gateway::wrap(&["--remote-url", &format!("http://127.0.0.1:{port}/mcp")]);
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{}/readyz", g.base)).send().await.unwrap().status(),
        503
    );
    let c = g.client();
    let started = Instant::now();
    let v = c
        .post(&json!({"jsonrpc":"2.0","id":"x1","method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(v.status(), 200);
    let v: serde_json::Value = v.json().await.unwrap();
    assert_eq!(v["id"], "x1");
    assert_eq!(v["error"]["code"], -32030, "{v}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_forgot_the_session_ends_the_clients_session_with_404() {
    let fx = HttpFixture::start();
    let g = gateway(&fx).await;
    let mut c = g.client();
    c.initialize().await;
    let upstream_session = c.call_text("session", json!({})).await;
    // End the upstream session behind the gateway's back.
    let r = reqwest::Client::new()
        .delete(&fx.url)
        .header("mcp-session-id", &upstream_session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the client is told to initialize again");
    let mut again = c.clone();
    again.initialize().await;
    assert_eq!(again.call_text("echo", json!({"text": "fresh"})).await, "fresh");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_initialize_the_upstream_refuses_leaves_no_session() {
    let fx = HttpFixture::start();
    let g = gateway(&fx).await;
    let c = g.client();
    let r = c
        .post(&json!({"jsonrpc":"2.0","id":"i","method":"initialize","params":{
            "protocolVersion":"0000-00-00","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}))
        .send()
        .await
        .unwrap();
    assert!(
        r.headers().get("mcp-session-id").is_none(),
        "no session for a refused initialize"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["id"], "i");
    assert_eq!(
        v["error"]["code"], -32602,
        "the upstream's refusal reaches the client: {v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_answering_garbage_gives_a_clean_error_not_a_500() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let body = "<html>definitely not MCP</html>";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    let g = Gateway::wrap(&["--remote-url", &format!("http://127.0.0.1:{port}/mcp")])
        .ready()
        .await;
    let r = g
        .client()
        .post(&json!({"jsonrpc":"2.0","id":5,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["id"], 5);
    assert_eq!(v["error"]["code"], -32032, "{v}");
    assert!(
        !v["error"]["message"].as_str().unwrap().contains("html"),
        "upstream detail stays in the log"
    );
}

/// A TLS terminator in front of a plain HTTP server, with a certificate for `localhost` from a CA
/// of its own: what an `https://` MCP server looks like to the gateway.
struct TlsFront {
    port: u16,
    ca_pem: String,
    handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsFront {
    async fn start(target: &str) -> TlsFront {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let target: std::net::SocketAddr = target
            .trim_start_matches("http://")
            .trim_end_matches("/mcp")
            .parse()
            .unwrap();
        let (acceptor, ca_pem) = localhost_tls();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut plain = tokio::net::TcpStream::connect(target).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            port,
            ca_pem,
            handshakes,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/mcp", self.port)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_upstream_is_called_over_tls_and_its_certificate_is_verified() {
    let fx = HttpFixture::start();
    let front = TlsFront::start(&fx.url).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &front.ca_pem).unwrap();

    let trusting = Gateway::serve(&format!(
        "[upstream]\nurl = {:?}\nca_file = {:?}\n",
        front.url(),
        ca.display().to_string()
    ))
    .ready()
    .await;
    let mut c = trusting.client();
    assert_eq!(c.initialize().await["serverInfo"]["name"], "tollgate-fixture");
    assert_eq!(c.call_text("echo", json!({"text": "over tls"})).await, "over tls");
    let resp = c
        .post(&json!({"jsonrpc":"2.0","id":"p1","method":"tools/call","params":{
            "name":"progress","arguments":{"steps":2,"ms":10},"_meta":{"progressToken":1}}}))
        .send()
        .await
        .unwrap();
    let msgs = sse_messages(&resp.text().await.unwrap());
    assert_eq!(
        msgs.iter().filter(|m| m["method"] == "notifications/progress").count(),
        2,
        "a streamed answer crosses TLS event by event: {msgs:?}"
    );
    assert_eq!(msgs.last().unwrap()["id"], "p1");
    assert!(
        front.handshakes.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the calls went through the TLS front"
    );

    // On the public web roots, the server's private CA is not trusted: a clean error, no answer.
    let public = Gateway::serve(&format!("[upstream]\nurl = {:?}\n", front.url()));
    let v = public
        .client()
        .post(&json!({"jsonrpc":"2.0","id":7,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = v.json().await.unwrap();
    assert_eq!(v["id"], 7);
    assert_eq!(v["error"]["code"], -32030, "an untrusted certificate is refused: {v}");
    // Log lines reach stderr a few milliseconds after they are logged.
    eventually(
        Duration::from_secs(5),
        "the log to say the certificate is untrusted",
        || async { public.proc.stderr().contains("certificate").then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_needs_credentials_gets_the_configured_header_and_never_the_clients_key() {
    let fx = HttpFixture::start_with(&["--require-auth", "Bearer upstream-secret"]);
    let dir = tempfile::tempdir().unwrap();
    let g = Gateway::serve(&format!(
        "[upstream]\nurl = {:?}\nheaders = {{ Authorization = \"Bearer upstream-secret\" }}\n\
         [billing]\nadmin_key = {ADMIN_KEY:?}\ndata_dir = {:?}\n",
        fx.url,
        dir.path().display().to_string()
    ))
    .ready()
    .await;
    let (_, secret) = g.admin().create_key("agent", 10).await;
    let mut c = g.client();
    c.initialize().await;
    // The client authenticates to the gateway with its own Authorization; the upstream insists on
    // exactly its own credentials, so the call passing means only the configured header went on.
    let v = read_answer(
        c.post(
            &json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}),
        )
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(v["result"]["content"][0]["text"], "hi", "{v}");

    // A new credential in the file needs a restart (and is reported so), though values never print.
    let path = g.dir.path().join("tollgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("Bearer upstream-secret", "Bearer rotated")).unwrap();
    let report = g.admin().post("/admin/config/reload", &json!({})).send_json().await;
    assert_eq!(report["restartRequired"], json!(["upstream"]), "{report}");

    // Without the header the upstream refuses; the client gets a clean JSON-RPC error, its own id.
    let bare = Gateway::wrap(&["--remote-url", &fx.url]);
    let v = bare
        .client()
        .post(&json!({"jsonrpc":"2.0","id":"i1","method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}))
        .send_json().await;
    assert_eq!(v["id"], "i1");
    assert_eq!(v["error"]["code"], -32032, "{v}");
    eventually(
        Duration::from_secs(5),
        "the log to name the upstream's refusal (HTTP 401)",
        || async { bare.proc.stderr().contains("HTTP 401").then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http_upstreams_errors_and_tool_errors_are_refunded_when_configured_and_results_kept() {
    let fx = HttpFixture::start();
    let dir = tempfile::tempdir().unwrap();
    let g = Gateway::serve(&format!(
        "[upstream]\nurl = {:?}\n[billing]\nadmin_key = {ADMIN_KEY:?}\ndata_dir = {:?}\n\
         refund_on = [\"error\", \"timeout\", \"tool_error\"]\n",
        fx.url,
        dir.path().display().to_string()
    ))
    .ready()
    .await;
    let admin = g.admin();
    let (id, secret) = admin.create_key("agent", 10).await;
    let mut c = g.client();
    c.api_key = Some(secret);
    c.initialize().await;
    assert_eq!(c.call("fail", json!({})).await["error"]["code"], -32050);
    assert_eq!(c.call("fail_tool", json!({})).await["result"]["isError"], true);
    // A result that mentions isError in its text is no tool error.
    assert_eq!(
        c.call_text("echo", json!({"text": "\"isError\": true"})).await,
        "\"isError\": true"
    );
    assert_eq!(admin.key(&id).await["credits"], 9, "only the echo is charged");
    let outcomes: Vec<(String, String)> = admin
        .requests(&format!("keyId={id}"))
        .await
        .iter()
        .map(|r| {
            (
                r["tool"].as_str().unwrap().into(),
                r["outcome"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("echo".into(), "allowed".into()),
            ("fail_tool".into(), "refunded".into()),
            ("fail".into(), "refunded".into())
        ]
    );
}
