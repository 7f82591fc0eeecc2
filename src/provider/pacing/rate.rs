//! The rate one worker calls one provider at. Unpaced until the provider first says slow down
//! (a 429, or a 503 with `Retry-After`); then the fleet's rate is set just under what the
//! provider took in the trailing second, holds while the provider's window settles, grows back
//! to just under the rate it refused while calls wait on it and stays there; only
//! [`PROBE_AFTER`] the cut does it probe past it (slowly at first, faster the longer the provider
//! takes more; each probe that finds the limit unmoved puts the next further off, up to
//! [`LONGEST_PROBE_AFTER`]), so a lane settles just under the provider's limit and pays a
//! probe's `Retry-After` pause only now and then. A worker that starts from what the fleet found
//! before ([`Rate::recall`]) is paced from its first call. Replicas share the rate through their heartbeats
//! ([`Rate::adopt`]); each takes `rate / workers`, spaced evenly with no burst. A configured
//! `provider.max_requests_per_second` stays the ceiling.

use super::concurrency::Figures;
use super::schedule::Schedule;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
// The runtime's clock, so tests can pause and advance it.
use tokio::time::Instant;

/// One provider's rate, as this worker keeps it.
pub struct Rate {
    /// Calls per second for the fleet, if configured; this worker takes its share.
    configured: Option<f64>,
    /// When this worker's next call to the provider may start, and the rate it found.
    pace: Mutex<Pace>,
    figures: Arc<Figures>,
    provider_id: i64,
    /// Wakes the calls waiting on their turns when the turns come nearer (the rate grew).
    nearer: tokio::sync::Notify,
}

/// This worker's pace for one provider: the rate the fleet found the provider takes (none until
/// the first 429), when it was last cut, and what this worker measured of its own calls.
struct Pace {
    /// When each turn to call comes, at the current spacing.
    schedule: Schedule,
    /// Calls a second the whole fleet may make to the provider, as found from its answers: cut on
    /// a 429, grown back while calls wait on it (see [`growth`]), evened out between replicas
    /// through their heartbeats ([`Rate::adopt`]). This worker takes `found / workers`.
    found: Option<f64>,
    /// When the provider last said slow down (here, or in another replica's report).
    last_cut: Option<Instant>,
    /// The fleet rate the provider last refused (what was cut from): the rate climbs back to
    /// just under it ([`PLATEAU`]) and waits there before probing past it.
    refused: Option<f64>,
    /// The rate before the last growth, if it grew since the last cut: it ran a whole second
    /// without a 429, so a probe that overshoots is cut back under it.
    before_growth: Option<f64>,
    /// No probe past the plateau before this: a recalled rate held for the fleet a while, so a
    /// restart does not spend a `Retry-After` testing it at once ([`RECALLED_HOLDS`]).
    first_probe: Option<Instant>,
    /// How long after a cut the rate probes past the plateau: [`PROBE_AFTER`], half as long
    /// again after each probe that found the limit where it was, up to [`LONGEST_PROBE_AFTER`].
    probe_after: Duration,
    last_growth: Instant,
    /// Whether a call waited on the pace since the last growth: the rate grows only while it is
    /// what holds calls back, never while demand is below it.
    held_back: bool,
    /// Answers in each tenth of the trailing second: what the provider took from this worker.
    answers: [u32; 10],
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
/// After a cut the rate climbs back to this fraction of the rate refused and stays there until
/// [`PROBE_AFTER`]: each probe past a limit that has not moved costs a `Retry-After` pause.
const PLATEAU: f64 = 0.99;
/// How long after a cut the rate probes past the plateau.
const PROBE_AFTER: Duration = Duration::from_secs(15);
/// The longest wait before a probe: a limit that rose is still found within half a minute.
const LONGEST_PROBE_AFTER: Duration = Duration::from_secs(24);
/// A probe cut at no more than this times the rate refused before found the limit unmoved.
const UNMOVED: f64 = 1.05;

/// How long a worker that starts from a remembered rate waits before probing past it: the
/// fleet ran at it, so its first minute need not pay a probe's `Retry-After`.
const RECALLED_HOLDS: Duration = Duration::from_secs(60);

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
            first_probe: None,
            probe_after: PROBE_AFTER,
            last_growth: now,
            held_back: false,
            answers: [0; 10],
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
            self.answers[slot] = 0;
            self.calls[slot] = 0;
        }
        self.tenth = tenth;
    }

    /// Answers this worker got in the trailing second, and calls it started.
    fn taken(&mut self, now: Instant) -> (f64, f64) {
        self.roll(now);
        (
            f64::from(self.answers.iter().sum::<u32>()),
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
            // Until the probe, the rate climbs back to just under the one refused and stays
            // there; the probe then grows slowly at first, as right after a cut.
            let probe_at = match (
                self.last_cut.map(|at| at + self.probe_after),
                self.first_probe,
            ) {
                (Some(after_cut), Some(first)) => Some(after_cut.max(first)),
                (after_cut, first) => after_cut.or(first),
            };
            let probing = probe_at.is_none_or(|at| now >= at);
            let since = match probe_at {
                Some(at) if probing => HOLD + now.duration_since(at),
                _ => since_cut,
            };
            // Plus one a second, so a rate cut very low climbs back in seconds, not minutes.
            let mut g = growth(since);
            let above = self
                .refused
                .is_some_and(|refused| found > refused * ABOVE_REFUSED);
            if g > 0.0 && above {
                g = g.max(FAST_GROWTH);
            }
            let mut grown = if g > 0.0 {
                found * (1.0 + g) + 1.0
            } else {
                found
            };
            if !probing
                && !above
                && let Some(refused) = self.refused
            {
                grown = grown.min(found.max(refused * PLATEAU));
            }
            if grown > found {
                self.before_growth = Some(found);
            }
            self.found = Some(ceiling.map_or(grown, |c| grown.min(c)));
        }
        self.last_growth = now;
        self.held_back = false;
    }
}

