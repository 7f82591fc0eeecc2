//! The run's report: the account, the longest time without progress per fault kind, the
//! workers' resources over the run and their warning lines, as text (for people and docs/) and
//! JSON (for tools).

use super::Options;
use super::account::{Account, Leftovers};
use super::collect::Event;
use super::faults::Done;
use super::fleet::Life;
use super::load::Load;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

/// What the report is made from.
pub struct Parts<'a> {
    pub options: Options,
    pub commit: String,
    pub done: Vec<Done>,
    pub load: &'a Load,
    pub events: &'a [Event],
    pub load_end: Duration,
    pub drained: Option<Duration>,
    pub account: Account,
    pub planted: Option<Account>,
    pub leftovers: Leftovers,
    pub lives: &'a [Life],
    pub exits: Vec<String>,
    /// The store's rows for the account's examples.
    pub evidence: Vec<String>,
    /// The workers' progress as the store recorded it.
    pub progress: Progress,
}

/// When commands were claimed and completed, in seconds from the start of the load (the
/// store's clock, which is this machine's).
#[derive(Default)]
pub struct Progress {
    pub claimed: Vec<f64>,
    pub completed: Vec<f64>,
}

/// The longest stretch without an event after one kind of fault.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stall {
    pub kind: String,
    pub faults: usize,
    pub longest_s: f64,
    /// When the worst one started, from the start of the load.
    pub worst_at_s: f64,
    /// The longest allowed, for the kinds that have a target.
    pub target_s: Option<f64>,
}

/// One process's memory, descriptors and sockets: at its baseline, at its peak after it, and at
/// its last sample (after the drain, when it is idle again).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Resources {
    pub worker: String,
    pub lived_s: f64,
    pub baseline_at_s: f64,
    pub rss_kb: (u64, u64, u64),
    pub fds: (u64, u64, u64),
    pub sockets: (u64, u64, u64),
    /// The lowest RSS in the ten minutes after the baseline and in the last ten minutes of the
    /// life, for lives of 30 minutes or more: a leak raises the floor; memory a fault or a burst
    /// needed for a while (and the end's last burst from the delay queues) does not.
    pub rss_floor_kb: Option<(u64, u64)>,
    /// The same for descriptors: the HTTP client's idle connections after a slow provider
    /// close within its idle timeout, a leaked socket stays and raises the floor.
    pub fd_floor: Option<(u64, u64)>,
    /// The median RSS of the same two windows: the level the worker runs at, which a floor
    /// taken during the warm-up understates.
    pub rss_median_kb: Option<(u64, u64)>,
    /// The median descriptors of the same two windows.
    pub fd_median: Option<(u64, u64)>,
}

impl Resources {
    /// The last sample over the baseline, the worst of memory and descriptors, in percent: what
    /// the faults left behind (a leak), not what they needed while they lasted (the peak).
    pub fn growth_percent(&self) -> f64 {
        let grow =
            |(base, _, end): (u64, u64, u64)| (end as f64 / base.max(1) as f64 - 1.0) * 100.0;
        grow(self.rss_kb).max(grow(self.fds))
    }
}

/// The report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub seed: u64,
    pub commit: String,
    pub minutes: f64,
    pub rate: f64,
    pub workers: usize,
    pub compress: f64,
    pub sent: BTreeMap<String, u64>,
    pub republished: u64,
    pub unconfirmed: u64,
    pub faults: Vec<String>,
    pub drained_s: Option<f64>,
    pub account: Account,
    pub planted: Option<Account>,
    pub leftovers: Leftovers,
    pub stalls: Vec<Stall>,
    pub resources: Vec<Resources>,
    pub warning_lines: u64,
    pub error_lines: u64,
    pub top_warnings: Vec<(String, u64)>,
    pub exits: Vec<String>,
    pub evidence: Vec<String>,
    /// Per fault over its target: second by second around the gap, what the load had
    /// confirmed, what the workers claimed and completed, and what the collector received.
    pub timelines: Vec<String>,
}

