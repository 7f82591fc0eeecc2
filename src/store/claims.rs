//! Claiming a command: the idempotency decision. One multi-row `INSERT … ON CONFLICT …
//! RETURNING` claims every command that arrived while the previous one ran (through the
//! [`Batcher`]); the row then says whether this worker calls the provider, or the command is
//! finished, held by another worker, or in conflict with an earlier request under its id.

use super::batch::{Batcher, Write};
use super::commands::{CommandRecord, PROCESSING, find};
use super::{PgConn, PgPool, StoreError};
use crate::command::Envelope;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Numeric, Text};
use diesel_async::RunQueryDsl;
use std::time::Duration;

/// What the idempotency record says about a delivered command.
#[derive(Debug)]
pub enum Claim {
    /// This worker holds the command now and must call the provider; `attempts` were made before.
    Acquired {
        /// Provider calls made for the command before this claim.
        attempts: i32,
        /// This claim's token: the outcome, a renewal or a release must present it.
        token: String,
    },
    /// The command already has an outcome; publish its event again, do not call the provider.
    Finished(Box<CommandRecord>),
    /// Another worker holds the command right now.
    Busy,
    /// The id was used before for a different request.
    Conflict,
}

#[derive(QueryableByName)]
struct Claimed {
    #[diesel(sql_type = Text)]
    command_id: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Text)]
    lease_token: String,
}

/// How long a claim's holder may go without a heartbeat (it beats every second) before another
/// worker takes the claim over without waiting for its lease (two minutes at the shipped
/// settings): a SIGKILLed worker's commands go on within this, not the lease. A claim younger than
/// this is never taken this way (its holder may not have beaten yet). A holder that was alive
/// after all (cut off from the database) cannot record over the taker: every outcome presents
/// its claim's token, and the provider sees the same idempotency key.
pub const OWNER_SILENT: Duration = Duration::from_secs(15);

/// The claim writer: claims for `owner`, with a lease of `lease`.
pub struct ClaimWriter {
    owner: String,
    lease: Duration,
}

/// The running claim writer.
pub type Claims = Batcher<ClaimWriter>;

impl ClaimWriter {
    /// Starts the writer; `owner` and `lease` are the worker's.
    pub fn start(pool: PgPool, owner: String, lease: Duration) -> Claims {
        Batcher::start(pool, Self { owner, lease })
    }
}

impl Write for ClaimWriter {
    type Request = Envelope;
    /// `Some((attempts made before, the claim's token))` when this worker now holds the command.
    type Reply = Option<(i32, String)>;
    const NAME: &'static str = "claim writer";
    const MAX_BATCH: usize = 512;

    /// Inserts the commands' rows, or takes over rows whose holder's lease ran out, or re-opens
    /// recorded failures an operator replayed. One row may not be affected twice by one
    /// statement: a second copy of a command in the same batch is answered "not claimed" and
    /// looks at the record.
    async fn write(
        &self,
        conn: &mut PgConn,
        requests: &[Envelope],
    ) -> Result<Vec<Option<(i32, String)>>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let first: Vec<bool> = requests
            .iter()
            .map(|e| seen.insert(e.command_id.as_str()))
            .collect();
        let unique = requests
            .iter()
            .zip(&first)
            .filter(|(_, f)| **f)
            .map(|(e, _)| e);
        let columns = ClaimColumns::from(unique);
        let mut claimed = insert_or_take_over(conn, columns, &self.owner, self.lease).await?;
        Ok(requests
            .iter()
            .zip(first)
            .map(|(e, first)| {
                first
                    .then(|| claimed.remove(e.command_id.as_str()))
                    .flatten()
            })
            .collect())
    }
}

/// The claimed commands as column arrays, for `unnest`.
#[derive(Default)]
struct ClaimColumns {
    ids: Vec<String>,
    canonical: Vec<String>,
    providers: Vec<i64>,
    amounts: Vec<bigdecimal::BigDecimal>,
    descriptions: Vec<String>,
    emails: Vec<Option<String>>,
    invoices: Vec<Option<i64>>,
    adhoc: Vec<Option<i64>>,
    customers: Vec<Option<i64>>,
    correlations: Vec<String>,
    replays: Vec<i32>,
    tokens: Vec<String>,
}

impl<'a, I: Iterator<Item = &'a Envelope>> From<I> for ClaimColumns {
    fn from(envelopes: I) -> Self {
        let mut c = Self::default();
        for e in envelopes {
            let cmd = &e.command;
            c.ids.push(e.command_id.as_str().to_owned());
            c.canonical.push(e.canonical_request.clone());
            c.providers.push(cmd.payment_provider_id);
            c.amounts.push(cmd.amount.value().clone());
            c.descriptions.push(cmd.description.clone());
            c.emails
                .push(cmd.email_address.as_ref().map(|a| a.as_str().to_owned()));
            c.invoices.push(cmd.invoice_id);
            c.adhoc.push(cmd.adhoc_invoice_id);
            c.customers.push(cmd.customer_id);
            c.correlations.push(e.correlation_id.clone());
            c.replays.push(e.replay_count);
            c.tokens.push(uuid::Uuid::new_v4().simple().to_string());
        }
        c
    }
}

