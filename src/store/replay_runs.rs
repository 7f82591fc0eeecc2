//! The audit trail of dead-letter replays.

use super::schema::replay_runs::dsl as r;
use super::{PgConn, StoreError};
use chrono::{DateTime, Utc};
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::pg::{Pg, PgValue};
use diesel::prelude::*;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;

/// A run as it starts.
#[derive(Debug, Insertable, Queryable, Selectable)]
#[diesel(table_name = super::schema::replay_runs)]
pub struct NewReplayRun {
    /// Who ran it.
    pub requested_by: String,
    /// The `--kind` filter.
    pub filter_kind: Option<String>,
    /// The `--command-id` filter.
    pub filter_command_id: Option<String>,
    /// The `--limit`.
    pub max_count: Option<i64>,
    /// The `--rate`.
    pub rate_per_second: Option<f64>,
    /// Whether it only showed what it would do.
    pub dry_run: bool,
    /// `cli` or `console`.
    pub source: String,
    /// The whole filter, as the console and the CLI share it.
    pub filter: Option<serde_json::Value>,
    /// Running until it ends (done, or failed).
    pub state: RunState,
    /// Dead letters the run is to replay.
    pub total: i32,
    /// Whether the operator accepted that some may create a second link.
    pub accept_duplicate_risk: bool,
    /// Its canary, automatic stop and ramp.
    #[diesel(embed)]
    pub guard: GuardColumns,
}

/// A run's guard as its columns hold it (see [`crate::dead_letters::guard`]).
#[derive(Clone, Debug, Insertable, Queryable, Selectable)]
#[diesel(table_name = super::schema::replay_runs)]
pub struct GuardColumns {
    /// Letters sent first, whose outcomes must all be successes before the rest go.
    pub canary: i32,
    /// How long the canaries may take to succeed.
    pub canary_wait_ms: i64,
    /// The run stops once this many of its letters failed again.
    pub stop_after_failures: Option<i32>,
    /// The run stops once this share of its last `failure_window` settled letters failed again.
    pub max_failure_ratio: Option<f64>,
    /// How many settled letters the ratio is judged over.
    pub failure_window: i32,
    /// Replays per second at the start, doubled every ramp interval up to the rate.
    pub start_rate: Option<f64>,
}

/// A recorded run: what it started as (read through `Deref`), with its progress and end.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = super::schema::replay_runs)]
pub struct ReplayRun {
    /// The run's id.
    pub id: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended (none: it died midway).
    pub finished_at: Option<DateTime<Utc>>,
    /// What it started as.
    #[diesel(embed)]
    pub run: NewReplayRun,
    /// Sent back to the command exchange (0 in a dry run).
    pub replayed: i32,
    /// Looked at and left in place.
    pub skipped: i32,
    /// Chosen but refused by the broker.
    pub failed: i32,
    /// Still in the dead-letter queue at the end.
    pub left_in_queue: Option<i32>,
    /// The selected command ids (replayed unless `dry_run`).
    pub command_ids: Vec<String>,
    /// Chosen by the filter (in a dry run, what a real run would have replayed).
    pub selected: i32,
    /// Last progress (a running job not updated for a while has stopped).
    pub updated_at: DateTime<Utc>,
    /// Why it stopped by itself (state `stopped`).
    pub stop_reason: Option<String>,
}

impl std::ops::Deref for ReplayRun {
    type Target = NewReplayRun;
    fn deref(&self) -> &NewReplayRun {
        &self.run
    }
}

impl ReplayRun {
    /// The guard the run was started with.
    pub fn guard(&self) -> crate::dead_letters::guard::Guard {
        let columns = &self.guard;
        crate::dead_letters::guard::Guard {
            canary: columns.canary.max(0) as u32,
            canary_wait_ms: columns.canary_wait_ms.max(0) as u64,
            stop_after_failures: columns.stop_after_failures.map(|n| n.max(1) as u32),
            max_failure_ratio: columns.max_failure_ratio,
            failure_window: columns.failure_window.max(1) as u32,
            start_rate: columns.start_rate,
        }
    }
}

