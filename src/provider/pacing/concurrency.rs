//! An adaptive concurrency limit for one provider (AIMD, as in Netflix's concurrency-limits):
//! it starts small and doubles every round trip (slow start, as TCP's), but not faster than
//! [`SLOW_START_DOUBLING`], until the provider first pushes back or the ceiling is reached, so a
//! new lane does not send a whole prefetch at once into a provider's rate limit; after that it
//! grows by one per limit's worth of calls that succeed with a latency near the lowest seen lately, and shrinks by [`BACKOFF`] when the
//! provider says it is overloaded (a 503 without `Retry-After`, a timeout), at most once per
//! round trip. A 429 (or a 503 with `Retry-After`) is a matter of rate, the lane's pace: here it
//! only ends slow start and pauses every call to this provider until its `Retry-After` (or for a
//! short pause of our own without one), not only the one that got it. Commands waiting here hold
//! no provider connection; the broker's prefetch is the ceiling.
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
/// The pause after a 429 without `Retry-After`, doubled for each one in a row (to 0.8 s, and at
/// most the longest pause allowed).
const BARE_PAUSE: Duration = Duration::from_millis(50);
/// The limit a lane starts at, before slow start doubles it (or the ceiling, if lower).
const INITIAL_LIMIT: f64 = 16.0;
/// Slow start doubles the limit every round trip, but not faster than once in this long: against
/// a fast provider's rate limit the calls under way when the first 429 comes back are all
/// refused, and a doubling every 50 ms round trip had a whole window's worth under way.
const SLOW_START_DOUBLING: Duration = Duration::from_millis(200);
/// Shortest time between two decreases, when no latency has been measured yet.
const MIN_DECREASE_GAP: Duration = Duration::from_millis(50);

pub use super::Signal;
pub use crate::metrics::ProviderFigures as Figures;

