//! Fixing a dead letter's data before sending it again. The operator changes the command's body
//! fields and nothing else; the edited body passes the worker's own intake check before anything
//! is sent; it goes as a **new command** (its id derived from the original's and the edit
//! number, so the provider sees a new `Idempotency-Key` and the original's record is untouched),
//! carrying `x-edited-from`, as a replay run of one; the letter becomes `edited`, naming its
//! successor, and the audit log keeps who, why, and the fields before and after. A letter is
//! taken for an edit by one atomic update: a second edit at the same time finds it taken.

use super::publish::{ReplayChannel, publish_one};
use super::replay_rows::ReplayOutcome;
use super::store::{self, State};
use super::targets::ReplayTargets;
use crate::broker::messages::{self, OutboundMessage, properties_from_json};
use crate::command::{Command, CommandId};
use crate::config::Settings;
use crate::headers;
use crate::store::schema::dead_letters::dsl as d;
use crate::store::{PgConn, StoreError, audit, replay_runs};
use chrono::Utc;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::time::Duration;

/// The fields an operator may change: the command's body, nothing of its envelope.
pub const EDITABLE: [&str; 7] = [
    "paymentProviderId",
    "amountInMajorCurrency",
    "description",
    "emailAddress",
    "invoiceId",
    "adhocInvoiceId",
    "customerId",
];

/// Fields that hold personal data: shown to operators, masked for viewers.
pub const PERSONAL: [&str; 2] = ["emailAddress", "description"];

/// Most characters of a reason kept.
const REASON_CHARS: usize = 500;

/// An edit as asked: the fields to change (JSON values as written; `null` removes a field).
#[derive(Debug)]
pub struct EditRequest {
    /// The dead letter.
    pub id: i64,
    /// The fields and their new values, as JSON text (numbers kept exactly as written).
    pub changes: BTreeMap<String, Box<RawValue>>,
    /// Why (required): kept in the audit log.
    pub reason: String,
    /// Who, for the audit log.
    pub requested_by: String,
    /// `cli` or `console`.
    pub source: String,
    /// The console's client address, for the audit log.
    pub client_address: Option<String>,
}

/// Why an edit was not made.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("no dead letter has id {0}")]
    /// No such dead letter.
    NotFound(i64),
    #[error(
        "dead letter {id} is {state}: only an open dead letter can be edited (an edit or a \
         replay may have taken it just now)"
    )]
    /// Not open (taken by another edit or a replay, or done with).
    NotOpen {
        /// The dead letter.
        id: i64,
        /// Its state.
        state: State,
    },
    #[error("{0}")]
    /// The edit itself is refused: the field and the reason.
    Invalid(String),
    #[error(transparent)]
    /// The database or the broker failed; nothing was changed.
    Other(#[from] anyhow::Error),
}

impl From<StoreError> for EditError {
    fn from(error: StoreError) -> Self {
        Self::Other(error.into())
    }
}

/// An edit made: the new command sent, the run that sent it, and what changed.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Edited {
    /// The dead letter edited (now `edited`).
    pub dead_letter_id: i64,
    /// The command id it was sent as.
    pub command_id: String,
    /// The command id it was edited from.
    pub edited_from: String,
    /// The replay run of one that sent it.
    pub job_id: i64,
    /// The changed fields before (null: absent).
    pub before: serde_json::Value,
    /// The changed fields after (null: removed).
    pub after: serde_json::Value,
}

