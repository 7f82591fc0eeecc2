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

/// Marks `instance_id` alive now with its `status`, and counts the workers seen within `fresh`
/// (this one included). Rows silent for an hour are removed on the way.
pub async fn beat(
    conn: &mut PgConn,
    instance_id: &str,
    fresh: Duration,
    status: &serde_json::Value,
) -> Result<i64, StoreError> {
    // The statement sees the table as it was before its own insert: count the others, add one.
    let live: Live = diesel::sql_query(
        "WITH beat AS (
             INSERT INTO worker_heartbeats (instance_id, seen_at, status) VALUES ($1, now(), $3)
             ON CONFLICT (instance_id) DO UPDATE SET seen_at = now(), status = $3
         ), expired AS (
             DELETE FROM worker_heartbeats WHERE seen_at < now() - interval '1 hour'
         )
         SELECT count(*) FILTER (WHERE instance_id <> $1) + 1 AS workers
         FROM worker_heartbeats
         WHERE seen_at > now() - $2 * interval '1 millisecond'",
    )
    .bind::<Text, _>(instance_id)
    .bind::<BigInt, _>(fresh.as_millis() as i64)
    .bind::<diesel::sql_types::Jsonb, _>(status)
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

/// A live worker's row, as `status` reads it.
#[derive(diesel::QueryableByName, Debug)]
pub struct Alive {
    /// The worker's lease owner name.
    #[diesel(sql_type = Text)]
    pub instance_id: String,
    /// How long ago it beat, in milliseconds.
    #[diesel(sql_type = BigInt)]
    pub age_ms: i64,
    /// What it reported.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Jsonb>)]
    pub status: Option<serde_json::Value>,
}

/// The workers seen within `fresh`, with what they reported.
pub async fn alive(conn: &mut PgConn, fresh: Duration) -> Result<Vec<Alive>, StoreError> {
    Ok(diesel::sql_query(
        "SELECT instance_id, (extract(epoch FROM now() - seen_at) * 1000)::int8 AS age_ms, status
         FROM worker_heartbeats
         WHERE seen_at > now() - $1 * interval '1 millisecond'
         ORDER BY instance_id",
    )
    .bind::<BigInt, _>(fresh.as_millis() as i64)
    .load(conn)
    .await?)
}