impl From<&crate::dead_letters::guard::Guard> for GuardColumns {
    fn from(guard: &crate::dead_letters::guard::Guard) -> Self {
        Self {
            canary: guard.canary as i32,
            canary_wait_ms: guard.canary_wait_ms as i64,
            stop_after_failures: guard.stop_after_failures.map(|n| n as i32),
            max_failure_ratio: guard.max_failure_ratio,
            failure_window: guard.failure_window as i32,
            start_rate: guard.start_rate,
        }
    }
}

/// Where a replay run is; the `state` column holds its text, the API and the pages show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, AsExpression, FromSqlRow, serde::Serialize)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Publishing its letters (or stopped midway: a console takes it over once it is idle).
    Running,
    /// Ended with every chosen letter published, or a dry run.
    Done,
    /// Ended with letters the broker refused or did not confirm: they stay open, and the
    /// `PaymentLinkReplayRunFailed` alert says so.
    Failed,
    /// Stopped by itself (its canary or too many of its letters failed again): the letters it
    /// did not publish are open again, and a resume sends them.
    Stopped,
}

impl RunState {
    /// The text the column holds and the API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Done => "done",
            RunState::Failed => "failed",
            RunState::Stopped => "stopped",
        }
    }
}

impl RunState {
    /// The state named `text`, as the column holds it.
    pub fn parse(text: &str) -> Option<Self> {
        [
            RunState::Running,
            RunState::Done,
            RunState::Failed,
            RunState::Stopped,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ToSql<Text, Pg> for RunState {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <str as ToSql<Text, Pg>>::to_sql(self.as_str(), out)
    }
}

impl FromSql<Text, Pg> for RunState {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let text = <String as FromSql<Text, Pg>>::from_sql(value)?;
        RunState::parse(&text).ok_or_else(|| format!("unknown replay run state {text:?}").into())
    }
}

/// Records the start of a run and returns its id.
pub async fn start(conn: &mut PgConn, run: &NewReplayRun) -> Result<i64, StoreError> {
    Ok(diesel::insert_into(r::replay_runs)
        .values(run)
        .returning(r::id)
        .get_result(conn)
        .await?)
}

/// Records the command ids the run took, and how many they are.
pub async fn set_selection(
    conn: &mut PgConn,
    run_id: i64,
    command_ids: &[String],
) -> Result<(), StoreError> {
    diesel::update(r::replay_runs.find(run_id))
        .set((
            r::command_ids.eq(command_ids),
            r::total.eq(command_ids.len() as i32),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// How a run ended.
#[derive(Debug, Clone, Copy)]
pub struct RunCounts {
    /// Chosen by the filter.
    pub selected: i32,
    /// Sent back (0 in a dry run).
    pub replayed: i32,
    /// Looked at and left in place.
    pub skipped: i32,
    /// Chosen but refused by the broker.
    pub failed: i32,
    /// Still in the dead-letter queue.
    pub left: i32,
}

/// Records how the run ended: `failed` when the broker refused or did not confirm any of its
/// letters, else `done`.
pub async fn finish(conn: &mut PgConn, run_id: i64, counts: RunCounts) -> Result<(), StoreError> {
    let RunCounts {
        selected,
        replayed,
        skipped,
        failed,
        left,
    } = counts;
    diesel::update(r::replay_runs.find(run_id))
        .set((
            r::finished_at.eq(Some(Utc::now())),
            r::selected.eq(selected),
            r::replayed.eq(replayed),
            r::skipped.eq(skipped),
            r::failed.eq(failed),
            r::left_in_queue.eq(Some(left)),
            r::state.eq(if failed > 0 {
                RunState::Failed
            } else {
                RunState::Done
            }),
            r::updated_at.eq(Utc::now()),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Records that the run stopped by itself, and why.
pub async fn stop(
    conn: &mut PgConn,
    run_id: i64,
    reason: &str,
    left: i32,
) -> Result<(), StoreError> {
    diesel::update(r::replay_runs.find(run_id))
        .set((
            r::finished_at.eq(Some(Utc::now())),
            r::left_in_queue.eq(Some(left)),
            r::state.eq(RunState::Stopped),
            r::stop_reason.eq(Some(reason)),
            r::updated_at.eq(Utc::now()),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Makes a stopped run running again (a resume); returns whether it was stopped.
pub async fn restart(conn: &mut PgConn, run_id: i64) -> Result<bool, StoreError> {
    Ok(diesel::update(
        r::replay_runs
            .find(run_id)
            .filter(r::state.eq(RunState::Stopped)),
    )
    .set((
        r::state.eq(RunState::Running),
        r::finished_at.eq(None::<DateTime<Utc>>),
        r::stop_reason.eq(None::<String>),
        r::updated_at.eq(Utc::now()),
    ))
    .execute(conn)
    .await?
        == 1)
}

/// Shows the run is alive while it waits (for its canaries), so no console takes it over.
pub async fn touch(conn: &mut PgConn, run_id: i64) -> Result<(), StoreError> {
    diesel::update(r::replay_runs.find(run_id))
        .set(r::updated_at.eq(Utc::now()))
        .execute(conn)
        .await?;
    Ok(())
}

/// Every run, newest first.
pub async fn all(conn: &mut PgConn) -> Result<Vec<ReplayRun>, StoreError> {
    Ok(r::replay_runs
        .order(r::id.desc())
        .select(ReplayRun::as_select())
        .load(conn)
        .await?)
}

/// The newest `limit` runs.
pub async fn newest(conn: &mut PgConn, limit: i64) -> Result<Vec<ReplayRun>, StoreError> {
    Ok(r::replay_runs
        .order(r::id.desc())
        .limit(limit)
        .select(ReplayRun::as_select())
        .load(conn)
        .await?)
}

/// One run.
pub async fn find(conn: &mut PgConn, run_id: i64) -> Result<Option<ReplayRun>, StoreError> {
    Ok(r::replay_runs
        .find(run_id)
        .select(ReplayRun::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Takes over a running run nobody has advanced for `idle` (its process stopped midway), so
/// exactly one process resumes it; returns whether this one did.
pub async fn take_over(
    conn: &mut PgConn,
    run_id: i64,
    idle: std::time::Duration,
) -> Result<bool, StoreError> {
    let before = Utc::now() - chrono::Duration::from_std(idle).unwrap_or_default();
    Ok(diesel::update(
        r::replay_runs
            .find(run_id)
            .filter(r::state.eq(RunState::Running.as_str()))
            .filter(r::updated_at.lt(before)),
    )
    .set(r::updated_at.eq(Utc::now()))
    .execute(conn)
    .await?
        == 1)
}

/// How long the longest-idle running run has not moved, and how many runs ended `failed` within
/// `recent`: the figures the alerts on replays read.
pub async fn watch(
    conn: &mut PgConn,
    recent: std::time::Duration,
) -> Result<(Option<DateTime<Utc>>, i64), StoreError> {
    let since = Utc::now() - chrono::Duration::from_std(recent).unwrap_or_default();
    let idle_since: Option<DateTime<Utc>> = r::replay_runs
        .filter(r::state.eq(RunState::Running.as_str()))
        .select(diesel::dsl::min(r::updated_at))
        .first(conn)
        .await?;
    let failed: i64 = r::replay_runs
        .filter(r::state.eq(RunState::Failed.as_str()))
        .filter(r::finished_at.ge(since))
        .count()
        .get_result(conn)
        .await?;
    Ok((idle_since, failed))
}

/// Running runs nobody has advanced for `idle`.
pub async fn stalled(conn: &mut PgConn, idle: std::time::Duration) -> Result<Vec<i64>, StoreError> {
    let before = Utc::now() - chrono::Duration::from_std(idle).unwrap_or_default();
    Ok(r::replay_runs
        .filter(r::state.eq(RunState::Running.as_str()))
        .filter(r::updated_at.lt(before))
        .select(r::id)
        .load(conn)
        .await?)
}
