//! What the console shows, typed once: the API serializes these views and the pages render the
//! same ones, so a field added here reaches both (and the OpenAPI document says its name).

use super::Console;
pub use crate::dead_letters::view::DeadLetterView;
use crate::store::{StoreError, replay_runs};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// The view of dead letter `id` from the console's pool.
pub async fn dead_letter(console: &Console, id: i64) -> Result<Option<DeadLetterView>, StoreError> {
    let mut conn = console.pool.get().await?;
    DeadLetterView::load(&console.settings, &mut conn, id).await
}

/// A replay run, as the API answers it and its page shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayRunView {
    /// The run's id (`jobId` in the API, whose contract predates the one name).
    pub job_id: i64,
    pub state: replay_runs::RunState,
    pub total: i32,
    pub replayed: i32,
    pub failed: i32,
    /// Not replayable, left alone.
    pub skipped: i32,
    pub dry_run: bool,
    pub requested_by: String,
    pub source: String,
    pub filter: Option<Value>,
    pub rate: Option<f64>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

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
        }
    }
}

impl ReplayRunView {
    /// The view of job `id`, if there is one.
    pub async fn load(console: &Console, id: i64) -> Result<Option<Self>, StoreError> {
        let mut conn = console.pool.get().await?;
        Ok(replay_runs::find(&mut conn, id)
            .await?
            .as_ref()
            .map(Self::from))
    }
}
