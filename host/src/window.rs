//! Per-minute totals of the request log, kept in memory so that health scoring never reads the
//! log itself: a window of a million requests is a few thousand buckets. Rebuilt from the store at
//! start-up and fed by every request-log row after that.
//!
//! Each thread counts into its own buckets, merged when the window is read: one shared lock taken
//! by both connection threads on every paid call cost ~0.1 µs a call at c=32.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

/// The longest window kept (one day of minutes).
pub const MAX_MINUTES: usize = 24 * 60;

/// Requests of one minute, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// The minute, as Unix milliseconds / 60 000.
    pub minute: i64,
    pub allowed: u64,
    pub denied: u64,
    pub refunded: u64,
    pub error: u64,
    pub credits: i64,
    pub duration_us_total: u64,
    pub duration_us_max: u64,
}

impl Bucket {
    /// Adds `n` requests with outcome `outcome`.
    pub fn add(&mut self, outcome: &str, n: u64, credits: i64, duration_us_total: u64, duration_us_max: u64) {
        match outcome {
            "allowed" => self.allowed += n,
            "denied" => self.denied += n,
            "refunded" => self.refunded += n,
            _ => self.error += n,
        }
        self.credits += credits;
        self.duration_us_total += duration_us_total;
        self.duration_us_max = self.duration_us_max.max(duration_us_max);
    }

    /// Adds another count of the same minute.
    fn merge(&mut self, o: &Bucket) {
        self.allowed += o.allowed;
        self.denied += o.denied;
        self.refunded += o.refunded;
        self.error += o.error;
        self.credits += o.credits;
        self.duration_us_total += o.duration_us_total;
        self.duration_us_max = self.duration_us_max.max(o.duration_us_max);
    }
}

/// The last day of request-log minutes.
#[derive(Default)]
pub struct Window {
    /// Per thread, oldest first. A thread's lock is taken by that thread on each request and by
    /// readers (a health score), so it is almost never contended.
    minutes: thread_local::ThreadLocal<Mutex<VecDeque<Bucket>>>,
}

impl Window {
    /// Counts one request at `at_ms`.
    pub fn record(&self, at_ms: i64, outcome: &str, credits: i64, duration_us: u64) {
        self.add(at_ms.div_euclid(60_000), outcome, 1, credits, duration_us, duration_us);
    }

    /// Adds `n` requests of `minute` (used to rebuild from the store).
    pub fn add(&self, minute: i64, outcome: &str, n: u64, credits: i64, total_us: u64, max_us: u64) {
        let mut m = self.minutes.get_or_default().lock().unwrap();
        // Rows arrive in time order, give or take a request's duration: look back a little.
        let found = m.iter_mut().rev().take(4).find(|b| b.minute == minute);
        match found {
            Some(b) => b.add(outcome, n, credits, total_us, max_us),
            None => {
                let mut b = Bucket {
                    minute,
                    ..Bucket::default()
                };
                b.add(outcome, n, credits, total_us, max_us);
                let at = m.iter().rposition(|x| x.minute < minute).map_or(0, |i| i + 1);
                m.insert(at, b);
                while m.len() > MAX_MINUTES {
                    m.pop_front();
                }
            }
        }
    }

    /// The buckets from `since_minute` on, oldest first, every thread's counts of a minute in one.
    pub fn since(&self, since_minute: i64) -> Vec<Bucket> {
        let mut merged: BTreeMap<i64, Bucket> = BTreeMap::new();
        for shard in self.minutes.iter() {
            let m = shard.lock().unwrap();
            for b in m.iter().filter(|b| b.minute >= since_minute) {
                merged.entry(b.minute).and_modify(|x| x.merge(b)).or_insert(*b);
            }
        }
        // A thread idle for a day may still hold minutes older than the others keep.
        let keep = merged.len().saturating_sub(MAX_MINUTES);
        merged.into_values().skip(keep).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_minute_and_outcome() {
        let w = Window::default();
        w.record(60_000, "allowed", 2, 10);
        w.record(61_000, "denied", 0, 30);
        w.record(120_000, "refunded", 0, 5);
        w.record(59_999, "allowed", 1, 1);
        let b = w.since(0);
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].minute, b[0].allowed), (0, 1));
        assert_eq!((b[1].minute, b[1].allowed, b[1].denied, b[1].credits), (1, 1, 1, 2));
        assert_eq!((b[1].duration_us_total, b[1].duration_us_max), (40, 30));
        assert_eq!((b[2].minute, b[2].refunded), (2, 1));
        assert_eq!(w.since(2).len(), 1);
    }

    #[test]
    fn counts_made_on_several_threads_read_as_one_bucket_per_minute() {
        let w = std::sync::Arc::new(Window::default());
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let w = w.clone();
                std::thread::spawn(move || {
                    w.record(60_000, "allowed", 2, 10 * (i + 1));
                    w.record(120_000 + i as i64, "error", 0, 1);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let b = w.since(0);
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!((b[0].minute, b[0].allowed, b[0].credits), (1, 3, 6));
        assert_eq!((b[0].duration_us_total, b[0].duration_us_max), (60, 30));
        assert_eq!((b[1].minute, b[1].error), (2, 3));
        assert_eq!(w.since(2), vec![b[1]]);
    }
}