/// Checks the edit, takes the letter, sends the edited command (confirmed), records the run and
/// the audit entry. On a refusal nothing changes; when the broker does not take the command,
/// the letter is open again.
pub async fn edit(
    settings: &Settings,
    conn: &mut PgConn,
    request: &EditRequest,
) -> Result<Edited, EditError> {
    let (letter, _) = store::get(conn, request.id)
        .await?
        .ok_or(EditError::NotFound(request.id))?;
    if letter.state != State::Open {
        return Err(EditError::NotOpen {
            id: letter.id,
            state: letter.state,
        });
    }
    ReplayTargets::new(settings)
        .check(&letter.original_exchange, &letter.original_routing_key)
        .map_err(|why| EditError::Invalid(format!("not replayable: {why}")))?;
    let reason = request.reason.trim();
    if reason.is_empty() {
        return Err(EditError::Invalid(
            "reason: say why the command is edited".into(),
        ));
    }
    let (body, before, after) = edited_body(&letter.body, &request.changes)?;
    Command::parse(&body)
        .map_err(|e| EditError::Invalid(format!("the edited command is not valid: {e}")))?;
    let command_id = successor_id(conn, &letter.command_id).await?;
    take(conn, letter.id, &command_id).await?;
    let properties = properties_from_json(letter.properties.clone())
        .map_err(|e| anyhow::anyhow!("its stored properties do not read back: {e}"))?;
    let copy = new_command(settings, conn, &letter, &properties, &command_id, body).await?;
    let run_id = replay_runs::start(conn, &one_run(request, letter.id, &command_id)).await?;
    let outcome = send(settings, run_id, &copy).await;
    let counts = |replayed, failed| replay_runs::RunCounts {
        selected: 1,
        replayed,
        skipped: 0,
        failed,
        left: 0,
    };
    if let ReplayOutcome::Failed(why) = outcome {
        give_back(conn, letter.id).await?;
        replay_runs::finish(conn, run_id, counts(0, 1)).await?;
        return Err(EditError::Other(anyhow::anyhow!(
            "the broker did not take the edited command ({why}); dead letter {} is open again",
            letter.id
        )));
    }
    replay_runs::finish(conn, run_id, counts(1, 0)).await?;
    let edited = Edited {
        dead_letter_id: letter.id,
        command_id,
        edited_from: letter.command_id.clone(),
        job_id: run_id,
        before,
        after,
    };
    audit::record(conn, &audit_entry(request, &edited, reason)).await?;
    Ok(edited)
}

/// Takes open letter `id` for the edit that sends it as `command_id`, in one atomic update: a
/// second edit or a replay at the same time finds it taken.
async fn take(conn: &mut PgConn, id: i64, command_id: &str) -> Result<(), EditError> {
    let taken = diesel::update(d::dead_letters.find(id).filter(d::state.eq(State::Open)))
        .set((
            d::state.eq(State::Edited),
            d::edited_into.eq(Some(command_id)),
            d::state_changed_at.eq(Utc::now()),
        ))
        .execute(conn)
        .await
        .map_err(StoreError::from)?;
    if taken == 0 {
        let state = store::get(conn, id)
            .await?
            .map_or(State::Open, |(l, _)| l.state);
        return Err(EditError::NotOpen { id, state });
    }
    Ok(())
}

/// Opens letter `id` again after the broker did not take its edited command.
async fn give_back(conn: &mut PgConn, id: i64) -> Result<(), EditError> {
    diesel::update(d::dead_letters.find(id))
        .set((
            d::state.eq(State::Open),
            d::edited_into.eq(None::<String>),
            d::state_changed_at.eq(Utc::now()),
        ))
        .execute(conn)
        .await
        .map_err(StoreError::from)?;
    Ok(())
}

/// The body with the changes applied, and the changed fields before and after. Numbers keep
/// the text they were written with: an amount is never read as a float.
fn edited_body(
    body: &[u8],
    changes: &BTreeMap<String, Box<RawValue>>,
) -> Result<(Vec<u8>, serde_json::Value, serde_json::Value), EditError> {
    if changes.is_empty() {
        return Err(EditError::Invalid(format!(
            "nothing to change: give at least one of {}",
            EDITABLE.join(", ")
        )));
    }
    if let Some(field) = changes.keys().find(|f| !EDITABLE.contains(&f.as_str())) {
        return Err(EditError::Invalid(format!(
            "{}: not a field an edit may change (only {})",
            crate::text::visible(field),
            EDITABLE.join(", ")
        )));
    }
    // A body that is not a JSON object (the letter was refused for that) starts empty: the edit
    // then has to give every field the command needs.
    let mut fields: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(body).unwrap_or_default();
    let (mut before, mut after) = (serde_json::Map::new(), serde_json::Map::new());
    for (field, value) in changes {
        let old = fields.get(field).map(|v| v.get().to_owned());
        before.insert(field.clone(), json_of(old.as_deref()));
        if value.get() == "null" {
            fields.remove(field);
        } else {
            fields.insert(field.clone(), value.clone());
        }
        after.insert(field.clone(), json_of(Some(value.get())));
    }
    let body = serde_json::to_vec(&fields).map_err(anyhow::Error::from)?;
    Ok((body, before.into(), after.into()))
}

/// A field's value for the audit entry: an amount as text (its exact digits), the rest as JSON.
fn json_of(raw: Option<&str>) -> serde_json::Value {
    match raw.map(serde_json::from_str::<serde_json::Value>) {
        Some(Ok(serde_json::Value::Number(_))) => {
            serde_json::Value::String(raw.unwrap_or_default().to_owned())
        }
        Some(Ok(value)) => value,
        _ => serde_json::Value::Null,
    }
}