impl Report {
    pub fn new(parts: Parts<'_>) -> Report {
        let o = &parts.options;
        let (warning_lines, error_lines, top_warnings) = log_lines(parts.lives);
        let timelines = timelines(&parts);
        Report {
            seed: o.seed,
            commit: parts.commit,
            minutes: o.minutes,
            rate: o.rate,
            workers: o.workers,
            compress: o.compress,
            sent: parts
                .load
                .sent
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            republished: parts.load.republished,
            unconfirmed: parts.load.unconfirmed,
            faults: parts
                .done
                .iter()
                .map(|d| {
                    format!(
                        "{:>7.1}s {} ({})",
                        d.started.as_secs_f64(),
                        d.fault.kind,
                        d.note
                    )
                })
                .collect(),
            drained_s: parts.drained.map(|d| d.as_secs_f64()),
            stalls: stalls(&parts.done, parts.events, parts.load_end),
            resources: resources(parts.lives, o.minutes),
            account: parts.account,
            planted: parts.planted,
            leftovers: parts.leftovers,
            warning_lines,
            error_lines,
            top_warnings,
            exits: parts.exits,
            evidence: parts.evidence,
            timelines,
        }
    }

    /// The run's own verdict: the account green, every command drained, no worker exited by
    /// itself, and (with `--plant`) the negative control caught all it was given.
    pub fn green(&self) -> bool {
        self.account.green()
            && self.drained_s.is_some()
            && self.exits.is_empty()
            && self.unconfirmed == 0
            && self.plant_caught().unwrap_or(true)
    }

