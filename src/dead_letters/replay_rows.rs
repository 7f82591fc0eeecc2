//! A replay run's rows in the dead-letter store: it reserves its dead letters (state
//! `replaying`), reads them back a batch at a time, and records each one's outcome (replayed,
//! failed, or skipped as not replayable) with its history and the run's counts, in one
//! transaction per batch.

use super::Kind;
use super::guard::{LetterOutcome, Settled, Tally};
use super::store::{State, Stored};
use crate::store::schema::dead_letter_replays::dsl as r;
use crate::store::schema::dead_letters::dsl as d;
use crate::store::{PgConn, StoreError};
use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

/// Reserves the open ones of `ids` for the replay run `run_id` (state `replaying`); returns their
/// ids. A run works through its reserved rows, so a run stopped midway can be resumed, and two
/// runs never take the same dead letter.
pub async fn reserve(conn: &mut PgConn, ids: &[i64], run_id: i64) -> Result<Vec<i64>, StoreError> {
    Ok(diesel::update(
        d::dead_letters
            .filter(d::id.eq_any(ids))
            .filter(d::state.eq(State::Open)),
    )
    .set((
        d::state.eq(State::Replaying),
        d::replay_run_id.eq(run_id),
        d::state_changed_at.eq(Utc::now()),
    ))
    .returning(d::id)
    .get_results(conn)
    .await?)
}

/// The next `limit` dead letters `run_id` reserved and has not finished with, after `after`.
pub async fn next_reserved(
    conn: &mut PgConn,
    run_id: i64,
    after: i64,
    limit: i64,
) -> Result<Vec<Stored>, StoreError> {
    Ok(d::dead_letters
        .filter(d::replay_run_id.eq(run_id))
        .filter(d::state.eq(State::Replaying))
        .filter(d::id.gt(after))
        .order(d::id.asc())
        .limit(limit)
        .select(Stored::as_select())
        .load(conn)
        .await?)
}

/// What became of one dead letter in a replay run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// The broker confirmed the copy.
    Replayed,
    /// The broker did not confirm it (refused, unroutable, timed out): open again.
    Failed(String),
    /// Not published, and why (its target is not one replay may publish to): open again.
    Skipped(String),
}

impl ReplayOutcome {
    /// The line its history keeps.
    fn history(&self) -> String {
        match self {
            Self::Replayed => "replayed".to_owned(),
            // Unconfirmed is not undelivered: the copy may still reach the queue.
            Self::Failed(why) => format!("not confirmed, open again: {why}"),
            Self::Skipped(why) => format!("skipped, {why}"),
        }
    }
}

/// Each of `ids` with the exchange and routing key its message names, and its kind.
pub async fn targets(
    conn: &mut PgConn,
    ids: &[i64],
) -> Result<Vec<(i64, String, String, Kind)>, StoreError> {
    Ok(d::dead_letters
        .filter(d::id.eq_any(ids))
        .order(d::id.asc())
        .select((
            d::id,
            d::original_exchange,
            d::original_routing_key,
            d::kind,
        ))
        .load(conn)
        .await?)
}

