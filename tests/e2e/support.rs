//! Builders for end-to-end tests: the real `tollgate` binary on port 0, the fixture server, the
//! official server-everything, and a small MCP client over HTTP.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

pub const TOLLGATE: &str = env!("CARGO_BIN_EXE_tollgate");
pub const FIXTURE: &str = env!("CARGO_BIN_EXE_tollgate-fixture");
pub const ACCEPT_BOTH: &str = "application/json, text/event-stream";
/// The admin key billed test gateways run with.
pub const ADMIN_KEY: &str = "e2e-admin-key-0123456789";

/// The repository root (tests/ and host/ live under it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The npm packages the tests use, installed by the test command (tests/run).
pub fn npm_dir() -> PathBuf {
    let dir = repo_root().join("tests/npm");
    assert!(
        dir.join("node_modules/@modelcontextprotocol/server-everything")
            .is_dir(),
        "tests/npm/node_modules is missing: run `npm ci --prefix tests/npm` (tests/run does)"
    );
    dir
}

/// A spawned process that is killed when dropped; its stderr is kept in a file for diagnostics.
pub struct Proc {
    pub child: Child,
    pub stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Spawns `cmd`, waits for a stdout line containing `marker`, and returns the rest of that line
    /// after the marker. Bails with the process's stderr if it exits first or takes too long.
    pub fn spawn(cmd: Command, marker: &str, wait: Duration) -> (Proc, String) {
        let (proc, _, rest) = Proc::spawn_collecting(cmd, marker, wait);
        (proc, rest)
    }

