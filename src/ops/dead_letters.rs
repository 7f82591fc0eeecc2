//! Operators' actions on the dead-letter store, shared by the CLI and the console: list, replay
//! and archive what a [`Filter`] selects. A replay run reserves its dead letters first (state
//! `replaying`), then publishes each stored original to its original exchange and routing key
//! (confirmed) and records the outcome, a batch at a time; a run stopped midway is resumed from
//! its reserved rows. Every action is recorded in the audit log.

use crate::broker::messages::{self, OutboundMessage, properties_from_json};
use crate::broker::publisher::{PublishError, confirm_channel, publish_confirmed};
use crate::broker::{self};
use crate::config::Settings;
use crate::errors::ErrorKind;
use crate::headers::{self, read_int};
use crate::ops::targets::ReplayTargets;
use crate::store::dead_letters::{self as store, Filter, ReplayOutcome, Stored, Summary};
use crate::store::{self as db, PgConn, PgPool, audit, replay_runs};
use anyhow::Context as _;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Every kind a dead letter can have: the worker's error kinds, `delivery-limit` for a message
/// the broker dead-lettered itself, and `unknown` for one without either mark.
pub fn known_kinds() -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
    kinds.extend([DELIVERY_LIMIT, EXPIRED, REJECTED, MAXLEN, UNKNOWN]);
    kinds
}

/// The kind of a message the broker dead-lettered itself after its delivery limit.
pub const DELIVERY_LIMIT: &str = "delivery-limit";
/// The kind of a message the broker dead-lettered itself when its TTL ran out in the queue.
pub const EXPIRED: &str = "expired";
/// The kind of a message the broker dead-lettered itself when a consumer rejected it.
pub const REJECTED: &str = "rejected";
/// The kind of a message the broker dead-lettered itself to keep the queue within its length.
pub const MAXLEN: &str = "maxlen";
/// The kind of a message in the queue with neither the worker's headers nor the broker's.
pub const UNKNOWN: &str = "unknown";

/// Whether replaying a dead letter of this kind, unchanged, fails the same way again.
pub fn fails_again(kind: &str) -> bool {
    kind == ErrorKind::Validation.as_str() || kind == ErrorKind::IdempotencyConflict.as_str()
}

/// A dead letter as lists show it, with whether a replay may publish it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    /// What the store holds.
    #[serde(flatten)]
    pub summary: Summary,
    /// Whether its target is one replay may publish to.
    pub replayable: bool,
    /// Why not, when it is not.
    pub not_replayable_because: Option<String>,
}

impl std::ops::Deref for Listed {
    type Target = Summary;
    fn deref(&self) -> &Summary {
        &self.summary
    }
}

impl Listed {
    /// `summary`, checked against `targets`.
    pub fn new(summary: Summary, targets: &ReplayTargets) -> Self {
        let why = targets
            .check(&summary.original_exchange, &summary.original_routing_key)
            .err();
        Self {
            summary,
            replayable: why.is_none(),
            not_replayable_because: why,
        }
    }
}

/// What `list` found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    /// The matching dead letters, newest first (at most the limit).
    pub letters: Vec<Listed>,
    /// Of all matching dead letters, how many per kind.
    pub by_kind: BTreeMap<String, i64>,
    /// How many match in all.
    pub matching: i64,
}

/// Opens the store for an operator's command, saying why when the database cannot be reached.
pub async fn connect(settings: &Settings, what: &str) -> anyhow::Result<(PgPool, PgConn)> {
    let pool = db::pool(&settings.database)?;
    match pool.get().await {
        Ok(conn) => Ok((pool, conn)),
        Err(error) => Err(crate::diagnose::database(settings, what, error).await),
    }
}

/// Lists the newest `limit` dead letters that match, with the count per kind of all that match.
pub async fn list(
    conn: &mut PgConn,
    filter: &Filter,
    limit: i64,
    targets: &ReplayTargets,
) -> anyhow::Result<Listing> {
    let (letters, _) = store::page(conn, filter, limit, None).await?;
    let by_kind = store::count_by_kind(conn, filter).await?;
    Ok(Listing {
        letters: letters
            .into_iter()
            .map(|l| Listed::new(l, targets))
            .collect(),
        matching: by_kind.values().sum(),
        by_kind,
    })
}