/// Records replays' outcomes in one transaction, with the run's progress: `replayed` where the
/// broker confirmed the copy; otherwise the dead letter is open again and its history says why.
/// Only rows the run still holds (`replaying`) are recorded, so a dead letter published twice
/// (a job resumed by another console while its first one was still going) is counted once.
/// Returns how many outcomes were recorded.
pub async fn record_replays(
    conn: &mut PgConn,
    run_id: i64,
    outcomes: &[(i64, ReplayOutcome)],
) -> Result<usize, StoreError> {
    use crate::store::schema::replay_runs::dsl as runs;
    let now = Utc::now();
    let ids = |which: fn(&ReplayOutcome) -> bool| -> Vec<i64> {
        outcomes
            .iter()
            .filter(|(_, o)| which(o))
            .map(|(id, _)| *id)
            .collect()
    };
    let groups = [
        (
            ids(|o| matches!(o, ReplayOutcome::Replayed)),
            State::Replayed,
        ),
        (ids(|o| matches!(o, ReplayOutcome::Failed(_))), State::Open),
        (ids(|o| matches!(o, ReplayOutcome::Skipped(_))), State::Open),
    ];
    conn.transaction::<_, StoreError, _>(async move |conn| {
        let mut recorded = Vec::with_capacity(outcomes.len());
        let mut counts = [0i32; 3];
        for (i, (ids, state)) in groups.iter().enumerate() {
            if ids.is_empty() {
                continue;
            }
            let held: Vec<i64> = diesel::update(
                d::dead_letters
                    .filter(d::id.eq_any(ids))
                    .filter(d::state.eq(State::Replaying))
                    .filter(d::replay_run_id.eq(run_id)),
            )
            .set((d::state.eq(*state), d::state_changed_at.eq(now)))
            .returning(d::id)
            .get_results(&mut *conn)
            .await?;
            counts[i] = held.len() as i32;
            recorded.extend(held);
        }
        let history: Vec<_> = outcomes
            .iter()
            .filter(|(id, _)| recorded.contains(id))
            .map(|(id, outcome)| (*id, outcome.history()))
            .collect();
        insert_history(conn, run_id, &history).await?;
        diesel::update(runs::replay_runs.find(run_id))
            .set((
                runs::replayed.eq(runs::replayed + counts[0]),
                runs::failed.eq(runs::failed + counts[1]),
                runs::skipped.eq(runs::skipped + counts[2]),
                runs::updated_at.eq(now),
            ))
            .execute(&mut *conn)
            .await?;
        Ok(recorded.len())
    })
    .await
}

/// Records that a run left these open dead letters alone, and why (not replayable): in their
/// history and in the run's skipped count.
pub async fn record_skipped(
    conn: &mut PgConn,
    run_id: i64,
    skipped: &[(i64, String)],
) -> Result<(), StoreError> {
    use crate::store::schema::replay_runs::dsl as runs;
    if skipped.is_empty() {
        return Ok(());
    }
    let history: Vec<(i64, String)> = skipped
        .iter()
        .map(|(id, why)| (*id, ReplayOutcome::Skipped(why.clone()).history()))
        .collect();
    conn.transaction::<_, StoreError, _>(async move |conn| {
        // In chunks: one statement holds at most 65,535 bound values, and a filter can select
        // far more dead letters than a chunk.
        for chunk in history.chunks(HISTORY_CHUNK) {
            insert_history(conn, run_id, chunk).await?;
        }
        diesel::update(runs::replay_runs.find(run_id))
            .set((
                runs::skipped.eq(runs::skipped + history.len() as i32),
                runs::updated_at.eq(Utc::now()),
            ))
            .execute(&mut *conn)
            .await?;
        Ok(())
    })
    .await
}

/// History rows written by one statement (three bound values each).
const HISTORY_CHUNK: usize = 5000;

async fn insert_history(
    conn: &mut PgConn,
    run_id: i64,
    lines: &[(i64, String)],
) -> Result<(), StoreError> {
    if lines.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = lines
        .iter()
        .map(|(id, outcome)| {
            (
                r::dead_letter_id.eq(*id),
                r::run_id.eq(run_id),
                r::outcome.eq(outcome),
            )
        })
        .collect();
    diesel::insert_into(r::dead_letter_replays)
        .values(&rows)
        .execute(conn)
        .await?;
    Ok(())
}

