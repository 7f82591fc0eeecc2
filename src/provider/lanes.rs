//! One lane per `paymentProviderId`: its own circuit breaker, its own adaptive concurrency
//! limit and its share of the fleet's rate limit, so a provider that is down or overloaded never
//! slows the commands of another. Lanes are
//! made on first use and dropped once no command has used them for [`LANE_IDLE`], whatever their
//! breaker says (a lane held by a command, between its tries too, is kept); past [`MAX_LANES`]
//! the idle ones go first, then the least lately used that no command holds. So a stream of
//! made-up provider ids cannot grow the worker's memory, its metrics or `/readyz` without bound.

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
/// A lane no command has used for this long is dropped, whatever its breaker says (a provider
/// still down opens a new lane's breaker again).
pub const LANE_IDLE: Duration = Duration::from_secs(10 * 60);

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
    /// When a command last asked for this lane.
    used: Mutex<Instant>,
}

/// This worker's pace for one provider: the rate the fleet found the provider takes (none until
/// the first 429), when it was last cut, and what this worker measured of its own calls.
struct Pace {
    /// When each turn to call comes, at the current spacing.
    schedule: Schedule,
    /// Calls a second the whole fleet may make to the provider, as found from its answers: cut on
    /// a 429, grown back while calls wait on it (see [`growth`]), evened out between replicas
    /// through their heartbeats ([`Lane::adopt`]). This worker takes `found / workers`.
    found: Option<f64>,
    /// When the provider last said slow down (here, or in another replica's report).
    last_cut: Option<Instant>,
    /// The fleet rate the provider last refused (what was cut from).
    refused: Option<f64>,
    /// The rate before the last growth, if it grew since the last cut: it ran a whole second
    /// without a 429, so a probe that overshoots is cut back under it.
    before_growth: Option<f64>,
    last_growth: Instant,
    /// Whether a call waited on the pace since the last growth: the rate grows only while it is
    /// what holds calls back, never while demand is below it.
    held_back: bool,
    /// Links made in each tenth of the trailing second: what the provider took from this worker.
    links: [u32; 10],
    /// Calls started in each tenth of the trailing second.
    calls: [u32; 10],
    /// The tenth of a second (counted from `origin`) the buckets were last moved up to.
    tenth: u64,
    origin: Instant,
    /// The rate last written to the log, to log only large changes.
    logged: f64,
}

/// A cut never takes the rate below this fraction of what it was, however little the provider
/// took in the last second (a burst from elsewhere must not crush the lane in one go).
const MAX_CUT: f64 = 0.7;
/// No cut goes below this many calls a second: a provider that answers 429 to the very first
/// call says nothing yet about its rate, and a lane cut to one call a second would crawl (its
/// `Retry-After`, or our own short pause without one, still holds back a provider slower still).
const MIN_RATE: f64 = 5.0;
/// A 429 this soon after the last cut cuts by 30 % at least ([`REPEATED_CUT`]); a cut this
/// recent in another replica's report outweighs the rates of those that were not told to slow
/// down since (see `fleet`).
pub const FRESH_CUT: Duration = Duration::from_secs(3);
const REPEATED_CUT: f64 = 0.7;
/// A repeated cut never takes the rate below this fraction of what it was.
const REPEATED_FLOOR: f64 = 0.5;
/// Once the provider takes this much more than the rate it last refused, its limit has gone up:
/// the rate grows by [`FAST_GROWTH`] a second.
const ABOVE_REFUSED: f64 = 1.02;
const FAST_GROWTH: f64 = 0.3;
/// After a 429 the rate is set this far under what the provider took in the trailing second.
const UNDER_TAKEN: f64 = 0.95;
/// For this long after a cut the rate holds: the provider's window settles before it is probed.
const HOLD: Duration = Duration::from_secs(2);

/// The fraction the found rate grows by in the second that ends `since_cut` after the last cut:
/// nothing while it holds, then 1 % a second, half as much again every second after (slow up to
/// the rate the provider refused, faster the longer it takes more), at most 20 % (and
/// [`FAST_GROWTH`] once it takes clearly more than it refused).
fn growth(since_cut: Duration) -> f64 {
    if since_cut < HOLD {
        return 0.0;
    }
    let probing = (since_cut - HOLD).as_secs_f64();
    (0.01 * 1.5f64.powf(probing)).min(0.2)
}

