//! One lane per `paymentProviderId`: its own circuit breaker and its own pacing (concurrency
//! limit and share of the fleet's rate, see [`super::pacing`]), so a provider that is down or
//! overloaded never slows the commands of another. This module only keeps the lanes: they are
//! made on first use and dropped once no command has used them for [`LANE_IDLE`], whatever their
//! breaker says (a lane held by a command, between its tries too, is kept); past [`MAX_LANES`]
//! the idle ones go first, then the least lately used that no command holds. So a stream of
//! made-up provider ids cannot grow the worker's memory, its metrics or `/readyz` without bound.
//! What a lane found ([`Memory`]) outlives it here, up to [`MAX_LANES`] providers: a lane made
//! again, or first made in a worker that read the fleet's memories at start, starts from it.

use super::breaker::{Breaker, State};
use super::pacing::concurrency::Figures;
use super::pacing::{Memory, Pacer};
use crate::config::Settings;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// The runtime's clock, so tests can pause and advance it.
use tokio::time::Instant;

/// Most lanes kept at once; idle ones beyond it are dropped.
pub const MAX_LANES: usize = 1024;
/// A lane no command has used for this long is dropped, whatever its breaker says (a provider
/// still down opens a new lane's breaker again).
pub const LANE_IDLE: Duration = Duration::from_secs(10 * 60);

pub use crate::metrics::LaneFigures;

/// Keeps the newest [`MAX_LANES`] memories: made-up provider ids cannot grow them without bound.
fn forget_the_oldest(remembered: &mut HashMap<i64, (Memory, Instant)>) {
    if remembered.len() <= MAX_LANES {
        return;
    }
    let mut ages: Vec<(Instant, i64)> = remembered.iter().map(|(id, (_, at))| (*at, *id)).collect();
    ages.sort_unstable();
    for (_, id) in ages.into_iter().take(remembered.len() - MAX_LANES) {
        remembered.remove(&id);
    }
}

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
    /// Its circuit breaker's state.
    pub breaker: State,
    /// The fleet-wide rate limit configured for it, if any.
    pub max_requests_per_second: Option<f64>,
    /// The fleet-wide rate this worker found (or adopted from the others) from the provider's
    /// 429s; none while unpaced.
    #[serde(default)]
    pub found_rate: Option<f64>,
    /// How long before the report the found rate was last cut.
    #[serde(default)]
    pub since_cut_ms: Option<u64>,
    /// Answers that asked to slow down, since the worker started.
    #[serde(default)]
    pub slowed_down: u64,
}

/// One provider's breaker and pacing.
pub struct Lane {
    /// Taken to be down after mostly failing calls.
    pub breaker: Arc<Breaker>,
    /// How many calls at once, and how often.
    pub pacer: Pacer,
    figures: Arc<Figures>,
    /// When a command last asked for this lane.
    used: Mutex<Instant>,
}

impl Lane {
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
    /// What each provider's lane last found, and when (a lane made later starts from it).
    remembered: Mutex<HashMap<i64, (Memory, Instant)>>,
}

