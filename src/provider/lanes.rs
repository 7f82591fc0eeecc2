//! One lane per `paymentProviderId`: its own circuit breaker, its own adaptive concurrency
//! limit and its share of the fleet's rate limit, so a provider that is down or overloaded never
//! slows the commands of another. Lanes are
//! made on first use; past [`MAX_LANES`] the idle ones are dropped, so a stream of made-up
//! provider ids cannot grow the worker's memory or its metrics without bound.

use super::breaker::{Breaker, State};
use super::limit::{Figures, Limiter};
use crate::config::Settings;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// The runtime's clock, so tests can pause and advance it.
use tokio::time::Instant;

/// Most lanes kept at once; idle ones beyond it are dropped.
pub const MAX_LANES: usize = 1024;

pub use crate::metrics::LaneFigures;

/// One lane, as a worker reports it in its heartbeat.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaneStatus {
    /// The provider.
    pub provider_id: i64,
    /// Calls this worker lets be under way at once now.
    pub limit: i64,
    /// Calls under way.
    pub in_flight: i64,
    /// Calls waiting for a slot.
    pub queued: i64,
    /// Calls started since the worker started.
    pub calls: u64,
    /// closed, open or half-open.
    pub breaker: String,
    /// The fleet-wide rate limit configured for it, if any.
    pub max_requests_per_second: Option<f64>,
}

/// One provider's breaker and limits.
pub struct Lane {
    /// Taken to be down after mostly failing calls.
    pub breaker: Arc<Breaker>,
    /// How many calls may be under way at once.
    pub limiter: Limiter,
    /// Calls per second for the fleet, if limited; this worker takes its share.
    rate: Option<f64>,
    /// When this worker's next call to the provider may start, and the rate it found.
    pace: Mutex<Pace>,
    figures: Arc<Figures>,
    provider_id: i64,
}

/// This worker's pace for one provider: the rate it has found the provider takes (none until the
/// first 429), and what it measured of its own calls.
struct Pace {
    next_call: Instant,
    /// Calls a second this worker found the provider takes: cut by [`RATE_CUT`] on a 429, grown
    /// by [`RATE_GROWTH`] per second without one.
    found: Option<f64>,
    /// Calls started in the current one-second window, and the rate of the last full window.
    window_start: Instant,
    window_calls: u32,
    observed: f64,
    /// Links made in the current window, and the rate of the last full one: the provider took
    /// at least that many, so a cut never goes below it.
    window_links: u32,
    observed_links: f64,
    last_cut: Option<Instant>,
    last_growth: Instant,
    /// The rate last written to the log, to log only large changes.
    logged: f64,
}

/// The factor the found rate is multiplied by on a 429.
const RATE_CUT: f64 = 0.7;
/// The factor the found rate grows by per second without a 429.
const RATE_GROWTH: f64 = 1.1;

impl Pace {
    fn new() -> Self {
        let now = Instant::now();
        Pace {
            next_call: now,
            found: None,
            window_start: now,
            window_calls: 0,
            observed: 0.0,
            window_links: 0,
            observed_links: 0.0,
            last_cut: None,
            last_growth: now,
            logged: 0.0,
        }
    }

    /// Counts a call starting now; grows the found rate once a second without a cut.
    fn count(&mut self, now: Instant) {
        let window = now.duration_since(self.window_start);
        if window >= Duration::from_secs(1) {
            self.observed = f64::from(self.window_calls) / window.as_secs_f64();
            self.observed_links = f64::from(self.window_links) / window.as_secs_f64();
            self.window_start = now;
            self.window_calls = 0;
            self.window_links = 0;
        }
        self.window_calls += 1;
        if let Some(found) = self.found
            && now.duration_since(self.last_growth) >= Duration::from_secs(1)
        {
            self.found = Some(found * RATE_GROWTH + 1.0);
            self.last_growth = now;
        }
    }
}

