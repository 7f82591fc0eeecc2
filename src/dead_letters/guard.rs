//! How a replay run keeps from replaying into a cause nobody fixed: it sends a canary first and
//! goes on only once every canary succeeded, it stops by itself when too many of its replayed
//! letters fail again (leaving the rest open for a resume), and it may start slow and ramp up.
//! The decisions are pure functions of the run's outcomes (read from the store by
//! [`super::replay_rows::outcomes`]), so they are tested without a broker.

use serde::Serialize;
use std::time::Duration;

/// Runs longer than this get one canary unless asked otherwise.
pub const CANARY_FROM: usize = 10;
/// How long canaries may take to succeed unless asked otherwise: long enough for the provider
/// calls' retries, short of the delay queue's tiers (a canary sent there has not succeeded).
pub const CANARY_WAIT: Duration = Duration::from_secs(120);
/// The failure ratio a run stops at unless asked otherwise.
pub const MAX_FAILURE_RATIO: f64 = 0.5;
/// The settled letters the failure ratio is judged over unless asked otherwise.
pub const FAILURE_WINDOW: u32 = 20;
/// A ramping run doubles its rate this often.
pub const RAMP_EVERY: Duration = Duration::from_secs(10);

/// What a replay run is asked to guard itself with; unset fields take the defaults above.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuardRequest {
    /// Letters sent first (0: none); by default 1 for runs of more than [`CANARY_FROM`].
    pub canary: Option<u32>,
    /// How long the canaries may take ([`CANARY_WAIT`]).
    pub canary_wait: Option<Duration>,
    /// Stop once this many letters failed again (by default no count stops a run).
    pub stop_after_failures: Option<u32>,
    /// Stop once this share of the last settled letters failed again ([`MAX_FAILURE_RATIO`]).
    pub max_failure_ratio: Option<f64>,
    /// How many settled letters the ratio is judged over ([`FAILURE_WINDOW`]).
    pub failure_window: Option<u32>,
    /// Replays per second at the start, doubled every [`RAMP_EVERY`] up to the run's rate.
    pub start_rate: Option<f64>,
}

/// The guard a run was started with, as the run records it (a resume works with the same).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Guard {
    /// Letters sent first.
    pub canary: u32,
    /// How long the canaries may take, in milliseconds.
    pub canary_wait_ms: u64,
    /// Stop once this many letters failed again.
    pub stop_after_failures: Option<u32>,
    /// Stop once this share of the last `failure_window` settled letters failed again (none: the
    /// ratio stops nothing).
    pub max_failure_ratio: Option<f64>,
    /// How many settled letters the ratio is judged over.
    pub failure_window: u32,
    /// Replays per second at the start.
    pub start_rate: Option<f64>,
}

impl GuardRequest {
    /// No canary and no automatic stop: every selected letter is sent whatever becomes of the
    /// first ones (`--canary 0 --max-failure-ratio 1`).
    pub fn off() -> GuardRequest {
        GuardRequest {
            canary: Some(0),
            max_failure_ratio: Some(1.0),
            ..GuardRequest::default()
        }
    }

    /// The guard for a run of `total` letters. A ratio of 1 or more stops nothing (no window
    /// can hold more failures than letters), so it is kept as none.
    pub fn resolve(&self, total: usize) -> Guard {
        let canary = self
            .canary
            .unwrap_or(if total > CANARY_FROM { 1 } else { 0 });
        Guard {
            canary,
            canary_wait_ms: self.canary_wait.unwrap_or(CANARY_WAIT).as_millis() as u64,
            stop_after_failures: self.stop_after_failures,
            max_failure_ratio: Some(self.max_failure_ratio.unwrap_or(MAX_FAILURE_RATIO))
                .filter(|r| *r < 1.0),
            failure_window: self.failure_window.unwrap_or(FAILURE_WINDOW).max(1),
            start_rate: self.start_rate,
        }
    }

    /// Why the request cannot be a guard: the setting named, and what it must be.
    pub fn check(&self, rate: Option<f64>) -> Result<(), String> {
        if let Some(ratio) = self.max_failure_ratio
            && !(ratio > 0.0 && ratio <= 1.0)
        {
            return Err(format!(
                "max-failure-ratio must be above 0 and at most 1, not {ratio}"
            ));
        }
        if self.failure_window == Some(0) {
            return Err("failure-window must be at least 1".into());
        }
        if self.stop_after_failures == Some(0) {
            return Err("stop-after-failures must be at least 1".into());
        }
        match (self.start_rate, rate) {
            (Some(start), _) if !(start.is_finite() && start >= 0.1) => Err(format!(
                "start-rate must be at least 0.1 a second, not {start}"
            )),
            (Some(_), None) => Err("start-rate needs a rate to ramp up to".into()),
            (Some(start), Some(rate)) if start > rate => Err(format!(
                "start-rate ({start}) must not be above the rate ({rate})"
            )),
            _ => Ok(()),
        }
    }
}

