//! A replay run with live progress (the script polls the API every half second).

use super::{Shown, layout};
use crate::console::Console;
use crate::console::auth::Caller;
use crate::console::reply;
use crate::console::reply::Path;
use crate::dead_letters::guard::{Guard, Settled};
use crate::store::replay_runs::RunState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::html;

/// The guard in words.
fn guard_text(guard: &Guard) -> String {
    let canary = match guard.canary {
        0 => "no canary".to_owned(),
        n => format!(
            "{n} canary letter(s) first, up to {} s",
            guard.canary_wait_ms / 1000
        ),
    };
    let ratio = guard.max_failure_ratio.map_or(String::new(), |r| {
        format!(
            "; stops when {r} of the last {} settled fail again",
            guard.failure_window
        )
    });
    let count = guard
        .stop_after_failures
        .map_or(String::new(), |n| format!("; stops after {n} fail again"));
    format!("{canary}{ratio}{count}")
}

/// Most characters of a run's filter shown.
const SHOWN_FILTER_CHARS: usize = 2000;

pub(super) async fn page(
    caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
) -> Response {
    let run = match crate::console::views::replay_run(&console, id).await {
        Ok(Some(run)) => run,
        Ok(None) => return layout::not_found(&caller, "No replay run has this id").into_response(),
        Err(e) => return reply::internal(e),
    };
    let filter = run
        .filter
        .as_ref()
        .map(|f| f.to_string())
        .unwrap_or_default();
    let filter = crate::headers::excerpt(&filter, SHOWN_FILTER_CHARS);
    let tally = run.outcomes.unwrap_or_default();
    let failed_again = run.failed_again.clone().unwrap_or_default();
    let content = html! {
        h1 { "Replay run " (id) }
        div id="job" data-id=(id) {}
        div.progress { div id="bar" {} }
        dl {
            dt { "State" } dd id="state" { (run.state.as_str()) }
            dt { "Total" } dd id="total" { (run.total) }
            dt { "Replayed" } dd id="replayed" { (run.replayed) }
            dt { "Failed" } dd id="failed" { (run.failed) }
            dt { "Skipped (not replayable, or failing again)" } dd id="skipped" { (run.skipped) }
            dt { "Requested by" } dd { (Shown(&run.requested_by)) }
            dt { "Filter" } dd { code { (Shown(&filter)) } }
            dt { "Rate" } dd {
                @match run.rate { Some(rate) => { (rate) " per second" }, None => "no limit" }
                @if let Some(start) = run.guard.start_rate { ", starting at " (start) " and doubling every 10 s" }
            }
            dt { "Guard" } dd { (guard_text(&run.guard)) }
            dt { "Succeeded" } dd id="succeeded" { (tally.succeeded) }
            dt { "Failed again" } dd id="failed-again" { (tally.failed_again) }
            dt { "Pending" } dd id="pending" { (tally.pending) }
            dt { "Stopped because" } dd id="stop-reason" { (Shown(run.stop_reason.as_deref().unwrap_or(""))) }
        }
        @if caller.role == crate::config::Role::Operator {
            button id="resume" data-id=(id) hidden[run.state != RunState::Stopped] { "Resume: send the letters it left open" }
        }
        @if !failed_again.is_empty() {
            h2 { "Failed again" }
            table {
                tr { th { "Dead letter" } th { "Command" } th { "Why" } }
                @for letter in failed_again {
                    tr {
                        td { a href={ "/dead-letters/" (letter.dead_letter_id) } { (letter.dead_letter_id) } }
                        td { (Shown(&letter.command_id)) }
                        td { @if let Settled::FailedAgain(kind) = &letter.settled { (Shown(kind)) } }
                    }
                }
            }
        }
        p { a href="/dead-letters?state=open" { "Back to the open dead letters" } }
    };
    layout::signed_in(&caller, &format!("Replay run {id}"), content).into_response()
}