/// Each replayed letter of run `$1` (of those listed in `$2`, unless it is null) and what became
/// of it, in the order the run published them: failed again when the replayed command came back
/// as a new dead letter linked to this one, or when its record failed after this replay (the new
/// dead letter may not be stored yet); succeeded when its record has its link; pending otherwise.
/// A macro, so the queries built on it are whole strings at compile time.
macro_rules! outcomes_sql {
    () => {
        "SELECT h.id AS seq, d.id, d.command_id, \
                CASE WHEN n.kind IS NOT NULL OR again.failed THEN 'failed' \
                     WHEN c.status = 'succeeded' THEN 'succeeded' \
                     ELSE 'pending' END AS outcome, \
                COALESCE(n.kind, CASE WHEN again.failed THEN c.error_kind END) AS kind \
         FROM dead_letter_replays h \
         JOIN dead_letters d ON d.id = h.dead_letter_id \
         LEFT JOIN payment_link_commands c ON c.command_id = d.command_id \
         LEFT JOIN LATERAL (SELECT c.status = 'failed' AND c.replay_count > d.replay_count \
                            AS failed) again ON true \
         LEFT JOIN LATERAL (SELECT n.kind FROM dead_letters n WHERE n.previous_id = d.id \
                            ORDER BY n.id LIMIT 1) n ON true \
         WHERE h.run_id = $1 AND h.outcome = 'replayed' \
           AND ($2::bigint[] IS NULL OR d.id = ANY($2)) \
         ORDER BY h.id"
    };
}

/// One row of [`outcomes_sql`].
#[derive(QueryableByName)]
struct OutcomeRow {
    /// Where the run sent it in its order (the history row's id).
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    seq: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    command_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    outcome: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    kind: Option<String>,
}

impl From<OutcomeRow> for LetterOutcome {
    fn from(row: OutcomeRow) -> Self {
        LetterOutcome {
            dead_letter_id: row.id,
            command_id: row.command_id,
            settled: match row.outcome.as_str() {
                "failed" => Settled::FailedAgain(row.kind.unwrap_or_else(|| "unknown".into())),
                "succeeded" => Settled::Succeeded,
                _ => Settled::Pending,
            },
        }
    }
}

type BigInts = diesel::sql_types::Nullable<diesel::sql_types::Array<diesel::sql_types::BigInt>>;

/// What became of each letter `run_id` replayed, in the order it published them (see
/// [`outcomes_sql`]).
pub async fn outcomes(conn: &mut PgConn, run_id: i64) -> Result<Vec<LetterOutcome>, StoreError> {
    outcomes_among(conn, run_id, None).await
}

/// What became of the letters `ids` that `run_id` replayed: a working reads only those it does
/// not know the end of yet, so judging a long run costs what is in flight, not its whole past.
pub async fn outcomes_of(
    conn: &mut PgConn,
    run_id: i64,
    ids: &[i64],
) -> Result<Vec<LetterOutcome>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    outcomes_among(conn, run_id, Some(ids)).await
}

async fn outcomes_among(
    conn: &mut PgConn,
    run_id: i64,
    ids: Option<&[i64]>,
) -> Result<Vec<LetterOutcome>, StoreError> {
    let rows: Vec<OutcomeRow> = diesel::sql_query(outcomes_sql!())
        .bind::<diesel::sql_types::BigInt, _>(run_id)
        .bind::<BigInts, _>(ids)
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(LetterOutcome::from).collect())
}

/// Most letters one page of a run's outcomes holds.
pub const LETTERS_PAGE: i64 = 1000;

/// A page of what became of the letters `run_id` replayed, in the order it sent them: up to
/// `limit` after position `after` (none: from the start), and the position to ask the next page
/// from (none on the last page). A run of 100,000 letters is read a page at a time.
pub async fn outcomes_page(
    conn: &mut PgConn,
    run_id: i64,
    after: Option<i64>,
    limit: i64,
) -> Result<(Vec<LetterOutcome>, Option<i64>), StoreError> {
    let limit = limit.clamp(1, LETTERS_PAGE);
    let rows: Vec<OutcomeRow> = diesel::sql_query(concat!(
        "SELECT * FROM (",
        outcomes_sql!(),
        ") o WHERE seq > $3 ORDER BY seq LIMIT $4"
    ))
    .bind::<diesel::sql_types::BigInt, _>(run_id)
    .bind::<BigInts, _>(None::<&[i64]>)
    .bind::<diesel::sql_types::BigInt, _>(after.unwrap_or(0))
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .load(conn)
    .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.seq))
        .flatten();
    Ok((rows.into_iter().map(LetterOutcome::from).collect(), next))
}

