//! The retry schedule, and the only place that uses the `backoff` crate: exponential backoff with
//! jitter, capped per wait and in total, that honours a server's `Retry-After` within the budget.
//! Kept in one small module so the crate (unmaintained since 2021) can be swapped in one place.

use crate::config::RetrySettings;
use std::future::Future;
use std::time::{Duration, Instant};

/// What one attempt says about trying again.
#[derive(Debug)]
pub enum Attempt<E> {
    /// Trying again cannot help.
    Permanent(E),
    /// Trying again may help; `retry_after` is the server's own wish, if it said one.
    Transient(E, Option<Duration>),
    /// Trying again later may help, but not within this round (the provider's circuit is open):
    /// the round ends at once, as if its budget were spent.
    NotNow(E),
}

/// How a retried operation ended without success.
#[derive(Debug, PartialEq, Eq)]
pub enum GaveUp<E> {
    /// An attempt failed permanently.
    Permanent(E),
    /// Transient failures outlasted the budget; this is the last one.
    Exhausted(E),
}

fn schedule(settings: &RetrySettings) -> backoff::ExponentialBackoff {
    let mut schedule = backoff::ExponentialBackoff {
        current_interval: Duration::from_millis(settings.initial_interval_ms),
        initial_interval: Duration::from_millis(settings.initial_interval_ms),
        randomization_factor: settings.randomization_factor,
        multiplier: settings.multiplier,
        max_interval: Duration::from_millis(settings.max_interval_ms),
        // The budget is checked by `retry_spending`, which leaves out time queued for the lane;
        // the crate's own clock would count it.
        max_elapsed_time: None,
        ..backoff::ExponentialBackoff::default()
    };
    backoff::backoff::Backoff::reset(&mut schedule);
    schedule
}

/// Runs `operation` until it succeeds, fails permanently, or the budget
/// (`retry.max_elapsed_ms`) is spent. Each wait is the schedule's next interval, or the server's
/// `Retry-After` when that is longer; a wait that would end past the budget is not started.
/// `on_retry` hears of each transient failure and the wait that follows it. (The schedule's own
/// tests use this; the provider client leaves its lane waits out with [`retry_spending`].)
#[cfg(test)]
pub async fn retry<T, E, F, Fut>(
    settings: &RetrySettings,
    operation: F,
    on_retry: impl FnMut(&E, Duration),
) -> Result<T, GaveUp<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    retry_spending(settings, operation, on_retry, || Duration::ZERO).await
}

/// [`retry`], where the time `queued()` says the operations spent waiting for their turn (behind
/// their provider's limit or its `Retry-After` pause) is not taken from the budget: a command is
/// given up for the provider's answers, never for the worker's own queueing.
pub async fn retry_spending<T, E, F, Fut>(
    settings: &RetrySettings,
    mut operation: F,
    mut on_retry: impl FnMut(&E, Duration),
    queued: impl Fn() -> Duration,
) -> Result<T, GaveUp<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    use backoff::backoff::Backoff;
    let budget = Duration::from_millis(settings.max_elapsed_ms);
    let started = Instant::now();
    let spent = || started.elapsed().saturating_sub(queued());
    let mut schedule = schedule(settings);
    loop {
        match operation().await {
            Ok(value) => return Ok(value),
            Err(Attempt::Permanent(error)) => return Err(GaveUp::Permanent(error)),
            Err(Attempt::NotNow(error)) => return Err(GaveUp::Exhausted(error)),
            Err(Attempt::Transient(error, retry_after)) => {
                let Some(interval) = schedule.next_backoff() else {
                    return Err(GaveUp::Exhausted(error));
                };
                // Whatever the server asked for (any size), a wait past the budget is not started;
                // compared against what is left, so no sum can overflow.
                let wait = retry_after.map_or(interval, |asked| asked.max(interval));
                if wait > budget.saturating_sub(spent()) {
                    return Err(GaveUp::Exhausted(error));
                }
                on_retry(&error, wait);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn settings(max_elapsed_ms: u64) -> RetrySettings {
        RetrySettings {
            initial_interval_ms: 5,
            max_interval_ms: 20,
            multiplier: 2.0,
            randomization_factor: 0.0,
            max_elapsed_ms,
            delay_tiers_ms: Vec::new(),
        }
    }

    #[tokio::test]
    async fn retries_transient_failures_until_success() {
        let calls = AtomicU32::new(0);
        let mut waits = Vec::new();
        let result = retry(
            &settings(5_000),
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err(Attempt::Transient("503", None)),
                    _ => Ok("link"),
                }
            },
            |_, wait| waits.push(wait),
        )
        .await;
        assert_eq!(result, Ok("link"));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(waits, [Duration::from_millis(5), Duration::from_millis(10)]);
    }

    #[tokio::test]
    async fn an_absurd_retry_after_ends_the_round_without_a_panic() {
        for asked in [
            Duration::MAX,
            Duration::from_secs(u64::MAX),
            Duration::from_secs(3600),
        ] {
            let calls = AtomicU32::new(0);
            let result: Result<(), _> = retry(
                &settings(5_000),
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(Attempt::Transient("429", Some(asked)))
                },
                |_, _| panic!("no wait past the budget is started"),
            )
            .await;
            assert_eq!(result, Err(GaveUp::Exhausted("429")), "{asked:?}");
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn permanent_failure_stops_at_once() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = retry(
            &settings(5_000),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Attempt::Permanent("400"))
            },
            |_, _| {},
        )
        .await;
        assert_eq!(result, Err(GaveUp::Permanent("400")));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn budget_ends_in_exhaustion() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = retry(
            &settings(100),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Attempt::Transient("503", None))
            },
            |_, _| {},
        )
        .await;
        assert_eq!(result, Err(GaveUp::Exhausted("503")));
        assert!(calls.load(Ordering::SeqCst) > 2);
    }

    #[tokio::test]
    async fn retry_after_is_honoured_within_the_budget_only() {
        let mut waits = Vec::new();
        let calls = AtomicU32::new(0);
        let result = retry(
            &settings(5_000),
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(Attempt::Transient("429", Some(Duration::from_millis(30)))),
                    _ => Ok(()),
                }
            },
            |_, wait| waits.push(wait),
        )
        .await;
        assert_eq!(result, Ok(()));
        assert_eq!(waits, [Duration::from_millis(30)]);

        let result: Result<(), _> = retry(
            &settings(1_000),
            || async { Err(Attempt::Transient("429", Some(Duration::from_secs(3600)))) },
            |_, _| {},
        )
        .await;
        assert_eq!(result, Err(GaveUp::Exhausted("429")));
    }

    #[tokio::test]
    async fn time_queued_for_the_lane_is_not_taken_from_the_budget() {
        use std::sync::atomic::AtomicU64;
        let calls = AtomicU32::new(0);
        let queued_ms = AtomicU64::new(0);
        // Each attempt first waits 40 ms for its turn; the budget is 60 ms of the rest.
        let operation = || async {
            tokio::time::sleep(Duration::from_millis(40)).await;
            queued_ms.fetch_add(40, Ordering::SeqCst);
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(Attempt::Transient("429", None)),
                _ => Ok("link"),
            }
        };
        let result = retry_spending(
            &settings(60),
            operation,
            |_, _| {},
            || Duration::from_millis(queued_ms.load(Ordering::SeqCst)),
        )
        .await;
        assert_eq!(result, Ok("link"), "queueing spent no budget");
        calls.store(0, Ordering::SeqCst);
        let counted = retry(&settings(60), operation, |_, _| {}).await;
        assert_eq!(counted, Err(GaveUp::Exhausted("429")), "counted, it would");
    }
}
