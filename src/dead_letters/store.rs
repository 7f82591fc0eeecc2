//! The dead-letter store: every dead letter as a row, with its original message, why it failed,
//! its state (`open`, `replaying`, `replayed`, `archived`) and its replays. The CLI and the
//! console select rows with one [`Filter`], so both offer the same filters and the database does
//! the filtering, with keyset pagination for the list.

use crate::store::schema::dead_letter_replays::dsl as r;
use crate::store::schema::dead_letters::dsl as d;
use crate::store::{PgConn, StoreError};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde::Serialize;

pub use super::kind::{Kind, State};

/// A row as the ingester writes it: the dead letter's own columns, declared once (a [`Stored`]
/// row is this and the store's bookkeeping).
#[derive(Clone, Debug, Insertable, Queryable, Selectable)]
#[diesel(table_name = crate::store::schema::dead_letters)]
pub struct NewDeadLetter {
    /// What makes a redelivered or republished letter one row: the worker's dead-letter id and a hash of the message, or the hash alone.
    pub dedup_key: String,
    /// The command's id (the message id; empty when it had none).
    pub command_id: String,
    /// Why it was dead-lettered.
    pub kind: Kind,
    /// What went wrong, in words.
    pub error_message: String,
    /// The provider's HTTP status, when it answered.
    pub http_status: Option<i32>,
    /// Provider calls made for it.
    pub attempts: Option<i32>,
    /// The start of the provider's error answer, if any.
    pub error_body: Option<String>,
    /// When it failed (the worker's time; its ingestion's for a letter the worker did not make).
    pub failed_at: DateTime<Utc>,
    /// Times its command had been replayed before it failed.
    pub replay_count: i32,
    /// The command's `paymentProviderId`, where its body had one.
    pub payment_provider_id: Option<i64>,
    /// The command's `invoiceId`, if any.
    pub invoice_id: Option<i64>,
    /// The command's `adhocInvoiceId`, if any.
    pub adhoc_invoice_id: Option<i64>,
    /// The command's `customerId`, if any.
    pub customer_id: Option<i64>,
    /// The command's description.
    pub description: Option<String>,
    /// The command's e-mail address, if any (personal data: masked for viewers).
    pub email: Option<String>,
    /// The trace it was part of (from its `traceparent`).
    pub trace_id: Option<String>,
    /// The exchange the command was published to; a replay goes there.
    pub original_exchange: String,
    /// The routing key the command was published with; a replay uses it.
    pub original_routing_key: String,
    /// Its AMQP properties and headers, in the stored JSON form.
    pub properties: serde_json::Value,
    /// The message body, as it came.
    pub body: Vec<u8>,
    /// What had to be changed to store it (dropped headers, a cut body), if anything.
    pub stored_with_changes: Option<String>,
}

/// A dead letter as lists show it (no message body).
#[derive(Clone, Debug, Queryable, Selectable, Serialize, PartialEq, Eq)]
#[diesel(table_name = crate::store::schema::dead_letters)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Its id in the store.
    pub id: i64,
    /// The command's id (its message id).
    pub command_id: String,
    /// Why it was dead-lettered.
    pub kind: Kind,
    /// The provider's HTTP status, when it answered.
    pub http_status: Option<i32>,
    /// Provider calls made for it.
    pub attempts: Option<i32>,
    /// When it failed (the worker's time; its ingestion's for a letter the worker did not make).
    pub failed_at: DateTime<Utc>,
    /// Times its command had been replayed before it failed.
    pub replay_count: i32,
    /// Where it stands: open, replaying, replayed or archived.
    pub state: State,
    /// The command's `invoiceId`, if any.
    pub invoice_id: Option<i64>,
    /// The command's `adhocInvoiceId`, if any.
    pub adhoc_invoice_id: Option<i64>,
    /// The command's `customerId`, if any.
    pub customer_id: Option<i64>,
    /// What went wrong, in words.
    #[serde(rename = "message")]
    pub error_message: String,
    /// The exchange its message names (where a replay would go).
    #[serde(rename = "exchange")]
    pub original_exchange: String,
    /// The routing key its message names.
    #[serde(rename = "routingKey")]
    pub original_routing_key: String,
}