    /// Whether the planted loss, duplicate and second link were each reported.
    pub fn plant_caught(&self) -> Option<bool> {
        let planted = self.planted.as_ref()?;
        let clean = &self.account;
        Some(
            planted.lost > clean.lost
                && planted.two_links > clean.two_links
                && planted.duplicate_events > clean.duplicate_events,
        )
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let a = &self.account;
        let mut t = String::new();
        let _ = writeln!(t, "seed {}  commit {}", self.seed, self.commit);
        let _ = writeln!(
            t,
            "{:.1} min at {}/s, {} workers, time compressed {}x",
            self.minutes, self.rate, self.workers, self.compress
        );
        let _ = writeln!(
            t,
            "\nsent (confirmed by the broker): {:?}; republished after no confirm: {}; never confirmed: {}",
            self.sent, self.republished, self.unconfirmed
        );
        let _ = writeln!(t, "faults: {}", self.faults.len());
        for f in &self.faults {
            let _ = writeln!(t, "  {f}");
        }
        let drained = self
            .drained_s
            .map_or("NOT within the bound".into(), |s| format!("in {s:.1} s"));
        let _ = writeln!(t, "\ndrained {drained}\n\naccount");
        let rows: [(&str, String, bool); 13] = [
            ("commands", a.commands.to_string(), true),
            ("created (one link each)", a.created.to_string(), true),
            ("failed or dead-lettered", a.failed.to_string(), true),
            (
                "dead letters by kind",
                format!("{:?}", a.dead_letters),
                true,
            ),
            ("LOST", a.lost.to_string(), a.lost == 0),
            ("TWO LINKS", a.two_links.to_string(), a.two_links == 0),
            (
                "INVALID WITH A LINK",
                a.invalid_with_link.to_string(),
                a.invalid_with_link == 0,
            ),
            (
                "CREATED TWICE (two event ids)",
                a.created_twice.to_string(),
                a.created_twice == 0,
            ),
            (
                "STUCK",
                format!(
                    "{} {:?} outbox {} processing {}",
                    a.stuck,
                    self.leftovers.queues,
                    self.leftovers.outbox_unsent,
                    self.leftovers.processing
                ),
                a.stuck == 0,
            ),
            (
                "duplicate events (same id)",
                a.duplicate_events.to_string(),
                true,
            ),
            (
                "provider calls repeating an applied key",
                a.repeated_calls.to_string(),
                true,
            ),
            (
                "  of which after a lost answer or a hang",
                a.repeated_after_lost_answer.to_string(),
                true,
            ),
            (
                "workers that exited by themselves",
                format!("{:?}", self.exits),
                self.exits.is_empty(),
            ),
        ];
        for (name, value, ok) in rows {
            let _ = writeln!(t, "  {}{name:<42} {value}", if ok { "  " } else { "! " });
        }
        for (what, ids) in &a.examples {
            let _ = writeln!(t, "  e.g. {what}: {}", ids.join(", "));
        }
        for line in &self.evidence {
            let _ = writeln!(t, "  store: {line}");
        }
        let _ = writeln!(
            t,
            "\nlongest time without an event, per fault kind (from the fault's start; for a failover from the promotion, for a stall from its end)"
        );
        for s in &self.stalls {
            let target = match s.target_s {
                Some(target) if s.longest_s > target => {
                    format!("  ! over the {target:.0} s target")
                }
                Some(target) => format!("  (target {target:.0} s)"),
                None => String::new(),
            };
            let _ = writeln!(
                t,
                "  {:<27} {:>3} faults  {:>6.1} s  (worst at {:.0} s){target}",
                s.kind, s.faults, s.longest_s, s.worst_at_s
            );
        }
        for line in &self.timelines {
            let _ = writeln!(t, "{line}");
        }
        let _ = writeln!(
            t,
            "\nworkers' resources (at the baseline / peak after it / at the end, idle after the drain)"
        );
        for r in &self.resources {
            let _ = writeln!(
                t,
                "  worker {:<6} lived {:>5.0} s  baseline at {:>3.0} s  RSS {:?} KiB  fds {:?}  sockets {:?}  end over baseline {:+.1} %",
                r.worker,
                r.lived_s,
                r.baseline_at_s,
                r.rss_kb,
                r.fds,
                r.sockets,
                r.growth_percent()
            );
            if let Some((early, late)) = r.rss_floor_kb {
                let _ = writeln!(
                    t,
                    "  worker {:<6} RSS floor: {early} KiB in the 10 minutes after the baseline, {late} KiB in its last 10 minutes ({:+.1} %)",
                    r.worker,
                    (late as f64 / early.max(1) as f64 - 1.0) * 100.0
                );
            }
            if let Some((early, late)) = r.rss_median_kb {
                let _ = writeln!(
                    t,
                    "  worker {:<6} RSS median: {early} KiB in the 10 minutes after the baseline, {late} KiB in its last 10 minutes ({:+.1} %)",
                    r.worker,
                    (late as f64 / early.max(1) as f64 - 1.0) * 100.0
                );
            }
            if let Some((early, late)) = r.fd_median {
                let _ = writeln!(
                    t,
                    "  worker {:<6} descriptors median: {early} in the 10 minutes after the baseline, {late} in its last 10 minutes ({:+.1} %)",
                    r.worker,
                    (late as f64 / early.max(1) as f64 - 1.0) * 100.0
                );
            }
            if let Some((early, late)) = r.fd_floor {
                let _ = writeln!(
                    t,
                    "  worker {:<6} descriptors floor: {early} in the 10 minutes after the baseline, {late} in its last 10 minutes ({:+.1} %)",
                    r.worker,
                    (late as f64 / early.max(1) as f64 - 1.0) * 100.0
                );
            }
        }
        let _ = writeln!(
            t,
            "\nlog lines: {} warnings, {} errors, over all workers; most frequent warnings:",
            self.warning_lines, self.error_lines
        );
        for (message, n) in &self.top_warnings {
            let _ = writeln!(t, "  {n:>6}  {message}");
        }
        if let Some(planted) = &self.planted {
            let caught = self.plant_caught().unwrap_or(false);
            let _ = writeln!(
                t,
                "\nnegative control (one command's events dropped, one event copied, one second link forged): lost {}, two links {}, duplicate events {}: {}",
                planted.lost,
                planted.two_links,
                planted.duplicate_events,
                if caught { "all caught" } else { "NOT CAUGHT" }
            );
        }
        let _ = writeln!(
            t,
            "\nverdict: {}",
            if self.green() { "GREEN" } else { "RED" }
        );
        t
    }
}

