//! Problems that repeat (an event no queue takes, a provider answering 429, a broker refusing
//! publishes) are logged once when they start, then as one summary line per interval with the
//! count and the fix, and once when they end: a warning per event per retry buries everything
//! else in the log (a newcomer saw 5,415 identical lines in 70 s).
//!
//! The registry is process-wide, like the log it writes to; [`tick`] (called by the worker's
//! gauge loop) writes the summaries and ends problems that went quiet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// A kind of repeated trouble: what identifies it, what it means and what fixes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Identifies one problem: occurrences with the same key are counted together.
    pub key: String,
    /// What is wrong, in words (no secrets, no per-message ids).
    pub what: String,
    /// What an operator can do about it.
    pub fix: String,
    /// Whether it ends by itself when it has not happened for an interval; otherwise it ends
    /// only through [`resolved`] (a publish that got through).
    pub ends_when_quiet: bool,
}

struct Open {
    problem: Problem,
    since: Instant,
    last_seen: Instant,
    total: u64,
    unsummarised: u64,
    last_summary: Instant,
}

/// Most problems open at once. Their keys may carry what a publisher chose (the provider id of
/// commands parked for it), so past this many a new one is counted under one overflow problem,
/// logged once: a flood of made-up ids can grow neither the registry nor the log.
pub const MAX_OPEN: usize = 256;
/// The overflow problem's key.
const OVERFLOW: &str = "repeats: overflow";

static OPEN: LazyLock<Mutex<HashMap<String, Open>>> = LazyLock::new(Mutex::default);
/// How many problems are open, so the common case (none) takes no lock.
static OPEN_COUNT: AtomicUsize = AtomicUsize::new(0);
static INTERVAL_MS: AtomicU64 = AtomicU64::new(30_000);

/// Sets the summary interval (`log.summary_interval_ms`).
pub fn set_interval(interval: Duration) {
    INTERVAL_MS.store(interval.as_millis().max(1) as u64, Ordering::Relaxed);
}

/// Whether any problem is open: lets a success path skip building keys.
pub fn any_open() -> bool {
    OPEN_COUNT.load(Ordering::Relaxed) > 0
}

fn interval() -> Duration {
    Duration::from_millis(INTERVAL_MS.load(Ordering::Relaxed))
}

/// Counts one occurrence of `problem`; the first of a run calls `first` to log it in full
/// (with the ids of the message or command it happened to), later ones are only counted. Past
/// [`MAX_OPEN`] open problems, a new one is counted under the overflow problem instead.
pub fn occurred(problem: impl FnOnce() -> Problem, key: &str, first: impl FnOnce()) {
    let now = Instant::now();
    let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    let full = open.len() >= MAX_OPEN && !open.contains_key(key);
    let key = if full { OVERFLOW } else { key };
    if let Some(entry) = open.get_mut(key) {
        entry.total += 1;
        entry.unsummarised += 1;
        entry.last_seen = now;
        return;
    }
    let problem = if full {
        Problem {
            key: OVERFLOW.into(),
            what: format!("more than {MAX_OPEN} different problems at once; further ones are counted here together"),
            fix: "the first of each was logged; see the metrics for which part of the system is failing".into(),
            ends_when_quiet: true,
        }
    } else {
        problem()
    };
    open.insert(
        key.to_owned(),
        Open {
            problem,
            since: now,
            last_seen: now,
            total: 1,
            unsummarised: 0,
            last_summary: now,
        },
    );
    OPEN_COUNT.store(open.len(), Ordering::Relaxed);
    drop(open);
    if full {
        tracing::warn!(
            "more than {MAX_OPEN} different problems at once; further ones are counted together"
        );
    } else {
        first();
    }
}

/// Ends the open problem `key`, if any, with one line saying how long it lasted.
pub fn resolved(key: &str) {
    if !any_open() {
        return;
    }
    let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ended) = open.remove(key) {
        OPEN_COUNT.store(open.len(), Ordering::Relaxed);
        drop(open);
        log_end(&ended, "resolved");
    }
}

/// Writes a summary line for every open problem that happened again since its last one, once
/// an interval has passed, and ends the quiet ones.
pub fn tick() {
    if OPEN_COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let every = interval();
    let now = Instant::now();
    let mut summaries = Vec::new();
    let mut ended = Vec::new();
    let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    open.retain(|_, entry| {
        if now.duration_since(entry.last_summary) < every {
            return true;
        }
        if entry.unsummarised > 0 {
            summaries.push((
                entry.problem.clone(),
                entry.unsummarised,
                entry.total,
                now.duration_since(entry.last_summary),
                now.duration_since(entry.since),
            ));
            entry.unsummarised = 0;
            entry.last_summary = now;
            return true;
        }
        if entry.problem.ends_when_quiet && now.duration_since(entry.last_seen) >= every {
            ended.push(Open {
                problem: entry.problem.clone(),
                ..*entry
            });
            return false;
        }
        true
    });
    OPEN_COUNT.store(open.len(), Ordering::Relaxed);
    drop(open);
    for (problem, count, total, over, since) in summaries {
        tracing::warn!(
            count,
            total,
            for_s = since.as_secs(),
            "{}: {count} more time(s) in the last {} s; {}",
            problem.what,
            over.as_secs().max(1),
            problem.fix
        );
    }
    for entry in ended {
        log_end(&entry, "not seen for an interval");
    }
}

fn log_end(entry: &Open, how: &str) {
    tracing::info!(
        total = entry.total,
        lasted_s = entry.since.elapsed().as_secs(),
        "ended ({how}): {}",
        entry.problem.what
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(key: &str, quiet: bool) -> Problem {
        Problem {
            key: key.into(),
            what: format!("trouble {key}"),
            fix: "fix it".into(),
            ends_when_quiet: quiet,
        }
    }

    fn is_open(key: &str) -> Option<(u64, u64)> {
        let open = OPEN.lock().unwrap();
        open.get(key).map(|e| (e.total, e.unsummarised))
    }

    #[test]
    fn the_first_occurrence_is_logged_and_the_rest_counted_until_resolved() {
        let key = "unit unroutable a b";
        let mut firsts = 0;
        for _ in 0..1000 {
            occurred(|| problem(key, false), key, || firsts += 1);
        }
        assert_eq!(firsts, 1);
        assert_eq!(is_open(key), Some((1000, 999)));
        resolved(key);
        assert_eq!(is_open(key), None);
        occurred(|| problem(key, false), key, || firsts += 1);
        assert_eq!(firsts, 2, "a new run is logged again");
        resolved(key);
        assert_eq!(is_open(key), None);
    }

    /// A publisher can make up a problem's key (a provider id per command): the registry and
    /// the lines written stay bounded however many it makes.
    #[test]
    fn past_the_cap_new_problems_are_counted_together_and_logged_once() {
        let mut firsts = 0;
        for id in 0..(MAX_OPEN as u64 * 4) {
            let key = format!("unit parked {id}");
            occurred(|| problem(&key, true), &key, || firsts += 1);
        }
        assert_eq!(
            firsts, MAX_OPEN,
            "each problem under the cap is logged once"
        );
        assert_eq!(OPEN.lock().unwrap().len(), MAX_OPEN + 1);
        assert_eq!(
            is_open(OVERFLOW),
            Some((MAX_OPEN as u64 * 3, MAX_OPEN as u64 * 3 - 1))
        );
        // A problem already open is still counted under its own key.
        occurred(
            || problem("unit parked 0", true),
            "unit parked 0",
            || firsts += 1,
        );
        assert_eq!(is_open("unit parked 0"), Some((2, 1)));
    }
}
