//! What the retention sweep removes, one bounded batch per statement: completed commands past
//! their window (with their sent outbox rows; never a command still processing, nor one with an
//! outbox row not yet published), finished replay runs with their per-letter history, and old
//! audit entries. Each batch takes its rows with `FOR UPDATE SKIP LOCKED`, so two sweeps never
//! remove the same row and neither waits for the other or for the command path.

use super::{PgConn, StoreError};
use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Nullable, Timestamptz};
use diesel_async::RunQueryDsl;

#[derive(diesel::QueryableByName)]
struct Removed {
    #[diesel(sql_type = BigInt)]
    removed: i64,
}

/// Runs one of the sweep's statements: `$1` the time before which rows go, `$2` the batch size;
/// returns how many rows it removed.
async fn in_batch(
    conn: &mut PgConn,
    sql: &'static str,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<usize, StoreError> {
    let removed: Removed = diesel::sql_query(sql)
        .bind::<Timestamptz, _>(before)
        .bind::<BigInt, _>(batch)
        .get_result(conn)
        .await?;
    Ok(removed.removed as usize)
}

/// Removes up to `batch` commands that completed before `before`, and their outbox rows (all
/// sent); returns how many commands.
pub async fn commands(
    conn: &mut PgConn,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<usize, StoreError> {
    in_batch(
        conn,
        "WITH doomed AS ( \
             SELECT c.command_id FROM payment_link_commands c \
             WHERE c.status IN ('succeeded', 'failed') AND c.completed_at < $1 \
               AND NOT EXISTS (SELECT 1 FROM outbox o \
                               WHERE o.command_id = c.command_id AND o.sent_at IS NULL) \
             ORDER BY c.completed_at LIMIT $2 \
             FOR UPDATE OF c SKIP LOCKED), \
         sent AS (DELETE FROM outbox o USING doomed d WHERE o.command_id = d.command_id), \
         gone AS (DELETE FROM payment_link_commands c USING doomed d \
                  WHERE c.command_id = d.command_id RETURNING 1) \
         SELECT count(*) AS removed FROM gone",
        before,
        batch,
    )
    .await
}

/// Removes up to `batch` replay runs that finished before `before`, with their per-letter
/// history; returns how many runs.
pub async fn replay_runs(
    conn: &mut PgConn,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<usize, StoreError> {
    in_batch(
        conn,
        "WITH doomed AS ( \
             SELECT id FROM replay_runs WHERE state <> 'running' AND finished_at < $1 \
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
         history AS (DELETE FROM dead_letter_replays r USING doomed d WHERE r.run_id = d.id), \
         gone AS (DELETE FROM replay_runs r USING doomed d WHERE r.id = d.id RETURNING 1) \
         SELECT count(*) AS removed FROM gone",
        before,
        batch,
    )
    .await
}

/// Removes up to `batch` audit entries older than `before`; returns how many.
pub async fn audit(
    conn: &mut PgConn,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<usize, StoreError> {
    in_batch(
        conn,
        "WITH doomed AS ( \
             SELECT id FROM audit_log WHERE at < $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED), \
         gone AS (DELETE FROM audit_log a USING doomed d WHERE a.id = d.id RETURNING 1) \
         SELECT count(*) AS removed FROM gone",
        before,
        batch,
    )
    .await
}

/// What the sweep reports: the oldest completed command kept, and the tables' sizes.
#[derive(Debug, Default, diesel::QueryableByName)]
pub struct Kept {
    /// When the oldest completed command still kept completed.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub oldest_completed: Option<DateTime<Utc>>,
    /// Bytes of the command table, its TOAST and its indexes.
    #[diesel(sql_type = BigInt)]
    pub commands_bytes: i64,
    /// Bytes of the outbox, likewise.
    #[diesel(sql_type = BigInt)]
    pub outbox_bytes: i64,
    /// Bytes of the dead-letter store, likewise.
    #[diesel(sql_type = BigInt)]
    pub dead_letters_bytes: i64,
}

/// The oldest completed command kept and the sizes of the tables that grow.
pub async fn kept(conn: &mut PgConn) -> Result<Kept, StoreError> {
    Ok(diesel::sql_query(
        "SELECT (SELECT min(completed_at) FROM payment_link_commands \
                 WHERE status IN ('succeeded', 'failed')) AS oldest_completed, \
                pg_total_relation_size('payment_link_commands') AS commands_bytes, \
                pg_total_relation_size('outbox') AS outbox_bytes, \
                pg_total_relation_size('dead_letters') AS dead_letters_bytes",
    )
    .get_result(conn)
    .await?)
}

/// Takes the sweep's advisory lock on this connection if no other session holds it.
pub async fn try_lock(conn: &mut PgConn) -> Result<bool, StoreError> {
    #[derive(diesel::QueryableByName)]
    struct Locked {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        locked: bool,
    }
    let row: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
        .bind::<BigInt, _>(SWEEP_LOCK)
        .get_result(conn)
        .await?;
    Ok(row.locked)
}

/// Gives the sweep's advisory lock back.
pub async fn unlock(conn: &mut PgConn) -> Result<(), StoreError> {
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(SWEEP_LOCK)
        .execute(conn)
        .await?;
    Ok(())
}

/// Advisory lock key held by the replica that sweeps ("plw_swp").
const SWEEP_LOCK: i64 = 0x0070_6c77_5f73_7770;