/// The longest a broker fault or a failover (from the promotion) may stop progress.
const TARGET_S: f64 = 5.0;

/// The longest gap between events after fault `i` (from when progress is expected), over the
/// window up to the next fault (or the load's end), and when that gap began.
fn gap(done: &[Done], i: usize, times: &[Duration], load_end: Duration) -> (Duration, Duration) {
    let d = &done[i];
    let until = done
        .get(i + 1)
        .map_or(load_end, |next| next.started)
        .max(d.ended);
    let mut last = d.progress_from;
    let mut longest = (Duration::ZERO, last);
    for &at in times
        .iter()
        .filter(|&&at| at > d.progress_from && at <= until)
    {
        if at - last > longest.0 {
            longest = (at - last, last);
        }
        last = at;
    }
    let tail = until
        .saturating_sub(last)
        .min(until.saturating_sub(d.progress_from));
    if tail > longest.0 {
        longest = (tail, last);
    }
    longest
}

fn event_times(events: &[Event]) -> Vec<Duration> {
    let mut times: Vec<Duration> = events.iter().map(|e| e.at).collect();
    times.sort();
    times
}

/// The longest gap between events after each fault, worst per kind.
fn stalls(done: &[Done], events: &[Event], load_end: Duration) -> Vec<Stall> {
    let times = event_times(events);
    let mut worst: BTreeMap<String, Stall> = BTreeMap::new();
    for (i, d) in done.iter().enumerate() {
        let (longest, _) = gap(done, i, &times, load_end);
        let entry = worst
            .entry(d.fault.kind.name().to_owned())
            .or_insert(Stall {
                kind: d.fault.kind.name().to_owned(),
                faults: 0,
                longest_s: 0.0,
                worst_at_s: 0.0,
                target_s: d.fault.kind.has_target().then_some(TARGET_S),
            });
        entry.faults += 1;
        if longest.as_secs_f64() > entry.longest_s {
            entry.longest_s = longest.as_secs_f64();
            entry.worst_at_s = d.started.as_secs_f64();
        }
    }
    worst.into_values().collect()
}

/// One figure of a life's samples from its baseline on, in the ten minutes after the baseline and
/// in the last ten minutes, reduced by `pick` (the floor, the median); lives of 30 minutes or more
/// (see [`Resources::rss_floor_kb`]).
fn windows(
    after: &[super::fleet::Sample],
    base_s: f64,
    figure: fn(&super::fleet::Sample) -> u64,
    pick: fn(Vec<u64>) -> Option<u64>,
) -> Option<(u64, u64)> {
    const WINDOW_S: f64 = 600.0;
    let end_s = after.last()?.age_s;
    if end_s - base_s < 3.0 * WINDOW_S {
        return None;
    }
    let within = |from: f64, to: f64| {
        pick(
            after
                .iter()
                .filter(|s| s.age_s >= from && s.age_s <= to)
                .map(figure)
                .collect(),
        )
    };
    Some((
        within(base_s, base_s + WINDOW_S)?,
        within(end_s - WINDOW_S, end_s)?,
    ))
}

fn floor(values: Vec<u64>) -> Option<u64> {
    values.into_iter().min()
}

fn median(mut values: Vec<u64>) -> Option<u64> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