    /// Like [`Proc::spawn`], and also returns the stdout lines printed before the marker line.
    pub fn spawn_collecting(mut cmd: Command, marker: &str, wait: Duration) -> (Proc, Vec<String>, String) {
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        cmd.stdout(Stdio::piped()).stderr(stderr).stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawning a test process");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std_mpsc::channel();
        let marker_owned = marker.to_string();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut before = Vec::new();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find(&marker_owned) {
                    let _ = tx.send((before, line[i + marker_owned.len()..].trim().to_string()));
                    break;
                }
                before.push(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let mut proc = Proc {
            child,
            stderr_path,
            _dir: dir,
        };
        let deadline = Instant::now() + wait;
        loop {
            if let Ok((before, rest)) = rx.recv_timeout(Duration::from_millis(50)) {
                return (proc, before, rest);
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("process exited early ({status}); stderr:\n{}", proc.stderr());
            }
            if Instant::now() > deadline {
                panic!(
                    "process did not print {marker:?} within {wait:?}; stderr:\n{}",
                    proc.stderr()
                );
            }
        }
    }

    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running gateway.
pub struct Gateway {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    /// `tollgate wrap --listen 127.0.0.1:0 --free <args>`: the proxy alone, no billing.
    pub fn wrap(args: &[&str]) -> Gateway {
        let mut cmd = Command::new(TOLLGATE);
        cmd.args(["wrap", "--listen", "127.0.0.1:0", "--free"]).args(args);
        Gateway::start(cmd)
    }

    /// `tollgate wrap` with billing on: its own data directory, the admin key [`ADMIN_KEY`].
    pub fn wrap_billed(args: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(TOLLGATE);
        cmd.args(["wrap", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(args)
            .env("TOLLGATE_ADMIN_KEY", ADMIN_KEY);
        let mut g = Gateway::start(cmd);
        g.dir = dir;
        g
    }

    /// `tollgate wrap` with billing on this data directory (a test can restart on it), the admin
    /// key [`ADMIN_KEY`], in front of the stdio fixture.
    pub fn billed_on(data_dir: &Path, extra: &[&str]) -> Gateway {
        let mut cmd = Command::new(TOLLGATE);
        cmd.args(["wrap", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .args(["--", FIXTURE, "--stdio"])
            .env("TOLLGATE_ADMIN_KEY", ADMIN_KEY);
        Gateway::start(cmd)
    }

    /// The admin API of this gateway, with [`ADMIN_KEY`].
    pub fn admin(&self) -> Admin {
        Admin {
            http: reqwest::Client::new(),
            base: self.base.clone(),
        }
    }

    /// `tollgate serve` with this config text (its `[server] listen` is forced to port 0). Without
    /// a `[billing]` section, billing is off.
    pub fn serve(config: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        let mut config = config.to_string();
        if !config.contains("[billing]") {
            config.push_str("\n[billing]\nenabled = false\n");
        }
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(TOLLGATE);
        cmd.arg("serve")
            .arg("--config")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0"]);
        let mut g = Gateway::start(cmd);
        g.dir = dir;
        g
    }

    /// A gateway in front of the fixture over stdio, with extra config lines for `[upstream]`.
    pub fn stdio_fixture(upstream_extra: &str) -> Gateway {
        Gateway::serve(&format!(
            "[upstream]\ncommand = [{FIXTURE:?}, \"--stdio\"]\n{upstream_extra}\n"
        ))
    }

    fn start(mut cmd: Command) -> Gateway {
        cmd.env("RUST_LOG", "tollgate=debug,info");
        let (proc, rest) = Proc::spawn(cmd, "listening on ", Duration::from_secs(30));
        let base = rest.trim_end_matches("/mcp").to_string();
        Gateway {
            proc,
            base,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn mcp_url(&self) -> String {
        format!("{}/mcp", self.base)
    }

    /// Waits until `/readyz` says the upstream is up.
    pub async fn ready(self) -> Gateway {
        self.ready_ref().await;
        self
    }

    /// Waits until `/readyz` says the upstream is up (borrowing).
    pub async fn ready_ref(&self) -> &Gateway {
        let deadline = Instant::now() + Duration::from_secs(60);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await
                && r.status() == 200
            {
                return self;
            }
            assert!(
                Instant::now() < deadline,
                "gateway never became ready; stderr:\n{}",
                self.proc.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn client(&self) -> McpClient {
        McpClient::new(&self.mcp_url())
    }
}

/// The fixture server in HTTP mode.
pub struct HttpFixture {
    pub proc: Proc,
    pub url: String,
}

impl HttpFixture {
    pub fn start() -> HttpFixture {
        HttpFixture::start_with(&[])
    }

    /// The fixture over HTTP with more arguments (e.g. `--require-auth VALUE`).
    pub fn start_with(args: &[&str]) -> HttpFixture {
        let mut cmd = Command::new(FIXTURE);
        cmd.args(["--http", "127.0.0.1:0"]).args(args);
        let (proc, url) = Proc::spawn(cmd, "listening on ", Duration::from_secs(10));
        HttpFixture { proc, url }
    }
}

/// A TLS acceptor for `localhost` with a certificate from a CA of its own, and that certificate
/// (PEM) for a client to trust.
pub fn localhost_tls() -> (tokio_rustls::TlsAcceptor, String) {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), cert.pem())
}

/// A free loopback port (for servers that cannot report the port they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal MCP client over Streamable HTTP, enough to drive the gateway as an SDK would.
#[derive(Clone)]
pub struct McpClient {
    pub http: reqwest::Client,
    pub url: String,
    pub session: Option<String>,
    pub version: String,
    /// Sent as `X-API-Key` when set.
    pub api_key: Option<String>,
}

impl McpClient {
    pub fn new(url: &str) -> McpClient {
        McpClient {
            http: reqwest::Client::builder().pool_max_idle_per_host(4).build().unwrap(),
            url: url.to_string(),
            session: None,
            version: "2025-11-25".to_string(),
            api_key: None,
        }
    }

    /// A POST with the usual MCP headers (session and version once known).
    pub fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        let mut b = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", ACCEPT_BOTH)
            .body(body.to_string());
        if let Some(s) = &self.session {
            b = b
                .header("mcp-session-id", s)
                .header("mcp-protocol-version", &self.version);
        }
        if let Some(k) = &self.api_key {
            b = b.header("x-api-key", k);
        }
        b
    }

    /// `initialize` then `notifications/initialized`; returns the initialize result.
    pub async fn initialize(&mut self) -> Value {
        let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion": self.version, "capabilities": {},
            "clientInfo": {"name": "e2e", "version": "1"}}});
        let resp = self.post(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "initialize failed");
        let session = resp
            .headers()
            .get("mcp-session-id")
            .expect("a session id")
            .to_str()
            .unwrap()
            .to_string();
        let v = read_answer(resp).await;
        self.session = Some(session);
        if let Some(ver) = v["result"]["protocolVersion"].as_str() {
            self.version = ver.to_string();
        }
        let r = self
            .post(&json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        v["result"].clone()
    }

    /// A request with this id; returns the whole JSON-RPC response.
    pub async fn request_with_id(&self, id: Value, method: &str, params: Value) -> Value {
        let resp = self
            .post(&json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}))
            .send()
            .await
            .unwrap();
        read_answer(resp).await
    }

    pub async fn request(&self, method: &str, params: Value) -> Value {
        self.request_with_id(json!(1), method, params).await
    }

    /// `tools/call`; returns the whole JSON-RPC response.
    pub async fn call(&self, tool: &str, args: Value) -> Value {
        self.request("tools/call", json!({"name": tool, "arguments": args}))
            .await
    }

    /// `tools/call` and the text of its first content item (panics on an error).
    pub async fn call_text(&self, tool: &str, args: Value) -> String {
        let v = self.call(tool, args).await;
        v["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("no text in {v}"))
            .to_string()
    }

    /// Opens the session's server-to-client stream (`GET /mcp`).
    pub async fn open_stream(&self) -> reqwest::Response {
        self.with_key(self.http.get(&self.url))
            .header("accept", "text/event-stream")
            .header("mcp-session-id", self.session.as_deref().unwrap())
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self) -> reqwest::Response {
        self.with_key(self.http.delete(&self.url))
            .header("mcp-session-id", self.session.as_deref().unwrap())
            .send()
            .await
            .unwrap()
    }

    /// The API key on a request, as a client sends it with every request of its session.
    fn with_key(&self, b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => b.header("x-api-key", k),
            None => b,
        }
    }
}

/// Sends a request and reads its answer's body as JSON (a transport error or a body that is not
/// JSON fails the test).
pub trait SendJson {
    fn send_json(self) -> impl std::future::Future<Output = Value>;
}

impl SendJson for reqwest::RequestBuilder {
    async fn send_json(self) -> Value {
        self.send().await.unwrap().json().await.unwrap()
    }
}

/// The JSON-RPC response in an answer, whether it came as JSON or as SSE (last message wins).
pub async fn read_answer(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let sse = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    if sse {
        let events = sse_messages(&text);
        events
            .into_iter()
            .rev()
            .find(|m| m.get("method").is_none())
            .unwrap_or_else(|| panic!("no response in stream: {text}"))
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("HTTP {status}: not JSON: {text}"))
    }
}

/// The JSON messages in an SSE text (empty events skipped).
pub fn sse_messages(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
                .collect();
            let data = data.join("\n");
            if data.is_empty() {
                None
            } else {
                serde_json::from_str(&data).ok()
            }
        })
        .collect()
}

