//! Working a replay run: publishing its reserved letters a batch at a time (canaries first),
//! judging the outcomes as they come back, stopping by itself when its guard says so, and
//! resuming a run that stopped. [`super::replay`] starts runs; this sends what they took.

use super::guard::{self, Canaries, Guard, Settling, Tally};
use super::publish::{ReplayChannel, publish_batch};
use super::replay::open;
use super::replay_rows::{self, ReplayOutcome};
use super::store;
use super::targets::ReplayTargets;
use crate::config::Settings;
use crate::store::{self as db, PgConn, audit, replay_runs};
use diesel_async::AsyncConnection;
use serde::Serialize;
use std::time::{Duration, Instant};

/// How a run ended.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Worked {
    /// Confirmed by the broker.
    pub replayed: Vec<i64>,
    /// Refused by the broker (open again).
    pub failed: Vec<i64>,
    /// Not published, with the reason (not replayable; open again).
    pub skipped: Vec<(i64, String)>,
    /// Open dead letters left in the store when it ended.
    pub left: i64,
    /// Why the run stopped by itself before publishing the rest (its canary failed, or too many
    /// of its letters failed again); none when it went to its end.
    pub stopped: Option<String>,
    /// What became of the letters replayed in this working, as far as known when it ended.
    pub tally: Tally,
}

/// Most dead letters published before their outcomes are recorded (without a rate limit).
const BATCH: i64 = 200;
/// How often a run looks at its canaries' outcomes while it waits for them.
const CANARY_POLL: Duration = Duration::from_millis(500);

/// A run being worked: its channel, its guard and what it published so far.
struct Working {
    run_id: i64,
    channel: ReplayChannel,
    targets: ReplayTargets,
    copies: crate::intake::Copies,
    guard: Guard,
    rate: Option<f64>,
    began: Instant,
    timeout: Duration,
    /// The letters published by this working and their outcomes (a resume is judged on its own
    /// letters).
    settling: Settling,
    /// When their outcomes were last read.
    read_at: Option<Instant>,
    worked: Worked,
    after: i64,
}