/// The command again, as it was first published, with the replay count increased; without
/// `reply_to` (see [`messages::routed_elsewhere_removed`]).
pub fn replay_message(
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    body: &[u8],
) -> OutboundMessage {
    let replay_count = read_int(properties, headers::REPLAY_COUNT).unwrap_or(0) + 1;
    let mut kept = headers::without_failure_headers(properties);
    kept.insert(
        headers::REPLAY_COUNT.into(),
        AMQPValue::LongLongInt(replay_count),
    );
    OutboundMessage {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        properties: messages::routed_elsewhere_removed(properties).with_headers(kept),
        body: body.to_vec(),
    }
}

/// The stored dead letter's replay: its original, to its original exchange and routing key, if
/// that is a target replay may publish to (else skipped, with the reason).
fn replay_of(letter: &Stored, targets: &ReplayTargets) -> Result<OutboundMessage, ReplayOutcome> {
    targets
        .check(&letter.original_exchange, &letter.original_routing_key)
        .map_err(ReplayOutcome::Skipped)?;
    let properties = properties_from_json(letter.properties.clone()).map_err(|e| {
        ReplayOutcome::Failed(format!("its stored properties do not read back: {e}"))
    })?;
    Ok(replay_message(
        &letter.original_exchange,
        &letter.original_routing_key,
        &properties,
        &letter.body,
    ))
}

/// How a replay is asked for.
#[derive(Clone, Debug)]
pub struct ReplayRequest {
    /// Which dead letters (only open ones are replayed).
    pub filter: Filter,
    /// At most this many (the oldest first).
    pub limit: Option<usize>,
    /// Only say what would be replayed.
    pub dry_run: bool,
    /// Replays per second at most.
    pub rate: Option<f64>,
    /// Go ahead even where a replay may create a second link (see [`ReplayError::DuplicateRisk`]).
    pub accept_duplicate_risk: bool,
    /// Who asked, for the audit log.
    pub requested_by: String,
    /// `cli` or `console`.
    pub source: String,
    /// The console's client address, for the audit log (none from the CLI).
    pub client_address: Option<String>,
}

/// Why a replay did not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "{count} of the selected dead letters first called the provider more than \
         {window_hours} h ago (provider.idempotency_window_hours): the provider may have \
         forgotten their idempotency keys, so replaying them may create a second payment link. \
         Check with the provider, then confirm with --accept-duplicate-risk \
         (in the console: \"I accept the risk\"), or narrow the selection. First ids: {first:?}"
    )]
    /// Some selected dead letters are older than the provider's idempotency window.
    DuplicateRisk {
        /// How many.
        count: usize,
        /// The window.
        window_hours: u64,
        /// The first few of their ids.
        first: Vec<i64>,
    },
    #[error(transparent)]
    /// The database or the broker failed.
    Other(#[from] anyhow::Error),
}

impl From<db::StoreError> for ReplayError {
    fn from(error: db::StoreError) -> Self {
        Self::Other(error.into())
    }
}

/// A replay run as it starts.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    /// The run (and the console's job) id.
    pub run_id: i64,
    /// The dead letters selected (reserved unless a dry run).
    pub ids: Vec<i64>,
    /// Of those, the ones whose kind fails again as they are (validation, idempotency conflict).
    pub fail_again: Vec<i64>,
    /// Of those, the ones at risk of a second link (accepted, or the run would not start).
    pub at_risk: Vec<i64>,
    /// Matching dead letters left alone because they are not replayable, with the reason.
    pub skipped: Vec<(i64, String)>,
}

