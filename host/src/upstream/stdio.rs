//! The stdio upstream: one child process shared by every client, owned by one supervisor task.
//!
//! Tollgate initializes the child itself, once, and answers each client's `initialize` from that
//! result. Every client request gets a fresh upstream id (and progress token) so that two clients
//! sending `id: 1` at once can never receive each other's answer; replies are matched by id, in any
//! order, and mapped back. The child's own requests are answered here and never reach a client.
//! If the child dies, in-flight calls fail at once and it is restarted with backoff.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use super::{Error, Replies, Reply};
use crate::config::{UpstreamConfig, UpstreamKind};
use crate::jsonrpc::{self, Kind, Message, code};
use crate::session::{Session, Sessions};
use crate::sse;

/// The longest line the child may write (16 MiB); a longer one is a protocol error.
const MAX_LINE: usize = 16 << 20;

/// A handle on the shared stdio child.
pub struct StdioUpstream {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    next_id: AtomicU64,
    /// True while a child is up and initialized.
    ready: watch::Sender<bool>,
    sessions: Sessions,
    connect_timeout: Duration,
    stop: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// The live child's writer and initialize result; `None` while (re)starting.
    conn: Option<Conn>,
    /// In-flight requests by upstream id.
    pending: HashMap<u64, Pending>,
}

#[derive(Clone)]
struct Conn {
    writer: mpsc::UnboundedSender<Bytes>,
    /// The child's answer to Tollgate's `initialize`.
    init: Arc<Map<String, Value>>,
}

struct Pending {
    tx: mpsc::UnboundedSender<Message>,
    /// The id the client used, restored on the reply.
    client_id: Value,
    /// The progress token the client used, restored on progress notifications.
    progress_token: Option<Value>,
    /// Whose call this is (for cancellation).
    session: Arc<str>,
}

/// Held by whoever waits for a reply. Dropping it before the reply came (client gone, timeout)
/// forgets the call and tells the child `notifications/cancelled`.
pub struct CallGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap();
        if st.pending.remove(&self.id).is_some()
            && let Some(conn) = &st.conn
        {
            let note = json!({"jsonrpc":"2.0","method":"notifications/cancelled",
                "params":{"requestId": self.id, "reason": "the client abandoned the request"}});
            let _ = conn.writer.send(line(&note));
        }
        drop(st);
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).expect("JSON values serialize");
    b.push(b'\n');
    Bytes::from(b)
}

