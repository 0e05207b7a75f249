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

/// A new public key id (`key_` and 10 random bytes in hex): 24 characters, so that the copies of it
/// a paid call hands to the database writer are kept inline (`CompactString`), not allocated. An
/// id is a public handle, not a secret; 80 random bits keep a million keys' ids apart by far, and
/// [`super::Ledger::create_key`] draws again on a repeat.
pub fn new_id() -> String {
    let bytes: [u8; 10] = rand::random();
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
    /// The most credits the key may ever spend.
    pub spending_limit: Option<i64>,
    /// Calls and credits per UTC day and month.
    pub quota: Option<Quota>,
}

/// Limits per UTC day and calendar month (each optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Quota {
    pub daily_calls: Option<i64>,
    pub monthly_calls: Option<i64>,
    pub daily_credits: Option<i64>,
    pub monthly_credits: Option<i64>,
}

/// Days since 1970-01-01 (UTC) of a Unix-milliseconds time.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// The civil date (year, month 1–12, day) of a day number (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The day number of a civil date (the inverse of [`civil_from_days`]).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A month number (year × 12 + month − 1) of a Unix-milliseconds time, in UTC.
pub fn month_of(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(day_of(ms));
    y * 12 + m - 1
}

/// Unix milliseconds at the start of a month number.
pub fn month_start_ms(month: i64) -> i64 {
    days_from_civil(month.div_euclid(12), month.rem_euclid(12) + 1, 1) * 86_400_000
}

/// What a key used in the current UTC day and month.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub day: i64,
    pub day_calls: i64,
    pub day_credits: i64,
    pub month: i64,
    pub month_calls: i64,
    pub month_credits: i64,
}

impl Usage {
    /// Starts a new day or month when one has begun.
    fn roll(&mut self, now_ms: i64) {
        let (day, month) = (day_of(now_ms), month_of(now_ms));
        if day != self.day {
            self.day = day;
            self.day_calls = 0;
            self.day_credits = 0;
        }
        if month != self.month {
            self.month = month;
            self.month_calls = 0;
            self.month_credits = 0;
        }
    }
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
    /// Replaced whole on change; a request reads one consistent snapshot. An `ArcSwap`, not a
    /// lock: reading it on every paid call writes no line the other connection thread shares.
    settings: arc_swap::ArcSwap<KeySettings>,
    /// The settings' expiry (Unix ms; `i64::MAX`: never), readable without the settings' lock, so
    /// that reports walking a million keys touch less memory.
    expires_at: AtomicI64,
    /// Day and month usage; its lock also makes the quota check and the debit one step.
    usage: std::sync::Mutex<Usage>,
}

