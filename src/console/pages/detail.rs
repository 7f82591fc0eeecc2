//! One dead letter: why it failed, its ids, its original message (properties, headers and the
//! body pretty-printed without touching a digit), its replays, and the actions an operator may
//! take on it.

use super::{Shown, kind_badge, layout, state_badge, when};
use crate::console::Console;
use crate::console::auth::{Caller, Role};
use crate::console::reply;
use crate::console::reply::Path;
use crate::console::views::DeadLetterView;
use crate::dead_letters::State as LetterState;
use crate::dead_letters::targets::exchange_name;
use crate::text::pretty_json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};

/// A field of a definition list: its name and its value (or a dash).
fn field(name: &str, value: Option<String>) -> Markup {
    html! { dt { (name) } dd { @match &value { Some(v) => (Shown(v)), None => "–" } } }
}

/// The warnings and actions above the details.
fn notices(caller: &Caller, letter: &DeadLetterView) -> Markup {
    let id = letter.id;
    html! {
        @if letter.fails_again {
            p.warn { "Replayed as it is, this command fails the same way again: its body or id is what was wrong. Edit it below, or send a corrected command." }
        }
        @if letter.duplicate_risk {
            p.warn { "Its first provider call is older than the provider's idempotency window: a replay may create a second payment link." }
        }
        @if let Some(why) = &letter.not_replayable_because {
            p.warn id="not-replayable" {
                "Not replayable: " (Shown(why)) ". A replay skips it; archive it, or send a corrected command."
            }
        }
        @if caller.role == Role::Operator && letter.state == LetterState::Open {
            div.actions {
                @if letter.replayable {
                    button data-act="replay" data-ids={ "[" (id) "]" } id="replay-one" { "Replay" }
                }
                button.secondary data-act="archive" data-ids={ "[" (id) "]" } id="archive-one" { "Archive" }
            }
            @if letter.replayable {
                (edit_form(letter))
            }
        }
    }
}

/// The form that fixes the command's fields and sends it as a new command: each field shows
/// its value as JSON (a number with its digits); a value that is not JSON is taken as text.
fn edit_form(letter: &DeadLetterView) -> Markup {
    let current: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> = letter
        .original
        .text
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    html! {
        details id="edit" {
            summary { "Edit and send as a new command" }
            p.muted { "Only the command's fields change. It is checked as the worker checks a command, then sent under a new command id (so the provider sees a new Idempotency-Key); this dead letter becomes edited." }
            form id="edit-form" data-id=(letter.id) {
                dl {
                    @for name in crate::dead_letters::edit::EDITABLE {
                        @let value = current.get(name).map(|v| v.get().to_owned()).unwrap_or_default();
                        dt { label for={ "edit-" (name) } { (name) } }
                        dd { input id={ "edit-" (name) } name=(name) size="40" value=(value) data-initial=(value); }
                    }
                    dt { label for="edit-reason" { "Why (kept in the audit log)" } }
                    dd { input id="edit-reason" name="reason" size="40" required; }
                }
                button id="edit-send" type="submit" { "Send the edited command" }
            }
        }
    }
}

/// Why it failed, and the ids it carries.
fn why(letter: &DeadLetterView) -> Markup {
    let text = |v: &Option<String>| v.clone();
    let number = |v: Option<i64>| v.map(|v| v.to_string());
    html! {
        h2 { "Why" }
        dl {
            (field("Error", Some(letter.error_message.clone())))
            (field("HTTP status", letter.http_status.map(|v| v.to_string())))
            (field("Provider answer", text(&letter.error_body)))
            (field("Provider calls", letter.attempts.map(|v| v.to_string())))
            (field("Replays of its command before it failed", Some(letter.replay_count.to_string())))
            (field("Command id", Some(letter.command_id.clone())))
            (field("Trace id", text(&letter.trace_id)))
            (field("Provider id", number(letter.provider_id)))
            (field("Invoice id", number(letter.invoice_id)))
            (field("Ad hoc invoice id", number(letter.adhoc_invoice_id)))
            (field("Customer id", number(letter.customer_id)))
            (field("Description", text(&letter.description)))
            (field("E-mail", text(&letter.email)))
            (field("Stored with changes", text(&letter.stored_with_changes)))
            dt { "Failed" } dd { (when(letter.failed_at)) }
            @if let Some(previous) = letter.previous_id {
                dt { "Replayed from" } dd { a href={ "/dead-letters/" (previous) } { "dead letter " (previous) } }
            }
            @if let Some(from) = &letter.edits.edited_from {
                (field("Edited from command", Some(from.clone())))
            }
            @if let Some(into) = &letter.edits.edited_into {
                dt { "Edited, sent as command" }
                dd id="edited-into" {
                    (Shown(into)) " (" (letter.edits.edited_outcome.as_deref().unwrap_or("pending")) ")"
                }
            }
        }
    }
}

