//! Client sessions: the `Mcp-Session-Id`s Tollgate mints, what each session holds (negotiated
//! version, upstream session, its server-to-client stream, its resource subscriptions), and expiry.
//!
//! Locks here are `std::sync` locks held for a map operation at most, never across an `.await`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

/// One client session.
pub struct Session {
    /// The id the client sends as `Mcp-Session-Id` (128 random bits, hex).
    pub id: Arc<str>,
    /// The id of the API key that started it (billing on and a key sent with `initialize`):
    /// only requests with that key may use it. Without one, any request with the id may.
    owner: Option<Box<str>>,
    /// The protocol revision negotiated at `initialize`.
    pub protocol_version: OnceLock<String>,
    /// For an HTTP upstream: the upstream's own session id for this client alone (kept as the
    /// header value it is sent as).
    pub upstream_session: OnceLock<http::HeaderValue>,
    /// The open `GET /mcp` stream, if any (stdio upstream): server notifications go here.
    stream: Mutex<Option<mpsc::Sender<Bytes>>>,
    /// The client asked for log messages (`logging/setLevel`).
    pub wants_logs: AtomicBool,
    /// Resource URIs this session subscribed to (stdio upstream).
    pub subscriptions: Mutex<HashSet<String>>,
    /// Milliseconds since the registry's epoch when the session was last used.
    last_used: AtomicU64,
    /// Ended by `DELETE`, expiry or shutdown.
    closed: AtomicBool,
}

impl Session {
    /// The id of the API key that started the session, if one did.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Attaches a new server-to-client stream, replacing (and so ending) an older one.
    pub fn attach_stream(&self, tx: mpsc::Sender<Bytes>) {
        *self.stream.lock().unwrap() = Some(tx);
    }

    /// Sends a frame on the session's open stream; false if there is none or it is full or gone.
    pub fn push(&self, frame: Bytes) -> bool {
        let guard = self.stream.lock().unwrap();
        match guard.as_ref() {
            Some(tx) => tx.try_send(frame).is_ok(),
            None => false,
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.stream.lock().unwrap().take();
    }
}

/// Why a session could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the gateway holds its maximum of {0} sessions")]
    TooMany(usize),
}

/// The registry of live sessions; cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    map: RwLock<foldhash::HashMap<Arc<str>, Arc<Session>>>,
    max: usize,
    idle: Duration,
    epoch: Instant,
}

impl Sessions {
    pub fn new(max: usize, idle: Duration) -> Sessions {
        Sessions {
            inner: Arc::new(Inner {
                map: RwLock::new(foldhash::HashMap::default()),
                max,
                idle,
                epoch: Instant::now(),
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// Mints a new session, bound to the API key `owner` if given.
    pub fn create(&self, owner: Option<&str>) -> Result<Arc<Session>, SessionError> {
        let id: Arc<str> = format!("{:032x}", rand::random::<u128>()).into();
        let session = Arc::new(Session {
            id: id.clone(),
            owner: owner.map(Box::from),
            protocol_version: OnceLock::new(),
            upstream_session: OnceLock::new(),
            stream: Mutex::new(None),
            wants_logs: AtomicBool::new(false),
            subscriptions: Mutex::new(HashSet::new()),
            last_used: AtomicU64::new(self.now_ms()),
            closed: AtomicBool::new(false),
        });
        let mut map = self.inner.map.write().unwrap();
        if map.len() >= self.inner.max {
            return Err(SessionError::TooMany(self.inner.max));
        }
        map.insert(id, session.clone());
        Ok(session)
    }

    /// Finds a live session and marks it used.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let s = self.inner.map.read().unwrap().get(id).cloned()?;
        s.last_used.store(self.now_ms(), Ordering::Relaxed);
        Some(s)
    }

    /// Ends a session; returns it if it was live.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let s = self.inner.map.write().unwrap().remove(id)?;
        s.close();
        Some(s)
    }

    /// Every live session (a snapshot).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.inner.map.read().unwrap().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.inner.map.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends the sessions idle longer than the configured timeout; returns them.
    pub fn expire_idle(&self) -> Vec<Arc<Session>> {
        let now = self.now_ms();
        let idle = self.inner.idle.as_millis() as u64;
        let mut map = self.inner.map.write().unwrap();
        let dead: Vec<Arc<str>> = map
            .iter()
            .filter(|(_, s)| now.saturating_sub(s.last_used.load(Ordering::Relaxed)) > idle)
            .map(|(k, _)| k.clone())
            .collect();
        dead.iter()
            .filter_map(|k| map.remove(k))
            .inspect(|s| s.close())
            .collect()
    }

    /// Ends every session (shutdown): their streams end so that connections can drain.
    pub fn close_all(&self) {
        let mut map = self.inner.map.write().unwrap();
        for (_, s) in map.drain() {
            s.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_until_it_is_removed() {
        let sessions = Sessions::new(10, Duration::from_secs(60));
        let s = sessions.create(None).unwrap();
        assert!(sessions.get(&s.id).is_some());
        sessions.remove(&s.id);
        assert!(sessions.get(&s.id).is_none());
        assert!(s.is_closed());
    }

    #[test]
    fn the_session_limit_is_enforced() {
        let sessions = Sessions::new(2, Duration::from_secs(60));
        sessions.create(None).unwrap();
        sessions.create(None).unwrap();
        assert!(matches!(sessions.create(None), Err(SessionError::TooMany(2))));
    }

    #[test]
    fn session_ids_are_unique_and_unguessable_in_length() {
        let sessions = Sessions::new(100, Duration::from_secs(60));
        let a = sessions.create(None).unwrap();
        let b = sessions.create(None).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 32);
    }

    #[test]
    fn idle_sessions_expire() {
        let sessions = Sessions::new(10, Duration::from_millis(1));
        let s = sessions.create(None).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let expired = sessions.expire_idle();
        assert_eq!(expired.len(), 1);
        assert!(sessions.get(&s.id).is_none());
    }
}
