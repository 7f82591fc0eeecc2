//! An adaptive concurrency limit for one provider (AIMD, as in Netflix's concurrency-limits):
//! the limit grows by one per limit's worth of calls that succeed with a latency near the lowest
//! seen lately, and shrinks by [`BACKOFF`] when the provider says it is overloaded (429, 503,
//! a timeout), at most once per round trip. A 429 or 503 with `Retry-After` also pauses every call
//! to this provider until then, not only the one that got it. Commands waiting here hold no
//! provider connection; the broker's prefetch is the ceiling.

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::Notify;
// The runtime's clock, so tests can pause and advance it.
use tokio::time::Instant;

/// The factor the limit is multiplied by on an overload signal.
const BACKOFF: f64 = 0.7;
/// A latency up to this many times the lowest seen lately counts as "near the minimum".
const LATENCY_TOLERANCE: f64 = 2.0;
/// How long the lowest latency is remembered before it is measured afresh (a provider that got
/// slower for good must not freeze the limit forever).
const MIN_LATENCY_WINDOW: Duration = Duration::from_secs(10);
/// Shortest time between two decreases, when no latency has been measured yet.
const MIN_DECREASE_GAP: Duration = Duration::from_millis(50);

pub use crate::metrics::ProviderFigures as Figures;

/// How a call ended, as the limit sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Signal {
    /// Answered (a link, or a 4xx that says the provider is up), after this long.
    Answered(Duration),
    /// The provider is overloaded (429, 503, a timeout); with its `Retry-After`, if any.
    Overloaded(Option<Duration>),
    /// Another failure (a 5xx other than 503, no connection): says nothing about load.
    Other,
}

struct State {
    limit: f64,
    in_flight: usize,
    min_latency: Option<Duration>,
    min_latency_since: Instant,
    last_decrease: Option<Instant>,
    paused_until: Option<Instant>,
}

/// The limit of one provider.
pub struct Limiter {
    max: usize,
    max_pause: Duration,
    adaptive: bool,
    state: Mutex<State>,
    changed: Notify,
    figures: std::sync::Arc<Figures>,
}

/// Leave to make one call; give it back with [`Slot::done`] (dropping it counts as `Other`).
pub struct Slot<'a> {
    limiter: &'a Limiter,
    done: bool,
}

impl Limiter {
    /// A limit that starts at `max` (the prefetch: no throttling until the provider pushes back)
    /// and stays between 1 and `max`; without `adaptive`, it stays at `max`. A `Retry-After`
    /// pauses calls for at most `max_pause`.
    pub fn new(
        max: usize,
        adaptive: bool,
        max_pause: Duration,
        figures: std::sync::Arc<Figures>,
    ) -> Self {
        let max = max.max(1);
        figures.limit.store(max as i64, Ordering::Relaxed);
        Self {
            max,
            max_pause,
            adaptive,
            state: Mutex::new(State {
                limit: max as f64,
                in_flight: 0,
                min_latency: None,
                min_latency_since: Instant::now(),
                last_decrease: None,
                paused_until: None,
            }),
            changed: Notify::new(),
            figures,
        }
    }

    /// The current limit, in whole calls (production reads it through [`Figures`]).
    #[cfg(test)]
    fn limit(&self) -> usize {
        self.state.lock().expect("limit lock").limit as usize
    }

