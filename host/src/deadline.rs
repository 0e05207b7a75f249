//! Coarse deadlines for the hot path: call timeouts and slow-client timeouts without a tokio timer
//! per request.
//!
//! Measured on the proxy benchmark, registering and cancelling a tokio timer per request (a call
//! timeout, and hyper's per-request header timer) cost 3–6 µs of CPU per request, most of the
//! gateway's overhead over a bare pass-through proxy. Here a deadline is an entry in a sharded map
//! and an atomic flag; one sweeper task fires the expired ones every `tick`. A deadline therefore
//! fires up to one tick late, which is fine for timeouts counted in seconds.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

const SHARDS: usize = 16;

/// The deadline registry; cheap to clone.
#[derive(Clone)]
pub struct Deadlines {
    inner: Arc<Inner>,
}

struct Inner {
    shards: [Mutex<foldhash::HashMap<u64, Entry>>; SHARDS],
    next_key: AtomicU64,
    epoch: Instant,
}

struct Entry {
    at_ms: u64,
    alarm: Arc<Alarm>,
}

/// What a sweeper sets when a deadline passes.
#[derive(Default)]
pub struct Alarm {
    fired: AtomicBool,
    waker: AtomicWaker,
}

impl Alarm {
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Registers the task to wake when the alarm fires; true if it has fired already.
    pub fn poll_fired(&self, cx: &mut Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.fired()
    }
}

/// A registered deadline; dropping it cancels the deadline.
pub struct Deadline {
    key: u64,
    inner: Arc<Inner>,
    alarm: Arc<Alarm>,
}

impl Deadline {
    pub fn alarm(&self) -> &Alarm {
        &self.alarm
    }

    /// Moves the deadline to `after` from now (and re-arms it if it had fired).
    pub fn reset(&self, after: Duration) {
        let at_ms = self.inner.now_ms() + after.as_millis() as u64;
        self.alarm.fired.store(false, Ordering::Release);
        if let Some(e) = self.inner.shard(self.key).lock().unwrap().get_mut(&self.key) {
            e.at_ms = at_ms;
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.inner.shard(self.key).lock().unwrap().remove(&self.key);
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn shard(&self, key: u64) -> &Mutex<foldhash::HashMap<u64, Entry>> {
        &self.shards[key as usize % SHARDS]
    }
}

impl Deadlines {
    /// A registry whose sweeper (a task on the current runtime) fires deadlines every `tick`.
    /// The sweeper stops when the last handle is dropped.
    pub fn start(tick: Duration) -> Deadlines {
        let inner = Arc::new(Inner {
            shards: std::array::from_fn(|_| Mutex::new(foldhash::HashMap::default())),
            next_key: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let now = inner.now_ms();
                for shard in &inner.shards {
                    for e in shard.lock().unwrap().values() {
                        if e.at_ms <= now && !e.alarm.fired.swap(true, Ordering::AcqRel) {
                            e.alarm.waker.wake();
                        }
                    }
                }
            }
        });
        Deadlines { inner }
    }

    /// Registers a deadline `after` from now.
    pub fn register(&self, after: Duration) -> Deadline {
        self.register_from(Instant::now(), after)
    }

    /// Registers a deadline `after` from `from` (a moment just taken, so that a request that
    /// already read the clock need not read it again).
    pub fn register_from(&self, from: Instant, after: Duration) -> Deadline {
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        let alarm = Arc::new(Alarm::default());
        let at_ms = from.saturating_duration_since(self.inner.epoch).as_millis() as u64 + after.as_millis() as u64;
        self.inner.shard(key).lock().unwrap().insert(
            key,
            Entry {
                at_ms,
                alarm: alarm.clone(),
            },
        );
        Deadline {
            key,
            inner: self.inner.clone(),
            alarm,
        }
    }

    /// Runs `fut` with a deadline: `Err(Elapsed)` if it is not done `after` from now.
    pub fn timeout<F: Future>(&self, after: Duration, fut: F) -> Timeout<F> {
        Timeout {
            fut,
            deadline: self.register(after),
        }
    }
}

/// The deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `fut` until it completes or `alarm` fires.
pub fn race<F: Future>(alarm: &Alarm, fut: F) -> Race<'_, F> {
    Race { fut, alarm }
}

pin_project_lite::pin_project! {
    /// A future raced against an alarm (see [`race`]).
    pub struct Race<'a, F> {
        #[pin]
        fut: F,
        alarm: &'a Alarm,
    }
}

impl<F: Future> Future for Race<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if this.alarm.poll_fired(cx) {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// A future with a deadline (see [`Deadlines::timeout`]).
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        deadline: Deadline,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if this.deadline.alarm.poll_fired(cx) {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slow_future_is_cut_off_at_its_deadline() {
        let d = Deadlines::start(Duration::from_millis(5));
        let started = Instant::now();
        let r = d.timeout(Duration::from_millis(30), std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(30) && took < Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_quick_future_finishes_and_its_deadline_is_forgotten() {
        let d = Deadlines::start(Duration::from_millis(5));
        assert_eq!(d.timeout(Duration::from_secs(5), async { 7 }).await, Ok(7));
        assert!(d.inner.shards.iter().all(|s| s.lock().unwrap().is_empty()));
    }

    #[tokio::test]
    async fn a_reset_deadline_fires_later() {
        let d = Deadlines::start(Duration::from_millis(5));
        let deadline = d.register(Duration::from_millis(20));
        deadline.reset(Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!deadline.alarm().fired());
    }
}
