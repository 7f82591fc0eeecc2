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
    /// When this worker's next call to the provider may start.
    next_call: Mutex<Instant>,
    figures: Arc<Figures>,
}

impl Lane {
    /// Waits for this worker's turn under the fleet's rate limit: calls are spaced evenly at
    /// `rate / workers` per second, with no burst, so the fleet never goes above the rate in any
    /// second (give or take one call per worker).
    pub async fn pace(&self, workers: usize) {
        let Some(rate) = self.rate else {
            return;
        };
        let gap = Duration::from_secs_f64(workers.max(1) as f64 / rate);
        let at = {
            let mut next = self.next_call.lock().expect("pace lock");
            let at = (*next).max(Instant::now());
            *next = at + gap;
            at
        };
        tokio::time::sleep_until(at).await;
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
            next_call: Mutex::new(Instant::now()),
            figures: figures.clone(),
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
}
