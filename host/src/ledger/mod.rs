//! The ledger: API keys with their balances in memory (a debit is one atomic check-and-debit) and
//! every change durable in the store (a ledger row per grant, top-up, charge and refund, keyed by
//! request id so that nothing is applied twice).
//!
//! The narrow interface the gate uses — authenticate, reserve, settle, top up, key lifecycle — is
//! all here, so another backend (a shared database for several gateways) slots in behind it.

pub mod journal;
pub mod keys;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub use keys::{DebitError, Key, KeySettings, Quota, Status, Usage};
pub use sqlite::{
    Cursor, DeadLetter, Entry, EventRow, LedgerFilter, LedgerRow, LogFollower, Op, RequestFilter, RequestRow,
    Retention, Store, StoreError, is_usage,
};

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Debit(#[from] DebitError),
    #[error("no key with id {0:?}")]
    UnknownKey(String),
    #[error("the key is revoked")]
    Revoked,
}

/// Keys and balances; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    by_hash: RwLock<foldhash::HashMap<keys::KeyHash, Arc<Key>>>,
    /// Ordered by id, so that listings page with a cursor.
    by_id: RwLock<BTreeMap<String, Arc<Key>>>,
    /// Every key in the order it was created (and loaded), for walks over all of them: the keys
    /// were allocated in this order, so a walk reads memory front to back instead of hopping
    /// (a million keys: ~15 ms instead of ~100 ms).
    all: RwLock<Vec<Arc<Key>>>,
    store: Store,
    /// Held across a settings change's write and its swap into the key, so that changes reach
    /// memory in the order the database has them (and a key's expiry always matches its settings).
    settings_change: tokio::sync::Mutex<()>,
}

/// Credits taken for one call, not yet settled.
#[must_use = "a reservation must be settled (kept or refunded)"]
#[derive(Debug)]
pub struct Reservation {
    pub key: Arc<Key>,
    pub amount: i64,
    pub request_id: compact_str::CompactString,
    /// When it was charged (Unix ms), to give a refund back to the right day and month.
    pub at: i64,
}