/// The id the edited command is sent as: the original's base id (without an earlier edit's
/// suffix) with `~edit` and the next edit number no command has yet.
async fn successor_id(conn: &mut PgConn, original: &str) -> Result<String, EditError> {
    use crate::store::schema::payment_link_commands::dsl as c;
    let (base, first) = first_edit_number(original);
    let mut number = first.ok_or_else(|| no_free_number(original))?;
    for _ in 0..1000 {
        let id = format!("{base}~edit{number}");
        let used: i64 = c::payment_link_commands
            .filter(c::command_id.eq(&id))
            .count()
            .get_result(conn)
            .await
            .map_err(StoreError::from)?;
        let named: i64 = d::dead_letters
            .filter(d::edited_into.eq(&id))
            .count()
            .get_result(conn)
            .await
            .map_err(StoreError::from)?;
        if used == 0 && named == 0 {
            CommandId::parse(&id).map_err(|e| EditError::Invalid(e.0))?;
            return Ok(id);
        }
        number = number
            .checked_add(1)
            .ok_or_else(|| no_free_number(original))?;
    }
    Err(no_free_number(original))
}

/// The base id and the first edit number to try: one after an earlier edit's, or 1. `None` when
/// the earlier number is the largest there is (the id comes off the wire, so it may be).
fn first_edit_number(original: &str) -> (&str, Option<u32>) {
    match original.rsplit_once("~edit") {
        Some((base, n)) => match n.parse::<u32>() {
            Ok(earlier) => (base, earlier.checked_add(1)),
            Err(_) => (original, Some(1)),
        },
        None => (original, Some(1)),
    }
}

fn no_free_number(original: &str) -> EditError {
    EditError::Invalid(format!("no free edit number for {original}"))
}

/// The edited command as it is published: the stored original's properties under the new id,
/// its carried headers (not the rounds' counters: a new command starts afresh), and
/// `x-edited-from`.
async fn new_command(
    settings: &Settings,
    conn: &mut PgConn,
    letter: &store::Stored,
    properties: &lapin::BasicProperties,
    command_id: &str,
    body: Vec<u8>,
) -> Result<OutboundMessage, EditError> {
    let marks = crate::marks::Marks::load(settings, conn).await?;
    let carried = crate::intake::carried(
        properties.headers().as_ref(),
        &settings.broker.carried_headers,
    );
    let mut kept = lapin::types::FieldTable::default();
    for (name, value) in carried.inner() {
        let counter = [
            headers::ATTEMPTS,
            headers::DELAY_ROUND,
            headers::REPLAY_COUNT,
        ]
        .contains(&name.as_str());
        if !counter {
            kept.insert(name.clone(), value.clone());
        }
    }
    kept.insert(
        headers::EDITED_FROM.into(),
        headers::text(&letter.command_id),
    );
    marks.sign_counters(&mut kept, command_id);
    Ok(OutboundMessage {
        exchange: letter.original_exchange.clone(),
        routing_key: letter.original_routing_key.clone(),
        properties: messages::routed_elsewhere_removed(properties)
            .with_message_id(command_id.into())
            .with_headers(kept),
        body,
    })
}

/// Publishes `copy` on a channel of its own and waits for the broker's confirm.
async fn send(settings: &Settings, run_id: i64, copy: &OutboundMessage) -> ReplayOutcome {
    let timeout = Duration::from_millis(settings.broker.publish_timeout_ms);
    let name = format!("payment-link-worker edit {run_id}");
    let mut channel = match ReplayChannel::open(&settings.broker, name).await {
        Ok(channel) => channel,
        Err(e) => return ReplayOutcome::Failed(format!("{e:#}")),
    };
    let outcome = match channel.usable().await {
        Ok(open) => publish_one(&open, copy, timeout).await,
        Err(why) => ReplayOutcome::Failed(why),
    };
    channel.close(timeout).await;
    outcome
}

/// The run of one that sends an edited command.
fn one_run(request: &EditRequest, id: i64, command_id: &str) -> replay_runs::NewReplayRun {
    replay_runs::NewReplayRun {
        requested_by: request.requested_by.clone(),
        filter_kind: None,
        filter_command_id: None,
        max_count: Some(1),
        rate_per_second: None,
        dry_run: false,
        source: request.source.clone(),
        filter: Some(serde_json::json!({ "edit": id, "sentAs": command_id })),
        state: replay_runs::RunState::Running,
        total: 1,
        accept_duplicate_risk: false,
        guard: (&super::guard::GuardRequest::off().resolve(1)).into(),
    }
}