impl Lane {
    /// Waits for this worker's turn under the fleet's rate limit: calls are spaced evenly at
    /// `rate / workers` per second, with no burst, so the fleet never goes above the rate in any
    /// second (give or take one call per worker).
    ///
    /// Without a configured rate, or below it, the worker paces itself at the rate it found the
    /// provider takes (see [`Lane::slowed_down`]): unpaced until the first 429.
    pub async fn pace(&self, workers: usize) {
        let at = {
            let mut pace = self.pace.lock().expect("pace lock");
            let now = Instant::now();
            pace.count(now);
            let share = self.rate.map(|rate| rate / workers.max(1) as f64);
            let rate = match (share, pace.found) {
                (Some(share), Some(found)) => share.min(found),
                (one, other) => match one.or(other) {
                    Some(rate) => rate,
                    None => return,
                },
            };
            self.figures
                .rate_milli
                .store((rate * 1000.0) as i64, std::sync::atomic::Ordering::Relaxed);
            let gap = Duration::from_secs_f64(1.0 / rate.max(0.1));
            let at = pace.next_call.max(now);
            pace.next_call = at + gap;
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// A call got its link: counted towards what the provider takes.
    pub fn answered(&self) {
        self.pace.lock().expect("pace lock").window_links += 1;
    }

    /// The provider answered "slow down" (a 429, or a 503 with `Retry-After`): the rate this
    /// worker calls it at is cut to [`RATE_CUT`] of what it was (of what it measured, the first
    /// time), at most once a second, and grows back slowly while calls succeed, so the lane
    /// settles just under the provider's limit. A configured rate stays the ceiling.
    pub fn slowed_down(&self) {
        let mut pace = self.pace.lock().expect("pace lock");
        let now = Instant::now();
        if pace
            .last_cut
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        // The current window's rates (over at least 0.1 s, so the first calls of a window do
        // not read as a burst of thousands a second), or the last full window's.
        let window = now.duration_since(pace.window_start).as_secs_f64().max(0.1);
        let (current, links) = (
            f64::from(pace.window_calls) / window,
            f64::from(pace.window_links) / window,
        );
        let base = pace.found.unwrap_or(current.max(pace.observed));
        // Never below what the provider took lately: a 429 for one command (or one account's
        // burst) must not slow the lane's other commands to a crawl.
        let took = links.max(pace.observed_links);
        let cut = (base * RATE_CUT).max(took).max(1.0);
        pace.found = Some(cut);
        pace.last_cut = Some(now);
        pace.last_growth = now;
        let logged = pace.logged;
        if logged == 0.0 || (cut - logged).abs() / logged > 0.25 {
            pace.logged = cut;
            drop(pace);
            tracing::info!(
                provider_id = self.provider_id,
                rate_per_s = cut.round(),
                "the provider asks to slow down: calling it at most this often from this worker"
            );
        }
    }

    fn idle(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.breaker.state() == State::Closed
            && self.figures.in_flight.load(Relaxed) == 0
            && self.figures.queued.load(Relaxed) == 0
    }
}

/// Every provider's lane; shared by the tasks of one worker.
pub struct Lanes {
    settings: Settings,
    /// Live workers sharing the fleet's rate limits (from the heartbeat; 1 until known).
    workers: AtomicUsize,
    lanes: Mutex<HashMap<i64, Arc<Lane>>>,
    figures: Arc<LaneFigures>,
}

impl Lanes {
    /// No lanes yet; `figures` is where the metrics read each lane's limit and load.
    pub fn new(settings: &Settings, figures: Arc<LaneFigures>) -> Arc<Self> {
        Arc::new(Self {
            settings: settings.clone(),
            workers: AtomicUsize::new(1),
            lanes: Mutex::new(HashMap::new()),
            figures,
        })
    }

    /// How many workers share the fleet's rate limits now (counted through the heartbeat).
    pub fn set_workers(&self, workers: usize) {
        self.workers.store(workers.max(1), Ordering::Relaxed);
    }

    /// The workers sharing the fleet's rate limits.
    pub fn workers(&self) -> usize {
        self.workers.load(Ordering::Relaxed)
    }

    /// The lane of `provider_id`, made on first use.
    pub fn lane(&self, provider_id: i64) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        if let Some(lane) = lanes.get(&provider_id) {
            return lane.clone();
        }
        if lanes.len() >= MAX_LANES {
            let mut figures = self.figures.lock().expect("figures lock");
            lanes.retain(|id, lane| {
                let keep = Arc::strong_count(lane) > 1 || !lane.idle();
                if !keep {
                    figures.remove(id);
                }
                keep
            });
        }
        let figures = Arc::new(Figures::default());
        let retry = &self.settings.retry;
        let lane = Arc::new(Lane {
            breaker: Breaker::new(self.settings.breaker.clone()),
            limiter: Limiter::new(
                usize::from(self.settings.broker.prefetch),
                self.settings.provider.adaptive_concurrency,
                // A `Retry-After` within the retry budget pauses the lane (the wait is not
                // taken from any command's budget); a longer one ends the round as before.
                Duration::from_millis(retry.max_elapsed_ms.max(retry.max_interval_ms)),
                figures.clone(),
            ),
            rate: self.settings.provider.rate_limit(provider_id),
            pace: Mutex::new(Pace::new()),
            figures: figures.clone(),
            provider_id,
        });
        self.figures
            .lock()
            .expect("figures lock")
            .insert(provider_id, figures);
        lanes.insert(provider_id, lane.clone());
        lane
    }

    /// Each lane as `status` shows it: its concurrency limit and load, calls started so far,
    /// its breaker, and the fleet-wide rate limit configured for it.
    pub fn snapshot(&self) -> Vec<LaneStatus> {
        use std::sync::atomic::Ordering::Relaxed;
        let lanes = self.lanes.lock().expect("lanes lock");
        let mut all: Vec<LaneStatus> = lanes
            .iter()
            .map(|(id, lane)| LaneStatus {
                provider_id: *id,
                limit: lane.figures.limit.load(Relaxed),
                in_flight: lane.figures.in_flight.load(Relaxed),
                queued: lane.figures.queued.load(Relaxed),
                calls: lane.figures.started.load(Relaxed),
                breaker: match lane.breaker.state() {
                    State::Closed => "closed",
                    State::Open => "open",
                    State::HalfOpen => "half-open",
                }
                .to_owned(),
                max_requests_per_second: lane.rate,
            })
            .collect();
        all.sort_by_key(|l| l.provider_id);
        all
    }

    /// The providers whose circuit is open, and whether every known provider's is.
    pub fn open_circuits(&self) -> (Vec<i64>, bool) {
        let lanes = self.lanes.lock().expect("lanes lock");
        let mut open: Vec<i64> = lanes
            .iter()
            .filter(|(_, lane)| lane.breaker.state() == State::Open)
            .map(|(id, _)| *id)
            .collect();
        open.sort_unstable();
        let all = !lanes.is_empty() && open.len() == lanes.len();
        (open, all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(env: &[(&str, &str)]) -> Arc<Lanes> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let settings = Settings::load_from(None, env).unwrap();
        Lanes::new(&settings, Arc::new(LaneFigures::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn calls_are_paced_at_the_workers_share_of_the_fleet_rate() {
        let lanes = lanes(&[(
            "PAYMENT_LINK_WORKER__PROVIDER__MAX_REQUESTS_PER_SECOND_BY_ID",
            "5=20",
        )]);
        let lane = lanes.lane(5);
        let started = Instant::now();
        for _ in 0..11 {
            lane.pace(1).await;
        }
        // 20 a second alone: the 11th call starts 10 gaps of 50 ms after the first.
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        let started = Instant::now();
        for _ in 0..10 {
            lane.pace(4).await;
        }
        // One of four workers: 5 a second, 200 ms apart; the first waited out the 50 ms gap
        // the earlier rate left.
        assert_eq!(started.elapsed(), Duration::from_millis(50 + 9 * 200));
        let unlimited = lanes.lane(6);
        let started = Instant::now();
        for _ in 0..100 {
            unlimited.pace(4).await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "no limit for provider 6");
    }

    #[tokio::test(start_paused = true)]
    async fn lanes_are_per_provider_and_idle_ones_are_dropped_past_the_cap() {
        let lanes = lanes(&[]);
        assert!(Arc::ptr_eq(&lanes.lane(1), &lanes.lane(1)));
        assert!(!Arc::ptr_eq(&lanes.lane(1), &lanes.lane(2)));
        let busy = lanes.lane(3);
        for id in 100..(100 + MAX_LANES as i64 * 2) {
            lanes.lane(id);
        }
        assert!(lanes.lanes.lock().unwrap().len() <= MAX_LANES + 1);
        assert!(Arc::ptr_eq(&busy, &lanes.lane(3)), "a lane in use is kept");
        assert!(lanes.figures.lock().unwrap().len() <= MAX_LANES + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_that_says_slow_down_is_paced_under_the_rate_it_took_and_grows_back() {
        let lanes = lanes(&[]);
        let lane = lanes.lane(8);
        // 100 calls a second, unpaced: nobody said what the provider takes.
        let started = Instant::now();
        for _ in 0..100 {
            lane.pace(1).await;
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(started.elapsed(), Duration::from_secs(1), "unpaced");
        lane.pace(1).await; // closes the measured second
        lane.slowed_down();
        lane.slowed_down(); // a second 429 in the same second cuts nothing more
        // Cut to 70 a second: 8 calls take 7 gaps of 1/70 s.
        let started = Instant::now();
        for _ in 0..8 {
            lane.pace(1).await;
        }
        let gaps = started.elapsed().as_secs_f64();
        assert!((0.09..0.11).contains(&gaps), "7 gaps of 1/70 s: {gaps}");
        // A second without a 429: a little faster (70 × 1.1 + 1 = 78 a second).
        tokio::time::advance(Duration::from_secs(1)).await;
        lane.pace(1).await;
        let found = lane.pace.lock().unwrap().found.unwrap();
        assert!((77.5..78.5).contains(&found), "{found}");
    }
}