/// What became of a replayed letter's command, once the worker had it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "outcome", content = "kind")]
pub enum Settled {
    /// Not yet known: the worker has not finished it (it may be waiting for a retry).
    Pending,
    /// It has its payment link.
    Succeeded,
    /// It failed again, for this reason (the kind of its new dead letter).
    FailedAgain(String),
}

/// A replayed letter of a run and its outcome, in the order the run published them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LetterOutcome {
    /// The dead letter replayed.
    pub dead_letter_id: i64,
    /// Its command.
    pub command_id: String,
    /// What became of it.
    #[serde(flatten)]
    pub settled: Settled,
}

/// A run's outcomes counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    /// Replayed and got a link.
    pub succeeded: usize,
    /// Replayed and failed again.
    pub failed_again: usize,
    /// Replayed, outcome not known yet.
    pub pending: usize,
}

impl Tally {
    /// The counts of `outcomes`.
    pub fn of(outcomes: &[LetterOutcome]) -> Tally {
        let mut tally = Tally::default();
        for outcome in outcomes {
            match outcome.settled {
                Settled::Pending => tally.pending += 1,
                Settled::Succeeded => tally.succeeded += 1,
                Settled::FailedAgain(_) => tally.failed_again += 1,
            }
        }
        tally
    }
}

/// The outcomes of the letters one working of a run published, in the order it published them.
/// Only the pending ones are read again ([`Settling::pending`]): a letter that settled stays
/// settled, so judging a run after each batch costs what is in flight, not all it sent.
#[derive(Debug, Default)]
pub struct Settling {
    letters: Vec<LetterOutcome>,
    /// Where each published letter is in `letters`.
    at: std::collections::HashMap<i64, usize>,
    /// The dead-letter ids not settled yet.
    pending: std::collections::BTreeSet<i64>,
}

impl Settling {
    /// A letter the broker confirmed; pending until its outcome is read.
    pub fn published(&mut self, dead_letter_id: i64, command_id: &str) {
        if self.at.contains_key(&dead_letter_id) {
            return;
        }
        self.at.insert(dead_letter_id, self.letters.len());
        self.letters.push(LetterOutcome {
            dead_letter_id,
            command_id: command_id.to_owned(),
            settled: Settled::Pending,
        });
        self.pending.insert(dead_letter_id);
    }

    /// The letters whose outcome is still to be read.
    pub fn pending(&self) -> Vec<i64> {
        self.pending.iter().copied().collect()
    }

    /// Outcomes as read; those of letters this working did not publish are ignored.
    pub fn read(&mut self, outcomes: Vec<LetterOutcome>) {
        for outcome in outcomes {
            let Some(&i) = self.at.get(&outcome.dead_letter_id) else {
                continue;
            };
            if outcome.settled != Settled::Pending {
                self.pending.remove(&outcome.dead_letter_id);
            }
            self.letters[i].settled = outcome.settled;
        }
    }

    /// Every published letter and its outcome as last read, in publishing order.
    pub fn all(&self) -> &[LetterOutcome] {
        &self.letters
    }
}

/// How the canaries stand.
#[derive(Debug, PartialEq, Eq)]
pub enum Canaries {
    /// Every one succeeded: the rest may go.
    Passed,
    /// Some are not settled yet.
    Waiting,
    /// Some failed again: the run stops, with this reason.
    Failed(String),
}

/// How the canaries (the first ones `outcomes` lists) stand.
pub fn canaries(outcomes: &[LetterOutcome]) -> Canaries {
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match &o.settled {
            Settled::FailedAgain(kind) => {
                Some(format!("dead letter {} ({kind})", o.dead_letter_id))
            }
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        return Canaries::Failed(format!(
            "the canary failed again: {}; nothing else was sent",
            failed.join(", ")
        ));
    }
    if outcomes.iter().all(|o| o.settled == Settled::Succeeded) {
        Canaries::Passed
    } else {
        Canaries::Waiting
    }
}

