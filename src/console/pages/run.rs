//! A replay run with live progress (the script polls the API every half second).

use super::{Shown, layout};
use crate::console::Console;
use crate::console::auth::Caller;
use crate::console::reply;
use crate::console::views::ReplayRunView;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maud::html;

/// Most characters of a run's filter shown.
const SHOWN_FILTER_CHARS: usize = 2000;

pub(super) async fn page(
    caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
) -> Response {
    let run = match ReplayRunView::load(&console, id).await {
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
            }
        }
        p { a href="/dead-letters?state=open" { "Back to the open dead letters" } }
    };
    layout::signed_in(&caller, &format!("Replay run {id}"), content).into_response()
}