/// The turns handed out to calls, spaced `gap` apart from the anchor: a turn's time is computed
/// when it comes, from the spacing then. A cut re-spaces the turns already handed out (the calls
/// waiting on them would otherwise go out at the old rate, for as long as a concurrency limit's
/// worth of turns lasts, and be refused again); a turn is kept, not reset, so the calls waiting
/// do not all go at once.
struct Schedule {
    anchor_at: Instant,
    anchor_turn: u64,
    gap: Duration,
    next_turn: u64,
}

impl Schedule {
    /// From the last turn that has come (by `now`), turns come `gap` apart; those already due
    /// stay due.
    fn space(&mut self, now: Instant, gap: Duration) {
        if gap == self.gap {
            return;
        }
        if self.next_turn > 0 && !self.gap.is_zero() {
            let old = self.gap.as_secs_f64();
            let came = if now >= self.anchor_at {
                let after = (now - self.anchor_at).as_secs_f64() / old + 1e-9;
                (self.anchor_turn + after.floor() as u64).min(self.next_turn - 1)
            } else {
                let before = (self.anchor_at - now).as_secs_f64() / old - 1e-9;
                self.anchor_turn.saturating_sub(before.ceil() as u64)
            };
            self.anchor_at = self.time_of(came);
            self.anchor_turn = came;
        }
        self.gap = gap;
    }

    fn time_of(&self, turn: u64) -> Instant {
        let gaps = |n: u64| Duration::from_secs_f64(self.gap.as_secs_f64() * n as f64);
        if turn >= self.anchor_turn {
            self.anchor_at + gaps(turn - self.anchor_turn)
        } else {
            let before = gaps(self.anchor_turn - turn);
            self.anchor_at.checked_sub(before).unwrap_or(self.anchor_at)
        }
    }

    /// The next turn and its time; never in the past (an idle lane does not save up a burst).
    /// The schedule is anchored at it, so the turns' times stay exact however long it runs.
    fn hand_out(&mut self, now: Instant) -> (u64, Instant) {
        let turn = self.next_turn;
        self.next_turn += 1;
        let at = self.time_of(turn).max(now);
        self.anchor_at = at;
        self.anchor_turn = turn;
        (turn, at)
    }
}

impl Pace {
    fn new() -> Self {
        let now = Instant::now();
        Pace {
            schedule: Schedule {
                anchor_at: now,
                anchor_turn: 0,
                gap: Duration::ZERO,
                next_turn: 0,
            },
            found: None,
            last_cut: None,
            refused: None,
            before_growth: None,
            last_growth: now,
            held_back: false,
            links: [0; 10],
            calls: [0; 10],
            tenth: 0,
            origin: now,
            logged: 0.0,
        }
    }

    /// Moves the trailing-second buckets up to `now`.
    fn roll(&mut self, now: Instant) {
        let tenth = (now.duration_since(self.origin).as_millis() / 100) as u64;
        let stale = tenth.saturating_sub(self.tenth).min(10);
        for step in 1..=stale {
            let slot = ((self.tenth + step) % 10) as usize;
            self.links[slot] = 0;
            self.calls[slot] = 0;
        }
        self.tenth = tenth;
    }

    /// Links this worker made in the trailing second, and calls it started.
    fn taken(&mut self, now: Instant) -> (f64, f64) {
        self.roll(now);
        (
            f64::from(self.links.iter().sum::<u32>()),
            f64::from(self.calls.iter().sum::<u32>()),
        )
    }