impl Guard {
    /// Whether anything can stop the run once its canaries passed: without a failure count or
    /// ratio, its outcomes need not be read while it sends.
    pub fn judges(&self) -> bool {
        self.stop_after_failures.is_some() || self.max_failure_ratio.is_some()
    }

    /// Why the run must stop now, given its outcomes so far in publishing order; none while it
    /// may go on.
    pub fn stop_reason(&self, outcomes: &[LetterOutcome]) -> Option<String> {
        fn failed(o: &&LetterOutcome) -> bool {
            matches!(o.settled, Settled::FailedAgain(_))
        }
        let total_failed = outcomes.iter().filter(failed).count();
        if let Some(limit) = self.stop_after_failures
            && total_failed >= limit as usize
        {
            return Some(format!(
                "{total_failed} replayed letters failed again (stop-after-failures {limit}); \
                 {}",
                kinds(outcomes.iter().filter(failed))
            ));
        }
        let ratio = self.max_failure_ratio?;
        let window = self.failure_window as usize;
        let settled: Vec<&LetterOutcome> = outcomes
            .iter()
            .filter(|o| o.settled != Settled::Pending)
            .collect();
        if settled.len() < window {
            return None;
        }
        let last = &settled[settled.len() - window..];
        let in_window = last.iter().copied().filter(failed).count();
        (in_window as f64 >= ratio * window as f64).then(|| {
            format!(
                "{in_window} of the last {window} settled replays failed again (max-failure-ratio \
                 {ratio}); {}",
                kinds(last.iter().copied().filter(failed))
            )
        })
    }

    /// The rate `elapsed` into the run: the start rate doubled every [`RAMP_EVERY`], up to
    /// `rate` (without a start rate, `rate` throughout).
    pub fn rate_at(&self, rate: Option<f64>, elapsed: Duration) -> Option<f64> {
        let (start, rate) = match (self.start_rate, rate) {
            (Some(start), Some(rate)) => (start, rate),
            _ => return rate,
        };
        let doublings = (elapsed.as_secs_f64() / RAMP_EVERY.as_secs_f64()).floor() as i32;
        Some((start * 2f64.powi(doublings.min(64))).min(rate))
    }
}

