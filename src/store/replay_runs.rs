//! The audit trail of dead-letter replays.

use super::schema::replay_runs::dsl as r;
use super::{PgConn, StoreError};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

/// A run as it starts.
#[derive(Debug, Insertable)]
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
}

/// A recorded run.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = super::schema::replay_runs)]
pub struct ReplayRun {
    /// The run's id.
    pub id: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended (none: it died midway).
    pub finished_at: Option<DateTime<Utc>>,
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
}

/// Records the start of a run and returns its id.
pub async fn start(conn: &mut PgConn, run: &NewReplayRun) -> Result<i64, StoreError> {
    Ok(diesel::insert_into(r::replay_runs)
        .values(run)
        .returning(r::id)
        .get_result(conn)
        .await?)
}

/// Adds one replayed (or, in a dry run, selected) command id to the run.
pub async fn add_command(
    conn: &mut PgConn,
    run_id: i64,
    command_id: &str,
) -> Result<(), StoreError> {
    diesel::sql_query(
        "UPDATE replay_runs SET command_ids = array_append(command_ids, $2) WHERE id = $1",
    )
    .bind::<diesel::sql_types::BigInt, _>(run_id)
    .bind::<diesel::sql_types::Text, _>(command_id)
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

/// Records how the run ended.
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
        ))
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
