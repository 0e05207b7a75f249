//! API keys: the secret shown once, its SHA-256 hash (all that is stored), and the live record of
//! each key (status and balance as atomics, so a debit is one compare-and-swap).

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The prefix of every secret, so a leaked one is recognisable (and scannable) as a Tollgate key.
pub const SECRET_PREFIX: &str = "tg_";

/// A key's SHA-256 hash: what the store keeps and looks keys up by.
pub type KeyHash = [u8; 32];

/// A new secret: `tg_` and 32 random bytes in hex. Shown to the operator once, never stored.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{SECRET_PREFIX}{}", hex(&bytes))
}

/// A new public key id (`key_` and 12 random bytes in hex).
pub fn new_id() -> String {
    let bytes: [u8; 12] = rand::random();
    format!("key_{}", hex(&bytes))
}

pub fn hash(secret: &str) -> KeyHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// What is shown of a key after creation: enough to recognise it, useless to an attacker.
pub fn display_prefix(secret: &str) -> String {
    secret.chars().take(SECRET_PREFIX.len() + 6).collect()
}

/// Compares two hashes in constant time.
pub fn same_hash(a: &KeyHash, b: &KeyHash) -> bool {
    a.ct_eq(b).into()
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// A key's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Active = 0,
    Suspended = 1,
    Revoked = 2,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Suspended => "suspended",
            Status::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "suspended" => Some(Status::Suspended),
            "revoked" => Some(Status::Revoked),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> Status {
        match v {
            0 => Status::Active,
            1 => Status::Suspended,
            _ => Status::Revoked,
        }
    }
}

/// What an operator sets on a key besides its credits. Stored as JSON with the key.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KeySettings {
    pub tags: Vec<String>,
    pub namespace: Option<String>,
    /// Unix milliseconds after which the key is refused.
    pub expires_at: Option<i64>,
    /// When set, the only tools the key may call (and see in `tools/list`).
    pub allowed_tools: Option<Vec<String>>,
    /// Tools the key may never call.
    pub denied_tools: Vec<String>,
    /// When set, the only client addresses (single addresses or CIDR ranges) the key is accepted from.
    pub ip_allowlist: Option<Vec<ipnet::IpNet>>,
    /// Calls per period for the whole key, e.g. `"100/min"` (overrides the gateway's default).
    pub rate_limit: Option<String>,
    /// Calls per period for one tool of this key, e.g. `{"search": "10/min"}`.
    pub tool_rate_limits: std::collections::BTreeMap<String, String>,
}

impl KeySettings {
    /// Whether the key may call (and see) this tool.
    pub fn allows_tool(&self, tool: &str) -> bool {
        !self.denied_tools.iter().any(|t| t == tool)
            && self.allowed_tools.as_ref().is_none_or(|a| a.iter().any(|t| t == tool))
    }

    /// Whether a call from `ip` is accepted.
    pub fn allows_ip(&self, ip: std::net::IpAddr) -> bool {
        let ip = canonical(ip);
        self.ip_allowlist
            .as_ref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
    }

    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|e| now_ms >= e)
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is.
pub fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The live state of one key.
#[derive(Debug)]
pub struct Key {
    /// Public handle (`key_…`), used by the admin API and in the ledger.
    pub id: String,
    pub name: String,
    /// SHA-256 of the current secret.
    pub hash: std::sync::RwLock<KeyHash>,
    /// The first characters of the current secret, for display.
    pub prefix: std::sync::RwLock<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    status: AtomicU8,
    /// Credits available now (reservations already taken out).
    credits: AtomicI64,
    /// Credits kept by settled calls.
    spent: AtomicI64,
    /// Calls charged.
    calls: AtomicU64,
    /// Replaced whole on change; a request reads one consistent snapshot.
    settings: std::sync::RwLock<std::sync::Arc<KeySettings>>,
}

/// Why a debit was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DebitError {
    #[error("insufficient credits: {available} available, {needed} needed")]
    Insufficient { available: i64, needed: i64 },
}

