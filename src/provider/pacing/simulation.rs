//! The pacing against simulated providers on tokio's paused clock: minutes of traffic run in
//! well under a second, the same every time. Replicas share their found rates the way their
//! heartbeats do (`rate::fleet_rate`, once a second); each call takes the provider's latency;
//! a command whose call is refused calls again at its next turn (the lane holds the
//! `Retry-After`). Each scenario asserts its target from the pacing issue; the real benchmark
//! (docs/benchmarks.md) confirms them against the simulator over HTTP.

use super::{Memory, Pacer, Signal};
use crate::provider::pacing::concurrency::Figures;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A simulated provider's limit: a call is taken, or refused with the 429's `Retry-After`.
trait Limit: Send + Sync {
    /// Ok when the call is taken; otherwise the 429's `Retry-After`, if it sends one.
    fn call(&self) -> Result<(), Option<Duration>>;
}

/// A provider that takes `limit` calls in each one-second window (counted from its start) and
/// answers 429 to the rest, with `Retry-After: 1` when `retry_after`.
struct FixedWindow {
    limit: u64,
    retry_after: bool,
    origin: Instant,
    /// The current window's index and the calls it took.
    window: Mutex<(u64, u64)>,
}

impl Limit for FixedWindow {
    fn call(&self) -> Result<(), Option<Duration>> {
        let index = self.origin.elapsed().as_secs();
        let mut window = self.window.lock().unwrap();
        if window.0 != index {
            *window = (index, 0);
        }
        if window.1 < self.limit {
            window.1 += 1;
            return Ok(());
        }
        Err(self.retry_after.then_some(Duration::from_secs(1)))
    }
}

/// A provider that takes at most `limit` calls in any second (the calls taken in the last
/// second are remembered), answering 429 with `Retry-After: 1` above it.
struct SlidingWindow {
    limit: usize,
    taken: Mutex<std::collections::VecDeque<Instant>>,
}

impl Limit for SlidingWindow {
    fn call(&self) -> Result<(), Option<Duration>> {
        let now = Instant::now();
        let mut taken = self.taken.lock().unwrap();
        while taken
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            taken.pop_front();
        }
        if taken.len() < self.limit {
            taken.push_back(now);
            return Ok(());
        }
        Err(Some(Duration::from_secs(1)))
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved; a call takes one or gets a 429
/// whose `Retry-After` is the time until the next token (rounded up to a whole second, as the
/// header has it).
struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limit for TokenBucket {
    fn call(&self) -> Result<(), Option<Duration>> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let (tokens, then) = *state;
        let tokens = (tokens + now.duration_since(then).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            return Ok(());
        }
        *state = (tokens, now);
        let wait = ((1.0 - tokens) / self.rate).ceil().max(1.0);
        Err(Some(Duration::from_secs_f64(wait)))
    }
}

/// A fixed window whose limit drops from `before` to `after` calls a second at `at` into the
/// run (a provider's plan changed, or it is under load).
struct Changing {
    window: FixedWindow,
    after: u64,
    at: Duration,
}

impl Limit for Changing {
    fn call(&self) -> Result<(), Option<Duration>> {
        if self.window.origin.elapsed() >= self.at {
            let mut window = self.window.window.lock().unwrap();
            // The current window keeps what it took; the new limit holds from the next one.
            let index = self.window.origin.elapsed().as_secs();
            if window.0 != index {
                *window = (index, 0);
            }
            if window.1 < self.after {
                window.1 += 1;
                return Ok(());
            }
            return Err(Some(Duration::from_secs(1)));
        }
        self.window.call()
    }
}

/// What a run did: calls made, calls refused, how long the commands took, and what the first
/// replica's lane found (what it would write to PostgreSQL).
struct Run {
    calls: u64,
    refused: u64,
    elapsed: Duration,
    memory: Option<Memory>,
}

impl Run {
    /// Links a second over the run.
    fn rate(&self, commands: usize) -> f64 {
        commands as f64 / self.elapsed.as_secs_f64()
    }

    /// The share of calls answered 429.
    fn refused_share(&self) -> f64 {
        self.refused as f64 / self.calls as f64
    }
}