    /// Grows the found rate once a second while it holds calls back, by [`growth`].
    fn grow(&mut self, now: Instant, ceiling: Option<f64>) {
        if now.duration_since(self.last_growth) < Duration::from_secs(1) {
            return;
        }
        if let Some(found) = self.found
            && self.held_back
        {
            let since_cut = self
                .last_cut
                .map_or(Duration::MAX, |at| now.duration_since(at));
            // Plus one a second, so a rate cut very low climbs back in seconds, not minutes.
            let mut g = growth(since_cut);
            if g > 0.0
                && self
                    .refused
                    .is_some_and(|refused| found > refused * ABOVE_REFUSED)
            {
                g = g.max(FAST_GROWTH);
            }
            let grown = if g > 0.0 {
                self.before_growth = Some(found);
                found * (1.0 + g) + 1.0
            } else {
                found
            };
            self.found = Some(ceiling.map_or(grown, |c| grown.min(c)));
        }
        self.last_growth = now;
        self.held_back = false;
    }
}

impl Lane {
    /// Waits for this worker's turn under the fleet's rate: calls are spaced evenly at
    /// `rate / workers` per second, with no burst, so the fleet never goes above the rate in any
    /// second (give or take one call per worker). The rate is the configured one, or below it the
    /// one the fleet found the provider takes (see [`Lane::slowed_down`]): unpaced until the
    /// first 429.
    pub async fn pace(&self, workers: usize) {
        let turn = {
            let mut pace = self.pace.lock().expect("pace lock");
            let now = Instant::now();
            pace.roll(now);
            let tenth = (pace.tenth % 10) as usize;
            pace.calls[tenth] += 1;
            pace.grow(now, self.rate);
            let Some(gap) = self.gap(&pace, workers) else {
                return;
            };
            pace.schedule.space(now, gap);
            let (turn, at) = pace.schedule.hand_out(now);
            if at <= now {
                return;
            }
            pace.held_back = true;
            (turn, at)
        };
        // The turn's time is read again when it comes: a cut meanwhile moves it later.
        let (turn, mut at) = turn;
        loop {
            tokio::time::sleep_until(at).await;
            at = {
                let mut pace = self.pace.lock().expect("pace lock");
                if let Some(gap) = self.gap(&pace, workers) {
                    pace.schedule.space(Instant::now(), gap);
                }
                pace.schedule.time_of(turn)
            };
            if at <= Instant::now() {
                return;
            }
        }
    }

    /// The spacing of this worker's calls: `workers` share the configured rate, or below it the
    /// one the fleet found (none: unpaced).
    fn gap(&self, pace: &Pace, workers: usize) -> Option<Duration> {
        let rate = match (self.rate, pace.found) {
            (Some(configured), Some(found)) => configured.min(found),
            (one, other) => one.or(other)?,
        };
        self.figures
            .rate_milli
            .store((rate * 1000.0) as i64, std::sync::atomic::Ordering::Relaxed);
        Some(Duration::from_secs_f64(
            workers.max(1) as f64 / rate.max(0.1),
        ))
    }

    /// A call got its link: counted towards what the provider takes.
    pub fn answered(&self) {
        let mut pace = self.pace.lock().expect("pace lock");
        pace.roll(Instant::now());
        let tenth = (pace.tenth % 10) as usize;
        pace.links[tenth] += 1;
    }