/// Everything stored about a dead letter: what the ingester wrote, and the store's bookkeeping.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = crate::store::schema::dead_letters)]
pub struct Stored {
    /// Its id in the store.
    pub id: i64,
    /// What the ingester wrote (read through `Deref`).
    #[diesel(embed)]
    pub letter: NewDeadLetter,
    /// When it reached the store.
    pub ingested_at: DateTime<Utc>,
    /// Where it stands: open, replaying, replayed or archived.
    pub state: State,
    /// When its state last changed.
    pub state_changed_at: DateTime<Utc>,
    /// The replay run that last took it, if any.
    pub replay_run_id: Option<i64>,
    /// The dead letter this one's command was replayed from, if it failed again.
    pub previous_id: Option<i64>,
    /// The command id its edited copy was sent as (state `edited`).
    pub edited_into: Option<String>,
}

impl std::ops::Deref for Stored {
    type Target = NewDeadLetter;
    fn deref(&self) -> &NewDeadLetter {
        &self.letter
    }
}

/// One replay of a dead letter.
#[derive(Clone, Debug, Queryable, Selectable, Serialize)]
#[diesel(table_name = crate::store::schema::dead_letter_replays)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    /// The replay run.
    pub run_id: i64,
    /// When the run published it.
    pub replayed_at: DateTime<Utc>,
    /// What became of it, in words.
    pub outcome: String,
}

pub use super::filter::{Cursor, Filter};

/// Stores a batch of dead letters in one transaction; one already stored (same `dedup_key`) is
/// left as it is. A dead letter of a command whose earlier dead letter was replayed is linked to
/// it. Returns how many rows are new.
pub async fn insert_batch(conn: &mut PgConn, rows: &[NewDeadLetter]) -> Result<usize, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    conn.transaction::<_, StoreError, _>(async move |conn| {
        let new_ids: Vec<(i64, String)> = diesel::insert_into(d::dead_letters)
            .values(rows)
            .on_conflict(d::dedup_key)
            .do_nothing()
            .returning((d::id, d::command_id))
            .get_results(&mut *conn)
            .await?;
        // A replayed command that failed again points at the dead letter it was replayed from.
        diesel::sql_query(
            "UPDATE dead_letters AS new SET previous_id = ( \
                   SELECT old.id FROM dead_letters AS old \
                   WHERE old.command_id = new.command_id AND old.id < new.id \
                     AND old.state IN ('replaying', 'replayed') \
                   ORDER BY old.id DESC LIMIT 1) \
                 WHERE new.id = ANY($1) AND new.replay_count > 0",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(
            new_ids.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        )
        .execute(&mut *conn)
        .await?;
        Ok(new_ids.len())
    })
    .await
}

/// A page of matching dead letters, newest first, after `cursor`.
pub async fn page(
    conn: &mut PgConn,
    filter: &Filter,
    limit: i64,
    cursor: Option<Cursor>,
) -> Result<(Vec<Summary>, Option<Cursor>), StoreError> {
    let mut query = filter.apply(d::dead_letters.into_boxed());
    if let Some(after) = cursor {
        query = query.filter(
            d::failed_at
                .lt(after.failed_at)
                .or(d::failed_at.eq(after.failed_at).and(d::id.lt(after.id))),
        );
    }
    let rows: Vec<Summary> = query
        .order((d::failed_at.desc(), d::id.desc()))
        .limit(limit + 1)
        .select(Summary::as_select())
        .load(conn)
        .await?;
    Ok(split_page(rows, limit))
}