impl Ledger {
    /// Opens the store under `dir` and loads every key with its stored balance (see
    /// [`Store::open`] for `power_safe`).
    pub fn open(dir: &Path, power_safe: bool, retention: Retention) -> Result<Ledger, StoreError> {
        let (store, stored) = Store::open(dir, power_safe, retention)?;
        let now = now_ms();
        let usage = store.usage_since(
            keys::day_of(now) * 86_400_000,
            keys::month_start_ms(keys::month_of(now)),
        )?;
        let mut by_hash = foldhash::HashMap::with_capacity_and_hasher(stored.len(), Default::default());
        let mut by_id = BTreeMap::new();
        let mut all = Vec::with_capacity(stored.len());
        for s in stored {
            let key = Arc::new(Key::new(s.id.clone(), s.name, s.hash, s.prefix, s.created_at, 0));
            key.restore(s.credits, s.spent, s.calls, s.status);
            if let Some((day_calls, day_credits, month_calls, month_credits)) = usage.get(&s.id) {
                key.restore_usage(Usage {
                    day: keys::day_of(now),
                    day_calls: *day_calls,
                    day_credits: *day_credits,
                    month: keys::month_of(now),
                    month_calls: *month_calls,
                    month_credits: *month_credits,
                });
            }
            match serde_json::from_str::<KeySettings>(&s.settings) {
                Ok(settings) => key.set_settings(settings),
                Err(e) => tracing::error!(key_id = %s.id, error = %e, "unreadable key settings; using none"),
            }
            by_hash.insert(s.hash, key.clone());
            all.push(key.clone());
            by_id.insert(s.id, key);
        }
        Ok(Ledger {
            inner: Arc::new(Inner {
                by_hash: RwLock::new(by_hash),
                by_id: RwLock::new(by_id),
                all: RwLock::new(all),
                store,
                settings_change: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Creates a key holding `credits`; returns it and its secret (shown once, never stored).
    /// Durable before it returns.
    pub async fn create_key(
        &self,
        name: &str,
        credits: i64,
        settings: KeySettings,
    ) -> Result<(Arc<Key>, String), LedgerError> {
        let secret = keys::new_secret();
        let hash = keys::hash(&secret);
        let id = loop {
            let id = keys::new_id();
            if !self.inner.by_id.read().unwrap().contains_key(&id) {
                break id;
            }
        };
        let prefix = keys::display_prefix(&secret);
        let now = now_ms();
        let key = Arc::new(Key::new(id.clone(), name.to_string(), hash, prefix.clone(), now, 0));
        let store = &self.inner.store;
        store.submit(Op::CreateKey {
            id: id.clone(),
            name: name.to_string(),
            hash,
            prefix,
            created_at: now,
            settings: serde_json::to_string(&settings).expect("settings serialize"),
        })?;
        key.set_settings(settings);
        let seq = store.submit(Op::Ledger {
            request_id: compact_str::format_compact!("grant-{id}"),
            key_id: id.as_str().into(),
            entry: Entry::Grant,
            amount: credits,
            at: now,
        })?;
        store.durable(seq).await?;
        key.credit(credits);
        self.inner.by_hash.write().unwrap().insert(hash, key.clone());
        self.inner.by_id.write().unwrap().insert(id, key.clone());
        self.inner.all.write().unwrap().push(key.clone());
        Ok((key, secret))
    }

    /// The key a secret belongs to, if any (looked up by hash, compared in constant time).
    ///
    /// The hash is compared with the one the map holds the key under, inside the map's read lock:
    /// a rotation replaces that entry under the write lock, so this sees the key's current hash
    /// without reading (and locking) the key's own copy.
    pub fn authenticate(&self, secret: &str) -> Option<Arc<Key>> {
        let hash = keys::hash(secret);
        let by_hash = self.inner.by_hash.read().unwrap();
        let (stored, key) = by_hash.get_key_value(&hash)?;
        keys::same_hash(stored, &hash).then(|| key.clone())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Key>> {
        self.inner.by_id.read().unwrap().get(id).cloned()
    }

    /// Up to `limit` keys after `cursor` (by id) that pass `filter`. A filter few keys pass walks
    /// the whole map (~0.15 s at a million keys), so the map is read in chunks: the walk never
    /// holds its lock for long, and a key created meanwhile may or may not be seen.
    pub fn page(&self, cursor: Option<&str>, limit: usize, filter: impl Fn(&Key) -> bool) -> Vec<Arc<Key>> {
        self.page_in_chunks(cursor, limit, 16_384, filter)
    }

    fn page_in_chunks(
        &self,
        cursor: Option<&str>,
        limit: usize,
        chunk: usize,
        filter: impl Fn(&Key) -> bool,
    ) -> Vec<Arc<Key>> {
        use std::ops::Bound;
        let mut found = Vec::new();
        let mut after = cursor.map(str::to_string);
        while found.len() < limit {
            let map = self.inner.by_id.read().unwrap();
            let start = after.take().map_or(Bound::Unbounded, Bound::Excluded);
            let mut seen = 0;
            let mut last = None;
            for (id, k) in map.range((start, Bound::Unbounded)).take(chunk) {
                seen += 1;
                last = Some(id);
                if filter(k) {
                    found.push(k.clone());
                    if found.len() == limit {
                        break;
                    }
                }
            }
            if seen < chunk {
                break;
            }
            // The next chunk starts after this one's last key, read again under a new lock.
            after = last.cloned();
        }
        found
    }

    /// Calls `f` on every key, in creation order. The list is read in chunks, so a long walk
    /// never holds its lock for long (a key created meanwhile may or may not be seen).
    pub fn for_each(&self, mut f: impl FnMut(&Key)) {
        const CHUNK: usize = 16_384;
        let mut start = 0;
        loop {
            let all = self.inner.all.read().unwrap();
            let end = (start + CHUNK).min(all.len());
            for k in &all[start..end] {
                f(k);
            }
            if end == all.len() {
                return;
            }
            start = end;
        }
    }

    pub fn len(&self) -> usize {
        self.inner.by_id.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes `amount` credits for the call `request_id`, atomically, in memory. Nothing is written
    /// yet: the charge row is written with the call's settlement ([`Ledger::settle`]), in the same
    /// journal record as the refund (if any) and the request-log row, so a call costs one append.
    /// If the gateway dies before settling, the call was never answered and is not charged (as
    /// a timed-out call is refunded by default); the restored balance comes from the store.
    /// Refused once the store has failed: a call that could not be recorded is not forwarded.
    /// Takes the caller's reference to the key (no count to bump on a line both threads write).
    pub fn reserve(&self, key: Arc<Key>, amount: i64, request_id: &str) -> Result<Reservation, LedgerError> {
        self.reserve_at(key, amount, request_id, now_ms())
    }

    /// [`Ledger::reserve`] at `at` (milliseconds since the epoch, read once for the whole call).
    pub fn reserve_at(
        &self,
        key: Arc<Key>,
        amount: i64,
        request_id: &str,
        at: i64,
    ) -> Result<Reservation, LedgerError> {
        self.inner.store.check()?;
        key.charge(amount, at)?;
        Ok(Reservation {
            key,
            amount,
            request_id: request_id.into(),
            at,
        })
    }

    /// Settles a reservation: records its charge, keeps `kept` of it and refunds the rest (a
    /// refund row; keeping nothing cancels the call in the quotas too), and records the call's
    /// request-log row with them — journaled together, in one record (the row is what usage
    /// webhooks deliver). Returns the sequence number to wait for before answering the client
    /// (0 once journaled; the commit's without a journal).
    pub fn settle(&self, r: Reservation, kept: i64, row: RequestRow) -> Result<u64, LedgerError> {
        let refund = r.amount - kept.clamp(0, r.amount);
        // The request-log row was made just now: its time is the settlement's (never before the
        // charge's, which would move the key's usage back a day).
        let now = row.created_at.max(r.at);
        let ledger_row = |entry, amount, at| Op::Ledger {
            request_id: r.request_id.clone(),
            key_id: r.key.id.as_str().into(),
            entry,
            amount,
            at,
        };
        let refund_entry = match refund {
            0 => None,
            _ if refund == r.amount => Some(Entry::Refund),
            _ => Some(Entry::PartialRefund),
        };
        let charge = ledger_row(Entry::Charge, r.amount, r.at);
        let submitted = match refund_entry {
            None => self.inner.store.submit_money([charge, Op::Request(row)]),
            Some(entry) => {
                let refund_row = ledger_row(entry, refund, now);
                self.inner.store.submit_money([charge, refund_row, Op::Request(row)])
            }
        };
        let seq = match submitted {
            Ok(seq) => seq,
            Err(e) => {
                // Nothing was recorded: the call is not charged.
                r.key.refund(r.amount, r.at, now);
                return Err(e.into());
            }
        };
        match refund_entry {
            None => {}
            Some(Entry::Refund) => {
                r.key.refund(refund, r.at, now);
            }
            Some(_) => {
                r.key.refund_part(refund, r.at, now);
            }
        }
        Ok(seq)
    }

    /// Waits until store operation `seq` is committed.
    pub async fn durable(&self, seq: u64) -> Result<(), LedgerError> {
        Ok(self.inner.store.durable(seq).await?)
    }

    /// Adds credits to a key; durable before it returns. Returns the new balance.
    pub async fn topup(&self, id: &str, amount: i64, request_id: &str) -> Result<i64, LedgerError> {
        let key = self.get(id).ok_or_else(|| LedgerError::UnknownKey(id.to_string()))?;
        if key.status() == Status::Revoked {
            return Err(LedgerError::Revoked);
        }
        self.inner
            .store
            .write(Op::Ledger {
                request_id: request_id.into(),
                key_id: id.into(),
                entry: Entry::Topup,
                amount,
                at: now_ms(),
            })
            .await?;
        Ok(key.credit(amount))
    }

    /// Gives a key a new secret (returned, shown once); the old one stops working at once. Id,
    /// balance and settings stay. Durable before it returns.
    pub async fn rotate(&self, id: &str) -> Result<(Arc<Key>, String), LedgerError> {
        let key = self.get(id).ok_or_else(|| LedgerError::UnknownKey(id.to_string()))?;
        if key.status() == Status::Revoked {
            return Err(LedgerError::Revoked);
        }
        let secret = keys::new_secret();
        let hash = keys::hash(&secret);
        let prefix = keys::display_prefix(&secret);
        {
            // The old secret is refused from here on.
            let mut by_hash = self.inner.by_hash.write().unwrap();
            let old = *key.hash.read().unwrap();
            by_hash.remove(&old);
            *key.hash.write().unwrap() = hash;
            *key.prefix.write().unwrap() = prefix.clone();
            by_hash.insert(hash, key.clone());
        }
        self.inner
            .store
            .write(Op::Rotate {
                key_id: id.to_string(),
                hash,
                prefix,
            })
            .await?;
        Ok((key, secret))
    }

    /// Replaces a key's settings; durable before it returns.
    pub async fn set_settings(&self, id: &str, settings: KeySettings) -> Result<Arc<Key>, LedgerError> {
        let key = self.get(id).ok_or_else(|| LedgerError::UnknownKey(id.to_string()))?;
        if key.status() == Status::Revoked {
            return Err(LedgerError::Revoked);
        }
        let _one_at_a_time = self.inner.settings_change.lock().await;
        self.inner
            .store
            .write(Op::SetSettings {
                key_id: id.to_string(),
                settings: serde_json::to_string(&settings).expect("settings serialize"),
            })
            .await?;
        key.set_settings(settings);
        Ok(key)
    }

    /// Changes a key's status; durable before it returns. A revoked key stays revoked.
    pub async fn set_status(&self, id: &str, status: Status) -> Result<Arc<Key>, LedgerError> {
        let key = self.get(id).ok_or_else(|| LedgerError::UnknownKey(id.to_string()))?;
        if key.status() == Status::Revoked && status != Status::Revoked {
            return Err(LedgerError::Revoked);
        }
        // Refuse at once in memory; the row follows.
        key.set_status(status);
        self.inner
            .store
            .write(Op::SetStatus {
                key_id: id.to_string(),
                status,
            })
            .await?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_RETENTION: Retention = Retention::new(86_400_000, 1000);

    /// The request-log row a settlement records with it.
    fn row(request_id: &str, credits: i64) -> RequestRow {
        RequestRow {
            credits,
            created_at: now_ms(),
            ..RequestRow::sample(request_id)
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_key_is_found_by_its_secret_and_only_by_it() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let (key, secret) = ledger.create_key("alice", 5, KeySettings::default()).await.unwrap();
            assert_eq!(ledger.authenticate(&secret).unwrap().id, key.id);
            assert!(ledger.authenticate("tg_nope").is_none());
            assert_eq!(key.credits(), 5);
        });
    }

    #[test]
    fn a_page_of_keys_read_in_small_chunks_is_the_page_read_in_one_go() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            for i in 0..10 {
                ledger
                    .create_key(&format!("k{}", i % 3), 1, KeySettings::default())
                    .await
                    .unwrap();
            }
            let ids = |keys: Vec<Arc<Key>>| keys.into_iter().map(|k| k.id.clone()).collect::<Vec<_>>();
            let all = ids(ledger.page(None, 100, |_| true));
            assert_eq!(all.len(), 10);
            for (cursor, limit, name) in [
                (None, 100, "k0"),
                (None, 2, "k1"),
                (Some(all[4].as_str()), 3, "k0"),
                (Some(all[8].as_str()), 5, "k2"),
                (None, 100, "nobody"),
            ] {
                let filter = |k: &Key| k.name == name;
                let whole = ids(ledger.page_in_chunks(cursor, limit, 1000, filter));
                for chunk in [1, 2, 3] {
                    let chunked = ids(ledger.page_in_chunks(cursor, limit, chunk, filter));
                    assert_eq!(chunked, whole, "{cursor:?} {limit} {name} in chunks of {chunk}");
                }
                let expected: Vec<String> = all
                    .iter()
                    .filter(|id| cursor.is_none_or(|c| id.as_str() > c))
                    .filter(|id| ledger.get(id).unwrap().name == name)
                    .take(limit)
                    .cloned()
                    .collect();
                assert_eq!(whole, expected);
            }
        });
    }

    #[test]
    fn sixty_four_racing_reservations_on_ten_credits_take_exactly_ten() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let (key, _) = ledger.create_key("racer", 10, KeySettings::default()).await.unwrap();
            let tasks: Vec<_> = (0..64)
                .map(|i| {
                    let ledger = ledger.clone();
                    let key = key.clone();
                    tokio::spawn(async move {
                        match ledger.reserve(key.clone(), 1, &format!("req-{i}")) {
                            Ok(r) => {
                                let seq = ledger.settle(r, 1, row(&format!("req-{i}"), 1)).unwrap();
                                ledger.durable(seq).await.unwrap();
                                true
                            }
                            Err(_) => false,
                        }
                    })
                })
                .collect();
            let mut ok = 0;
            for t in tasks {
                ok += t.await.unwrap() as usize;
            }
            assert_eq!(ok, 10);
            assert_eq!(key.credits(), 0);
            ledger.store().sync().await.unwrap();
            let stored = ledger.store().stored_key(&key.id).unwrap().unwrap();
            assert_eq!(stored.credits, 0);
            assert_eq!(stored.spent, 10);
            let charges = ledger.store().ledger(Some(&key.id)).unwrap();
            assert_eq!(charges.iter().filter(|r| r.kind == "charge").count(), 10);
        });
    }

    #[test]
    fn balances_survive_a_restart_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (id, secret) = rt().block_on(async {
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let (key, secret) = ledger.create_key("bob", 100, KeySettings::default()).await.unwrap();
            let kept = ledger.reserve(key.clone(), 7, "r1").unwrap();
            let s1 = ledger.settle(kept, 3, row("r1", 3)).unwrap();
            let refunded = ledger.reserve(key.clone(), 5, "r2").unwrap();
            let s2 = ledger.settle(refunded, 0, row("r2", 0)).unwrap();
            ledger.durable(s1.max(s2)).await.unwrap();
            ledger.topup(&key.id, 20, "t1").await.unwrap();
            ledger.set_status(&key.id, Status::Suspended).await.unwrap();
            (key.id.clone(), secret)
        });
        let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
        let key = ledger.authenticate(&secret).unwrap();
        assert_eq!(key.id, id);
        // r1 kept 3 of its 7 (a partial refund of 4), r2 was refunded whole.
        assert_eq!(key.credits(), 100 - 3 + 20);
        assert_eq!(key.spent(), 3);
        assert_eq!(key.status(), Status::Suspended);
        let usage = key.usage(now_ms());
        assert_eq!(
            (usage.day_calls, usage.day_credits),
            (1, 3),
            "a partial refund keeps the call"
        );
        let rows = ledger.store().ledger(Some(&id)).unwrap();
        let sum: i64 = rows
            .iter()
            .map(|r| match r.kind.as_str() {
                "charge" => -r.amount,
                _ => r.amount,
            })
            .sum();
        assert_eq!(sum, key.credits(), "the balance is the sum of the ledger");
    }