fn audit_entry(request: &EditRequest, edited: &Edited, reason: &str) -> audit::NewEntry {
    let reason: String = reason.chars().take(REASON_CHARS).collect();
    audit::NewEntry {
        actor: request.requested_by.clone(),
        source: request.source.clone(),
        action: "edit".into(),
        filter: None,
        count: 1,
        ids: vec![edited.dead_letter_id],
        run_id: Some(edited.job_id),
        client_address: request.client_address.clone(),
        detail: Some(serde_json::json!({
            "reason": reason,
            "editedFrom": edited.edited_from,
            "sentAs": edited.command_id,
            "before": edited.before,
            "after": edited.after,
        })),
    }
}

/// An edit's audit detail as a viewer sees it: the personal fields' values masked.
pub fn masked(detail: &serde_json::Value) -> serde_json::Value {
    let mut detail = detail.clone();
    for side in ["before", "after"] {
        if let Some(fields) = detail.get_mut(side).and_then(|v| v.as_object_mut()) {
            for field in PERSONAL {
                if let Some(value) = fields.get_mut(field)
                    && !value.is_null()
                {
                    *value = serde_json::Value::String("(masked)".into());
                }
            }
        }
    }
    detail
}

/// Reads `--set field=value`: the value as JSON when it is JSON (a number keeps its digits),
/// else as a JSON string.
pub fn parse_setting(text: &str) -> Result<(String, Box<RawValue>), String> {
    let (field, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not FIELD=VALUE"))?;
    let raw = RawValue::from_string(value.to_owned())
        .or_else(|_| RawValue::from_string(serde_json::Value::String(value.to_owned()).to_string()))
        .map_err(|e| e.to_string())?;
    Ok((field.to_owned(), raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(pairs: &[&str]) -> BTreeMap<String, Box<RawValue>> {
        pairs.iter().map(|p| parse_setting(p).unwrap()).collect()
    }

    #[test]
    fn an_edit_number_follows_the_last_and_never_overflows() {
        assert_eq!(first_edit_number("inv-1"), ("inv-1", Some(1)));
        assert_eq!(first_edit_number("inv-1~edit3"), ("inv-1", Some(4)));
        assert_eq!(first_edit_number("inv-1~editx"), ("inv-1~editx", Some(1)));
        assert_eq!(first_edit_number("inv-1~edit4294967295"), ("inv-1", None));
        assert!(
            no_free_number("a")
                .to_string()
                .contains("no free edit number for a")
        );
    }

    #[test]
    fn an_edit_changes_only_the_fields_given_and_keeps_an_amounts_digits() {
        let body = br#"{"paymentProviderId":1,"amountInMajorCurrency":10.10,"description":"x","emailAddress":"bad"}"#;
        let (new, before, after) = edited_body(
            body,
            &changes(&[
                "emailAddress=ok@example.com",
                "amountInMajorCurrency=12345678901234567.89",
            ]),
        )
        .unwrap();
        let text = String::from_utf8(new).unwrap();
        assert!(
            text.contains(r#""amountInMajorCurrency":12345678901234567.89"#),
            "{text}"
        );
        assert!(
            text.contains(r#""emailAddress":"ok@example.com""#),
            "{text}"
        );
        assert!(text.contains(r#""description":"x""#), "{text}");
        assert_eq!(before["amountInMajorCurrency"], "10.10");
        assert_eq!(before["emailAddress"], "bad");
        assert_eq!(after["amountInMajorCurrency"], "12345678901234567.89");
        let (removed, _, after) = edited_body(body, &changes(&["emailAddress=null"])).unwrap();
        assert!(!String::from_utf8(removed).unwrap().contains("emailAddress"));
        assert!(after["emailAddress"].is_null());
    }

    #[test]
    fn an_edit_of_anything_but_the_body_fields_is_refused_naming_it() {
        for bad in [&["messageId=x"][..], &[]] {
            let refused = edited_body(b"{}", &changes(bad)).unwrap_err().to_string();
            assert!(refused.contains("paymentProviderId"), "{refused}");
        }
        let refused = edited_body(b"{}", &changes(&["replayCount=1"]))
            .unwrap_err()
            .to_string();
        assert!(refused.starts_with("replayCount: not a field"), "{refused}");
    }

    #[test]
    fn viewers_see_personal_values_masked() {
        let detail = serde_json::json!({
            "before": { "emailAddress": "a@b.c", "invoiceId": 1 },
            "after": { "emailAddress": "d@e.f", "description": null },
        });
        let seen = masked(&detail);
        assert_eq!(seen["before"]["emailAddress"], "(masked)");
        assert_eq!(seen["after"]["emailAddress"], "(masked)");
        assert_eq!(seen["before"]["invoiceId"], 1);
        assert!(seen["after"]["description"].is_null());
    }
}
