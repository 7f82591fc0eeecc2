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
    pub requested_by: String,
    pub filter_kind: Option<String>,
    pub filter_command_id: Option<String>,
    pub max_count: Option<i64>,
    pub rate_per_second: Option<f64>,
    pub dry_run: bool,
}

/// A recorded run.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = super::schema::replay_runs)]
pub struct ReplayRun {
    pub id: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub requested_by: String,
    pub filter_kind: Option<String>,
    pub filter_command_id: Option<String>,
    pub max_count: Option<i64>,
    pub rate_per_second: Option<f64>,
    pub dry_run: bool,
    pub replayed: i32,
    pub skipped: i32,
    pub failed: i32,
    pub left_in_queue: Option<i32>,
    pub command_ids: Vec<String>,
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

/// Records how the run ended.
pub async fn finish(
    conn: &mut PgConn,
    run_id: i64,
    (replayed, skipped, failed, left): (i32, i32, i32, i32),
) -> Result<(), StoreError> {
    diesel::update(r::replay_runs.find(run_id))
        .set((
            r::finished_at.eq(Some(Utc::now())),
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
