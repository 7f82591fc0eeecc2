//! The workers alive right now, counted through a heartbeat row each one refreshes: how a rate
//! limit set for the whole fleet is split between replicas without a coordinator.

use super::{PgConn, StoreError};
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use std::time::Duration;

#[derive(diesel::QueryableByName)]
struct Live {
    #[diesel(sql_type = BigInt)]
    workers: i64,
}

/// Marks `instance_id` alive now, and counts the workers seen within `fresh` (this one
/// included). Rows silent for an hour are removed on the way.
pub async fn beat(
    conn: &mut PgConn,
    instance_id: &str,
    fresh: Duration,
) -> Result<i64, StoreError> {
    // The statement sees the table as it was before its own insert: count the others, add one.
    let live: Live = diesel::sql_query(
        "WITH beat AS (
             INSERT INTO worker_heartbeats (instance_id, seen_at) VALUES ($1, now())
             ON CONFLICT (instance_id) DO UPDATE SET seen_at = now()
         ), expired AS (
             DELETE FROM worker_heartbeats WHERE seen_at < now() - interval '1 hour'
         )
         SELECT count(*) FILTER (WHERE instance_id <> $1) + 1 AS workers
         FROM worker_heartbeats
         WHERE seen_at > now() - $2 * interval '1 millisecond'",
    )
    .bind::<Text, _>(instance_id)
    .bind::<BigInt, _>(fresh.as_millis() as i64)
    .get_result(conn)
    .await?;
    Ok(live.workers)
}

/// Removes `instance_id`'s row when it stops, so the others count it out at once.
pub async fn leave(conn: &mut PgConn, instance_id: &str) -> Result<(), StoreError> {
    diesel::sql_query("DELETE FROM worker_heartbeats WHERE instance_id = $1")
        .bind::<Text, _>(instance_id)
        .execute(conn)
        .await?;
    Ok(())
}