/// Publishes the run's reserved dead letters, a batch at a time, recording each batch's outcomes
/// and the run's progress; ends the run. With a canary, the first letters go alone and the rest
/// only once every canary succeeded; after each batch the run's outcomes so far are judged, and
/// a run whose letters fail again beyond its guard stops, leaving the rest open (see
/// [`super::guard`]). Runs again from where it was if it stopped midway (a dead letter published
/// just before a stop may be published twice; the worker's idempotency makes the second a
/// republished event, not a second link). `rate` is the run's own unless given.
pub async fn work(
    settings: &Settings,
    conn: &mut PgConn,
    run_id: i64,
    rate: Option<f64>,
) -> anyhow::Result<Worked> {
    let run = replay_runs::find(conn, run_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no replay run {run_id}"))?;
    let channel = ReplayChannel::open(
        &settings.broker,
        format!("payment-link-worker replay {run_id}"),
    )
    .await?;
    let mut working = Working {
        run_id,
        channel,
        targets: ReplayTargets::new(settings),
        copies: crate::intake::Copies {
            carried: settings.broker.carried_headers.clone(),
            marks: crate::marks::Marks::load(settings, conn).await?,
        },
        guard: run.guard(),
        rate: rate.or(run.rate_per_second),
        began: Instant::now(),
        timeout: Duration::from_millis(settings.broker.publish_timeout_ms),
        settling: Settling::default(),
        read_at: None,
        worked: Worked::default(),
        after: 0,
    };
    let stopped = working.go(conn).await?;
    working.read_outcomes(conn).await?;
    let Working {
        channel,
        timeout,
        mut worked,
        settling,
        ..
    } = working;
    channel.close(timeout).await;
    worked.tally = Tally::of(settling.all());
    if let Some(reason) = stopped {
        replay_rows::release(conn, run_id).await?;
        worked.left = store::count(conn, &open()).await?;
        replay_runs::stop(conn, run_id, &reason, worked.left as i32).await?;
        worked.stopped = Some(reason);
        return Ok(worked);
    }
    worked.left = store::count(conn, &open()).await?;
    let run = replay_runs::find(conn, run_id).await?;
    let counts = replay_runs::RunCounts {
        selected: run.as_ref().map_or(0, |r| r.total),
        replayed: run.as_ref().map_or(0, |r| r.replayed),
        skipped: run.as_ref().map_or(0, |r| r.skipped),
        failed: run.as_ref().map_or(0, |r| r.failed),
        left: worked.left as i32,
    };
    replay_runs::finish(conn, run_id, counts).await?;
    Ok(worked)
}

impl Working {
    /// Publishes everything reserved, canaries first; returns why it stopped early, if it did.
    async fn go(&mut self, conn: &mut PgConn) -> anyhow::Result<Option<String>> {
        if self.guard.canary > 0 {
            let canaries = self
                .publish_next(conn, i64::from(self.guard.canary))
                .await?;
            if canaries.is_empty() {
                return Ok(None);
            }
            if let Some(reason) = self.await_canaries(conn, &canaries).await? {
                return Ok(Some(reason));
            }
        }
        loop {
            let rate = self.guard.rate_at(self.rate, self.began.elapsed());
            // With a rate limit, a batch is about a second of publishing: the recorded progress
            // stays close to the real one, and a console never sees a job that is going as stalled.
            let batch = rate.map_or(BATCH, |r| r.clamp(1.0, BATCH as f64) as i64);
            if self.publish_next(conn, batch).await?.is_empty() {
                return Ok(None);
            }
            // Read at most every poll: without a rate limit, batches follow each other faster
            // than outcomes come back.
            if !self.guard.judges() {
                continue;
            }
            if self.read_at.is_none_or(|at| at.elapsed() >= CANARY_POLL) {
                self.read_outcomes(conn).await?;
            }
            if let Some(reason) = self.guard.stop_reason(self.settling.all()) {
                return Ok(Some(reason));
            }
        }
    }

    /// Reads the outcomes of the letters still pending.
    async fn read_outcomes(&mut self, conn: &mut PgConn) -> anyhow::Result<()> {
        let pending = self.settling.pending();
        let read = replay_rows::outcomes_of(conn, self.run_id, &pending).await?;
        self.settling.read(read);
        self.read_at = Some(Instant::now());
        Ok(())
    }

    /// Publishes the next `limit` reserved letters and records their outcomes; returns the ids
    /// the broker confirmed (empty when nothing was left).
    async fn publish_next(&mut self, conn: &mut PgConn, limit: i64) -> anyhow::Result<Vec<i64>> {
        let letters = replay_rows::next_reserved(conn, self.run_id, self.after, limit).await?;
        let Some(last) = letters.last() else {
            return Ok(Vec::new());
        };
        self.after = last.id;
        let pause = self
            .guard
            .rate_at(self.rate, self.began.elapsed())
            .filter(|r| *r > 0.0 && r.is_finite())
            .map(|r| Duration::from_secs_f64(1.0 / r));
        let outcomes = publish_batch(
            &mut self.channel,
            &self.targets,
            &self.copies,
            &letters,
            pause,
            self.timeout,
        )
        .await;
        let mut confirmed = Vec::new();
        for (id, outcome) in &outcomes {
            match outcome {
                ReplayOutcome::Replayed => {
                    confirmed.push(*id);
                    self.worked.replayed.push(*id);
                }
                ReplayOutcome::Failed(error) => {
                    tracing::error!(dead_letter = id, %error, "the broker did not take the replayed command; it stays open");
                    self.worked.failed.push(*id);
                }
                ReplayOutcome::Skipped(why) => {
                    tracing::warn!(dead_letter = id, why = %why, "dead letter not replayed");
                    self.worked.skipped.push((*id, why.clone()));
                }
            }
        }
        replay_rows::record_replays(conn, self.run_id, &outcomes).await?;
        for letter in letters.iter().filter(|l| confirmed.contains(&l.id)) {
            self.settling.published(letter.id, &letter.command_id);
        }
        // A batch the broker took none of still counts as sent: the next batch goes on.
        Ok(if confirmed.is_empty() {
            letters.iter().map(|l| l.id).collect()
        } else {
            confirmed
        })
    }

    /// Waits (bounded by the guard) until every canary succeeded; returns why the run stops
    /// when one failed again or they took too long.
    async fn await_canaries(
        &mut self,
        conn: &mut PgConn,
        canaries: &[i64],
    ) -> anyhow::Result<Option<String>> {
        let wait = Duration::from_millis(self.guard.canary_wait_ms);
        let until = Instant::now() + wait;
        loop {
            let outcomes = replay_rows::outcomes_of(conn, self.run_id, canaries).await?;
            self.settling.read(outcomes.clone());
            if outcomes.is_empty() {
                // The broker took none of them: nothing can be judged, the run goes on as it
                // would without a canary (those letters are open again, and counted failed).
                return Ok(None);
            }
            match guard::canaries(&outcomes) {
                Canaries::Passed => return Ok(None),
                Canaries::Failed(reason) => return Ok(Some(reason)),
                Canaries::Waiting if Instant::now() >= until => {
                    return Ok(Some(format!(
                        "the canary had no outcome within {} s (it may be waiting for a retry); \
                         nothing else was sent",
                        wait.as_secs()
                    )));
                }
                Canaries::Waiting => {}
            }
            replay_runs::touch(conn, self.run_id).await?;
            tokio::time::sleep(CANARY_POLL).await;
        }
    }
}

/// Makes a run that stopped by itself go again: the letters it left open are reserved for it
/// again, and the resume is in the audit log. Returns how many letters it took back (0 when the
/// run had not stopped: a run that died midway is resumed from what it still holds).
pub async fn resume(
    conn: &mut PgConn,
    run_id: i64,
    requested_by: &str,
    source: &str,
) -> Result<usize, db::StoreError> {
    let requested_by = requested_by.to_owned();
    let source = source.to_owned();
    conn.transaction::<_, db::StoreError, _>(async move |conn| {
        if !replay_runs::restart(conn, run_id).await? {
            return Ok(0);
        }
        let taken = replay_rows::reserve_left(conn, run_id).await?;
        let entry = audit::NewEntry {
            actor: requested_by,
            source,
            action: "resume".into(),
            filter: None,
            count: taken as i32,
            ids: Vec::new(),
            run_id: Some(run_id),
            client_address: None,
            detail: None,
        };
        audit::record(conn, &entry).await?;
        Ok(taken)
    })
    .await
}
