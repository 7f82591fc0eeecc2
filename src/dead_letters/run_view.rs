//! A replay run as the console's API answers it, its page shows it and `dead-letters run --json`
//! prints it: typed once, so a field added here reaches all three.

use super::guard::{Guard, LetterOutcome, Tally};
use super::replay_rows;
use crate::store::{PgConn, StoreError, replay_runs};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// A replay run, as the API answers it and its page shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayRunView {
    /// The run's id (`jobId` in the API, whose contract predates the one name).
    pub job_id: i64,
    /// Running, done, failed or stopped.
    pub state: replay_runs::RunState,
    /// Letters it took.
    pub total: i32,
    /// Confirmed by the broker.
    pub replayed: i32,
    /// Refused by the broker (open again).
    pub failed: i32,
    /// Not replayable, left alone.
    pub skipped: i32,
    /// Only said what it would do.
    pub dry_run: bool,
    /// Who started it.
    pub requested_by: String,
    /// `cli` or `console`.
    pub source: String,
    /// What it selected.
    pub filter: Option<Value>,
    /// Replays per second at most.
    pub rate: Option<f64>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended (or stopped).
    pub finished_at: Option<DateTime<Utc>>,
    /// Its canary, automatic stop and ramp.
    pub guard: Guard,
    /// Why it stopped by itself (state `stopped`; a resume sends the rest).
    pub stop_reason: Option<String>,
    /// What became of its replayed letters so far (only on one run's view, not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcomes: Option<Tally>,
    /// Its letters that failed again, the first [`FAILED_AGAIN_SHOWN`] (only on one run's view).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_again: Option<Vec<LetterOutcome>>,
}

/// Most failed-again letters a run's view lists (`/api/replays/{id}/letters` has them all).
pub const FAILED_AGAIN_SHOWN: usize = 50;

impl From<&replay_runs::ReplayRun> for ReplayRunView {
    fn from(run: &replay_runs::ReplayRun) -> Self {
        Self {
            job_id: run.id,
            state: run.state,
            total: run.total,
            replayed: run.replayed,
            failed: run.failed,
            skipped: run.skipped,
            dry_run: run.dry_run,
            requested_by: run.requested_by.clone(),
            source: run.source.clone(),
            filter: run.filter.clone(),
            rate: run.rate_per_second,
            started_at: run.started_at,
            finished_at: run.finished_at,
            guard: run.guard(),
            stop_reason: run.stop_reason.clone(),
            outcomes: None,
            failed_again: None,
        }
    }
}

impl ReplayRunView {
    /// The view of run `id` with its outcomes, if there is one.
    pub async fn load(conn: &mut PgConn, id: i64) -> Result<Option<Self>, StoreError> {
        let Some(run) = replay_runs::find(conn, id).await? else {
            return Ok(None);
        };
        let (tally, failed_again) = replay_rows::tally(conn, id, FAILED_AGAIN_SHOWN as i64).await?;
        let mut view = Self::from(&run);
        view.outcomes = Some(tally);
        view.failed_again = Some(failed_again);
        Ok(Some(view))
    }
}