struct State {
    limit: f64,
    /// Doubling every round trip until the first push-back (429, 503, a timeout).
    slow_start: bool,
    in_flight: usize,
    min_latency: Option<Duration>,
    min_latency_since: Instant,
    last_decrease: Option<Instant>,
    paused_until: Option<Instant>,
    /// 429s without `Retry-After` in a row, each after the pause the last one began.
    bare_streak: u32,
    /// Slow start's limit and when it began (its first call, or the first after the lane sat
    /// idle): the limit doubles at most once per [`SLOW_START_DOUBLING`], however short the
    /// round trip.
    slow_start_from: (f64, Instant),
    /// When a call last ended: a lane with none under way since longer than
    /// [`SLOW_START_DOUBLING`] starts slow start's clock again at its next call.
    last_done: Option<Instant>,
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
    /// A limit that starts at [`INITIAL_LIMIT`] and doubles every round trip (at most every
    /// [`SLOW_START_DOUBLING`]) up to `max` (the prefetch) until the provider pushes back, and
    /// stays between 1 and `max`; without `adaptive`, it stays at `max`. A `Retry-After` pauses
    /// calls for at most `max_pause`.
    pub fn new(
        max: usize,
        adaptive: bool,
        max_pause: Duration,
        figures: std::sync::Arc<Figures>,
    ) -> Self {
        let max = max.max(1);
        let initial = if adaptive {
            INITIAL_LIMIT.min(max as f64)
        } else {
            max as f64
        };
        figures.limit.store(initial as i64, Ordering::Relaxed);
        Self {
            max,
            max_pause,
            adaptive,
            state: Mutex::new(State {
                limit: initial,
                slow_start: adaptive,
                in_flight: 0,
                min_latency: None,
                min_latency_since: Instant::now(),
                last_decrease: None,
                paused_until: None,
                bare_streak: 0,
                slow_start_from: (initial, Instant::now()),
                last_done: None,
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
                        // A burst after a quiet spell doubles from where the lane is, not
                        // as if it had been doubling all the while.
                        // (The first call finds the lane idle too.)
                        let idle = state.in_flight == 0
                            && state
                                .last_done
                                .is_none_or(|at| now.duration_since(at) >= SLOW_START_DOUBLING);
                        if state.slow_start && idle {
                            state.slow_start_from = (state.limit, now);
                        }
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
        state.last_done = Some(now);
        match signal {
            Signal::Answered(latency) => {
                state.bare_streak = 0;
                let stale = now.duration_since(state.min_latency_since) > MIN_LATENCY_WINDOW;
                if stale || state.min_latency.is_none_or(|min| latency < min) {
                    state.min_latency = Some(latency);
                    state.min_latency_since = now;
                }
                let near = state.min_latency.is_some_and(|min| {
                    latency.as_secs_f64() <= min.as_secs_f64() * LATENCY_TOLERANCE + 0.001
                });
                if self.adaptive && near {
                    // One more per answer doubles the limit every round trip; one more per
                    // limit's worth of answers, once the provider has pushed back.
                    let step = if state.slow_start {
                        1.0
                    } else {
                        1.0 / state.limit
                    };
                    let mut grown = (state.limit + step).min(self.max as f64);
                    if state.slow_start {
                        let (from, since) = state.slow_start_from;
                        let doublings = now.duration_since(since).as_secs_f64()
                            / SLOW_START_DOUBLING.as_secs_f64();
                        grown = grown.min(from * 2f64.powf(doublings)).max(state.limit);
                    }
                    state.limit = grown;
                }
            }
            Signal::Overloaded(retry_after) => {
                state.slow_start = false;
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
                self.pause(&mut state, now, retry_after);
            }
            Signal::SlowDown(retry_after) => {
                // The rate is the lane's pace's concern; the burst stops doubling here.
                state.slow_start = false;
                // Without a `Retry-After`, a short pause of our own, doubling while 429s keep
                // coming after each pause ends (the provider's window is still full), so the
                // calls already lined up are not all spent on 429s.
                let pause = retry_after.or_else(|| {
                    let paused = state.paused_until.is_some_and(|until| until > now);
                    if !paused {
                        state.bare_streak = (state.bare_streak + 1).min(5);
                    }
                    (!paused).then(|| BARE_PAUSE * 2u32.pow(state.bare_streak - 1))
                });
                self.pause(&mut state, now, pause);
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

impl Limiter {
    /// The longest `Retry-After` the lane holds for every call (longer ones end the round).
    pub fn max_pause(&self) -> Duration {
        self.max_pause
    }

    /// Pauses every call until `retry_after` from now (at most `max_pause`), unless a longer
    /// pause is on.
    fn pause(&self, state: &mut State, now: Instant, retry_after: Option<Duration>) {
        if let Some(pause) = retry_after {
            let until = now + pause.min(self.max_pause);
            if state.paused_until.is_none_or(|current| current < until) {
                state.paused_until = Some(until);
            }
        }
    }

    /// The limit reached, whether it is still doubling, and whether it learned anything (it is
    /// adaptive, and left slow start or grew past where it starts).
    pub fn memory(&self) -> (f64, bool, bool) {
        let state = self.state.lock().expect("limit lock");
        let grown = !state.slow_start || state.limit > INITIAL_LIMIT.min(self.max as f64);
        (state.limit, state.slow_start, self.adaptive && grown)
    }

    /// Starts at `limit` calls at once (within 1 and the ceiling), still doubling if
    /// `slow_start`: what the lane had reached before this worker started. Not adaptive: stays
    /// at the ceiling.
    pub fn recall(&self, limit: f64, slow_start: bool) {
        if !self.adaptive || !limit.is_finite() {
            return;
        }
        let mut state = self.state.lock().expect("limit lock");
        state.limit = limit.clamp(1.0, self.max as f64);
        state.slow_start = slow_start;
        state.slow_start_from = (state.limit, Instant::now());
        self.figures
            .limit
            .store(state.limit as i64, Ordering::Relaxed);
        drop(state);
        self.changed.notify_waiters();
    }

    /// How long the current pause (a `Retry-After`) still lasts, if one is on: a call that got
    /// its slot before the pause began waits it out too.
    pub fn paused_for(&self) -> Option<Duration> {
        let state = self.state.lock().expect("limit lock");
        let now = Instant::now();
        state
            .paused_until
            .filter(|until| *until > now)
            .map(|until| until - now)
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

    /// `calls` calls under way at once, answered in 20 ms after [`SLOW_START_DOUBLING`] has
    /// passed (the round trip is not what holds slow start back here).
    async fn round_trip(l: &Limiter, calls: usize) {
        let slots: Vec<_> = futures_util::future::join_all((0..calls).map(|_| l.acquire())).await;
        tokio::time::advance(SLOW_START_DOUBLING).await;
        for slot in slots {
            slot.done(Signal::Answered(Duration::from_millis(20)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_doubles_at_most_once_per_doubling_time_however_fast_the_answers() {
        let (l, _) = limiter(256);
        // A thousand answers at once, after `wait`: a round trip far shorter than the doubling
        // time. Returns the limit after them.
        let burst_after = |wait: Duration| {
            let l = &l;
            async move {
                tokio::time::advance(wait).await;
                for _ in 0..1000 {
                    l.acquire()
                        .await
                        .done(Signal::Answered(Duration::from_millis(1)));
                }
                l.limit()
            }
        };
        // One call under way all along, as under load: the lane is not idle between the bursts.
        let busy = l.acquire().await;
        assert_eq!(
            burst_after(Duration::ZERO).await,
            16,
            "no time: no doubling"
        );
        let half = burst_after(SLOW_START_DOUBLING / 2).await;
        assert_eq!(half, 22, "half the time: 16 times the square root of 2");
        let two = burst_after(SLOW_START_DOUBLING * 3 / 2).await;
        assert_eq!(two, 64, "two doublings in twice the time");
        // A quiet spell is not time spent doubling: a burst after it starts from 64 again.
        drop(busy);
        let idle = burst_after(Duration::from_secs(10)).await;
        assert_eq!(
            idle, 64,
            "after 10 s idle, a burst at once does not grow it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn overload_lowers_the_limit_once_per_round_trip_and_fast_answers_raise_it() {
        let (l, figures) = limiter(32);
        assert_eq!(l.limit(), 16, "starts small");
        // Slow start: one more per answer, so 16 answers (one round trip) double it.
        round_trip(&l, 16).await;
        assert_eq!(l.limit(), 32);
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
    async fn a_slow_down_ends_slow_start_without_lowering_the_limit() {
        let (l, _) = limiter(256);
        round_trip(&l, 16).await;
        assert_eq!(l.limit(), 32, "doubled in one round trip");
        l.acquire().await.done(Signal::SlowDown(None));
        assert_eq!(
            l.limit(),
            32,
            "a 429 is the pace's concern, not the limit's"
        );
        for _ in 0..40 {
            l.acquire()
                .await
                .done(Signal::Answered(Duration::from_millis(20)));
        }
        assert_eq!(l.limit(), 33, "then one more per limit's worth of answers");
        let (fixed, _) = {
            let figures = Arc::new(Figures::default());
            (
                Limiter::new(64, false, Duration::from_secs(1), figures.clone()),
                figures,
            )
        };
        assert_eq!(
            fixed.limit(),
            64,
            "not adaptive: the prefetch from the start"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_without_retry_after_pauses_briefly_and_longer_while_they_keep_coming() {
        let (l, _) = limiter(8);
        assert_eq!(l.paused_for(), None);
        l.acquire().await.done(Signal::SlowDown(None));
        assert_eq!(l.paused_for(), Some(BARE_PAUSE));
        // More 429s during the pause (calls that were already under way) do not extend it.
        l.state.lock().unwrap().in_flight += 1;
        l.finish(Signal::SlowDown(None));
        assert_eq!(l.paused_for(), Some(BARE_PAUSE));
        tokio::time::sleep(BARE_PAUSE).await;
        l.acquire().await.done(Signal::SlowDown(None));
        assert_eq!(
            l.paused_for(),
            Some(BARE_PAUSE * 2),
            "the next one after it: twice as long"
        );
        tokio::time::sleep(BARE_PAUSE * 2).await;
        l.acquire()
            .await
            .done(Signal::Answered(Duration::from_millis(20)));
        l.acquire().await.done(Signal::SlowDown(None));
        assert_eq!(
            l.paused_for(),
            Some(BARE_PAUSE),
            "a link in between starts over"
        );
        l.acquire()
            .await
            .done(Signal::SlowDown(Some(Duration::from_secs(3))));
        assert_eq!(
            l.paused_for(),
            Some(Duration::from_secs(3)),
            "a Retry-After is kept"
        );
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