/// Selects, checks and records a run; reserves its dead letters unless it is a dry run (which
/// ends here). The publishing is [`work`].
pub async fn start(
    settings: &Settings,
    conn: &mut PgConn,
    request: &ReplayRequest,
) -> Result<Started, ReplayError> {
    let mut ids = store::open_ids(conn, &request.filter).await?;
    if let Some(limit) = request.limit {
        ids.truncate(limit);
    }
    let targets = ReplayTargets::new(settings);
    let mut skipped = Vec::new();
    for (id, exchange, routing_key) in store::targets(conn, &ids).await? {
        if let Err(why) = targets.check(&exchange, &routing_key) {
            skipped.push((id, why));
        }
    }
    ids.retain(|id| !skipped.iter().any(|(s, _)| s == id));
    let window = Duration::from_secs(settings.provider.idempotency_window_hours * 3600);
    let mut at_risk = store::at_duplicate_risk(conn, &ids, window).await?;
    if !at_risk.is_empty() && !request.accept_duplicate_risk && !request.dry_run {
        return Err(ReplayError::DuplicateRisk {
            count: at_risk.len(),
            window_hours: settings.provider.idempotency_window_hours,
            first: at_risk.iter().take(5).copied().collect(),
        });
    }
    let filter = stored_filter(&request.filter)?;
    let run_id = replay_runs::start(
        conn,
        &replay_runs::NewReplayRun {
            requested_by: request.requested_by.clone(),
            filter_kind: request.filter.kind.clone(),
            filter_command_id: request.filter.command_id.clone(),
            max_count: request.limit.map(|l| l as i64),
            rate_per_second: request.rate,
            dry_run: request.dry_run,
            source: request.source.clone(),
            filter: Some(filter.clone()),
            state: if request.dry_run { "done" } else { "running" }.into(),
            total: ids.len() as i32,
            accept_duplicate_risk: request.accept_duplicate_risk,
        },
    )
    .await?;
    if !request.dry_run {
        // What another run took meanwhile is not this run's: it works on what it reserved.
        ids = store::reserve(conn, &ids, run_id).await?;
        ids.sort_unstable();
    }
    let selected = store::summaries(conn, &ids).await?;
    let fail_again = selected
        .iter()
        .filter(|s| fails_again(&s.kind))
        .map(|s| s.id)
        .collect();
    let command_ids: Vec<String> = selected.iter().map(|s| s.command_id.clone()).collect();
    replay_runs::set_selection(conn, run_id, &command_ids).await?;
    store::record_skipped(conn, run_id, &skipped).await?;
    if request.dry_run {
        let counts = replay_runs::RunCounts {
            selected: ids.len() as i32,
            replayed: 0,
            skipped: skipped.len() as i32,
            failed: 0,
            left: store::count(conn, &open()).await? as i32,
        };
        replay_runs::finish(conn, run_id, counts).await?;
    }
    audit::record(
        conn,
        &audit::NewEntry {
            actor: request.requested_by.clone(),
            source: request.source.clone(),
            action: if request.dry_run { "dry-run" } else { "replay" }.into(),
            filter: Some(filter),
            count: ids.len() as i32,
            ids: ids.clone(),
            run_id: Some(run_id),
            client_address: request.client_address.clone(),
        },
    )
    .await?;
    at_risk.retain(|id| ids.binary_search(id).is_ok());
    Ok(Started {
        run_id,
        ids,
        fail_again,
        at_risk,
        skipped,
    })
}

/// Most ids a stored filter keeps (in a replay run and in the audit log): the full selection is
/// in the run's reserved rows and the audit entry's ids, so a request naming 10,000 ids does not
/// store them twice more as text.
const STORED_FILTER_IDS: usize = 100;

/// The filter as the run and the audit log keep it: bounded, with how many ids it named.
fn stored_filter(filter: &Filter) -> anyhow::Result<serde_json::Value> {
    let mut kept = filter.clone();
    let named = kept.ids.as_ref().map(Vec::len);
    if let Some(ids) = kept.ids.as_mut() {
        ids.truncate(STORED_FILTER_IDS);
    }
    let mut value = serde_json::to_value(&kept).context("filter to JSON")?;
    if let Some(named) = named.filter(|n| *n > STORED_FILTER_IDS) {
        value["idsNamed"] = serde_json::json!(named);
    }
    Ok(value)
}

fn open() -> Filter {
    Filter {
        state: Some(store::OPEN.into()),
        ..Filter::default()
    }
}

/// How a run ended.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Worked {
    /// Confirmed by the broker.
    pub replayed: Vec<i64>,
    /// Refused by the broker (open again).
    pub failed: Vec<i64>,
    /// Not published, with the reason (not replayable; open again).
    pub skipped: Vec<(i64, String)>,
    /// Open dead letters left in the store when it ended.
    pub left: i64,
}

/// Most dead letters published before their outcomes are recorded (without a rate limit).
const BATCH: i64 = 200;