impl Rate {
    /// Unpaced until the provider first says slow down, under `configured` (calls a second for
    /// the whole fleet) if set.
    pub fn new(provider_id: i64, configured: Option<f64>, figures: Arc<Figures>) -> Self {
        Self {
            configured,
            pace: Mutex::new(Pace::new()),
            figures,
            provider_id,
            nearer: tokio::sync::Notify::new(),
        }
    }

    /// The fleet-wide rate configured for the provider, if any.
    pub fn configured(&self) -> Option<f64> {
        self.configured
    }

    /// Waits for this worker's turn under the fleet's rate: calls are spaced evenly at
    /// `rate / workers` per second, with no burst, so the fleet never goes above the rate in any
    /// second (give or take one call per worker). The rate is the configured one, or below it the
    /// one the fleet found the provider takes (see [`Rate::slowed_down`]): unpaced until the
    /// first 429.
    pub async fn pace(&self, workers: usize) {
        let turn = {
            let mut pace = self.pace.lock().expect("pace lock");
            let now = Instant::now();
            pace.roll(now);
            let tenth = (pace.tenth % 10) as usize;
            pace.calls[tenth] += 1;
            pace.grow(now, self.configured);
            let Some(gap) = self.gap(&pace, workers) else {
                return;
            };
            if pace.schedule.space(now, gap) {
                self.nearer.notify_waiters();
            }
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
            let nearer = self.nearer.notified();
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = nearer => {}
            }
            at = {
                let mut pace = self.pace.lock().expect("pace lock");
                if let Some(gap) = self.gap(&pace, workers)
                    && pace.schedule.space(Instant::now(), gap)
                {
                    self.nearer.notify_waiters();
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
        let rate = match (self.configured, pace.found) {
            (Some(configured), Some(found)) => configured.min(found),
            (one, other) => one.or(other)?,
        };
        self.figures
            .rate_milli
            .store((rate * 1000.0) as i64, Ordering::Relaxed);
        Some(Duration::from_secs_f64(
            workers.max(1) as f64 / rate.max(0.1),
        ))
    }

    /// The provider answered a call (a link, or a refusal that says it is up): counted towards
    /// what it takes.
    pub fn answered(&self) {
        let mut pace = self.pace.lock().expect("pace lock");
        pace.roll(Instant::now());
        let tenth = (pace.tenth % 10) as usize;
        pace.answers[tenth] += 1;
    }

    /// The provider answered "slow down" (a 429, or a 503 with `Retry-After`): at most once a
    /// second, the fleet's rate is set just under what the provider took from this worker in the
    /// trailing second times the workers (they pace alike), within bounds of what it was (see
    /// the cases below); it then holds, and grows back while calls wait on it, so the lane
    /// settles just under the provider's limit. A configured rate stays the ceiling.
    pub fn slowed_down(&self, workers: usize) {
        self.figures.slowed_down.fetch_add(1, Ordering::Relaxed);
        let mut pace = self.pace.lock().expect("pace lock");
        let now = Instant::now();
        if pace
            .last_cut
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        let (answers, calls) = pace.taken(now);
        let workers = workers.max(1) as f64;
        let under = (answers * workers * UNDER_TAKEN).max(1.0);
        let recent = pace
            .last_cut
            .is_some_and(|at| now.duration_since(at) < FRESH_CUT);
        let cut = match pace.found {
            // The first: just under what the provider took; when it took next to nothing (a 429
            // to the very first calls), 0.7 of the rate the calls went out at.
            None if answers >= MIN_RATE => under,
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
        let cut = self.configured.map_or(cut, |c| cut.min(c));
        let since_cut = pace.last_cut.map(|at| now.duration_since(at));
        // A probe (grown past the plateau) cut close to the rate refused before found the limit
        // where it was: the next probe waits longer. One cut far above it found a risen limit:
        // probes come at the shortest wait again. A cut at the plateau (the limit fell) leaves
        // the wait as it was.
        let probed = pace.refused.zip(pace.found).filter(|(refused, found)| {
            since_cut.is_some_and(|since| since >= pace.probe_after)
                && *found > refused * PLATEAU * 1.001
        });
        if let Some((refused, found)) = probed {
            pace.probe_after = if found <= refused * UNMOVED {
                pace.probe_after.mul_f64(1.5).min(LONGEST_PROBE_AFTER)
            } else {
                PROBE_AFTER
            };
        }
        pace.refused = Some(pace.found.unwrap_or(answers * workers));
        pace.before_growth = None;
        pace.first_probe = None;
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
            let found = self
                .configured
                .map_or(found, |c| found.min(c))
                .max(MIN_RATE);
            pace.found = Some(found);
            self.figures
                .rate_milli
                .store((found * 1000.0) as i64, Ordering::Relaxed);
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

    /// The fleet rate found or adopted that has held (the one before the last growth, if it grew
    /// since the last cut), and the rate last refused: what a restart starts from.
    pub fn memory(&self) -> (Option<f64>, Option<f64>) {
        let pace = self.pace.lock().expect("pace lock");
        // The rate before the last growth, if it grew since the last cut: it ran a whole second
        // without a 429, where the one grown to (a probe, maybe) has not shown it holds yet.
        let held = match (pace.found, pace.before_growth) {
            (Some(found), Some(before)) => Some(found.min(before)),
            (found, _) => found,
        };
        (held, pace.refused)
    }

    /// Starts paced at `found × trust` (a rate the fleet found before this worker started), under
    /// the configured ceiling, unless the fleet's heartbeats said otherwise already. It climbs
    /// back to `found` at most (just under `refused`, if lower) and waits there before probing
    /// past it, as after a cut some seconds ago: a restart does not spend a probe's
    /// `Retry-After` on a limit found a minute earlier.
    pub fn recall(&self, found: f64, refused: Option<f64>, trust: f64) {
        let mut pace = self.pace.lock().expect("pace lock");
        if pace.found.is_some() || !found.is_finite() || found <= 0.0 {
            return;
        }
        let now = Instant::now();
        let start = self
            .configured
            .map_or(found * trust, |c| (found * trust).min(c))
            .max(MIN_RATE);
        pace.found = Some(start);
        // The plateau is the rate the fleet ran at, not above: what it last refused may be well
        // over the limit (the rate a probe was cut from).
        let refused = refused.filter(|r| r.is_finite() && *r > 0.0);
        pace.refused = Some(refused.map_or(found, |r| r.min(found / PLATEAU)));
        pace.last_cut = now.checked_sub(FRESH_CUT).or(Some(now));
        pace.first_probe = Some(now + RECALLED_HOLDS);
        pace.last_growth = now;
        pace.before_growth = None;
        pace.held_back = false;
        self.figures
            .rate_milli
            .store((start * 1000.0) as i64, Ordering::Relaxed);
    }

    /// The fleet rate this worker found or adopted, and how long ago it was last cut.
    pub fn found(&self) -> (Option<f64>, Option<Duration>) {
        let pace = self.pace.lock().expect("pace lock");
        (pace.found, pace.last_cut.map(|at| at.elapsed()))
    }
}

/// One provider's fleet rate from the replicas' found rates and how many milliseconds ago each
/// was cut (the heartbeat reads the live replicas' reports: `fleet::fleet_rates`); `rates` is not empty.
pub fn fleet_rate(rates: &[(f64, Option<u64>)]) -> (f64, Option<Duration>) {
    let fresh_ms = FRESH_CUT.as_millis() as u64;
    let latest = rates.iter().filter_map(|(_, since)| *since).min();
    let episode: Vec<f64> = match latest {
        Some(latest) if latest < fresh_ms => rates
            .iter()
            .filter(|(_, since)| since.is_some_and(|s| s <= latest + 1000))
            .map(|(found, _)| *found)
            .collect(),
        _ => rates.iter().map(|(found, _)| *found).collect(),
    };
    let mean = episode.iter().sum::<f64>() / episode.len() as f64;
    (mean, latest.map(Duration::from_millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rate for one provider, under `configured` if set.
    pub(super) fn rate(configured: Option<f64>) -> Arc<Rate> {
        Arc::new(Rate::new(1, configured, Arc::new(Figures::default())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_re_spaces_the_turns_already_handed_out() {
        let lane = rate(None);
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

    /// A rate that grows brings the waiting calls' turns nearer, and wakes them: left asleep
    /// until their old times, they went beside the new turns handed out meanwhile, over the rate
    /// (a fixed window just over the calls' rate refused them).
    #[tokio::test(start_paused = true)]
    async fn a_rate_that_grows_wakes_the_waiting_calls_so_no_second_goes_over_it() {
        // Configured at 100 a second (the ceiling of its growth), found at 20 so far.
        let lane = rate(Some(100.0));
        lane.adopt(20.0, None);
        let started = Instant::now();
        let times = Arc::new(Mutex::new(Vec::new()));
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let (lane, times) = (lane.clone(), times.clone());
                tokio::spawn(async move {
                    for _ in 0..20 {
                        lane.pace(1).await;
                        times.lock().unwrap().push(started.elapsed());
                    }
                })
            })
            .collect();
        // Five seconds' worth of turns are waiting when the rate grows fivefold.
        tokio::time::sleep(Duration::from_millis(500)).await;
        lane.adopt(100.0, None);
        for caller in callers {
            caller.await.unwrap();
        }
        let mut per_second = [0u32; 30];
        for at in times.lock().unwrap().iter() {
            per_second[at.as_secs() as usize] += 1;
        }
        let over: Vec<(usize, u32)> = (1..per_second.len())
            .map(|s| (s, per_second[s]))
            .filter(|(_, n)| *n > 101)
            .collect();
        assert!(over.is_empty(), "seconds over 100 calls: {over:?}");
        assert!(per_second[1] >= 99, "the rate grew: {per_second:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_are_paced_at_the_workers_share_of_the_fleet_rate() {
        let lane = rate(Some(20.0));
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
        let unlimited = rate(None);
        let started = Instant::now();
        for _ in 0..100 {
            unlimited.pace(4).await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "no limit for provider 6");
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_that_says_slow_down_is_paced_under_what_it_took_then_probed_slowly() {
        let lane = rate(None);
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
        assert_eq!(lane.figures.slowed_down.load(Ordering::Relaxed), 2);
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
        let fresh = rate(None);
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
        let capped = rate(Some(150.0));
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
    use super::tests::rate;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_429_to_the_first_calls_paces_at_most_a_little_under_their_rate() {
        let lane = rate(None);
        for _ in 0..16 {
            lane.pace(1).await;
        }
        lane.slowed_down(1);
        let found = lane.found().0.unwrap();
        assert!((11.0..11.5).contains(&found), "{found}");
    }

    #[tokio::test(start_paused = true)]
    async fn cuts_are_to_what_was_taken_within_bounds_and_growth_speeds_up_past_the_refused_rate() {
        let lane = rate(None);
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
        let grown_by = |lane: Arc<Rate>, seconds: u32| async move {
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