impl Lanes {
    /// No lanes yet; `figures` is where the metrics read each lane's limit and load.
    pub fn new(settings: &Settings, figures: Arc<LaneFigures>) -> Arc<Self> {
        Arc::new(Self {
            settings: settings.clone(),
            workers: AtomicUsize::new(1),
            lanes: Mutex::new(HashMap::new()),
            figures,
            remembered: Mutex::new(HashMap::new()),
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

    /// The lane of `provider_id`, made on first use (dropping the lanes no command used lately).
    pub fn lane(&self, provider_id: i64) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        if let Some(lane) = lanes.get(&provider_id) {
            *lane.used.lock().expect("lane use lock") = Instant::now();
            return lane.clone();
        }
        {
            let mut figures = self.figures.lock().expect("figures lock");
            let full = lanes.len() >= MAX_LANES;
            lanes.retain(|id, lane| {
                let held = Arc::strong_count(lane) > 1;
                let stale = lane.used.lock().expect("lane use lock").elapsed() >= LANE_IDLE;
                let keep = held || !(stale || (full && lane.idle()));
                if !keep {
                    figures.remove(id);
                }
                keep
            });
            // Still full of lanes used lately (a flood of made-up ids): the least lately used
            // that no command holds go.
            if lanes.len() >= MAX_LANES {
                let mut free: Vec<(Instant, i64)> = lanes
                    .iter()
                    .filter(|(_, lane)| Arc::strong_count(lane) == 1)
                    .map(|(id, lane)| (*lane.used.lock().expect("lane use lock"), *id))
                    .collect();
                free.sort_unstable();
                for (_, id) in free.into_iter().take(lanes.len() + 1 - MAX_LANES) {
                    lanes.remove(&id);
                    figures.remove(&id);
                }
            }
        }
        let figures = Arc::new(Figures::default());
        let retry = &self.settings.retry;
        let lane = Arc::new(Lane {
            breaker: Breaker::showing(self.settings.breaker.clone(), figures.clone()),
            pacer: Pacer::new(
                provider_id,
                usize::from(self.settings.broker.prefetch),
                self.settings.provider.adaptive_concurrency,
                self.settings.provider.rate_limit(provider_id),
                // A `Retry-After` within the retry budget pauses the lane (the wait is not
                // taken from any command's budget); a longer one ends the round as before.
                Duration::from_millis(retry.max_elapsed_ms.max(retry.max_interval_ms)),
                figures.clone(),
            ),
            figures: figures.clone(),
            used: Mutex::new(Instant::now()),
        });
        if let Some((memory, written)) = self
            .remembered
            .lock()
            .expect("memory lock")
            .get(&provider_id)
        {
            lane.pacer.recall(*memory, written.elapsed());
        }
        self.figures
            .lock()
            .expect("figures lock")
            .insert(provider_id, figures);
        lanes.insert(provider_id, lane.clone());
        lane
    }

    /// Takes what the fleet found of each provider, each written `age` ago (read from
    /// PostgreSQL at start): the lanes made from now on start from it.
    pub fn recall(&self, memories: impl IntoIterator<Item = (i64, Memory, Duration)>) {
        let now = Instant::now();
        let mut remembered = self.remembered.lock().expect("memory lock");
        for (provider_id, memory, age) in memories {
            let written = now.checked_sub(age).unwrap_or(now);
            remembered.insert(provider_id, (memory, written));
        }
        forget_the_oldest(&mut remembered);
    }

    /// What each lane found worth remembering, to be written to PostgreSQL; kept here too, so a
    /// lane dropped while idle starts from it when made again.
    pub fn memories(&self) -> Vec<(i64, Memory)> {
        let found: Vec<(i64, Memory)> = {
            let lanes = self.lanes.lock().expect("lanes lock");
            lanes
                .iter()
                .filter_map(|(id, lane)| Some((*id, lane.pacer.memory()?)))
                .collect()
        };
        let now = Instant::now();
        let mut remembered = self.remembered.lock().expect("memory lock");
        for (provider_id, memory) in &found {
            remembered.insert(*provider_id, (*memory, now));
        }
        forget_the_oldest(&mut remembered);
        found
    }

    /// Each lane as `status` shows it: its concurrency limit and load, calls started so far,
    /// its breaker, and the fleet-wide rate limit configured for it.
    pub fn snapshot(&self) -> Vec<LaneStatus> {
        use std::sync::atomic::Ordering::Relaxed;
        let lanes = self.lanes.lock().expect("lanes lock");
        let mut all: Vec<LaneStatus> = lanes
            .iter()
            .map(|(id, lane)| (id, lane, lane.pacer.rate.found()))
            .map(|(id, lane, (found, since_cut))| LaneStatus {
                provider_id: *id,
                limit: lane.figures.limit.load(Relaxed),
                in_flight: lane.figures.in_flight.load(Relaxed),
                queued: lane.figures.queued.load(Relaxed),
                calls: lane.figures.started.load(Relaxed),
                breaker: lane.breaker.state(),
                max_requests_per_second: lane.pacer.rate.configured(),
                found_rate: found,
                since_cut_ms: since_cut.map(|d| d.as_millis() as u64),
                slowed_down: lane.figures.slowed_down.load(Relaxed),
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
    async fn lanes_are_per_provider_and_idle_ones_are_dropped_past_the_cap() {
        let lanes = lanes(&[(
            "PAYMENT_LINK_WORKER__PROVIDER__MAX_REQUESTS_PER_SECOND_BY_ID",
            "5=20",
        )]);
        assert_eq!(lanes.lane(5).pacer.rate.configured(), Some(20.0));
        assert_eq!(lanes.lane(6).pacer.rate.configured(), None);
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

    /// A lane starts from what the fleet remembered, under a configured ceiling, trusted less
    /// the older it is; a lane dropped while idle starts from what it had found when made again;
    /// made-up ids cannot grow the memories past [`MAX_LANES`].
    #[tokio::test(start_paused = true)]
    async fn lanes_start_from_what_was_remembered_under_the_configured_ceiling() {
        let lanes = lanes(&[(
            "PAYMENT_LINK_WORKER__PROVIDER__MAX_REQUESTS_PER_SECOND_BY_ID",
            "5=20",
        )]);
        let memory = |found: f64| Memory {
            found: Some(found),
            refused: Some(found * 1.05),
            concurrency: 40.0,
            slow_start: false,
        };
        let hour = Duration::from_secs(3600);
        lanes.recall([
            (4, memory(120.0), Duration::from_secs(30)),
            (5, memory(400.0), Duration::from_secs(30)),
            (6, memory(120.0), hour + Duration::from_secs(60)),
        ]);
        assert_eq!(lanes.lane(4).pacer.rate.found().0, Some(120.0));
        assert_eq!(
            lanes.lane(4).pacer.memory().map(|m| m.concurrency),
            Some(40.0),
            "its calls at once too"
        );
        assert_eq!(
            lanes.lane(5).pacer.rate.found().0,
            Some(20.0),
            "never above the configured rate"
        );
        assert_eq!(
            lanes.lane(6).pacer.rate.found().0,
            Some(60.0),
            "an hour older: trusted half"
        );
        assert_eq!(lanes.lane(7).pacer.rate.found().0, None, "nothing known");
        // Provider 4's lane, dropped while idle, starts from what it had found when made again.
        assert!(lanes.memories().iter().any(|(id, _)| *id == 4));
        lanes.lanes.lock().unwrap().remove(&4);
        assert_eq!(lanes.lane(4).pacer.rate.found().0, Some(120.0));
        lanes.recall((1000..1000 + 2 * MAX_LANES as i64).map(|id| (id, memory(50.0), hour)));
        assert!(lanes.remembered.lock().unwrap().len() <= MAX_LANES);
    }

    #[tokio::test(start_paused = true)]
    async fn lanes_nobody_uses_are_dropped_whatever_their_breaker_says() {
        let lanes = lanes(&[("PAYMENT_LINK_WORKER__BREAKER__MIN_CALLS", "1")]);
        // Lanes of made-up ids whose breakers opened (each call failed).
        for id in 0..50 {
            let lane = lanes.lane(id);
            lane.breaker.try_admit().unwrap().record(true);
            assert_eq!(lane.breaker.state(), State::Open);
        }
        let held = lanes.lane(7);
        assert_eq!(lanes.open_circuits().0.len(), 50);
        tokio::time::advance(LANE_IDLE).await;
        let fresh = lanes.lane(1000);
        let kept: Vec<i64> = lanes.snapshot().iter().map(|l| l.provider_id).collect();
        assert_eq!(kept, [7, 1000], "only the held lane and the new one");
        assert!(Arc::ptr_eq(&held, &lanes.lane(7)));
        assert_eq!(lanes.figures.lock().unwrap().len(), 2);
        drop(fresh);

        // Past the cap with lanes all used lately: the least lately used go, never a held one.
        for id in 2000..(2000 + MAX_LANES as i64 + 10) {
            let lane = lanes.lane(id);
            lane.breaker.try_admit().unwrap().record(true);
        }
        assert!(lanes.lanes.lock().unwrap().len() <= MAX_LANES);
        assert!(Arc::ptr_eq(&held, &lanes.lane(7)), "held through the flood");
    }
}