/// Reads an SSE response as it arrives; each message with the time it arrived.
pub async fn timed_messages(resp: reqwest::Response) -> Vec<(Instant, Value)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(i) = buf.find("\n\n") {
            let ev: String = buf.drain(..i + 2).collect();
            for m in sse_messages(&ev) {
                out.push((Instant::now(), m));
            }
        }
    }
    out
}

/// Reads an open SSE response until its text contains `needle` (true) or `within` passes (false).
pub async fn stream_shows(resp: reqwest::Response, needle: &str, within: Duration) -> bool {
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    tokio::time::timeout(within, async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains(needle) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

/// Polls `f` until it returns Some, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The admin API of a billed gateway.
pub struct Admin {
    pub http: reqwest::Client,
    pub base: String,
}

impl Admin {
    pub fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .header("x-admin-key", ADMIN_KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.base))
            .header("x-admin-key", ADMIN_KEY)
    }

    /// Creates a key; returns its id and secret.
    pub async fn create_key(&self, name: &str, credits: i64) -> (String, String) {
        let r = self
            .post("/admin/keys", &json!({"name": name, "credits": credits}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "creating a key failed");
        let v: Value = r.json().await.unwrap();
        (
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        )
    }

    /// Creates a key from a full request body; returns its id, its secret and the whole answer.
    pub async fn create_key_with(&self, body: Value) -> (String, String, Value) {
        let r = self.post("/admin/keys", &body).send().await.unwrap();
        assert_eq!(r.status(), 201, "creating a key failed: {body}");
        let v: Value = r.json().await.unwrap();
        (
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
            v,
        )
    }

    /// The key as the admin API shows it.
    pub async fn key(&self, id: &str) -> Value {
        let r = self.get(&format!("/admin/keys/{id}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    pub async fn action(&self, id: &str, action: &str) -> reqwest::Response {
        self.post(&format!("/admin/keys/{id}/{action}"), &json!({}))
            .send()
            .await
            .unwrap()
    }

    /// The ledger rows of a key, oldest first: every page, followed by its `nextCursor`.
    pub async fn ledger(&self, id: &str) -> Vec<Value> {
        self.ledger_pages(&format!("keyId={id}")).await.concat()
    }

    /// The ledger's pages for a query (`keyId=…&kind=…&limit=…`), oldest first, each page's
    /// `nextCursor` followed until there is none.
    pub async fn ledger_pages(&self, query: &str) -> Vec<Vec<Value>> {
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let after = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
            let r = self.get(&format!("/admin/ledger?{query}{after}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{query}{after}");
            let v: Value = r.json().await.unwrap();
            let page = v["entries"].as_array().cloned().unwrap_or_default();
            if !page.is_empty() {
                pages.push(page);
            }
            match v["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return pages,
            }
        }
    }

    /// The request log's rows for a query (`keyId=…&outcome=…`), newest first.
    pub async fn requests(&self, query: &str) -> Vec<Value> {
        let r = self.get(&format!("/admin/requests?{query}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        v["requests"].as_array().cloned().unwrap_or_default()
    }

    /// Tops a key up; returns the new balance.
    pub async fn topup(&self, id: &str, credits: i64) -> i64 {
        let r = self
            .post(&format!("/admin/keys/{id}/topup"), &json!({"credits": credits}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["credits"].as_i64().unwrap()
    }
}