impl Key {
    pub fn new(id: String, name: String, hash: KeyHash, prefix: String, created_at: i64, credits: i64) -> Key {
        Key {
            id,
            name,
            hash: std::sync::RwLock::new(hash),
            prefix: std::sync::RwLock::new(prefix),
            created_at,
            status: AtomicU8::new(Status::Active as u8),
            credits: AtomicI64::new(credits),
            spent: AtomicI64::new(0),
            calls: AtomicU64::new(0),
            settings: std::sync::RwLock::new(std::sync::Arc::new(KeySettings::default())),
        }
    }

    pub fn settings(&self) -> std::sync::Arc<KeySettings> {
        self.settings.read().unwrap().clone()
    }

    pub fn set_settings(&self, s: KeySettings) {
        *self.settings.write().unwrap() = std::sync::Arc::new(s);
    }

    pub fn status(&self) -> Status {
        Status::from_u8(self.status.load(Ordering::Acquire))
    }

    pub fn set_status(&self, s: Status) {
        self.status.store(s as u8, Ordering::Release);
    }

    pub fn credits(&self) -> i64 {
        self.credits.load(Ordering::Acquire)
    }

    pub fn spent(&self) -> i64 {
        self.spent.load(Ordering::Acquire)
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Acquire)
    }

    /// Restores counters loaded from the store.
    pub fn restore(&self, credits: i64, spent: i64, calls: u64, status: Status) {
        self.credits.store(credits, Ordering::Release);
        self.spent.store(spent, Ordering::Release);
        self.calls.store(calls, Ordering::Release);
        self.set_status(status);
    }

    /// Takes `amount` credits if (and only if) the key holds them: one atomic check-and-debit.
    pub fn debit(&self, amount: i64) -> Result<i64, DebitError> {
        let mut current = self.credits.load(Ordering::Acquire);
        loop {
            if current < amount {
                return Err(DebitError::Insufficient {
                    available: current,
                    needed: amount,
                });
            }
            match self
                .credits
                .compare_exchange_weak(current, current - amount, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(current - amount),
                Err(actual) => current = actual,
            }
        }
    }

    /// Adds credits (a top-up or grant); returns the new balance.
    pub fn credit(&self, amount: i64) -> i64 {
        self.credits.fetch_add(amount, Ordering::AcqRel) + amount
    }

    /// Charges a call: debits `amount` if the key holds it, and counts the call and the spend.
    pub fn charge(&self, amount: i64) -> Result<i64, DebitError> {
        let left = self.debit(amount)?;
        self.spent.fetch_add(amount, Ordering::AcqRel);
        self.calls.fetch_add(1, Ordering::AcqRel);
        Ok(left)
    }

    /// Gives a charge back; returns the new balance.
    pub fn refund(&self, amount: i64) -> i64 {
        self.spent.fetch_sub(amount, Ordering::AcqRel);
        self.credit(amount)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(credits: i64) -> Key {
        Key::new("key_1".into(), "k".into(), hash("tg_x"), "tg_x".into(), 0, credits)
    }

    #[test]
    fn a_secret_is_long_random_and_recognisable() {
        let a = new_secret();
        let b = new_secret();
        assert!(a.starts_with("tg_"));
        assert_eq!(a.len(), 3 + 64);
        assert_ne!(a, b);
        assert_eq!(display_prefix(&a).len(), 9);
        assert!(same_hash(&hash(&a), &hash(&a)));
        assert!(!same_hash(&hash(&a), &hash(&b)));
    }

    #[test]
    fn a_debit_never_overdraws_even_when_many_threads_race() {
        let k = Arc::new(key(10));
        let handles: Vec<_> = (0..64)
            .map(|_| {
                let k = k.clone();
                std::thread::spawn(move || k.debit(1).is_ok())
            })
            .collect();
        let ok = handles.into_iter().map(|h| h.join().unwrap()).filter(|b| *b).count();
        assert_eq!(ok, 10);
        assert_eq!(k.credits(), 0);
    }

    #[test]
    fn an_insufficient_balance_is_refused_and_left_untouched() {
        let k = key(3);
        assert_eq!(
            k.debit(5),
            Err(DebitError::Insufficient {
                available: 3,
                needed: 5
            })
        );
        assert_eq!(k.credits(), 3);
        assert_eq!(k.debit(3), Ok(0));
        assert_eq!(k.credit(2), 2);
    }
}