    /// A key's `credits` column as the database holds it (the balance as of the balance mark).
    fn credits_column(dir: &Path, id: &str) -> i64 {
        let conn = rusqlite::Connection::open(dir.join("tollgate.db")).unwrap();
        conn.query_row("SELECT credits FROM keys WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn balances_written_behind_the_ledger_are_exact_after_each_of_two_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let raw_credits = |id: &str| credits_column(dir.path(), id);
        let (id, secret) = rt().block_on(async {
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let (key, secret) = ledger.create_key("carol", 50, KeySettings::default()).await.unwrap();
            for i in 0..6 {
                let r = ledger.reserve(key.clone(), 4, &format!("c{i}")).unwrap();
                // Every third call is refunded whole, the others keep 3 of their 4.
                let kept = if i % 3 == 0 { 0 } else { 3 };
                let seq = ledger.settle(r, kept, row(&format!("c{i}"), kept)).unwrap();
                ledger.durable(seq).await.unwrap();
            }
            ledger.topup(&key.id, 9, "t1").await.unwrap();
            ledger.store().sync().await.unwrap();
            assert_eq!(key.credits(), 50 - 4 * 3 + 9);
            let stored = ledger.store().stored_key(&key.id).unwrap().unwrap();
            assert_eq!((stored.credits, stored.spent, stored.calls), (47, 12, 6));
            (key.id.clone(), secret)
        });
        assert_eq!(
            raw_credits(&id),
            0,
            "the key's row is not written with each commit, so a start-up must add the ledger to it"
        );
        for restart in 1..=2 {
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let key = ledger.authenticate(&secret).unwrap();
            assert_eq!((key.credits(), key.spent()), (47, 12), "restart {restart}");
            let stored = ledger.store().stored_key(&id).unwrap().unwrap();
            assert_eq!(
                (stored.credits, stored.spent, stored.calls),
                (47, 12, 6),
                "restart {restart}"
            );
            assert_eq!(raw_credits(&id), 47, "the start-up wrote the balance, once");
        }
    }

    #[test]
    fn balances_flushed_behind_the_ledger_are_not_counted_again_by_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let raw_credits = |id: &str| credits_column(dir.path(), id);
        let charge = |ledger: &Ledger, key: &Arc<Key>, request_id: &str| {
            let r = ledger.reserve(key.clone(), 2, request_id).unwrap();
            ledger.settle(r, 2, row(request_id, 2)).unwrap()
        };
        let (id, secret) = rt().block_on(async {
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            // Every commit writes the balances (and moves the mark) while the first calls go in.
            ledger.store().flush_balances_every(std::time::Duration::ZERO);
            let (key, secret) = ledger.create_key("dave", 30, KeySettings::default()).await.unwrap();
            for i in 0..3 {
                let seq = charge(&ledger, &key, &format!("d{i}"));
                ledger.durable(seq).await.unwrap();
            }
            ledger.store().sync().await.unwrap();
            assert_eq!(raw_credits(&key.id), 24, "written with the commits");
            // Then none do: these are after the mark when the gateway stops.
            ledger
                .store()
                .flush_balances_every(std::time::Duration::from_secs(3600));
            ledger.store().sync().await.unwrap();
            for i in 3..5 {
                let seq = charge(&ledger, &key, &format!("d{i}"));
                ledger.durable(seq).await.unwrap();
            }
            ledger.topup(&key.id, 5, "t1").await.unwrap();
            ledger.store().sync().await.unwrap();
            assert_eq!(key.credits(), 30 - 5 * 2 + 5);
            (key.id.clone(), secret)
        });
        assert_eq!(raw_credits(&id), 24, "the later calls are in the ledger only");
        for restart in 1..=2 {
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let key = ledger.authenticate(&secret).unwrap();
            assert_eq!((key.credits(), key.spent()), (25, 10), "restart {restart}");
            assert_eq!(raw_credits(&id), 25, "restart {restart}");
        }
    }