/// Publishes the run's reserved dead letters, a batch at a time, recording each batch's outcomes
/// and the run's progress; ends the run. Runs again from where it was if it stopped midway (a
/// dead letter published just before a stop may be published twice; the worker's idempotency
/// makes the second a republished event, not a second link).
pub async fn work(
    settings: &Settings,
    conn: &mut PgConn,
    run_id: i64,
    rate: Option<f64>,
) -> anyhow::Result<Worked> {
    let connection = broker::connect(
        &settings.broker,
        &format!("payment-link-worker replay {run_id}"),
    )
    .await?;
    let mut channel = ReplayChannel {
        channel: confirm_channel(&connection).await?,
        connection: &connection,
    };
    let targets = ReplayTargets::new(settings);
    let pause = rate
        .filter(|r| *r > 0.0 && r.is_finite())
        .map(|r| Duration::from_secs_f64(1.0 / r));
    // With a rate limit, a batch is about a second of publishing: the recorded progress stays
    // close to the real one, and a console never sees a job that is going as stalled.
    let batch = pause.map_or(BATCH, |p| {
        (1.0 / p.as_secs_f64()).clamp(1.0, BATCH as f64) as i64
    });
    let timeout = Duration::from_millis(settings.broker.publish_timeout_ms);
    let mut worked = Worked::default();
    let mut after = 0;
    loop {
        let letters = store::next_reserved(conn, run_id, after, batch).await?;
        let Some(last) = letters.last() else { break };
        after = last.id;
        let outcomes = publish_batch(&mut channel, &targets, &letters, pause, timeout).await;
        for (id, outcome) in &outcomes {
            match outcome {
                ReplayOutcome::Replayed => worked.replayed.push(*id),
                ReplayOutcome::Failed(error) => {
                    tracing::error!(dead_letter = id, %error, "the broker did not take the replayed command; it stays open");
                    worked.failed.push(*id);
                }
                ReplayOutcome::Skipped(why) => {
                    tracing::warn!(dead_letter = id, why = %why, "dead letter not replayed: it is not replayable");
                    worked.skipped.push((*id, why.clone()));
                }
            }
        }
        store::record_replays(conn, run_id, &outcomes).await?;
    }
    // Bounded too: a blocked connection cannot even send its close; the broker drops it later.
    let closing = async {
        let _ = channel.channel.close(200, "replay done".into()).await;
        let _ = connection.close(200, "replay done".into()).await;
    };
    let _ = tokio::time::timeout(timeout, closing).await;
    worked.left = store::count(conn, &open()).await?;
    let run = replay_runs::find(conn, run_id).await?;
    let counts = replay_runs::RunCounts {
        selected: run.as_ref().map_or(0, |r| r.total),
        replayed: run.as_ref().map_or(0, |r| r.replayed),
        skipped: run.as_ref().map_or(0, |r| r.skipped),
        failed: run.as_ref().map_or(0, |r| r.failed),
        left: worked.left as i32,
    };
    replay_runs::finish(conn, run_id, counts).await?;
    Ok(worked)
}

/// The replay's confirm channel, opened again when the broker has closed it: a publish the
/// broker refuses (an exchange that does not exist, a property it does not accept) closes the
/// channel, and that must fail that one dead letter, not the rest of the job.
struct ReplayChannel<'a> {
    connection: &'a Connection,
    channel: Channel,
}

impl ReplayChannel<'_> {
    /// The channel, reopened if the broker closed it.
    async fn usable(&mut self) -> Result<Channel, String> {
        if !self.channel.status().connected() {
            self.channel = confirm_channel(self.connection)
                .await
                .map_err(|e| format!("cannot reopen the replay's channel: {e}"))?;
        }
        Ok(self.channel.clone())
    }
}

/// Publishes one copy and waits for its confirm, within `timeout`.
async fn publish_one(
    channel: &Channel,
    copy: &OutboundMessage,
    timeout: Duration,
) -> ReplayOutcome {
    // Bounded: a broker that blocks publishers (an alarm) fails the batch, whose dead letters
    // are open again, rather than holding the job forever.
    match tokio::time::timeout(timeout, publish_confirmed(channel, copy)).await {
        Ok(Ok(())) => ReplayOutcome::Replayed,
        Ok(Err(e)) => ReplayOutcome::Failed(e.to_string()),
        Err(_) => ReplayOutcome::Failed(PublishError::TimedOut(timeout).to_string()),
    }
}