impl StdioUpstream {
    /// Spawns the supervisor, which starts and initializes the child in the background.
    pub fn start(cfg: &UpstreamConfig, sessions: Sessions) -> StdioUpstream {
        let (ready, _) = watch::channel(false);
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(1),
            ready,
            sessions,
            connect_timeout: cfg.connect_timeout,
            stop,
        });
        tokio::spawn(supervise(shared.clone(), cfg.clone()));
        StdioUpstream { shared }
    }

    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    pub fn shutdown(&self) {
        let _ = self.shared.stop.send(true);
    }

    /// The live connection, waiting up to the connect timeout for a (re)start.
    async fn conn(&self) -> Result<Conn, Error> {
        let deadline = tokio::time::Instant::now() + self.shared.connect_timeout;
        let mut ready = self.shared.ready.subscribe();
        loop {
            if let Some(c) = &self.shared.state.lock().unwrap().conn {
                return Ok(c.clone());
            }
            match tokio::time::timeout_at(deadline, ready.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Error::Unavailable("the gateway is shutting down".into())),
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "the stdio server did not start within {:?}",
                        self.shared.connect_timeout
                    )));
                }
            }
        }
    }

    /// Answers a client's `initialize` from the child's own result, at the version negotiated for
    /// this client. The child is never re-initialized.
    pub async fn initialize(&self, session: &Session, msg: Message) -> Result<Reply, Error> {
        let conn = self.conn().await?;
        let upstream_version = conn
            .init
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or(jsonrpc::LATEST_VERSION);
        let requested = msg.param_str("protocolVersion");
        let version = match requested.as_deref() {
            Some(v) if jsonrpc::is_supported_version(v) && v <= upstream_version => v,
            _ => upstream_version,
        };
        let _ = session.protocol_version.set(version.to_string());
        let mut result = (*conn.init).clone();
        result.insert("protocolVersion".into(), Value::String(version.to_string()));
        let id = msg.id().cloned().unwrap_or(Value::Null);
        Ok(Reply::Done(Message::from_value(&jsonrpc::result_response(
            id,
            Value::Object(result),
        ))))
    }

    /// What `server/discover` reports: the child's identity and capabilities, and the versions
    /// Tollgate speaks (all handshake-era, so a modern client falls back to `initialize`).
    pub async fn discover(&self, msg: &Message) -> Result<Reply, Error> {
        let conn = self.conn().await?;
        let mut result = Map::new();
        result.insert("supportedVersions".into(), json!(jsonrpc::SUPPORTED_VERSIONS));
        for key in ["capabilities", "serverInfo", "instructions"] {
            if let Some(v) = conn.init.get(key) {
                result.insert(key.into(), v.clone());
            }
        }
        let id = msg.id().cloned().unwrap_or(Value::Null);
        Ok(Reply::Done(Message::from_value(&jsonrpc::result_response(
            id,
            Value::Object(result),
        ))))
    }

    /// Forwards a request under a fresh upstream id.
    pub async fn request(&self, session: &Session, mut msg: Message) -> Result<Reply, Error> {
        let client_id = msg.id().cloned().unwrap_or(Value::Null);
        match msg.method() {
            Some("logging/setLevel") => {
                session.wants_logs.store(true, Ordering::Relaxed);
            }
            Some("resources/subscribe") => {
                if let Some(uri) = msg.param_str("uri") {
                    session.subscriptions.lock().unwrap().insert(uri);
                }
            }
            Some("resources/unsubscribe") => {
                if let Some(uri) = msg.param_str("uri") {
                    session.subscriptions.lock().unwrap().remove(&uri);
                    if self.subscribed_elsewhere(&uri) {
                        // Another client still wants updates for it: the child keeps its subscription.
                        let ok = jsonrpc::result_response(client_id, json!({}));
                        return Ok(Reply::Done(Message::from_value(&ok)));
                    }
                }
            }
            _ => {}
        }
        let conn = self.conn().await?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        msg.set_id(Value::from(id));
        let progress_token = match msg.progress_token() {
            Some(_) => msg.replace_progress_token(Value::from(id)),
            None => None,
        };
        let streamable = progress_token.is_some();
        let (tx, rx) = mpsc::unbounded_channel();
        let bytes = {
            let mut b = msg.to_bytes();
            b.push(b'\n');
            Bytes::from(b)
        };
        {
            let mut st = self.shared.state.lock().unwrap();
            if st.conn.is_none() {
                return Err(Error::Unavailable("the stdio server is restarting".into()));
            }
            st.pending.insert(
                id,
                Pending {
                    tx,
                    client_id,
                    progress_token,
                    session: session.id.clone(),
                },
            );
        }
        let guard = CallGuard {
            shared: self.shared.clone(),
            id,
        };
        if conn.writer.send(bytes).is_err() {
            return Err(Error::Unavailable("the stdio server is restarting".into()));
        }
        Ok(Reply::Stream(Replies {
            rx,
            streamable,
            _guard: Some(guard),
        }))
    }

    fn subscribed_elsewhere(&self, uri: &str) -> bool {
        self.shared
            .sessions
            .all()
            .iter()
            .any(|s| s.subscriptions.lock().unwrap().contains(uri))
    }

    /// Forwards a client notification. `initialized` is Tollgate's own business (the child was
    /// initialized once); `cancelled` is mapped to the upstream id of that client's request; client
    /// responses have nothing to answer (the child's requests are answered by Tollgate).
    pub fn notify(&self, session: &Session, msg: Message) {
        if msg.kind != Kind::Notification {
            return;
        }
        match msg.method() {
            Some("notifications/cancelled") => {
                let Some(mut params) = msg.params_value() else { return };
                let Some(request_id) = params.remove("requestId") else {
                    return;
                };
                let reason = params.remove("reason");
                let mut st = self.shared.state.lock().unwrap();
                let found = st
                    .pending
                    .iter()
                    .find(|(_, p)| p.session == session.id && p.client_id == request_id)
                    .map(|(id, _)| *id);
                if let Some(upstream_id) = found {
                    let p = st.pending.remove(&upstream_id).expect("found just now");
                    let _ = p.tx.send(Message::error(
                        p.client_id,
                        code::REQUEST_CANCELLED,
                        "request cancelled by the client",
                    ));
                    if let Some(conn) = &st.conn {
                        let mut params = json!({ "requestId": upstream_id });
                        if let Some(reason) = reason {
                            params["reason"] = reason;
                        }
                        let note = json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":params});
                        let _ = conn.writer.send(line(&note));
                    }
                }
            }
            Some("notifications/initialized") | Some("notifications/roots/list_changed") => {}
            _ => {
                if let Some(conn) = &self.shared.state.lock().unwrap().conn {
                    let mut b = msg.to_bytes();
                    b.push(b'\n');
                    let _ = conn.writer.send(Bytes::from(b));
                }
            }
        }
    }

    /// A `GET /mcp` stream for the session: broadcast notifications arrive on it.
    pub fn open_stream(&self, session: &Session) -> crate::body::Body {
        let (tx, rx) = mpsc::channel(256);
        let _ = tx.try_send(Bytes::from_static(sse::KEEPALIVE));
        // A weak handle: the stream ends when the session drops its sender (DELETE, expiry,
        // shutdown), not when the keep-alive next fails.
        let keepalive = tx.downgrade();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(25));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tx) = keepalive.upgrade() else { break };
                if tx.send(Bytes::from_static(sse::KEEPALIVE)).await.is_err() {
                    break;
                }
            }
        });
        session.attach_stream(tx);
        crate::body::Body::Channel(rx)
    }

    /// Releases the child's resource subscriptions that only this session held.
    pub fn end_session(&self, session: &Session) {
        let uris: Vec<String> = session.subscriptions.lock().unwrap().drain().collect();
        let conn = self.shared.state.lock().unwrap().conn.clone();
        for uri in uris {
            if !self.subscribed_elsewhere(&uri)
                && let Some(conn) = &conn
            {
                let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                let req = json!({"jsonrpc":"2.0","id":id,"method":"resources/unsubscribe","params":{"uri":uri}});
                let _ = conn.writer.send(line(&req));
            }
        }
    }
}