    #[test]
    fn a_restart_replays_the_charge_journal_without_logging_a_call_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (key_id, credits) = rt().block_on(async {
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let (key, _) = ledger.create_key("carol", 100, KeySettings::default()).await.unwrap();
            // Kept, refunded, kept in part.
            for (id, kept) in [("r1", 2), ("r2", 0), ("r3", 1)] {
                let r = ledger.reserve(key.clone(), 2, id).unwrap();
                ledger.settle(r, kept, row(id, kept)).unwrap();
            }
            ledger.store().sync().await.unwrap();
            (key.id.clone(), key.credits())
        });
        assert_eq!(
            journaled_calls(dir.path()),
            3,
            "the journal still holds the three committed calls"
        );
        // The first opening replays the journal's records, all of them committed already (and
        // deletes the segment); the second finds nothing more to replay. Each sees every call once.
        for _ in 0..2 {
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let rows = ledger
                .store()
                .requests(&RequestFilter {
                    limit: 100,
                    ..Default::default()
                })
                .unwrap();
            let mut ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
            ids.sort();
            assert_eq!(ids, ["r1", "r2", "r3"], "each call is in the request log once");
            let kinds: Vec<String> = ledger
                .store()
                .ledger(None)
                .unwrap()
                .into_iter()
                .map(|r| r.kind)
                .collect();
            assert_eq!(kinds.iter().filter(|k| *k == "charge").count(), 3);
            assert_eq!(
                ledger.get(&key_id).map(|k| k.credits()),
                Some(credits),
                "and charged once"
            );
        }
    }

    /// How many settled calls the charge journal in `dir` holds (one request row each).
    fn journaled_calls(dir: &std::path::Path) -> usize {
        let segments = journal::segments(&dir.join("journal")).unwrap();
        let ops = segments.iter().flat_map(|(_, path)| journal::read(path).unwrap());
        ops.filter(|op| matches!(op, Op::Request(_))).count()
    }

    #[test]
    fn with_power_durability_each_settled_call_waits_for_its_own_commit_and_nothing_is_journaled() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let ledger = Ledger::open(dir.path(), true, TEST_RETENTION).unwrap();
            let (key, _) = ledger.create_key("power", 50, KeySettings::default()).await.unwrap();
            let reader = ledger.store().reader().unwrap();
            let count = |kind: &str| -> i64 {
                reader
                    .query_row("SELECT COUNT(*) FROM ledger WHERE kind = ?1", [kind], |r| r.get(0))
                    .unwrap()
            };
            for i in 0..20 {
                let id = format!("power-{i}");
                let r = ledger.reserve(key.clone(), 2, &id).unwrap();
                let seq = ledger.settle(r, if i % 2 == 0 { 2 } else { 0 }, row(&id, 2)).unwrap();
                assert!(seq > 0, "a settled call has a commit to wait for");
                ledger.store().durable(seq).await.unwrap();
                assert_eq!(count("charge"), i + 1, "charge {i} is committed once awaited");
                assert_eq!(count("refund"), (i + 1) / 2);
            }
            let segments = super::journal::segments(&dir.path().join("journal")).unwrap_or_default();
            assert!(segments.is_empty(), "power durability writes no journal: {segments:?}");
            drop(ledger);
            let reopened = Ledger::open(dir.path(), true, TEST_RETENTION).unwrap();
            assert_eq!(reopened.get(&key.id).unwrap().credits(), 50 - 10 * 2);
        });
    }

    #[test]
    fn the_same_request_cannot_be_charged_twice() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let (key, _) = ledger.create_key("dup", 10, KeySettings::default()).await.unwrap();
            let seq = ledger
                .store()
                .write(Op::Ledger {
                    request_id: "same".into(),
                    key_id: key.id.as_str().into(),
                    entry: Entry::Charge,
                    amount: 3,
                    at: 0,
                })
                .await
                .unwrap();
            let again = ledger
                .store()
                .write(Op::Ledger {
                    request_id: "same".into(),
                    key_id: key.id.as_str().into(),
                    entry: Entry::Charge,
                    amount: 3,
                    at: 0,
                })
                .await
                .unwrap();
            assert!(again > seq);
            let stored = ledger.store().stored_key(&key.id).unwrap().unwrap();
            assert_eq!(stored.credits, 7, "the second identical row changed nothing");
        });
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_hard_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tollgate.db"),
            b"this is not sqlite, it is a text file of length",
        )
        .unwrap();
        let err = match Ledger::open(dir.path(), false, TEST_RETENTION) {
            Ok(_) => panic!("opened a corrupt database"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("tollgate.db"), "{err}");
    }

    #[test]
    fn a_rotated_key_answers_only_to_its_new_secret_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = rt().block_on(async {
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let (key, old) = ledger.create_key("rot", 9, KeySettings::default()).await.unwrap();
            let (_, new) = ledger.rotate(&key.id).await.unwrap();
            assert!(ledger.authenticate(&old).is_none(), "the old secret stops at once");
            assert_eq!(ledger.authenticate(&new).unwrap().credits(), 9);
            (old, new)
        });
        let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
        assert!(ledger.authenticate(&old).is_none());
        assert_eq!(ledger.authenticate(&new).unwrap().credits(), 9);
    }

    #[test]
    fn a_revoked_key_cannot_be_resumed_or_topped_up() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let ledger = Ledger::open(dir.path(), false, TEST_RETENTION).unwrap();
            let (key, secret) = ledger.create_key("gone", 1, KeySettings::default()).await.unwrap();
            ledger.set_status(&key.id, Status::Revoked).await.unwrap();
            assert!(matches!(
                ledger.set_status(&key.id, Status::Active).await,
                Err(LedgerError::Revoked)
            ));
            assert!(matches!(ledger.topup(&key.id, 5, "t").await, Err(LedgerError::Revoked)));
            assert_eq!(ledger.authenticate(&secret).unwrap().status(), Status::Revoked);
        });
    }
}
