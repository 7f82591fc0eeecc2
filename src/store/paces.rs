//! What the fleet last found of each provider's pace, kept so that a worker that starts (a
//! restart, a rollout, a new replica) calls a provider at what the others last found instead of
//! finding it again from slow start. One row per provider, the last writer's; rows older than
//! [`FORGET_AFTER`] are neither read nor kept.

use super::{PgConn, StoreError};
use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Double, Nullable};
use diesel_async::RunQueryDsl;
use std::time::Duration;

/// A remembered pace older than this says nothing worth starting from: the lane starts afresh.
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Most providers remembered: a publisher that makes up provider ids cannot grow the table
/// without bound within a day (the newest are kept).
pub const KEEP_AT_MOST: i64 = 4096;

/// One provider's pace as a worker last wrote it.
#[derive(QueryableByName, Clone, Debug, PartialEq)]
pub struct PaceRow {
    /// The provider.
    #[diesel(sql_type = BigInt)]
    pub provider_id: i64,
    /// Calls a second the fleet found the provider takes; none while it never pushed back.
    #[diesel(sql_type = Nullable<Double>)]
    pub found_rate: Option<f64>,
    /// The fleet rate it last refused.
    #[diesel(sql_type = Nullable<Double>)]
    pub refused_rate: Option<f64>,
    /// Calls under way at once the lane had reached.
    #[diesel(sql_type = Double)]
    pub concurrency: f64,
    /// Whether the lane was still doubling its calls at once (no push-back yet).
    #[diesel(sql_type = Bool)]
    pub slow_start: bool,
}

/// A remembered pace and its age when read.
#[derive(QueryableByName, Debug)]
pub struct Remembered {
    /// The pace.
    #[diesel(embed)]
    pub pace: PaceRow,
    /// How long ago it was written, in milliseconds.
    #[diesel(sql_type = BigInt)]
    pub age_ms: i64,
}

/// Writes `paces` (one per provider, the newest wins) in one statement, and forgets the others
/// past [`FORGET_AFTER`], or past the newest [`KEEP_AT_MOST`], on the way (not those written
/// here: one statement must not both update and delete a row).
pub async fn remember(conn: &mut PgConn, paces: &[PaceRow]) -> Result<(), StoreError> {
    if paces.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&PaceRow) -> Option<f64>| paces.iter().map(f).collect::<Vec<_>>();
    diesel::sql_query(
        "WITH written AS (
             INSERT INTO provider_paces
                 (provider_id, found_rate, refused_rate, concurrency, slow_start, found_at)
             SELECT *, now() FROM unnest($1::int8[], $2::float8[], $3::float8[], $4::float8[],
                                         $5::bool[])
             ON CONFLICT (provider_id) DO UPDATE SET found_rate = excluded.found_rate,
                 refused_rate = excluded.refused_rate, concurrency = excluded.concurrency,
                 slow_start = excluded.slow_start, found_at = excluded.found_at
         )
         DELETE FROM provider_paces
         WHERE provider_id <> ALL($1::int8[])
           AND (found_at < now() - $6 * interval '1 second'
                OR provider_id NOT IN (SELECT provider_id FROM provider_paces
                                       ORDER BY found_at DESC, provider_id LIMIT $7))",
    )
    .bind::<Array<BigInt>, _>(paces.iter().map(|p| p.provider_id).collect::<Vec<_>>())
    .bind::<Array<Nullable<Double>>, _>(column(|p| p.found_rate))
    .bind::<Array<Nullable<Double>>, _>(column(|p| p.refused_rate))
    .bind::<Array<Double>, _>(paces.iter().map(|p| p.concurrency).collect::<Vec<_>>())
    .bind::<Array<Bool>, _>(paces.iter().map(|p| p.slow_start).collect::<Vec<_>>())
    .bind::<BigInt, _>(FORGET_AFTER.as_secs() as i64)
    .bind::<BigInt, _>((KEEP_AT_MOST - paces.len() as i64).max(0))
    .execute(conn)
    .await?;
    Ok(())
}

/// The paces written within [`FORGET_AFTER`], newest first, at most `limit` of them.
pub async fn recall(conn: &mut PgConn, limit: i64) -> Result<Vec<Remembered>, StoreError> {
    Ok(diesel::sql_query(
        "SELECT provider_id, found_rate, refused_rate, concurrency, slow_start,
                (extract(epoch FROM now() - found_at) * 1000)::int8 AS age_ms
         FROM provider_paces
         WHERE found_at > now() - $1 * interval '1 second'
         ORDER BY found_at DESC, provider_id
         LIMIT $2",
    )
    .bind::<BigInt, _>(FORGET_AFTER.as_secs() as i64)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?)
}
