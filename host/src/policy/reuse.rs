//! Charges a pricing plugin lets the host reuse (`pricing-reuse` in the WIT): keyed by everything
//! such a plugin's price may depend on — the key (its id and the very settings it had), the method,
//! the tool and the started KiB of arguments — and kept until their window closes.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use compact_str::CompactString;

use super::pricing::Price;
use crate::ledger::{Key, KeySettings};

/// Shards, so that calls on different keys and tools rarely share a lock.
const SHARDS: usize = 16;
/// Entries per shard; a full shard is emptied (a cache miss costs one plugin call, nothing more).
const PER_SHARD: usize = 256;

/// What a reused charge was priced for.
pub struct Inputs<'a> {
    pub key: &'a Key,
    /// The key's settings when priced: a reuse needs the very same settings (not equal ones), so a
    /// change of tags, namespace or expiry always reaches the plugin.
    pub settings: &'a Arc<KeySettings>,
    pub method: &'a str,
    pub tool: Option<&'a str>,
    /// Started KiB of the arguments.
    pub kib: u64,
}

/// Its strings are kept inline (up to 24 bytes: a key id, a method, most tool names), so that
/// keeping an entry and emptying a full shard allocate and free nothing for them: with calls spread
/// over more keys than the cache holds, every call does both.
struct Entry {
    key_id: CompactString,
    /// Held, so its address cannot be reused by other settings while the entry lives.
    settings: Arc<KeySettings>,
    method: CompactString,
    tool: Option<CompactString>,
    kib: u64,
    price: Price,
    /// Unix ms after which the entry is not reused.
    until_ms: i64,
}

impl Entry {
    fn matches(&self, i: &Inputs<'_>) -> bool {
        self.kib == i.kib
            && Arc::ptr_eq(&self.settings, i.settings)
            && self.key_id.as_str() == i.key.id.as_str()
            && self.method.as_str() == i.method
            && self.tool.as_deref() == i.tool
    }
}

/// The reusable charges of one loaded pricing plugin (a reload or swap starts an empty one).
///
/// Hashed with foldhash, seeded per cache (SipHash, std's default, cost more than the rest of a
/// lookup); the map is keyed by that hash, and an entry is reused only if its inputs match.
pub struct ReuseCache {
    hasher: foldhash::fast::RandomState,
    shards: [Mutex<foldhash::HashMap<u64, Entry>>; SHARDS],
}

impl Default for ReuseCache {
    fn default() -> Self {
        ReuseCache {
            hasher: foldhash::fast::RandomState::default(),
            shards: std::array::from_fn(|_| Mutex::new(foldhash::HashMap::default())),
        }
    }
}

impl ReuseCache {
    fn hash(&self, i: &Inputs<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        i.key.id.hash(&mut h);
        i.method.hash(&mut h);
        i.tool.hash(&mut h);
        i.kib.hash(&mut h);
        h.finish()
    }

    /// The charge priced for `inputs`, if it may still be reused at `now_ms`.
    pub fn get(&self, inputs: &Inputs<'_>, now_ms: i64) -> Option<Price> {
        let h = self.hash(inputs);
        let shard = self.shards[h as usize % SHARDS].lock().unwrap();
        shard
            .get(&h)
            .filter(|e| now_ms < e.until_ms && e.matches(inputs))
            .map(|e| e.price)
    }

    /// Keeps `price`, priced for `inputs`, for reuse until `until_ms`.
    pub fn put(&self, inputs: &Inputs<'_>, price: Price, until_ms: i64) {
        let h = self.hash(inputs);
        let entry = Entry {
            key_id: inputs.key.id.as_str().into(),
            settings: inputs.settings.clone(),
            method: inputs.method.into(),
            tool: inputs.tool.map(Into::into),
            kib: inputs.kib,
            price,
            until_ms,
        };
        let mut shard = self.shards[h as usize % SHARDS].lock().unwrap();
        if shard.len() >= PER_SHARD && !shard.contains_key(&h) {
            shard.clear();
        }
        shard.insert(h, entry);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> Key {
        Key::new(
            id.into(),
            "k".into(),
            crate::ledger::keys::hash(id),
            "tg_".into(),
            0,
            100,
        )
    }

    fn inputs<'a>(key: &'a Key, settings: &'a Arc<KeySettings>, tool: &'a str, kib: u64) -> Inputs<'a> {
        Inputs {
            key,
            settings,
            method: "tools/call",
            tool: Some(tool),
            kib,
        }
    }

    #[test]
    fn a_charge_is_reused_for_the_same_inputs_until_its_window_closes() {
        let cache = ReuseCache::default();
        let k = key("key_a");
        let s = k.settings();
        cache.put(&inputs(&k, &s, "echo", 1), Price::flat(3), 1_000);
        assert_eq!(cache.get(&inputs(&k, &s, "echo", 1), 999), Some(Price::flat(3)));
        assert_eq!(cache.get(&inputs(&k, &s, "echo", 1), 1_000), None);
    }

    #[test]
    fn another_tool_size_key_or_settings_is_priced_afresh() {
        let cache = ReuseCache::default();
        let (a, b) = (key("key_a"), key("key_b"));
        let s = a.settings();
        cache.put(&inputs(&a, &s, "echo", 1), Price::flat(3), i64::MAX);
        assert_eq!(cache.get(&inputs(&a, &s, "add", 1), 0), None);
        assert_eq!(cache.get(&inputs(&a, &s, "echo", 2), 0), None);
        assert_eq!(cache.get(&inputs(&b, &s, "echo", 1), 0), None);
        a.set_settings(KeySettings::default());
        assert_eq!(
            cache.get(&inputs(&a, &a.settings(), "echo", 1), 0),
            None,
            "equal but new settings"
        );
    }

    #[test]
    fn a_full_shard_is_emptied_rather_than_growing() {
        let cache = ReuseCache::default();
        let k = key("key_a");
        let s = k.settings();
        let tools: Vec<String> = (0..SHARDS * PER_SHARD * 2).map(|i| format!("t{i}")).collect();
        for t in &tools {
            cache.put(&inputs(&k, &s, t, 0), Price::flat(1), i64::MAX);
        }
        assert!(cache.len() <= SHARDS * PER_SHARD);
        assert!(cache.len() > 0);
    }
}