fn split_page(mut rows: Vec<Summary>, limit: i64) -> (Vec<Summary>, Option<Cursor>) {
    let limit = usize::try_from(limit).unwrap_or(0);
    if rows.len() <= limit {
        return (rows, None);
    }
    rows.truncate(limit);
    let next = rows.last().map(|last| Cursor {
        failed_at: last.failed_at,
        id: last.id,
    });
    (rows, next)
}

/// How many dead letters match.
pub async fn count(conn: &mut PgConn, filter: &Filter) -> Result<i64, StoreError> {
    Ok(filter
        .apply(d::dead_letters.into_boxed())
        .count()
        .get_result(conn)
        .await?)
}

/// How many dead letters match, per kind, in one scan (whatever kinds the rows hold).
pub async fn count_by_kind(
    conn: &mut PgConn,
    filter: &Filter,
) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
    let matching = filter.apply(d::dead_letters.into_boxed()).select(d::id);
    let rows: Vec<(Kind, i64)> = d::dead_letters
        .filter(d::id.eq_any(matching))
        .group_by(d::kind)
        .select((d::kind, diesel::dsl::count_star()))
        .load(conn)
        .await?;
    let mut counts = std::collections::BTreeMap::new();
    for (kind, n) in rows {
        *counts.entry(kind.as_str().to_owned()).or_default() += n;
    }
    Ok(counts)
}

/// Counts for the overview.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    /// Dead letters per kind.
    pub by_kind: std::collections::BTreeMap<String, i64>,
    /// Dead letters per state.
    pub by_state: std::collections::BTreeMap<String, i64>,
    /// Open dead letters per kind.
    pub open_by_kind: std::collections::BTreeMap<String, i64>,
    /// When the oldest open one failed.
    pub oldest_open: Option<DateTime<Utc>>,
    /// Dead letters per hour over the last 24 hours, oldest hour first.
    pub last_24_hours: Vec<i64>,
}