/// The statement: the ids now held, with the provider calls made before.
async fn insert_or_take_over(
    conn: &mut PgConn,
    c: ClaimColumns,
    owner: &str,
    lease: Duration,
) -> Result<std::collections::HashMap<String, (i32, String)>, StoreError> {
    let claimed: Vec<Claimed> = diesel::sql_query(
        "INSERT INTO payment_link_commands AS c (command_id, canonical_request, payment_provider_id, \
             amount_in_major_currency, description, email_address, invoice_id, adhoc_invoice_id, \
             customer_id, correlation_id, status, replay_count, lease_owner, lease_expires_at, \
             lease_token) \
         SELECT u.command_id, u.canonical_request, u.payment_provider_id, u.amount, u.description, \
             u.email_address, u.invoice_id, u.adhoc_invoice_id, u.customer_id, u.correlation_id, \
             'processing', u.replay_count, $12, now() + $13 * interval '1 millisecond', u.token \
         FROM unnest($1::text[], $2::text[], $3::int8[], $4::numeric[], $5::text[], $6::text[], \
             $7::int8[], $8::int8[], $9::int8[], $10::text[], $11::int4[], $14::text[]) \
             AS u(command_id, canonical_request, payment_provider_id, amount, description, \
                  email_address, invoice_id, adhoc_invoice_id, customer_id, correlation_id, replay_count, \
                  token) \
         ON CONFLICT (command_id) DO UPDATE SET status = 'processing', \
             lease_owner = EXCLUDED.lease_owner, lease_expires_at = EXCLUDED.lease_expires_at, \
             lease_token = EXCLUDED.lease_token, \
             replay_count = GREATEST(c.replay_count, EXCLUDED.replay_count), updated_at = now() \
         WHERE c.canonical_request = EXCLUDED.canonical_request AND ( \
             (c.status = 'processing' AND (c.lease_expires_at < now() \
                 OR (c.updated_at < now() - $15 * interval '1 millisecond' AND NOT EXISTS ( \
                     SELECT 1 FROM worker_heartbeats h WHERE h.instance_id = c.lease_owner \
                     AND h.seen_at > now() - $15 * interval '1 millisecond')))) \
             OR (c.status = 'failed' AND EXCLUDED.replay_count > c.replay_count)) \
         RETURNING c.command_id, c.attempts, c.lease_token",
    )
    .bind::<Array<Text>, _>(c.ids)
    .bind::<Array<Text>, _>(c.canonical)
    .bind::<Array<BigInt>, _>(c.providers)
    .bind::<Array<Numeric>, _>(c.amounts)
    .bind::<Array<Text>, _>(c.descriptions)
    .bind::<Array<Nullable<Text>>, _>(c.emails)
    .bind::<Array<Nullable<BigInt>>, _>(c.invoices)
    .bind::<Array<Nullable<BigInt>>, _>(c.adhoc)
    .bind::<Array<Nullable<BigInt>>, _>(c.customers)
    .bind::<Array<Text>, _>(c.correlations)
    .bind::<Array<Integer>, _>(c.replays)
    .bind::<Text, _>(owner)
    .bind::<BigInt, _>(lease.as_millis() as i64)
    .bind::<Array<Text>, _>(c.tokens)
    .bind::<BigInt, _>(OWNER_SILENT.min(lease).as_millis() as i64)
    .load(conn)
    .await?;
    Ok(claimed
        .into_iter()
        .map(|c| (c.command_id, (c.attempts, c.lease_token)))
        .collect())
}

/// Claims the command for this worker through the claim writer: inserts its row, or takes
/// over a row whose holder's lease ran out, or re-opens a recorded failure an operator replayed.
/// Otherwise the record says why not: finished, held by another worker, or in conflict.
pub async fn claim(
    pool: &PgPool,
    claims: &Claims,
    envelope: &Envelope,
) -> Result<Claim, StoreError> {
    // No connection is held while waiting for the writer, which needs one from the same pool.
    if let Some((attempts, token)) = claims.submit(envelope.clone()).await? {
        return Ok(Claim::Acquired { attempts, token });
    }
    let conn = &mut pool.get().await?;
    let Some(existing) = find(conn, envelope.command_id.as_str()).await? else {
        // Deleted between the two statements (only by hand): the next delivery claims it anew.
        return Ok(Claim::Busy);
    };
    Ok(
        if existing.canonical_request != envelope.canonical_request {
            Claim::Conflict
        } else if existing.status == PROCESSING {
            Claim::Busy
        } else {
            Claim::Finished(Box::new(existing))
        },
    )
}