    /// Waits for a slot: until fewer calls than the limit are under way and no pause is on.
    pub async fn acquire(&self) -> Slot<'_> {
        // Counted as queued from its first wait until it gets a slot or is cancelled.
        let mut queued: Option<Queued<'_>> = None;
        loop {
            let notified = self.changed.notified();
            let pause = {
                let mut state = self.state.lock().expect("limit lock");
                let now = Instant::now();
                match state.paused_until {
                    Some(until) if until > now => Some(until - now),
                    _ if state.in_flight < state.limit as usize => {
                        state.in_flight += 1;
                        self.figures.in_flight.fetch_add(1, Ordering::Relaxed);
                        self.figures.started.fetch_add(1, Ordering::Relaxed);
                        return Slot {
                            limiter: self,
                            done: false,
                        };
                    }
                    _ => None,
                }
            };
            queued.get_or_insert_with(|| Queued::new(&self.figures));
            match pause {
                Some(pause) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    fn finish(&self, signal: Signal) {
        let mut state = self.state.lock().expect("limit lock");
        state.in_flight -= 1;
        self.figures.in_flight.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        match signal {
            Signal::Answered(latency) => {
                let stale = now.duration_since(state.min_latency_since) > MIN_LATENCY_WINDOW;
                if stale || state.min_latency.is_none_or(|min| latency < min) {
                    state.min_latency = Some(latency);
                    state.min_latency_since = now;
                }
                let near = state.min_latency.is_some_and(|min| {
                    latency.as_secs_f64() <= min.as_secs_f64() * LATENCY_TOLERANCE + 0.001
                });
                if self.adaptive && near {
                    state.limit = (state.limit + 1.0 / state.limit).min(self.max as f64);
                }
            }
            Signal::Overloaded(retry_after) => {
                let gap = state.min_latency.unwrap_or(MIN_DECREASE_GAP);
                let due = state
                    .last_decrease
                    .is_none_or(|at| now.duration_since(at) >= gap);
                if self.adaptive && due {
                    state.limit = (state.limit * BACKOFF).max(1.0);
                    state.last_decrease = Some(now);
                    tracing::debug!(
                        limit = state.limit,
                        "provider overloaded; lowering its concurrency limit"
                    );
                }
                if let Some(pause) = retry_after {
                    let until = now + pause.min(self.max_pause);
                    if state.paused_until.is_none_or(|current| current < until) {
                        state.paused_until = Some(until);
                    }
                }
            }
            Signal::Other => {}
        }
        self.figures
            .limit
            .store(state.limit as i64, Ordering::Relaxed);
        drop(state);
        self.changed.notify_waiters();
    }
}

/// One waiter in the queued count, for as long as it waits (cancelled waits included).
struct Queued<'a>(&'a Figures);

impl<'a> Queued<'a> {
    fn new(figures: &'a Figures) -> Self {
        figures.queued.fetch_add(1, Ordering::Relaxed);
        Self(figures)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Slot<'_> {
    /// Gives the slot back, telling the limit how the call went.
    pub fn done(mut self, signal: Signal) {
        self.done = true;
        self.limiter.finish(signal);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.finish(Signal::Other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn limiter(max: usize) -> (Limiter, Arc<Figures>) {
        let figures = Arc::new(Figures::default());
        let limiter = Limiter::new(max, true, Duration::from_secs(10), figures.clone());
        (limiter, figures)
    }

    #[tokio::test(start_paused = true)]
    async fn overload_lowers_the_limit_once_per_round_trip_and_fast_answers_raise_it() {
        let (l, figures) = limiter(32);
        l.acquire()
            .await
            .done(Signal::Answered(Duration::from_millis(20)));
        let slots: Vec<_> = futures_util::future::join_all((0..10).map(|_| l.acquire())).await;
        for slot in slots {
            slot.done(Signal::Overloaded(None));
        }
        assert_eq!(
            l.limit(),
            22,
            "one decrease (x0.7) for a burst within one round trip"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
        l.acquire().await.done(Signal::Overloaded(None));
        assert_eq!(l.limit(), 15, "another round trip, another decrease");
        for _ in 0..200 {
            l.acquire()
                .await
                .done(Signal::Answered(Duration::from_millis(20)));
        }
        assert!(l.limit() > 15, "grows again: {}", l.limit());
        assert!(l.limit() <= 32);
        assert_eq!(figures.limit.load(Ordering::Relaxed), l.limit() as i64);
        for _ in 0..2000 {
            l.acquire()
                .await
                .done(Signal::Answered(Duration::from_millis(20)));
        }
        assert_eq!(l.limit(), 32, "never above the ceiling");
        // Slow answers (far above the minimum) do not raise it.
        l.acquire().await.done(Signal::Overloaded(None));
        let lowered = l.limit();
        for _ in 0..200 {
            l.acquire()
                .await
                .done(Signal::Answered(Duration::from_millis(200)));
        }
        assert_eq!(l.limit(), lowered);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_bounds_calls_in_flight_and_waiters_are_counted() {
        let (l, figures) = limiter(2);
        let l = Arc::new(l);
        let a = l.acquire().await;
        let b = l.acquire().await;
        let third = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
        assert!(third.is_err(), "a third call waits");
        assert_eq!(
            figures.queued.load(Ordering::Relaxed),
            0,
            "a cancelled wait is not counted"
        );
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await.done(Signal::Other) }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while figures.queued.load(Ordering::Relaxed) != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the waiter is counted as queued");
        assert_eq!(figures.in_flight.load(Ordering::Relaxed), 2);
        drop(a);
        drop(b);
        waiter.await.unwrap();
        assert_eq!(figures.queued.load(Ordering::Relaxed), 0);
        assert_eq!(figures.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_pauses_every_call_to_the_provider_up_to_the_cap() {
        let (l, _) = limiter(8);
        l.acquire()
            .await
            .done(Signal::Overloaded(Some(Duration::from_millis(200))));
        let started = Instant::now();
        l.acquire().await.done(Signal::Other);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(200),
            "waited for the pause"
        );
        // A Retry-After beyond the cap (10 s here) pauses for the cap only.
        l.acquire()
            .await
            .done(Signal::Overloaded(Some(Duration::from_secs(3600))));
        let started = Instant::now();
        l.acquire().await.done(Signal::Other);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