/// Publishes a batch: without a rate limit every copy is sent before any confirm is awaited (one
/// round trip for the batch); with one, one copy per `pause`. When the broker closed the channel
/// during the batch (it refused one copy), the copies that failed with it are published again
/// one at a time on a reopened channel, so only the refused one fails, with the broker's reason
/// (a copy the broker took just before the close may so arrive twice; the worker's idempotency
/// makes the second a republished event, not a second link).
async fn publish_batch(
    channel: &mut ReplayChannel<'_>,
    targets: &ReplayTargets,
    letters: &[Stored],
    pause: Option<Duration>,
    timeout: Duration,
) -> Vec<(i64, ReplayOutcome)> {
    let copies: Vec<Result<OutboundMessage, ReplayOutcome>> = letters
        .iter()
        .map(|letter| replay_of(letter, targets))
        .collect();
    let mut outcomes: Vec<ReplayOutcome> = copies
        .iter()
        .map(|copy| match copy {
            Err(outcome) => outcome.clone(),
            Ok(_) => ReplayOutcome::Failed("not published".into()),
        })
        .collect();
    let publishable = (0..copies.len()).filter(|i| copies[*i].is_ok());
    let one_at_a_time: Vec<usize> = match pause {
        Some(_) => publishable.collect(),
        None => match channel.usable().await {
            Err(why) => {
                for i in publishable {
                    outcomes[i] = ReplayOutcome::Failed(why.clone());
                }
                Vec::new()
            }
            Ok(open) => {
                let indices: Vec<usize> = publishable.collect();
                let published = indices.iter().map(|&i| {
                    let open = open.clone();
                    let copy = copies[i].as_ref().expect("publishable");
                    async move { (i, publish_one(&open, copy, timeout).await) }
                });
                for (i, outcome) in futures_util::future::join_all(published).await {
                    outcomes[i] = outcome;
                }
                let closed = !open.status().connected();
                indices
                    .into_iter()
                    .filter(|&i| closed && matches!(outcomes[i], ReplayOutcome::Failed(_)))
                    .collect()
            }
        },
    };
    // At the rate limit, or again after the broker closed the channel mid-batch.
    for i in one_at_a_time {
        let copy = copies[i].as_ref().expect("publishable");
        outcomes[i] = match channel.usable().await {
            Ok(open) => publish_one(&open, copy, timeout).await,
            Err(why) => ReplayOutcome::Failed(why),
        };
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    letters.iter().map(|l| l.id).zip(outcomes).collect()
}

/// Archives the open dead letters that match (at most `limit`); records it in the audit log.
pub async fn archive(
    conn: &mut PgConn,
    filter: &Filter,
    limit: Option<usize>,
    actor: &str,
    source: &str,
    client_address: Option<&str>,
) -> anyhow::Result<Vec<i64>> {
    let mut ids = store::open_ids(conn, filter).await?;
    if let Some(limit) = limit {
        ids.truncate(limit);
    }
    let archived = store::archive(conn, &ids).await?;
    audit::record(
        conn,
        &audit::NewEntry {
            actor: actor.to_owned(),
            source: source.to_owned(),
            action: "archive".into(),
            filter: Some(stored_filter(filter)?),
            count: archived.len() as i32,
            ids: archived.clone(),
            run_id: None,
            client_address: client_address.map(str::to_owned),
        },
    )
    .await?;
    Ok(archived)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::{read_text, text};
    use lapin::types::FieldTable;

    #[test]
    fn replay_restores_the_command_and_counts_the_replay() {
        let mut headers = FieldTable::default();
        headers.insert("x-error-kind".into(), text("provider-rejected"));
        headers.insert("x-error-status".into(), AMQPValue::LongInt(400));
        headers.insert("x-dead-letter-id".into(), text("d-1"));
        headers.insert("x-original-exchange".into(), text("cmds"));
        headers.insert("x-original-routing-key".into(), text("payment-link.create"));
        headers.insert("x-replay-count".into(), AMQPValue::LongInt(2));
        headers.insert("x-delay-round".into(), AMQPValue::LongInt(4));
        headers.insert("traceparent".into(), text("00-abc"));
        let properties = BasicProperties::default()
            .with_message_id("c-1".into())
            .with_headers(headers);
        let copy = replay_message("cmds", "payment-link.create", &properties, b"{}");
        assert_eq!(copy.exchange, "cmds");
        assert_eq!(copy.routing_key, "payment-link.create");
        assert_eq!(copy.message_id(), "c-1");
        assert_eq!(read_int(&copy.properties, headers::REPLAY_COUNT), Some(3));
        assert_eq!(
            read_text(&copy.properties, "traceparent").as_deref(),
            Some("00-abc")
        );
        for gone in [
            "x-error-kind",
            "x-error-status",
            "x-delay-round",
            "x-original-exchange",
            "x-dead-letter-id",
        ] {
            assert!(
                read_text(&copy.properties, gone).is_none()
                    && read_int(&copy.properties, gone).is_none(),
                "{gone}"
            );
        }
    }
}