/// `commands` commands through `replicas` replicas at the shipped defaults (256 in flight each,
/// adaptive concurrency, pauses up to a minute), against `provider`, each call taking `latency`.
async fn run(provider: Arc<dyn Limit>, replicas: usize, commands: usize, latency: Duration) -> Run {
    run_from(provider, replicas, commands, latency, None).await
}

/// [`run`], each replica's lane starting from `recalled` (a memory and its age) if given, as a
/// worker that read the fleet's memories at start.
async fn run_from(
    provider: Arc<dyn Limit>,
    replicas: usize,
    commands: usize,
    latency: Duration,
    recalled: Option<(Memory, Duration)>,
) -> Run {
    let pacers: Vec<Arc<Pacer>> = (0..replicas)
        .map(|_| {
            let pacer = Pacer::new(
                1,
                256,
                true,
                None,
                Duration::from_secs(60),
                Arc::new(Figures::default()),
            );
            if let Some((memory, age)) = recalled {
                pacer.recall(memory, age);
            }
            Arc::new(pacer)
        })
        .collect();
    let left = Arc::new(AtomicUsize::new(commands));
    let calls = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let heartbeat = tokio::spawn({
        let pacers = pacers.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let rates: Vec<(f64, Option<u64>)> = pacers
                    .iter()
                    .filter_map(|pacer| {
                        let (found, since) = pacer.rate.found();
                        Some((found?, since.map(|d| d.as_millis() as u64)))
                    })
                    .collect();
                if rates.is_empty() {
                    continue;
                }
                let (found, since) = super::rate::fleet_rate(&rates);
                for pacer in &pacers {
                    pacer.rate.adopt(found, since);
                }
            }
        }
    });
    let mut tasks = Vec::new();
    for pacer in &pacers {
        for _ in 0..256 {
            let (pacer, provider) = (pacer.clone(), provider.clone());
            let (left, calls, refused) = (left.clone(), calls.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    loop {
                        let slot = pacer.turn(replicas).await;
                        tokio::time::sleep(latency).await;
                        calls.fetch_add(1, Ordering::Relaxed);
                        match provider.call() {
                            Ok(()) => {
                                pacer.report(slot, Signal::Answered(latency), replicas);
                                break;
                            }
                            Err(retry_after) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                let held =
                                    pacer.report(slot, Signal::SlowDown(retry_after), replicas);
                                if !held {
                                    // The retry's own backoff (its first interval).
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    heartbeat.abort();
    Run {
        calls: calls.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        memory: pacers[0].memory(),
    }
}

/// Against a fixed-window 200/s limit with `Retry-After: 1`, two replicas, 30,000 commands.
/// The pacing issue's target is 95 % of the limit with under 1 % answered 429; measured here:
/// 94.8 % and 0.69 % (92.5 % and 0.72 % before probes came further apart while they found the
/// limit unmoved; 88.7 % and 0.83 % before a rate that grows woke the calls waiting on their
/// turns; 79.3 % and 1.43 % before the rate waited at a plateau before probing).
/// Each probe past an unchanged limit still costs a whole `Retry-After` second. Asserted at what
/// it reaches, so that a change that loses ground fails.
#[tokio::test(start_paused = true)]
async fn a_fixed_window_with_retry_after_is_used_to_94_percent_with_under_1_percent_refused() {
    let (rate, refused) = fixed_window(true).await;
    assert!(rate >= 189.0, "{rate:.1}/s is under 94.5 % of 200/s");
    assert!(refused < 0.01, "{:.2} % of calls refused", refused * 100.0);
}

/// The same without `Retry-After`; the target, met: at least 93 % of the limit, under 2 %
/// refused (measured: 98.3 % and 0.79 %; 86.5 % and 3.97 % before the plateau).
#[tokio::test(start_paused = true)]
async fn a_fixed_window_without_retry_after_is_used_to_93_percent_with_under_2_percent_refused() {
    let (rate, refused) = fixed_window(false).await;
    assert!(rate >= 186.0, "{rate:.1}/s is under 93 % of 200/s");
    assert!(refused < 0.02, "{:.2} % of calls refused", refused * 100.0);
}

/// 30,000 commands through two replicas against a fixed window of 200/s (50 ms answers): links a
/// second, and the share of calls refused.
async fn fixed_window(retry_after: bool) -> (f64, f64) {
    let provider = Arc::new(FixedWindow {
        limit: 200,
        retry_after,
        origin: Instant::now(),
        window: Mutex::new((0, 0)),
    });
    let commands = 30_000;
    let run = run(provider, 2, commands, Duration::from_millis(50)).await;
    let (rate, refused) = (run.rate(commands), run.refused_share());
    println!(
        "{rate:.1}/s ({:.1} % of the limit), {:.2} % of {} calls refused, {:.1} s",
        rate / 2.0,
        refused * 100.0,
        run.calls,
        run.elapsed.as_secs_f64()
    );
    (rate, refused)
}

/// A fixed window of 200/s (50 ms answers), `Retry-After: 1`.
fn fixed(limit: u64) -> FixedWindow {
    FixedWindow {
        limit,
        retry_after: true,
        origin: Instant::now(),
        window: Mutex::new((0, 0)),
    }
}

/// Runs `commands` through `replicas` against `provider`; prints and returns links a second and
/// the share refused.
async fn measured(
    name: &str,
    provider: Arc<dyn Limit>,
    replicas: usize,
    commands: usize,
) -> (f64, f64) {
    let run = run(provider, replicas, commands, Duration::from_millis(50)).await;
    let (rate, refused) = (run.rate(commands), run.refused_share());
    println!(
        "{name}: {rate:.1}/s, {:.2} % of {} calls refused, {:.1} s",
        refused * 100.0,
        run.calls,
        run.elapsed.as_secs_f64()
    );
    (rate, refused)
}

/// The fleet's share of a 200/s fixed window (with `Retry-After`) is found whether one replica or
/// four share it. Measured: one replica 186.2/s (93.1 %) with 0.47 % refused, four 183.1/s (91.6
/// %) with 1.05 %. Asserted at what each reaches, so that a change that loses ground fails.
#[tokio::test(start_paused = true)]
async fn one_to_four_replicas_share_a_fixed_window_without_overrunning_it() {
    for (replicas, at_least, refused_under) in [(1, 185.0, 0.01), (4, 182.0, 0.015)] {
        let (rate, refused) = measured(
            &format!("{replicas} replica(s)"),
            Arc::new(fixed(200)),
            replicas,
            30_000,
        )
        .await;
        assert!(rate >= at_least, "{replicas}: {rate:.1}/s");
        assert!(
            refused < refused_under,
            "{replicas}: {:.2} % refused",
            refused * 100.0
        );
    }
}

/// A sliding window (no burst at a window's edge) and a token bucket (a burst of 50, then its
/// rate) of 200/s, two replicas. Measured: sliding 177.0/s (88.5 %) with 0.71 % refused, bucket
/// 170.2/s (85.1 %) with 0.38 %.
#[tokio::test(start_paused = true)]
async fn a_sliding_window_and_a_token_bucket_are_used_without_overrunning_them() {
    let sliding = SlidingWindow {
        limit: 200,
        taken: Mutex::new(std::collections::VecDeque::new()),
    };
    let (rate, refused) = measured("sliding window", Arc::new(sliding), 2, 30_000).await;
    assert!(rate >= 175.0, "sliding: {rate:.1}/s");
    assert!(refused < 0.01, "sliding: {:.2} % refused", refused * 100.0);
    let bucket = TokenBucket {
        rate: 200.0,
        burst: 50.0,
        state: Mutex::new((50.0, Instant::now())),
    };
    let (rate, refused) = measured("token bucket", Arc::new(bucket), 2, 30_000).await;
    assert!(rate >= 170.0, "bucket: {rate:.1}/s");
    assert!(refused < 0.005, "bucket: {:.2} % refused", refused * 100.0);
}

/// The limit halves (200/s to 100/s) a minute into the run: the pacing finds the new one, and
/// the run is paced under it without a storm of refusals. Measured: 133.3/s where a client that
/// knew both limits would make 154/s (87 %), with 1.47 % refused.
#[tokio::test(start_paused = true)]
async fn a_limit_that_halves_midway_is_found_again() {
    let changing = Changing {
        window: fixed(200),
        after: 100,
        at: Duration::from_secs(60),
    };
    // About a minute at 200/s and then about a minute at 100/s.
    let (rate, refused) = measured("halved at 60 s", Arc::new(changing), 2, 17_000).await;
    assert!(rate >= 131.0, "halved: {rate:.1}/s");
    assert!(refused < 0.02, "halved: {:.2} % refused", refused * 100.0);
}

/// A limit that records what it was asked each second of the run: calls made and calls taken.
struct Timeline {
    inner: Changing,
    /// Per second from the start: (calls, taken).
    seconds: Mutex<Vec<(u64, u64)>>,
}

impl Limit for Timeline {
    fn call(&self) -> Result<(), Option<Duration>> {
        let second = self.inner.window.origin.elapsed().as_secs() as usize;
        let answer = self.inner.call();
        let mut seconds = self.seconds.lock().unwrap();
        if seconds.len() <= second {
            seconds.resize(second + 1, (0, 0));
        }
        seconds[second].0 += 1;
        if answer.is_ok() {
            seconds[second].1 += 1;
        }
        answer
    }
}

/// The per-second calls and takes of a run against a fixed window (with `Retry-After`) whose
/// limit goes from `before` to `after` a minute in.
async fn changed_limit(before: u64, after: u64, commands: usize) -> Vec<(u64, u64)> {
    let timeline = Arc::new(Timeline {
        inner: Changing {
            window: fixed(before),
            after,
            at: Duration::from_secs(60),
        },
        seconds: Mutex::new(Vec::new()),
    });
    measured(
        &format!("{before}/s to {after}/s at 60 s"),
        timeline.clone(),
        2,
        commands,
    )
    .await;
    let seconds = timeline.seconds.lock().unwrap().clone();
    println!(
        "seconds 55 to 100 (calls, taken): {:?}",
        &seconds[55..seconds.len().min(100)]
    );
    seconds
}

/// The limit halves (200/s to 100/s) a minute in. The target is a rate within 15 % of
/// the new limit within 3 s. The calls made are: in the 40 seconds from the fall, no second is
/// more than 15 % over the new limit (at most 113 calls; a probe later in the run goes further over); but what the provider takes is under it, as each cut
/// and each probe costs a `Retry-After` second with next to no calls: over the 20 seconds from
/// second 63, it took 77.9 % of the new limit a second (measured; 78.2 % before slow start's
/// doubling was bounded in time, 84.6 % before probes came further apart, 72.5 % before a rate
/// that grows woke the calls waiting on their turns: the figure moves with where the
/// `Retry-After` pauses fall in these 20 seconds). **Not met**: after
/// the fall the rate collides with its plateau (0.99 of a rate refused that was over the new
/// limit) several times, each a pause.
#[tokio::test(start_paused = true)]
async fn a_halved_limit_is_never_overrun_and_its_take_is_measured() {
    let seconds = changed_limit(200, 100, 17_000).await;
    let overrun = (60..100).find(|&s| seconds[s].0 > 115);
    assert_eq!(
        overrun, None,
        "more than 115 calls in a second after the fall"
    );
    let taken: u64 = seconds[63..83].iter().map(|(_, taken)| taken).sum();
    let share = taken as f64 / 20.0 / 100.0;
    println!(
        "taken over seconds 63 to 82: {:.1} % of the new limit",
        share * 100.0
    );
    assert!(
        share >= 0.77,
        "{:.1} % of the halved limit taken",
        share * 100.0
    );
}

/// The limit triples (100/s to 300/s) a minute in: the target is the new limit found
/// within 30 s. Measured: the provider takes 85 % of 300/s (255 calls) in a second first at
/// second 72, 12 s after the rise (met; second 68 before a rate that grows woke the calls
/// waiting on their turns; the calls that went out over the rate then took some of the new
/// limit sooner).
#[tokio::test(start_paused = true)]
async fn a_tripled_limit_is_found_within_30_seconds() {
    let seconds = changed_limit(100, 300, 22_000).await;
    let found = (60..seconds.len())
        .find(|&s| seconds[s].1 >= 255)
        .expect("300/s never found");
    println!("85 % of 300/s first taken in second {found}");
    assert!(
        found <= 75,
        "85 % of the tripled limit taken only at second {found}"
    );
}

/// First contact, nothing known: the target is under 3 % of the first 3,000 calls
/// answered 429 (two replicas, a 200/s fixed window with `Retry-After`). The calls under way when
/// the first 429 comes back are refused with it; slow start doubling every 50 ms round trip had
/// about the provider's whole first window under way then (6.10 % of 3,195 calls refused).
/// Doubling at most every 200 ms: 2.09 % of 3,064.
#[tokio::test(start_paused = true)]
async fn first_contact_refuses_under_3_percent() {
    let (_, refused) = measured("first contact", Arc::new(fixed(200)), 2, 3_000).await;
    assert!(refused < 0.03, "{:.2} % refused", refused * 100.0);
}

/// First contact with a remembered rate: the fleet found a 200/s fixed window (with
/// `Retry-After`) over 30,000 commands and wrote what it found; two workers that start later
/// (a rollout: 30 s on; a restart the next morning: 10 hours on, the rate trusted at 1/1000 of
/// it and grown back from the floor) make 3,000 calls each. The target, under 0.5 %
/// refused, is asserted for both; the fresh start of `first_contact_refuses_under_3_percent`
/// refuses 2.09 %.
#[tokio::test(start_paused = true)]
async fn a_remembered_rate_is_started_at_with_under_half_a_percent_refused() {
    let latency = Duration::from_millis(50);
    let found = run(Arc::new(fixed(200)), 2, 30_000, latency).await;
    let memory = found.memory.expect("the lane found the provider's rate");
    let rate = memory.found.expect("a found rate");
    assert!((150.0..=200.0).contains(&rate), "{memory:?}");
    for age in [Duration::from_secs(30), Duration::from_secs(10 * 3600)] {
        let provider = Arc::new(fixed(200));
        let run = run_from(provider, 2, 3_000, latency, Some((memory, age))).await;
        println!(
            "remembered {:.0} s ago: {:.1}/s, {:.2} % of {} calls refused",
            age.as_secs_f64(),
            run.rate(3_000),
            run.refused_share() * 100.0,
            run.calls
        );
        assert!(
            run.refused_share() < 0.005,
            "{:.2} % refused with a rate remembered {age:?} ago",
            run.refused_share() * 100.0
        );
    }
}

/// A provider with no limit at all.
struct Unlimited;

impl Limit for Unlimited {
    fn call(&self) -> Result<(), Option<Duration>> {
        Ok(())
    }
}

/// What slow start costs a provider with no limit: one replica at the shipped defaults (256 at
/// once), the benchmark's 100 ms phase (5,000 commands) and its 300 ms phase (3,000), against
/// the benchmark's targets, 80 % of 256 calls under way at once. Measured: 100 ms 75.1 %
/// (**not met**; 84.9 % while slow start doubled every round trip, however short: the doubling
/// at most every 200 ms that keeps first contact under 3 % refused costs this ramp 0.4 s), 300 ms
/// 78.1 % (**not met**, here; the real benchmark's 709/s is 83 %, counted from the first event).
/// Asserted at what they reach.
#[tokio::test(start_paused = true)]
async fn slow_start_costs_an_unlimited_provider_are_measured() {
    for (latency_ms, commands, reached) in [(100, 5_000, 0.75), (300, 3_000, 0.78)] {
        let latency = Duration::from_millis(latency_ms);
        let run = run(Arc::new(Unlimited), 1, commands, latency).await;
        let rate = run.rate(commands);
        let most = 256.0 / latency.as_secs_f64();
        println!(
            "{latency_ms} ms: {rate:.0}/s, {:.1} % of {most:.0}/s",
            rate / most * 100.0
        );
        assert!(rate >= reached * most, "{latency_ms} ms: {rate:.0}/s");
    }
}
