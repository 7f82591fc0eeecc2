//! Everything about one dead letter, typed once: the console's API serializes it, its detail
//! page renders it, and `dead-letters show` prints it, so a field added here reaches all three.

use super::store::{self as store, Replay, Summary};
use super::targets::ReplayTargets;
use crate::broker::messages::properties_from_json;
use crate::config::Settings;
use crate::store::{PgConn, StoreError};
use chrono::{DateTime, Utc};
use lapin::types::AMQPValue;
use serde::Serialize;
use serde_json::{Map, Value, json};

/// Everything about one dead letter, as the API answers it and the detail page shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    /// What a list shows of it (its ids, kind, message, state; its target as `exchange` and
    /// `routingKey`), read through `Deref`.
    #[serde(flatten)]
    pub summary: Summary,
    /// The start of the provider's error answer, if any.
    pub error_body: Option<String>,
    /// When it reached the store.
    pub ingested_at: DateTime<Utc>,
    /// When its state last changed.
    pub state_changed_at: DateTime<Utc>,
    /// The replay run that last took it, if any.
    pub replay_run_id: Option<i64>,
    /// The dead letter this one's command was replayed from, if it failed again.
    pub previous_id: Option<i64>,
    /// The command's `paymentProviderId`, where its body had one.
    pub provider_id: Option<i64>,
    /// The command's description.
    pub description: Option<String>,
    /// The command's e-mail address, if any (personal data: masked for viewers).
    pub email: Option<String>,
    /// The trace it was part of (from its `traceparent`).
    pub trace_id: Option<String>,
    /// Its first provider call is older than the provider's idempotency window.
    pub duplicate_risk: bool,
    /// Replayed as it is, it fails the same way again.
    pub fails_again: bool,
    /// Its target is one a replay may publish to.
    pub replayable: bool,
    /// Why not, when it is not.
    pub not_replayable_because: Option<String>,
    /// What had to be changed to store it (dropped headers, a cut body), if anything.
    pub stored_with_changes: Option<String>,
    /// The message as it was dead-lettered.
    pub original: OriginalView,
    /// Its replays so far.
    pub replays: Vec<Replay>,
    /// The chain of edits it is part of: where it was edited from and into, and what became of
    /// its edited copy.
    pub edits: EditChain,
}

/// A dead letter's place in a chain of edits: original → edited copy → its outcome.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EditChain {
    /// The command id this letter's command was edited from (its `x-edited-from`), if it was.
    pub edited_from: Option<String>,
    /// The command id its edited copy was sent as (state `edited`).
    pub edited_into: Option<String>,
    /// What became of that copy: `succeeded`, `failed`, `processing`, or `pending` (not seen yet).
    pub edited_outcome: Option<String>,
}

impl std::ops::Deref for DeadLetterView {
    type Target = Summary;
    fn deref(&self) -> &Summary {
        &self.summary
    }
}

/// A dead letter's original message.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OriginalView {
    /// The exchange to publish to.
    pub exchange: String,
    /// The routing key to publish with.
    pub routing_key: String,
    /// The AMQP properties, headers aside.
    pub properties: Value,
    /// The headers as plain JSON (text as strings, numbers as numbers).
    pub headers: Map<String, Value>,
    /// The body as text, when it is UTF-8 and not JSON: a JSON body is sent once, as
    /// `bodyJson`, so that a large one does not go out twice.
    pub body: Option<String>,
    /// The body as JSON, exactly as sent (a number such as 3.00 is not re-formatted).
    pub body_json: Option<Box<serde_json::value::RawValue>>,
    /// The body as text, when it is UTF-8 (JSON or not), for the command line's view.
    #[serde(skip)]
    pub text: Option<String>,
    /// The body's size.
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
    pub async fn load(
        settings: &Settings,
        conn: &mut PgConn,
        id: i64,
    ) -> Result<Option<Self>, StoreError> {
        let Some((row, replays)) = store::get(conn, id).await? else {
            return Ok(None);
        };
        let window =
            std::time::Duration::from_secs(settings.provider.idempotency_window_hours * 3600);
        let at_risk = store::at_duplicate_risk(conn, &[id], window).await?;
        let not_replayable_because = ReplayTargets::new(settings)
            .check(&row.original_exchange, &row.original_routing_key)
            .err();
        let original = OriginalView::of(&row);
        let edits = EditChain::load(conn, &row, &original.headers).await?;
        Ok(Some(Self {
            fails_again: row.letter.kind.fails_again(),
            summary: Summary::from(&row),
            error_body: row.letter.error_body,
            ingested_at: row.ingested_at,
            state_changed_at: row.state_changed_at,
            replay_run_id: row.replay_run_id,
            previous_id: row.previous_id,
            provider_id: row.letter.payment_provider_id,
            description: row.letter.description,
            email: row.letter.email,
            trace_id: row.letter.trace_id,
            duplicate_risk: !at_risk.is_empty(),
            replayable: not_replayable_because.is_none(),
            not_replayable_because,
            stored_with_changes: row.letter.stored_with_changes,
            original,
            replays,
            edits,
        }))
    }
}

impl From<&store::Stored> for Summary {
    fn from(row: &store::Stored) -> Self {
        Summary {
            id: row.id,
            command_id: row.letter.command_id.clone(),
            kind: row.letter.kind,
            http_status: row.letter.http_status,
            attempts: row.letter.attempts,
            failed_at: row.letter.failed_at,
            replay_count: row.letter.replay_count,
            state: row.state,
            invoice_id: row.letter.invoice_id,
            adhoc_invoice_id: row.letter.adhoc_invoice_id,
            customer_id: row.letter.customer_id,
            error_message: row.letter.error_message.clone(),
            original_exchange: row.letter.original_exchange.clone(),
            original_routing_key: row.letter.original_routing_key.clone(),
        }
    }
}

impl OriginalView {
    /// The stored original as sent: its properties without the headers, the headers as plain
    /// JSON, and the body as JSON, as text or as neither.
    fn of(row: &store::Stored) -> Self {
        let headers: Map<String, Value> = properties_from_json(row.properties.clone())
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
        let body_bytes = row.body.len();
        OriginalView {
            exchange: row.letter.original_exchange.clone(),
            routing_key: row.letter.original_routing_key.clone(),
            properties,
            headers,
            body_bytes,
            body: body.clone().filter(|_| body_json.is_none()),
            body_json,
            text: body,
        }
    }
}

impl EditChain {
    /// Where a letter's command came from by an edit (its `x-edited-from` header), and what it
    /// was edited into and how that command stands.
    async fn load(
        conn: &mut PgConn,
        row: &store::Stored,
        headers: &Map<String, Value>,
    ) -> Result<Self, StoreError> {
        Ok(EditChain {
            edited_from: headers
                .get(crate::headers::EDITED_FROM)
                .and_then(Value::as_str)
                .map(str::to_owned),
            edited_outcome: match &row.edited_into {
                Some(id) => Some(
                    crate::store::commands::find(conn, id)
                        .await?
                        .map_or_else(|| "pending".to_owned(), |record| record.status),
                ),
                None => None,
            },
            edited_into: row.edited_into.clone(),
        })
    }
}