    /// The provider answered "slow down" (a 429, or a 503 with `Retry-After`): at most once a
    /// second, the fleet's rate is set just under what the provider took from this worker in the
    /// trailing second times the workers (they pace alike), within bounds of what it was (see
    /// the cases below); it then holds, and grows back while calls wait on it, so the lane
    /// settles just under the provider's limit. A configured rate stays the ceiling.
    pub fn slowed_down(&self, workers: usize) {
        self.figures
            .slowed_down
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut pace = self.pace.lock().expect("pace lock");
        let now = Instant::now();
        if pace
            .last_cut
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        let (links, calls) = pace.taken(now);
        let workers = workers.max(1) as f64;
        let under = (links * workers * UNDER_TAKEN).max(1.0);
        let recent = pace
            .last_cut
            .is_some_and(|at| now.duration_since(at) < FRESH_CUT);
        let cut = match pace.found {
            // The first: just under what the provider took; when it took next to nothing (a 429
            // to the very first calls), 0.7 of the rate the calls went out at.
            None if links >= MIN_RATE => under,
            None => calls * workers * MAX_CUT,
            // Still told to slow down right after a cut: the rate is still over the limit (the
            // limit fell). 30 % off at least, so a halved limit is found in two cuts, each
            // costing a `Retry-After` pause; down to what the provider took when that is lower
            // (a 429 within a second of a pause: the trailing second holds only the provider's
            // new window), but not below half (it reads low when this replica sat out a pause).
            Some(found) if recent => under.max(found * REPEATED_FLOOR).min(found * REPEATED_CUT),
            // Every other cut lowers the rate by 5 % at least (what this worker took, times the
            // workers, overstates the fleet's take when another replica sat out a pause, and a
            // trailing second that straddles two of the provider's windows reads high), and by
            // 30 % at most. A probe that grew past the limit goes back under the rate it grew
            // from (which the provider took for a whole second): the trailing second reads
            // the probe's own rate, and a cut to just under that would still be over the limit.
            Some(found) => under
                .min(pace.before_growth.map_or(f64::MAX, |r| r * UNDER_TAKEN))
                .max(found * MAX_CUT)
                .min(found * UNDER_TAKEN),
        }
        .max(MIN_RATE);
        let cut = self.rate.map_or(cut, |c| cut.min(c));
        pace.refused = Some(pace.found.unwrap_or(links * workers));
        pace.before_growth = None;
        pace.found = Some(cut);
        pace.last_cut = Some(now);
        pace.last_growth = now;
        pace.held_back = false;
        let logged = pace.logged;
        if logged == 0.0 || (cut - logged).abs() / logged > 0.25 {
            pace.logged = cut;
            drop(pace);
            tracing::info!(
                provider_id = self.provider_id,
                rate_per_s = cut.round(),
                "the provider asks to slow down: the fleet calls it at most this often"
            );
        }
    }

