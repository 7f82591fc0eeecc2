//! A replay job with live progress (the script polls the API every half second).

use super::{Shown, layout};
use crate::console::Console;
use crate::console::auth::Caller;
use crate::console::reply;
use crate::console::views::JobView;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maud::html;

/// Most characters of a job's filter shown.
const SHOWN_FILTER_CHARS: usize = 2000;

pub(super) async fn page(
    caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
) -> Response {
    let job = match JobView::load(&console, id).await {
        Ok(Some(job)) => job,
        Ok(None) => return layout::not_found(&caller, "No replay job has this id").into_response(),
        Err(e) => return reply::internal(e),
    };
    let filter = job
        .filter
        .as_ref()
        .map(|f| f.to_string())
        .unwrap_or_default();
    let filter = crate::headers::excerpt(&filter, SHOWN_FILTER_CHARS);
    let content = html! {
        h1 { "Replay job " (id) }
        div id="job" data-id=(id) {}
        div.progress { div id="bar" {} }
        dl {
            dt { "State" } dd id="state" { (Shown(&job.state)) }
            dt { "Total" } dd id="total" { (job.total) }
            dt { "Replayed" } dd id="replayed" { (job.replayed) }
            dt { "Failed" } dd id="failed" { (job.failed) }
            dt { "Skipped (not replayable)" } dd id="skipped" { (job.skipped) }
            dt { "Requested by" } dd { (Shown(&job.requested_by)) }
            dt { "Filter" } dd { code { (Shown(&filter)) } }
            dt { "Rate" } dd {
                @match job.rate { Some(rate) => { (rate) " per second" }, None => "no limit" }
            }
        }
        p { a href="/dead-letters?state=open" { "Back to the open dead letters" } }
    };
    layout::signed_in(&caller, &format!("Replay job {id}"), content).into_response()
}