/// The overview's counts, in one round trip per figure.
pub async fn overview(conn: &mut PgConn) -> Result<Overview, StoreError> {
    let groups: Vec<(Kind, State, i64)> = d::dead_letters
        .group_by((d::kind, d::state))
        .select((d::kind, d::state, diesel::dsl::count_star()))
        .load(conn)
        .await?;
    let mut overview = Overview::default();
    for (kind, state, n) in groups {
        let kind = kind.as_str().to_owned();
        *overview.by_kind.entry(kind.clone()).or_default() += n;
        *overview
            .by_state
            .entry(state.as_str().to_owned())
            .or_default() += n;
        if state == State::Open {
            *overview.open_by_kind.entry(kind).or_default() += n;
        }
    }
    overview.oldest_open = d::dead_letters
        .filter(d::state.eq(State::Open))
        .select(diesel::dsl::min(d::failed_at))
        .get_result(conn)
        .await?;
    #[derive(QueryableByName)]
    struct Hour {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        hour: i32,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let hours: Vec<Hour> = diesel::sql_query(
        "SELECT (23 - floor(extract(epoch FROM now() - failed_at) / 3600))::int AS hour, \
                count(*) AS n \
         FROM dead_letters WHERE failed_at > now() - interval '24 hours' GROUP BY 1",
    )
    .load(conn)
    .await?;
    overview.last_24_hours = vec![0; 24];
    for h in hours {
        if let Ok(i) = usize::try_from(h.hour)
            && i < 24
        {
            overview.last_24_hours[i] = h.n;
        }
    }
    Ok(overview)
}

/// One dead letter with its replays, oldest first.
pub async fn get(conn: &mut PgConn, id: i64) -> Result<Option<(Stored, Vec<Replay>)>, StoreError> {
    let Some(row) = d::dead_letters
        .find(id)
        .select(Stored::as_select())
        .first(conn)
        .await
        .optional()?
    else {
        return Ok(None);
    };
    let replays = r::dead_letter_replays
        .filter(r::dead_letter_id.eq(id))
        .order(r::id.asc())
        .select(Replay::as_select())
        .load(conn)
        .await?;
    Ok(Some((row, replays)))
}

/// How many times each of `ids` was published by a replay run (ids never replayed are absent).
pub async fn times_replayed(
    conn: &mut PgConn,
    ids: &[i64],
) -> Result<std::collections::HashMap<i64, i64>, StoreError> {
    let counted: Vec<(i64, i64)> = r::dead_letter_replays
        .filter(r::dead_letter_id.eq_any(ids))
        .filter(r::outcome.eq("replayed"))
        .group_by(r::dead_letter_id)
        .select((r::dead_letter_id, diesel::dsl::count_star()))
        .load(conn)
        .await?;
    Ok(counted.into_iter().collect())
}

/// Archives those of `ids` that are open; returns their ids.
pub async fn archive(conn: &mut PgConn, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
    Ok(diesel::update(
        d::dead_letters
            .filter(d::id.eq_any(ids))
            .filter(d::state.eq(State::Open)),
    )
    .set((
        d::state.eq(State::Archived),
        d::state_changed_at.eq(Utc::now()),
    ))
    .returning(d::id)
    .get_results(conn)
    .await?)
}

/// The list rows of `ids`, in id order.
pub async fn summaries(conn: &mut PgConn, ids: &[i64]) -> Result<Vec<Summary>, StoreError> {
    Ok(d::dead_letters
        .filter(d::id.eq_any(ids))
        .order(d::id.asc())
        .select(Summary::as_select())
        .load(conn)
        .await?)
}

/// The ids of the open dead letters that match, oldest first (what a replay would take).
pub async fn open_ids(conn: &mut PgConn, filter: &Filter) -> Result<Vec<i64>, StoreError> {
    Ok(filter
        .apply(d::dead_letters.into_boxed())
        .filter(d::state.eq(State::Open))
        .order(d::id.asc())
        .select(d::id)
        .load(conn)
        .await?)
}

/// Of `ids`, those whose command first called the provider longer ago than `window`: the
/// provider may have forgotten its idempotency key, so a replay may create a second link. A
/// dead letter whose command's record is gone (past `retention.commands_hours`) counts by its
/// own failure time and provider calls.
pub async fn at_duplicate_risk(
    conn: &mut PgConn,
    ids: &[i64],
    window: std::time::Duration,
) -> Result<Vec<i64>, StoreError> {
    use crate::store::schema::payment_link_commands::dsl as c;
    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    let oldest_safe = Utc::now().checked_sub_signed(window).unwrap_or_default();
    let mut risky: Vec<i64> = d::dead_letters
        .inner_join(c::payment_link_commands.on(c::command_id.eq(d::command_id)))
        .filter(d::id.eq_any(ids))
        .filter(c::attempts.gt(0))
        .filter(c::created_at.lt(oldest_safe))
        .select(d::id)
        .load(conn)
        .await?;
    let recordless: Vec<i64> = d::dead_letters
        .filter(d::id.eq_any(ids))
        .filter(d::attempts.gt(0))
        .filter(d::failed_at.lt(oldest_safe))
        .filter(diesel::dsl::not(diesel::dsl::exists(
            c::payment_link_commands.filter(c::command_id.eq(d::command_id)),
        )))
        .select(d::id)
        .load(conn)
        .await?;
    risky.extend(recordless);
    risky.sort_unstable();
    Ok(risky)
}

/// Removes archived and replayed dead letters whose state changed before `before`; returns how
/// many.
pub async fn purge(conn: &mut PgConn, before: DateTime<Utc>) -> Result<usize, StoreError> {
    Ok(diesel::delete(
        d::dead_letters
            .filter(d::state.eq_any([State::Archived, State::Replayed, State::Edited]))
            .filter(d::state_changed_at.lt(before)),
    )
    .execute(conn)
    .await?)
}