/// Per process that lived past its baseline (5 minutes, or a sixth of a shorter run): its level
/// then and its peak after.
fn resources(lives: &[Life], minutes: f64) -> Vec<Resources> {
    let baseline_age = (minutes * 60.0 / 6.0).min(300.0);
    lives
        .iter()
        .filter_map(|life| {
            let at = life.samples.iter().position(|s| s.age_s >= baseline_age)?;
            let base = life.samples[at];
            let after = &life.samples[at..];
            let last = after.last().copied().unwrap_or(base);
            let levels = |f: fn(&super::fleet::Sample) -> u64| {
                (f(&base), after.iter().map(f).max().unwrap_or(0), f(&last))
            };
            Some(Resources {
                worker: format!("{}#{}", life.slot, life.generation),
                lived_s: life.samples.last().map_or(0.0, |s| s.age_s),
                baseline_at_s: base.age_s,
                rss_kb: levels(|s| s.rss_kb),
                fds: levels(|s| s.fds),
                sockets: levels(|s| s.sockets),
                rss_floor_kb: windows(after, base.age_s, |s| s.rss_kb, floor),
                fd_floor: windows(after, base.age_s, |s| s.fds, floor),
                rss_median_kb: windows(after, base.age_s, |s| s.rss_kb, median),
                fd_median: windows(after, base.age_s, |s| s.fds, median),
            })
        })
        .collect()
}

/// Warning and error lines over every worker's log, and the most frequent warnings.
fn log_lines(lives: &[Life]) -> (u64, u64, Vec<(String, u64)>) {
    let (mut warnings, mut errors) = (0, 0);
    let mut by_message: HashMap<String, u64> = HashMap::new();
    for life in lives {
        let Ok(text) = std::fs::read_to_string(&life.log) else {
            continue;
        };
        for line in text.lines() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            match value.get("level").and_then(|l| l.as_str()) {
                Some("WARN") => warnings += 1,
                Some("ERROR") => errors += 1,
                _ => continue,
            }
            let message = value
                .get("message")
                .or_else(|| value.pointer("/fields/message"))
                .and_then(|m| m.as_str())
                .unwrap_or("?");
            *by_message
                .entry(message.chars().take(110).collect())
                .or_default() += 1;
        }
    }
    let mut top: Vec<(String, u64)> = by_message.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(10);
    (warnings, errors, top)
}

/// Second by second around each gap over its target: confirmed by the broker to the load,
/// claimed and completed by the workers (from the store), received by the collector. Tells a
/// stall of the workers from one of the load or of the collector's own queue.
fn timelines(parts: &Parts<'_>) -> Vec<String> {
    let times = event_times(parts.events);
    let per_second = |values: &mut dyn Iterator<Item = f64>, from: u64, to: u64| {
        let mut counts = vec![0u32; (to - from) as usize];
        for v in values {
            if v >= from as f64 && v < to as f64 {
                counts[(v as u64 - from) as usize] += 1;
            }
        }
        counts
    };
    let mut lines = Vec::new();
    for (i, d) in parts.done.iter().enumerate() {
        let (longest, began) = gap(&parts.done, i, &times, parts.load_end);
        if !d.fault.kind.has_target() || longest.as_secs_f64() <= TARGET_S {
            continue;
        }
        let from = d.started.as_secs().saturating_sub(2);
        let to = (began + longest).as_secs() + 3;
        let confirmed: Vec<u32> = (from..to)
            .map(|s| {
                parts
                    .load
                    .confirmed_per_s
                    .get(s as usize)
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        let claimed = per_second(&mut parts.progress.claimed.iter().copied(), from, to);
        let completed = per_second(&mut parts.progress.completed.iter().copied(), from, to);
        let received = per_second(&mut times.iter().map(Duration::as_secs_f64), from, to);
        lines.push(format!(
            "\n{} at {:.1} s ({}), undone at {:.1} s: {:.1} s without an event from {:.1} s",
            d.fault.kind,
            d.started.as_secs_f64(),
            d.note,
            d.ended.as_secs_f64(),
            longest.as_secs_f64(),
            began.as_secs_f64()
        ));
        lines.push("  second  confirmed  claimed  completed  events".into());
        for (k, second) in (from..to).enumerate() {
            lines.push(format!(
                "  {second:>6}  {:>9}  {:>7}  {:>9}  {:>6}",
                confirmed[k], claimed[k], completed[k], received[k]
            ));
        }
    }
    lines
}