/// The failure kinds of `failed`, counted: what the operator looks at before a resume.
fn kinds<'a>(failed: impl Iterator<Item = &'a LetterOutcome>) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for outcome in failed {
        if let Settled::FailedAgain(kind) = &outcome.settled {
            *counts.entry(kind.as_str()).or_default() += 1;
        }
    }
    let listed: Vec<String> = counts
        .iter()
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect();
    format!(
        "the rest are left open: fix the cause, then resume ({})",
        listed.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(pattern: &str) -> Vec<LetterOutcome> {
        pattern
            .chars()
            .enumerate()
            .map(|(i, c)| LetterOutcome {
                dead_letter_id: i as i64 + 1,
                command_id: format!("c-{i}"),
                settled: match c {
                    's' => Settled::Succeeded,
                    'f' => Settled::FailedAgain("provider-rejected".into()),
                    _ => Settled::Pending,
                },
            })
            .collect()
    }

    #[test]
    fn a_run_gets_one_canary_when_longer_than_ten_unless_asked() {
        assert_eq!(GuardRequest::default().resolve(10).canary, 0);
        assert_eq!(GuardRequest::default().resolve(11).canary, 1);
        let asked = GuardRequest {
            canary: Some(3),
            ..GuardRequest::default()
        };
        assert_eq!(asked.resolve(2).canary, 3);
        let none = GuardRequest {
            canary: Some(0),
            ..GuardRequest::default()
        };
        assert_eq!(none.resolve(500).canary, 0);
    }

    #[test]
    fn canaries_pass_only_when_every_one_succeeded() {
        assert_eq!(canaries(&outcomes("ss")), Canaries::Passed);
        assert_eq!(canaries(&outcomes("sp")), Canaries::Waiting);
        let Canaries::Failed(why) = canaries(&outcomes("pf")) else {
            panic!("a failed canary stops the run")
        };
        assert!(why.contains("dead letter 2 (provider-rejected)"), "{why}");
    }

    #[test]
    fn the_ratio_is_judged_over_the_last_settled_window() {
        let guard = GuardRequest {
            failure_window: Some(4),
            max_failure_ratio: Some(0.5),
            ..GuardRequest::default()
        }
        .resolve(100);
        // Fewer settled than the window: no verdict yet, whatever they are.
        assert_eq!(guard.stop_reason(&outcomes("ffp")), None);
        // One failure in the last four settled: under the ratio.
        assert_eq!(guard.stop_reason(&outcomes("ffsssf")), None);
        // Two of the last four settled (pending ones do not count): at the ratio, it stops.
        let why = guard.stop_reason(&outcomes("sssfppsf")).unwrap();
        assert!(why.contains("2 of the last 4"), "{why}");
        assert!(why.contains("2 provider-rejected"), "{why}");
    }

    #[test]
    fn a_failure_count_stops_a_run_whatever_the_ratio() {
        let guard = GuardRequest {
            stop_after_failures: Some(2),
            max_failure_ratio: Some(1.0),
            ..GuardRequest::default()
        }
        .resolve(100);
        assert_eq!(guard.max_failure_ratio, None);
        assert_eq!(guard.stop_reason(&outcomes("sfssssss")), None);
        assert!(guard.stop_reason(&outcomes("sfsssssf")).is_some());
    }

    #[test]
    fn a_ramp_doubles_every_interval_up_to_the_rate() {
        let guard = GuardRequest {
            start_rate: Some(2.0),
            ..GuardRequest::default()
        }
        .resolve(100);
        let at = |s| guard.rate_at(Some(10.0), Duration::from_secs(s));
        assert_eq!(
            (at(0), at(9), at(10), at(25), at(3600)),
            (Some(2.0), Some(2.0), Some(4.0), Some(8.0), Some(10.0))
        );
        let flat = GuardRequest::default().resolve(100);
        assert_eq!(flat.rate_at(Some(10.0), Duration::ZERO), Some(10.0));
        assert_eq!(flat.rate_at(None, Duration::ZERO), None);
    }

    #[test]
    fn bad_guards_name_the_setting() {
        let bad = [
            (
                GuardRequest {
                    max_failure_ratio: Some(0.0),
                    ..GuardRequest::default()
                },
                Some(1.0),
                "max-failure-ratio",
            ),
            (
                GuardRequest {
                    max_failure_ratio: Some(f64::NAN),
                    ..GuardRequest::default()
                },
                Some(1.0),
                "max-failure-ratio",
            ),
            (
                GuardRequest {
                    failure_window: Some(0),
                    ..GuardRequest::default()
                },
                None,
                "failure-window",
            ),
            (
                GuardRequest {
                    stop_after_failures: Some(0),
                    ..GuardRequest::default()
                },
                None,
                "stop-after-failures",
            ),
            (
                GuardRequest {
                    start_rate: Some(1.0),
                    ..GuardRequest::default()
                },
                None,
                "needs a rate",
            ),
            (
                GuardRequest {
                    start_rate: Some(5.0),
                    ..GuardRequest::default()
                },
                Some(1.0),
                "must not be above",
            ),
        ];
        for (request, rate, named) in bad {
            let why = request.check(rate).unwrap_err();
            assert!(why.contains(named), "{request:?}: {why}");
        }
        assert_eq!(GuardRequest::default().check(None), Ok(()));
    }

    #[test]
    fn settling_reads_again_only_what_is_pending_and_keeps_the_publishing_order() {
        let mut settling = Settling::default();
        for id in [3, 1, 2] {
            settling.published(id, &format!("c-{id}"));
        }
        settling.published(1, "c-1");
        assert_eq!(settling.pending(), vec![1, 2, 3]);
        let read = |id: i64, settled: Settled| LetterOutcome {
            dead_letter_id: id,
            command_id: format!("c-{id}"),
            settled,
        };
        settling.read(vec![
            read(1, Settled::Succeeded),
            read(2, Settled::Pending),
            read(9, Settled::Succeeded),
        ]);
        assert_eq!(
            settling.pending(),
            vec![2, 3],
            "settled letters are not read again"
        );
        settling.read(vec![read(3, Settled::FailedAgain("validation".into()))]);
        let order: Vec<i64> = settling.all().iter().map(|o| o.dead_letter_id).collect();
        assert_eq!(
            order,
            vec![3, 1, 2],
            "a letter another run sent is not this one's"
        );
        assert_eq!(
            Tally::of(settling.all()),
            Tally {
                succeeded: 1,
                failed_again: 1,
                pending: 1
            }
        );
    }

    #[test]
    fn a_run_with_nothing_to_stop_it_is_not_judged_while_it_sends() {
        assert!(!GuardRequest::off().resolve(100).judges());
        assert!(GuardRequest::default().resolve(100).judges());
        let counted = GuardRequest {
            stop_after_failures: Some(3),
            ..GuardRequest::off()
        };
        assert!(counted.resolve(100).judges());
    }
}