/// Starts the child, initializes it, watches it, restarts it with backoff when it dies.
async fn supervise(shared: Arc<Shared>, cfg: UpstreamConfig) {
    let UpstreamKind::Stdio {
        program,
        args,
        env,
        cwd,
    } = &cfg.kind
    else {
        unreachable!("a stdio upstream is configured with a command")
    };
    let mut stop = shared.stop.subscribe();
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        match cmd.spawn() {
            Ok(child) => {
                run_child(&shared, child, &cfg).await;
            }
            Err(e) => tracing::error!(program = %program, error = %e, "cannot start the stdio upstream"),
        }
        fail_all(&shared);
        if *stop.borrow() {
            return;
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        tracing::warn!(
            backoff_ms = backoff.as_millis() as u64,
            "stdio upstream stopped; restarting"
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(cfg.restart_backoff_max);
    }
}

/// Marks the child gone and fails every in-flight call at once.
fn fail_all(shared: &Shared) {
    let drained: Vec<Pending> = {
        let mut st = shared.state.lock().unwrap();
        st.conn = None;
        st.pending.drain().map(|(_, p)| p).collect()
    };
    shared.ready.send_replace(false);
    for p in drained {
        let _ = p.tx.send(Message::error(
            p.client_id,
            code::UPSTREAM_CLOSED,
            "the upstream server exited while the call was in flight",
        ));
    }
}

/// Runs one child from spawn to exit.
async fn run_child(shared: &Arc<Shared>, mut child: tokio::process::Child, cfg: &UpstreamConfig) {
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    tracing::info!(pid, "stdio upstream started");

    let (writer, mut write_rx) = mpsc::unbounded_channel::<Bytes>();
    let write_task = tokio::spawn(async move {
        while let Some(first) = write_rx.recv().await {
            if stdin.write_all(&first).await.is_err() {
                break;
            }
            // Write whatever else is queued before flushing: one syscall batch under load.
            while let Ok(more) = write_rx.try_recv() {
                if stdin.write_all(&more).await.is_err() {
                    return;
                }
            }
            if stdin.flush().await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            tracing::info!(target: "tollgate::upstream::stderr", pid, "{l}");
        }
    });
    let reader = {
        let shared = shared.clone();
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut rd = BufReader::with_capacity(64 * 1024, stdout);
            let mut buf = Vec::with_capacity(4096);
            loop {
                buf.clear();
                match (&mut rd).take(MAX_LINE as u64).read_until(b'\n', &mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {
                        if buf.len() >= MAX_LINE && buf.last() != Some(&b'\n') {
                            tracing::error!("stdio upstream wrote a line over 16 MiB; restarting it");
                            break;
                        }
                        on_line(&shared, &writer, &buf);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the stdio upstream failed");
                        break;
                    }
                }
            }
        })
    };

    // Tollgate's own handshake, once per child.
    // Ids stay small integers: JavaScript servers lose precision past 2^53.
    let init_id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    shared.state.lock().unwrap().pending.insert(
        init_id,
        Pending {
            tx,
            client_id: Value::from(init_id),
            progress_token: None,
            session: Arc::from(""),
        },
    );
    let init = json!({"jsonrpc":"2.0","id":init_id,"method":"initialize","params":{
        "protocolVersion": jsonrpc::LATEST_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "tollgate", "version": env!("CARGO_PKG_VERSION")}
    }});
    let _ = writer.send(line(&init));
    let mut stop = shared.stop.subscribe();
    let answered = tokio::select! {
        r = tokio::time::timeout(cfg.connect_timeout, rx.recv()) => r,
        _ = stop.changed() => Ok(None),
    };
    match answered {
        Ok(Some(resp)) => match resp.result_value() {
            Some(result) => {
                let _ = writer.send(line(&json!({"jsonrpc":"2.0","method":"notifications/initialized"})));
                shared.state.lock().unwrap().conn = Some(Conn {
                    writer: writer.clone(),
                    init: Arc::new(result.clone()),
                });
                shared.ready.send_replace(true);
                let version = result.get("protocolVersion").and_then(|v| v.as_str()).unwrap_or("?");
                tracing::info!(pid, version, "stdio upstream initialized");
                tokio::select! {
                    _ = reader => {}
                    _ = stop.changed() => {}
                }
            }
            None => tracing::error!(
                pid,
                response = %String::from_utf8_lossy(&resp.to_bytes()),
                "the stdio upstream refused initialize"
            ),
        },
        Ok(None) => {}
        Err(_) => tracing::error!(pid, timeout = ?cfg.connect_timeout, "the stdio upstream did not answer initialize"),
    }
    shared.state.lock().unwrap().pending.remove(&init_id);
    write_task.abort();
    let _ = child.start_kill();
    match child.wait().await {
        Ok(status) => tracing::warn!(pid, %status, "stdio upstream exited"),
        Err(e) => tracing::warn!(pid, error = %e, "waiting for the stdio upstream failed"),
    }
}