/// Why a debit was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DebitError {
    #[error("insufficient credits: {available} available, {needed} needed")]
    Insufficient { available: i64, needed: i64 },
    #[error("spending limit of {limit} credits reached ({spent} spent, {needed} needed)")]
    SpendingLimit { limit: i64, spent: i64, needed: i64 },
    #[error("{what} quota of {limit} reached")]
    Quota { what: &'static str, limit: i64 },
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
            settings: arc_swap::ArcSwap::from_pointee(KeySettings::default()),
            expires_at: AtomicI64::new(i64::MAX),
            usage: std::sync::Mutex::new(Usage::default()),
        }
    }

    /// Usage in the current day and month (as of `now_ms`).
    pub fn usage(&self, now_ms: i64) -> Usage {
        let mut u = self.usage.lock().unwrap();
        u.roll(now_ms);
        *u
    }

    /// Restores usage counted from the ledger at start-up.
    pub fn restore_usage(&self, u: Usage) {
        *self.usage.lock().unwrap() = u;
    }

    pub fn settings(&self) -> std::sync::Arc<KeySettings> {
        self.settings.load_full()
    }

    /// The settings for the span of one request's checks, without taking a reference count
    /// (hold it briefly: a thread has a few such slots, past them it falls back to one).
    pub fn settings_now(&self) -> arc_swap::Guard<std::sync::Arc<KeySettings>> {
        self.settings.load()
    }

    pub fn set_settings(&self, s: KeySettings) {
        // Callers change a key's settings one at a time (the ledger holds a lock across a change's
        // write and this); a reader may see the new expiry a moment before the new settings.
        self.expires_at
            .store(s.expires_at.unwrap_or(i64::MAX), Ordering::Release);
        self.settings.store(std::sync::Arc::new(s));
    }

    /// Whether the key's expiry has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        now_ms >= self.expires_at.load(Ordering::Acquire)
    }

    /// When the key expires (Unix ms; `i64::MAX`: never).
    pub fn expires_at(&self) -> i64 {
        self.expires_at.load(Ordering::Acquire)
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

    /// Charges a call at `now_ms`: checks the spending limit and quotas, debits `amount` if the key
    /// holds it, and counts the call and the spend, all as one step per key.
    pub fn charge(&self, amount: i64, now_ms: i64) -> Result<i64, DebitError> {
        let mut u = self.usage.lock().unwrap();
        u.roll(now_ms);
        self.check_limits(&u, amount)?;
        let left = self.debit(amount)?;
        u.day_calls += 1;
        u.month_calls += 1;
        u.day_credits += amount;
        u.month_credits += amount;
        self.spent.fetch_add(amount, Ordering::AcqRel);
        self.calls.fetch_add(1, Ordering::AcqRel);
        Ok(left)
    }

    /// The spending limit and quotas, for a charge of `amount` on top of `u`.
    fn check_limits(&self, u: &Usage, amount: i64) -> Result<(), DebitError> {
        let settings = self.settings();
        if let Some(limit) = settings.spending_limit {
            let spent = self.spent();
            if spent + amount > limit {
                return Err(DebitError::SpendingLimit {
                    limit,
                    spent,
                    needed: amount,
                });
            }
        }
        if let Some(q) = &settings.quota {
            for (what, limit, would_be) in [
                ("daily calls", q.daily_calls, u.day_calls + 1),
                ("monthly calls", q.monthly_calls, u.month_calls + 1),
                ("daily credits", q.daily_credits, u.day_credits + amount),
                ("monthly credits", q.monthly_credits, u.month_credits + amount),
            ] {
                if let Some(limit) = limit
                    && would_be > limit
                {
                    return Err(DebitError::Quota { what, limit });
                }
            }
        }
        Ok(())
    }

    /// Whether [`Key::charge`] would succeed now, changing nothing (shadow mode).
    pub fn would_charge(&self, amount: i64, now_ms: i64) -> Result<(), DebitError> {
        let mut u = *self.usage.lock().unwrap();
        u.roll(now_ms);
        self.check_limits(&u, amount)?;
        let available = self.credits();
        if available < amount {
            return Err(DebitError::Insufficient {
                available,
                needed: amount,
            });
        }
        Ok(())
    }

    /// Gives back a charge made at `charged_at_ms`; returns the new balance.
    pub fn refund(&self, amount: i64, charged_at_ms: i64, now_ms: i64) -> i64 {
        self.give_back(amount, charged_at_ms, now_ms, true)
    }

    /// Gives back part of a charge (the call still counts). Returns the new balance.
    pub fn refund_part(&self, amount: i64, charged_at_ms: i64, now_ms: i64) -> i64 {
        self.give_back(amount, charged_at_ms, now_ms, false)
    }

    /// Returns `amount` of a charge made at `charged_at_ms` to the balance and to that day's and
    /// month's usage; `cancel_call`: the call no longer counts either.
    fn give_back(&self, amount: i64, charged_at_ms: i64, now_ms: i64, cancel_call: bool) -> i64 {
        let calls = i64::from(cancel_call);
        {
            let mut u = self.usage.lock().unwrap();
            u.roll(now_ms);
            if u.day == day_of(charged_at_ms) {
                u.day_calls -= calls;
                u.day_credits -= amount;
            }
            if u.month == month_of(charged_at_ms) {
                u.month_calls -= calls;
                u.month_credits -= amount;
            }
        }
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
    fn a_new_key_id_is_key_and_twenty_hex_digits_short_enough_to_be_copied_without_allocating() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000, "ids repeat");
        for id in &ids {
            let digits = id.strip_prefix("key_").expect("starts with key_");
            assert_eq!(digits.len(), 20, "{id}");
            assert!(digits.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
            // What a paid call copies into its ledger op and request-log row.
            assert!(
                !compact_str::CompactString::from(id.as_str()).is_heap_allocated(),
                "{id}"
            );
        }
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
                std::thread::spawn(move || k.charge(1, 0).is_ok())
            })
            .collect();
        let ok = handles.into_iter().map(|h| h.join().unwrap()).filter(|b| *b).count();
        assert_eq!(ok, 10);
        assert_eq!(k.credits(), 0);
    }

    #[test]
    fn civil_dates_round_trip_and_months_start_where_they_should() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        let ms = days_from_civil(2026, 11, 26) * 86_400_000 + 3_600_000;
        assert_eq!(month_of(ms), 2026 * 12 + 10);
        assert_eq!(month_start_ms(month_of(ms)), days_from_civil(2026, 11, 1) * 86_400_000);
        assert_eq!(
            month_start_ms(2026 * 12 + 11),
            days_from_civil(2026, 12, 1) * 86_400_000
        );
    }

    #[test]
    fn quotas_and_the_spending_limit_refuse_without_debiting() {
        let k = key(100);
        k.set_settings(KeySettings {
            spending_limit: Some(5),
            quota: Some(Quota {
                daily_calls: Some(3),
                ..Quota::default()
            }),
            ..KeySettings::default()
        });
        let now = 1_000_000_000_000;
        assert!(k.charge(2, now).is_ok());
        assert!(k.charge(2, now).is_ok());
        assert!(matches!(k.charge(2, now), Err(DebitError::SpendingLimit { .. })));
        assert!(k.charge(1, now).is_ok());
        assert!(matches!(
            k.charge(0, now),
            Err(DebitError::Quota {
                what: "daily calls",
                ..
            })
        ));
        assert_eq!(k.credits(), 95);
        k.refund(1, now, now);
        assert!(k.charge(0, now).is_ok(), "a refund gives the call back to the quota");
        assert!(
            k.charge(0, now + 86_400_000).is_ok(),
            "a new day starts a new daily quota"
        );
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
