//! Replaying dead letters, shared by the CLI and the console. A replay run selects the open dead
//! letters a [`Filter`] matches, leaves those that are not replayable (see [`super::targets`]),
//! reserves the rest (state `replaying`), then publishes each stored original to its target
//! (confirmed; see [`super::publish`]) and records the outcomes, a batch at a time; a run
//! stopped midway is resumed from its reserved rows. Every run is recorded in the audit log.

use super::actions::stored_filter;
use super::publish::{ReplayChannel, publish_batch};
use super::replay_rows::{self, ReplayOutcome};
use super::store::{self, Filter, State};
use super::targets::ReplayTargets;

use super::guard::{self, Canaries, Guard, GuardRequest, Settling, Tally};
use crate::config::Settings;
use crate::store::replay_runs::RunState;
use crate::store::{self as db, PgConn, audit, replay_runs};
use diesel_async::AsyncConnection;
use serde::Serialize;
use std::time::{Duration, Instant};

/// How a replay is asked for.
#[derive(Clone, Debug)]
pub struct ReplayRequest {
    /// Which dead letters (only open ones are replayed).
    pub filter: Filter,
    /// At most this many (the oldest first).
    pub limit: Option<usize>,
    /// Only say what would be replayed.
    pub dry_run: bool,
    /// Replays per second at most.
    pub rate: Option<f64>,
    /// Go ahead even where a replay may create a second link (see [`ReplayError::DuplicateRisk`]).
    pub accept_duplicate_risk: bool,
    /// Replay dead letters that fail again as they are (validation, an idempotency conflict)
    /// too; without it they are skipped, with the reason.
    pub include_failing: bool,
    /// Refuse to start (see [`ReplayError::FailsAgain`]) rather than skip them unasked: the
    /// console asks its operator.
    pub ask_if_failing: bool,
    /// Who asked, for the audit log.
    pub requested_by: String,
    /// `cli` or `console`.
    pub source: String,
    /// The console's client address, for the audit log (none from the CLI).
    pub client_address: Option<String>,
    /// The canary, the automatic stop and the ramp.
    pub guard: GuardRequest,
}

/// Why a replay did not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "{count} of the selected dead letters first called the provider more than \
         {window_hours} h ago (provider.idempotency_window_hours): the provider may have \
         forgotten their idempotency keys, so replaying them may create a second payment link. \
         Check with the provider, then confirm with --accept-duplicate-risk \
         (in the console: \"I accept the risk\"), or narrow the selection. First ids: {first:?}"
    )]
    /// Some selected dead letters are older than the provider's idempotency window.
    DuplicateRisk {
        /// How many.
        count: usize,
        /// The window.
        window_hours: u64,
        /// The first few of their ids.
        first: Vec<i64>,
    },
    #[error(
        "{count} of the selected dead letters fail again as they are (their body or id is what \
         was wrong): include them, or skip them and send corrected commands"
    )]
    /// Some selected dead letters fail again, and the caller asked to be asked.
    FailsAgain {
        /// How many.
        count: usize,
    },
    #[error("{0}")]
    /// The request cannot be worked as asked (a guard setting out of range): what is wrong.
    Invalid(String),
    #[error(transparent)]
    /// The database or the broker failed.
    Other(#[from] anyhow::Error),
}

impl From<db::StoreError> for ReplayError {
    fn from(error: db::StoreError) -> Self {
        Self::Other(error.into())
    }
}

/// A replay run as it starts.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    /// The run (and the console's job) id.
    pub run_id: i64,
    /// The dead letters selected (reserved unless a dry run).
    pub ids: Vec<i64>,
    /// Of those, the ones whose kind fails again as they are (validation, idempotency conflict).
    pub fail_again: Vec<i64>,
    /// Of those, the ones at risk of a second link (accepted, or the run would not start).
    pub at_risk: Vec<i64>,
    /// Matching dead letters left alone because they are not replayable, with the reason.
    pub skipped: Vec<(i64, String)>,
}