/// A run's outcomes counted in the database, and the first `failed_shown` that failed again: what
/// a run's view needs, without reading every letter into memory on each of a console's polls.
pub async fn tally(
    conn: &mut PgConn,
    run_id: i64,
    failed_shown: i64,
) -> Result<(Tally, Vec<LetterOutcome>), StoreError> {
    use diesel::sql_types::{BigInt, Nullable, Text};
    /// The counts, on every row, beside one letter that failed again (none: a row of counts
    /// alone). One statement, so the outcomes are worked out once (a CTE read twice is
    /// materialised once), not once for the counts and again for the letters.
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        succeeded: i64,
        #[diesel(sql_type = BigInt)]
        failed: i64,
        #[diesel(sql_type = BigInt)]
        pending: i64,
        #[diesel(sql_type = Nullable<BigInt>)]
        seq: Option<i64>,
        #[diesel(sql_type = Nullable<BigInt>)]
        id: Option<i64>,
        #[diesel(sql_type = Nullable<Text>)]
        command_id: Option<String>,
        #[diesel(sql_type = Nullable<Text>)]
        outcome: Option<String>,
        #[diesel(sql_type = Nullable<Text>)]
        kind: Option<String>,
    }
    let rows: Vec<Row> = diesel::sql_query(concat!(
        "WITH o AS (",
        outcomes_sql!(),
        "), counts AS ( \
             SELECT count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded, \
                    count(*) FILTER (WHERE outcome = 'failed') AS failed, \
                    count(*) FILTER (WHERE outcome = 'pending') AS pending \
             FROM o \
         ) \
         SELECT c.succeeded, c.failed, c.pending, f.seq, f.id, f.command_id, f.outcome, f.kind \
         FROM counts c LEFT JOIN LATERAL ( \
             SELECT * FROM o WHERE outcome = 'failed' ORDER BY seq LIMIT $3 \
         ) f ON true \
         ORDER BY f.seq"
    ))
    .bind::<BigInt, _>(run_id)
    .bind::<BigInts, _>(None::<&[i64]>)
    .bind::<BigInt, _>(failed_shown)
    .load(conn)
    .await?;
    let tally = <[Row]>::first(&rows).map_or(Tally::default(), |row| Tally {
        pending: row.pending as usize,
        succeeded: row.succeeded as usize,
        failed_again: row.failed as usize,
    });
    let failed = rows.into_iter().filter_map(|row| {
        Some(LetterOutcome::from(OutcomeRow {
            seq: row.seq?,
            id: row.id?,
            command_id: row.command_id?,
            outcome: row.outcome?,
            kind: row.kind,
        }))
    });
    Ok((tally, failed.collect()))
}

/// Puts the letters `run_id` reserved and did not publish back to open (the run stopped by
/// itself); they keep the run's id, so a resume finds them. Returns how many.
pub async fn release(conn: &mut PgConn, run_id: i64) -> Result<usize, StoreError> {
    Ok(diesel::update(
        d::dead_letters
            .filter(d::replay_run_id.eq(run_id))
            .filter(d::state.eq(State::Replaying)),
    )
    .set((d::state.eq(State::Open), d::state_changed_at.eq(Utc::now())))
    .execute(conn)
    .await?)
}

/// Reserves again the open letters `run_id` left (a stop, or ones the broker refused), for a
/// resume. Returns how many.
pub async fn reserve_left(conn: &mut PgConn, run_id: i64) -> Result<usize, StoreError> {
    Ok(diesel::update(
        d::dead_letters
            .filter(d::replay_run_id.eq(run_id))
            .filter(d::state.eq(State::Open)),
    )
    .set((
        d::state.eq(State::Replaying),
        d::state_changed_at.eq(Utc::now()),
    ))
    .execute(conn)
    .await?)
}
