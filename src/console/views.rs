//! What the console shows, typed once: the API serializes these views and the pages render the
//! same ones, so a field added here reaches both (and the OpenAPI document says its name).

use super::Console;
use crate::broker::messages::properties_from_json;
use crate::dead_letters::store::{self as store, Kind, Replay, State};
use crate::dead_letters::targets::ReplayTargets;
use crate::store::{StoreError, replay_runs};
use chrono::{DateTime, Utc};
use lapin::types::AMQPValue;
use serde::Serialize;
use serde_json::{Map, Value, json};

/// Everything about one dead letter, as the API answers it and the detail page shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    pub id: i64,
    pub command_id: String,
    pub kind: Kind,
    /// Why it failed, in words.
    pub message: String,
    pub http_status: Option<i32>,
    pub attempts: Option<i32>,
    pub error_body: Option<String>,
    pub failed_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    pub replay_count: i32,
    pub state: State,
    pub state_changed_at: DateTime<Utc>,
    pub replay_run_id: Option<i64>,
    pub previous_id: Option<i64>,
    pub provider_id: Option<i64>,
    pub invoice_id: Option<i64>,
    pub adhoc_invoice_id: Option<i64>,
    pub customer_id: Option<i64>,
    pub description: Option<String>,
    pub email: Option<String>,
    pub trace_id: Option<String>,
    /// Its first provider call is older than the provider's idempotency window.
    pub duplicate_risk: bool,
    /// Replayed as it is, it fails the same way again.
    pub fails_again: bool,
    /// Its target is one a replay may publish to.
    pub replayable: bool,
    /// Why not, when it is not.
    pub not_replayable_because: Option<String>,
    pub stored_with_changes: Option<String>,
    /// The message as it was dead-lettered.
    pub original: OriginalView,
    /// Its replays so far.
    pub replays: Vec<Replay>,
}

/// A dead letter's original message.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OriginalView {
    pub exchange: String,
    pub routing_key: String,
    /// The AMQP properties, headers aside.
    pub properties: Value,
    /// The headers as plain JSON (text as strings, numbers as numbers).
    pub headers: Map<String, Value>,
    /// The body as text, when it is UTF-8.
    pub body: Option<String>,
    /// The body as JSON, exactly as sent (a number such as 3.00 is not re-formatted).
    pub body_json: Option<Box<serde_json::value::RawValue>>,
    pub body_bytes: usize,
}

/// A header value as plain JSON (text as a string, numbers as numbers, tables as objects).
fn header_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), header_json(v)))
                .collect(),
        ),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(header_json).collect()),
        other => serde_json::to_value(other)
            .ok()
            .and_then(|v| v.as_object().and_then(|o| o.values().next().cloned()))
            .unwrap_or(Value::Null),
    }
}

impl DeadLetterView {
    /// The view of dead letter `id`, if there is one.
    pub async fn load(console: &Console, id: i64) -> Result<Option<Self>, StoreError> {
        let mut conn = console.pool.get().await?;
        let Some((row, replays)) = store::get(&mut conn, id).await? else {
            return Ok(None);
        };
        let window = std::time::Duration::from_secs(
            console.settings.provider.idempotency_window_hours * 3600,
        );
        let at_risk = store::at_duplicate_risk(&mut conn, &[id], window).await?;
        let not_replayable_because = ReplayTargets::new(&console.settings)
            .check(&row.original_exchange, &row.original_routing_key)
            .err();
        let headers = properties_from_json(row.properties.clone())
            .ok()
            .and_then(|p| p.headers().clone())
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), header_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        let mut properties = row.properties.clone();
        if let Some(object) = properties.as_object_mut() {
            object.remove("headers");
            object.remove("text_headers");
        }
        let body = String::from_utf8(row.body.clone()).ok();
        let body_json = body
            .as_deref()
            .and_then(|b| serde_json::value::RawValue::from_string(b.to_owned()).ok());
        Ok(Some(Self {
            id: row.id,
            fails_again: row.kind.fails_again(),
            command_id: row.command_id,
            kind: row.kind,
            message: row.error_message,
            http_status: row.http_status,
            attempts: row.attempts,
            error_body: row.error_body,
            failed_at: row.failed_at,
            ingested_at: row.ingested_at,
            replay_count: row.replay_count,
            state: row.state,
            state_changed_at: row.state_changed_at,
            replay_run_id: row.replay_run_id,
            previous_id: row.previous_id,
            provider_id: row.payment_provider_id,
            invoice_id: row.invoice_id,
            adhoc_invoice_id: row.adhoc_invoice_id,
            customer_id: row.customer_id,
            description: row.description,
            email: row.email,
            trace_id: row.trace_id,
            duplicate_risk: !at_risk.is_empty(),
            replayable: not_replayable_because.is_none(),
            not_replayable_because,
            stored_with_changes: row.stored_with_changes,
            original: OriginalView {
                exchange: row.original_exchange,
                routing_key: row.original_routing_key,
                properties,
                headers,
                body_bytes: row.body.len(),
                body,
                body_json,
            },
            replays,
        }))
    }
}

/// A replay run, as the API answers it and its page shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayRunView {
    /// The run's id (`jobId` in the API, whose contract predates the one name).
    pub job_id: i64,
    pub state: String,
    pub total: i32,
    pub replayed: i32,
    pub failed: i32,
    /// Not replayable, left alone.
    pub skipped: i32,
    pub dry_run: bool,
    pub requested_by: String,
    pub source: String,
    pub filter: Option<Value>,
    pub rate: Option<f64>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<&replay_runs::ReplayRun> for ReplayRunView {
    fn from(run: &replay_runs::ReplayRun) -> Self {
        Self {
            job_id: run.id,
            state: run.state.clone(),
            total: run.total,
            replayed: run.replayed,
            failed: run.failed,
            skipped: run.skipped,
            dry_run: run.dry_run,
            requested_by: run.requested_by.clone(),
            source: run.source.clone(),
            filter: run.filter.clone(),
            rate: run.rate_per_second,
            started_at: run.started_at,
            finished_at: run.finished_at,
        }
    }
}

impl ReplayRunView {
    /// The view of job `id`, if there is one.
    pub async fn load(console: &Console, id: i64) -> Result<Option<Self>, StoreError> {
        let mut conn = console.pool.get().await?;
        Ok(replay_runs::find(&mut conn, id)
            .await?
            .as_ref()
            .map(Self::from))
    }
}