/// Selects, checks and records a run; reserves its dead letters unless it is a dry run (which
/// ends here). The publishing is [`work`].
pub async fn start(
    settings: &Settings,
    conn: &mut PgConn,
    request: &ReplayRequest,
) -> Result<Started, ReplayError> {
    request
        .guard
        .check(request.rate)
        .map_err(ReplayError::Invalid)?;
    let Chosen {
        mut ids,
        skipped,
        failing,
    } = choose(settings, conn, request).await?;
    if failing > 0 && request.ask_if_failing && !request.dry_run {
        return Err(ReplayError::FailsAgain { count: failing });
    }
    let window = Duration::from_secs(settings.provider.idempotency_window_hours * 3600);
    let mut at_risk = store::at_duplicate_risk(conn, &ids, window).await?;
    if !at_risk.is_empty() && !request.accept_duplicate_risk && !request.dry_run {
        return Err(ReplayError::DuplicateRisk {
            count: at_risk.len(),
            window_hours: settings.provider.idempotency_window_hours,
            first: at_risk.iter().take(5).copied().collect(),
        });
    }
    let filter = stored_filter(&request.filter)?;
    let run_id = replay_runs::start(conn, &new_run(request, &filter, ids.len())).await?;
    if !request.dry_run {
        // What another run took meanwhile is not this run's: it works on what it reserved.
        ids = replay_rows::reserve(conn, &ids, run_id).await?;
        ids.sort_unstable();
    }
    let selected = store::summaries(conn, &ids).await?;
    let fail_again = selected
        .iter()
        .filter(|s| s.kind.fails_again())
        .map(|s| s.id)
        .collect();
    let command_ids: Vec<String> = selected.iter().map(|s| s.command_id.clone()).collect();
    replay_runs::set_selection(conn, run_id, &command_ids).await?;
    if !request.dry_run {
        // A dry run changes nothing: its skipped count is in the run, not in each history.
        replay_rows::record_skipped(conn, run_id, &skipped).await?;
    }
    if request.dry_run {
        let counts = replay_runs::RunCounts {
            selected: ids.len() as i32,
            replayed: 0,
            skipped: skipped.len() as i32,
            failed: 0,
            left: store::count(conn, &open()).await? as i32,
        };
        replay_runs::finish(conn, run_id, counts).await?;
    }
    let entry = audit::NewEntry {
        actor: request.requested_by.clone(),
        source: request.source.clone(),
        action: if request.dry_run { "dry-run" } else { "replay" }.into(),
        filter: Some(filter),
        count: ids.len() as i32,
        ids: ids.clone(),
        run_id: Some(run_id),
        client_address: request.client_address.clone(),
        detail: None,
    };
    audit::record(conn, &entry).await?;
    at_risk.retain(|id| ids.binary_search(id).is_ok());
    Ok(Started {
        run_id,
        ids,
        fail_again,
        at_risk,
        skipped,
    })
}

/// The open letters a request selects, split into those to replay and those skipped (with why).
struct Chosen {
    ids: Vec<i64>,
    skipped: Vec<(i64, String)>,
    /// How many of the skipped would fail again (the rest go to a target not allowed).
    failing: usize,
}

/// The open letters `request` selects (up to its limit): those whose target the worker may
/// publish to, and unless asked for, not those that would fail again.
async fn choose(
    settings: &Settings,
    conn: &mut PgConn,
    request: &ReplayRequest,
) -> Result<Chosen, ReplayError> {
    let mut ids = store::open_ids(conn, &request.filter).await?;
    if let Some(limit) = request.limit {
        ids.truncate(limit);
    }
    let targets = ReplayTargets::new(settings);
    let selected = replay_rows::targets(conn, &ids).await?;
    let mut chosen = Chosen {
        ids: Vec::with_capacity(selected.len()),
        skipped: Vec::new(),
        failing: 0,
    };
    for (id, exchange, routing_key, kind) in selected {
        match targets.check(&exchange, &routing_key) {
            Err(why) => chosen.skipped.push((id, format!("not replayable: {why}"))),
            Ok(()) if kind.fails_again() && !request.include_failing => {
                chosen.failing += 1;
                chosen.skipped.push((id, fails_again_reason(kind)));
            }
            Ok(()) => chosen.ids.push(id),
        }
    }
    Ok(chosen)
}

/// The run a replay request starts: `total` letters, done at once when it is a dry run.
fn new_run(
    request: &ReplayRequest,
    filter: &serde_json::Value,
    total: usize,
) -> replay_runs::NewReplayRun {
    let guard = request.guard.resolve(total);
    let state = if request.dry_run {
        RunState::Done
    } else {
        RunState::Running
    };
    replay_runs::NewReplayRun {
        requested_by: request.requested_by.clone(),
        filter_kind: request.filter.kind.map(|k| k.as_str().to_owned()),
        filter_command_id: request.filter.command_id.clone(),
        max_count: request.limit.map(|l| l as i64),
        rate_per_second: request.rate,
        dry_run: request.dry_run,
        source: request.source.clone(),
        filter: Some(filter.clone()),
        state,
        total: total as i32,
        accept_duplicate_risk: request.accept_duplicate_risk,
        guard: (&guard).into(),
    }
}

/// Why a dead letter of `kind` is skipped unless failing ones are included.
fn fails_again_reason(kind: super::Kind) -> String {
    format!(
        "fails again as it is ({kind}): its body or id is what was wrong; send a corrected \
         command, or replay with --include-failing"
    )
}

pub(super) fn open() -> Filter {
    Filter {
        state: Some(State::Open),
        ..Filter::default()
    }
}

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