    /// Takes the fleet's view of the provider's rate, from the replicas' heartbeats: `found`, the
    /// mean of their found rates, and how long ago the latest of them was cut (the growth holds
    /// after a cut anywhere in the fleet).
    pub fn adopt(&self, found: f64, since_cut: Option<Duration>) {
        let mut pace = self.pace.lock().expect("pace lock");
        let now = Instant::now();
        // Within a tenth of the fleet's, this worker keeps its own: the reports are a beat old,
        // and taking them every beat would undo each second's growth. Above it, too, unless the
        // fleet's is a fresh cut: the replicas grow a second apart, and the mean would hold back
        // the one that grew first.
        let fresh = since_cut.is_some_and(|since| since < FRESH_CUT);
        let keep = pace
            .found
            .is_some_and(|ours| (ours - found).abs() <= 0.1 * found || (ours > found && !fresh));
        if !keep {
            let found = self.rate.map_or(found, |c| found.min(c)).max(MIN_RATE);
            pace.found = Some(found);
            self.figures.rate_milli.store(
                (found * 1000.0) as i64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        if let Some(since) = since_cut
            && let Some(at) = now.checked_sub(since)
            && pace.last_cut.is_none_or(|ours| ours < at)
        {
            pace.last_cut = Some(at);
            // Its refused rate is not in the report; a cut sets the rate just under it.
            pace.refused = Some(found / UNDER_TAKEN);
        }
    }

    /// The fleet rate this worker found or adopted, and how long ago it was last cut.
    fn found(&self) -> (Option<f64>, Option<Duration>) {
        let pace = self.pace.lock().expect("pace lock");
        (pace.found, pace.last_cut.map(|at| at.elapsed()))
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
            used: Mutex::new(Instant::now()),
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
            .map(|(id, lane)| (id, lane, lane.found()))
            .map(|(id, lane, (found, since_cut))| LaneStatus {
                provider_id: *id,
                limit: lane.figures.limit.load(Relaxed),
                in_flight: lane.figures.in_flight.load(Relaxed),
                queued: lane.figures.queued.load(Relaxed),
                calls: lane.figures.started.load(Relaxed),
                breaker: lane.breaker.state(),
                max_requests_per_second: lane.rate,
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
    async fn a_cut_re_spaces_the_turns_already_handed_out() {
        let lanes = lanes(&[]);
        let lane = lanes.lane(1);
        lane.adopt(100.0, None);
        lane.pace(1).await;
        let started = Instant::now();
        let waiting: Vec<_> = (0..10)
            .map(|_| {
                let lane = lane.clone();
                tokio::spawn(async move {
                    lane.pace(1).await;
                    Instant::now()
                })
            })
            .collect();
        // The turns at 10 and 20 ms come at 100 a second; then the rate halves.
        tokio::time::sleep(Duration::from_millis(25)).await;
        lane.adopt(50.0, Some(Duration::ZERO));
        let mut came = Vec::new();
        for call in waiting {
            came.push(call.await.unwrap() - started);
        }
        came.sort();
        // The first turn to come after the cut (at 30 ms) re-spaces the rest from itself: the
        // other seven follow 20 ms apart, not 10 ms.
        let expected: Vec<Duration> = [10, 20, 30, 50, 70, 90, 110, 130, 150, 170]
            .into_iter()
            .map(Duration::from_millis)
            .collect();
        assert_eq!(came, expected);
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
        // One of four workers: 5 a second, 200 ms apart from the last turn, the first included
        // (a change of rate re-spaces the turns not yet come).
        assert_eq!(started.elapsed(), Duration::from_millis(10 * 200));
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

    #[tokio::test(start_paused = true)]
    async fn a_provider_that_says_slow_down_is_paced_under_what_it_took_then_probed_slowly() {
        let lanes = lanes(&[]);
        let lane = lanes.lane(8);
        // 100 calls a second, unpaced (nobody said what the provider takes), each a link.
        let started = Instant::now();
        for i in 0..100 {
            if i > 0 {
                tokio::time::advance(Duration::from_millis(10)).await;
            }
            lane.pace(1).await;
            lane.answered();
        }
        assert_eq!(started.elapsed(), Duration::from_millis(990), "unpaced");
        lane.slowed_down(1);
        lane.slowed_down(1); // a second 429 in the same second cuts nothing more
        assert_eq!(
            lane.found().0,
            Some(95.0),
            "95 % of the 100 taken in the last second"
        );
        assert_eq!(
            lanes.figures.lock().unwrap()[&8]
                .slowed_down
                .load(Ordering::Relaxed),
            2
        );
        // Paced at 95 a second: 8 calls take 7 gaps of 1/95 s.
        let started = Instant::now();
        for _ in 0..8 {
            lane.pace(1).await;
        }
        let gaps = started.elapsed().as_secs_f64();
        assert!((0.07..0.08).contains(&gaps), "7 gaps of 1/95 s: {gaps}");
        // Held back for the next two seconds: the rate holds.
        for _ in 0..180 {
            lane.pace(1).await;
        }
        assert_eq!(lane.found().0, Some(95.0), "no growth while it holds");
        // Then it grows 1 % in the next second while calls wait on it, more after.
        for _ in 0..80 {
            lane.pace(1).await;
        }
        let grown = lane.found().0.unwrap();
        assert!((96.9..97.0).contains(&grown), "1 % and one more: {grown}");
        // Two workers share the fleet's rate: each takes half.
        let started = Instant::now();
        for _ in 0..5 {
            lane.pace(2).await;
        }
        let gaps = started.elapsed().as_secs_f64();
        assert!(
            (4.0 * 2.0 / 97.0..5.0 * 2.0 / 95.0).contains(&gaps),
            "{gaps}"
        );
        // A 429 when this worker took little lately cuts to 70 % at most.
        tokio::time::advance(Duration::from_secs(2)).await;
        let before = lane.found().0.unwrap();
        lane.slowed_down(1);
        assert_eq!(lane.found().0, Some(before * MAX_CUT));
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_adopt_the_fleets_rate_and_its_latest_cut() {
        let lanes = lanes(&[(
            "PAYMENT_LINK_WORKER__PROVIDER__MAX_REQUESTS_PER_SECOND_BY_ID",
            "9=150",
        )]);
        let fresh = lanes.lane(3);
        assert_eq!(fresh.found(), (None, None), "unpaced until told");
        fresh.adopt(120.0, Some(Duration::from_millis(500)));
        let (found, since) = fresh.found();
        assert_eq!(found, Some(120.0));
        assert_eq!(
            since,
            Some(Duration::from_millis(500)),
            "holds as the fleet does"
        );
        // Paced at its share at once: 120 for 3 workers, 40 a second each.
        let started = Instant::now();
        for _ in 0..5 {
            fresh.pace(3).await;
        }
        assert_eq!(started.elapsed(), Duration::from_millis(4 * 25));
        // A replica that grew past the fleet keeps its rate, unless the fleet's is a fresh cut.
        fresh.adopt(200.0, None);
        fresh.adopt(150.0, Some(Duration::from_secs(5)));
        assert_eq!(
            fresh.found().0,
            Some(200.0),
            "the others have not grown yet"
        );
        fresh.adopt(150.0, Some(Duration::from_millis(200)));
        assert_eq!(
            fresh.found().0,
            Some(150.0),
            "one of them was just told to slow down"
        );
        // A configured rate stays the ceiling.
        let capped = lanes.lane(9);
        capped.adopt(400.0, None);
        assert_eq!(capped.found().0, Some(150.0));
    }

    #[test]
    fn growth_holds_then_probes_slowly_then_faster() {
        assert_eq!(growth(Duration::from_millis(1900)), 0.0);
        assert!((growth(Duration::from_secs(2)) - 0.01).abs() < 1e-9);
        assert!((growth(Duration::from_secs(4)) - 0.0225).abs() < 1e-9);
        assert_eq!(growth(Duration::from_secs(30)), 0.2);
        assert_eq!(growth(Duration::MAX), 0.2, "never cut: the fastest probe");
    }
}

#[cfg(test)]
mod first_cut {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_429_to_the_first_calls_paces_at_most_a_little_under_their_rate() {
        let settings = Settings::load_from(None, Vec::<(String, String)>::new()).unwrap();
        let lanes = Lanes::new(&settings, Arc::new(LaneFigures::default()));
        let lane = lanes.lane(1);
        for _ in 0..16 {
            lane.pace(1).await;
        }
        lane.slowed_down(1);
        let found = lane.found().0.unwrap();
        assert!((11.0..11.5).contains(&found), "{found}");
    }

    #[tokio::test(start_paused = true)]
    async fn cuts_are_to_what_was_taken_within_bounds_and_growth_speeds_up_past_the_refused_rate() {
        let settings = Settings::load_from(None, Vec::<(String, String)>::new()).unwrap();
        let lanes = Lanes::new(&settings, Arc::new(LaneFigures::default()));
        let lane = lanes.lane(1);
        lane.adopt(200.0, None);
        // 100 links in the last second, then a 429: 95 % of them, but a cut takes 30 % at most.
        for _ in 0..100 {
            lane.answered();
            tokio::time::advance(Duration::from_millis(9)).await;
        }
        lane.slowed_down(1);
        assert_eq!(lane.found().0, Some(140.0), "not below 70 % of 200");
        // One within a second of that cut is the same episode: no cut.
        tokio::time::advance(Duration::from_millis(500)).await;
        lane.slowed_down(1);
        assert_eq!(lane.found().0, Some(140.0));
        // 1.2 s later, still told to slow down: the limit fell, 30 % off at least (the 110
        // links in the trailing second say 104.5).
        tokio::time::advance(Duration::from_millis(700)).await;
        for _ in 0..110 {
            lane.answered();
            tokio::time::advance(Duration::from_millis(4)).await;
        }
        lane.slowed_down(1);
        assert_eq!(lane.found().0, Some(98.0));
        // After the hold, while calls wait on it, it grows slowly up to the rate refused (140)…
        let grown_by = |lane: Arc<Lane>, seconds: u32| async move {
            let before = lane.found().0.unwrap();
            for _ in 0..seconds {
                tokio::time::advance(Duration::from_secs(1)).await;
                lane.pace(1).await;
                lane.pace(1).await;
            }
            lane.found().0.unwrap() / before
        };
        assert_eq!(grown_by(lane.clone(), 1).await, 1.0, "holds");
        let slow = grown_by(lane.clone(), 2).await;
        assert!((1.01..1.1).contains(&slow), "{slow}");
        // … and by 30 % a second once the provider takes clearly more than it refused.
        lane.adopt(145.0, None);
        let fast = grown_by(lane.clone(), 1).await;
        assert!((1.30..1.31).contains(&fast), "{fast}");
    }
}