/// Most bytes of a body the page shows.
const SHOWN_BODY_BYTES: usize = 64 * 1024;

/// The original message and the replays.
fn original(letter: &DeadLetterView) -> Markup {
    let original = &letter.original;
    // A large body is shown by its start, with the whole of it a download away.
    let shown_bytes = original.body_bytes.min(SHOWN_BODY_BYTES);
    let body = match &original.text {
        Some(text) if text.len() > SHOWN_BODY_BYTES => {
            crate::headers::excerpt(text, SHOWN_BODY_BYTES)
        }
        Some(text) => pretty_json(text).unwrap_or_else(|| text.clone()),
        None => format!("({} bytes, not UTF-8)", original.body_bytes),
    };
    html! {
        h2 { "Original message" }
        dl {
            (field("Exchange", Some(exchange_name(&original.exchange))))
            (field("Routing key", Some(original.routing_key.clone())))
        }
        details open { summary { "Properties" } pre { (Shown(&pretty(&original.properties))) } }
        details open { summary { "Headers" } pre id="headers" { (Shown(&pretty(&original.headers))) } }
        details open {
            summary { "Body (" (original.body_bytes) " bytes)" }
            @if shown_bytes < original.body_bytes {
                p id="body-cut" {
                    "The first " (shown_bytes) " of " (original.body_bytes) " bytes: "
                    a href={ "/api/dead-letters/" (letter.id) "/body" } download { "download the whole body" }
                }
            }
            pre id="body" { (Shown(&body)) }
        }
        h2 { "Replays" }
        table {
            tr { th { "Run" } th { "When" } th { "Outcome" } }
            @for replay in &letter.replays {
                tr {
                    td { a href={ "/replays/" (replay.run_id) } { (replay.run_id) } }
                    td { (when(replay.replayed_at)) }
                    td { (Shown(&replay.outcome)) }
                }
            }
        }
    }
}

/// A value as indented JSON.
fn pretty<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

pub(super) async fn page(
    caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
) -> Response {
    let letter = match crate::console::views::dead_letter(&console, id).await {
        Ok(Some(letter)) => letter,
        Ok(None) => {
            return layout::not_found(&caller, "No dead letter has this id").into_response();
        }
        Err(e) => return reply::internal(e),
    };
    let content = html! {
        h1 { "Dead letter " (id) " " (kind_badge(letter.kind.as_str())) " " (state_badge(letter.state.as_str())) }
        (notices(&caller, &letter))
        (why(&letter))
        (original(&letter))
    };
    layout::signed_in(&caller, &format!("Dead letter {id}"), content).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_indented_without_touching_a_digit() {
        let body = r#"{"amountInMajorCurrency":3.00,"d":"a, {b}: \"c\"","e":[],"f":{"g":[1,2e3]}}"#;
        let pretty = pretty_json(body).unwrap();
        assert!(
            pretty.contains("\"amountInMajorCurrency\": 3.00,"),
            "{pretty}"
        );
        assert!(pretty.contains(r#""d": "a, {b}: \"c\"""#), "{pretty}");
        assert!(pretty.contains("\"e\": []"), "{pretty}");
        assert!(pretty.contains("2e3"), "{pretty}");
        let compact: String = pretty.split_whitespace().collect();
        let original: String = body.split_whitespace().collect();
        assert_eq!(compact.replace(": ", ":"), original.replace(": ", ":"));
        assert_eq!(pretty_json("not json"), None);
    }
}