/// Handles one line from the child.
fn on_line(shared: &Shared, writer: &mpsc::UnboundedSender<Bytes>, bytes: &[u8]) {
    let text = bytes.trim_ascii();
    if text.is_empty() {
        return;
    }
    let mut msg = match Message::parse(text) {
        Ok(m) => m,
        Err(e) => {
            let shown = String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
            tracing::warn!(line = %shown, error = %e, "stdio upstream wrote a line that is not a JSON-RPC message");
            return;
        }
    };
    match msg.kind {
        Kind::Response => {
            let Some(id) = msg.id().and_then(Value::as_u64) else {
                tracing::warn!("stdio upstream answered an id Tollgate never sent");
                return;
            };
            let pending = shared.state.lock().unwrap().pending.remove(&id);
            match pending {
                Some(p) => {
                    msg.set_id(p.client_id);
                    let _ = p.tx.send(msg);
                }
                None => tracing::debug!(id, "reply to a call no longer waited for"),
            }
        }
        Kind::Request => {
            let id = msg.id().cloned().unwrap_or(Value::Null);
            let reply = match msg.method() {
                Some("ping") => jsonrpc::result_response(id, json!({})),
                Some("roots/list") => jsonrpc::result_response(id, json!({"roots": []})),
                Some(m) => jsonrpc::error_response(
                    id,
                    code::METHOD_NOT_FOUND,
                    &format!("{m} is not available through this gateway"),
                    None,
                ),
                None => return,
            };
            let _ = writer.send(line(&reply));
        }
        Kind::Notification => route_notification(shared, msg),
    }
}

/// Sends a child's notification to whom it concerns: progress to the caller alone, list changes to
/// every open stream, resource updates to subscribers, log messages to sessions that asked for them.
fn route_notification(shared: &Shared, mut msg: Message) {
    let method = msg.method().unwrap_or_default().to_string();
    match method.as_str() {
        "notifications/progress" => {
            let Some(token) = msg
                .params_value()
                .and_then(|p| p.get("progressToken").and_then(Value::as_u64))
            else {
                return;
            };
            let st = shared.state.lock().unwrap();
            if let Some(p) = st.pending.get(&token)
                && let Some(original) = &p.progress_token
            {
                msg.replace_notification_token(original.clone());
                let _ = p.tx.send(msg);
            }
        }
        "notifications/cancelled" => {}
        "notifications/message" => {
            let frame = sse::frame(&msg.to_bytes());
            for s in shared.sessions.all() {
                if s.wants_logs.load(Ordering::Relaxed) {
                    s.push(frame.clone());
                }
            }
        }
        "notifications/resources/updated" => {
            let Some(uri) = msg.param_str("uri") else {
                return;
            };
            let frame = sse::frame(&msg.to_bytes());
            for s in shared.sessions.all() {
                if s.subscriptions.lock().unwrap().contains(&uri) {
                    s.push(frame.clone());
                }
            }
        }
        m if m.ends_with("/list_changed") => {
            let frame = sse::frame(&msg.to_bytes());
            for s in shared.sessions.all() {
                s.push(frame.clone());
            }
        }
        other => tracing::debug!(method = other, "dropped a stdio upstream notification"),
    }
}
