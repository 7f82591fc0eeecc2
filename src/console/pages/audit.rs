//! The audit log, a page at a time, each entry with at most [`LISTED_IDS`] ids and
//! [`LISTED_FILTER_CHARS`] characters of its filter and a link to the whole entry; the newest
//! replay runs under the first page.

use super::{Shown, layout, when};
use crate::console::Console;
use crate::console::api::{AUDIT_PAGE, AuditQuery};
use crate::console::auth::Caller;
use crate::console::reply;
use crate::console::reply::{Path, Query};
use crate::store::{audit, replay_runs};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde_json::Value;

/// Most characters of an entry's filter a list shows; the whole is on the entry's own page.
const LISTED_FILTER_CHARS: usize = 300;
/// Ids an entry shows in the list.
const LISTED_IDS: usize = 20;

/// Who acted, from where.
fn source_and_address(e: &audit::Entry) -> Markup {
    html! {
        (Shown(&e.source))
        @if let Some(address) = &e.client_address { " from " (Shown(address)) }
    }
}

fn run_link(run: Option<i64>) -> Markup {
    html! { @if let Some(r) = run { a href={ "/replays/" (r) } { (r) } } }
}

/// One entry as a row of the list.
fn row(e: &audit::Entry) -> Markup {
    let filter = e.filter.as_ref().map(Value::to_string).unwrap_or_default();
    let long = filter.chars().count() > LISTED_FILTER_CHARS;
    let filter: String = filter.chars().take(LISTED_FILTER_CHARS).collect();
    let whole = html! { a href={ "/audit/" (e.id) } { "the whole entry" } };
    html! {
        tr {
            td { (when(e.at)) }
            td { (Shown(&e.actor)) }
            td { (source_and_address(e)) }
            td { (Shown(&e.action)) }
            td { (e.count) }
            td { code { (Shown(&filter)) } @if long { " … (" (whole) ")" } }
            td { (run_link(e.run_id)) }
            td {
                @for id in e.ids.iter().take(LISTED_IDS) {
                    a href={ "/dead-letters/" (id) } { (id) } " "
                }
                @if e.ids.len() > LISTED_IDS {
                    "… and " (e.ids.len() - LISTED_IDS) " more (" (whole) ")"
                }
            }
        }
    }
}

fn runs_table(runs: &[replay_runs::ReplayRun]) -> Markup {
    html! {
        h2 { "Replay runs" }
        table {
            tr {
                th { "Run" } th { "Started" } th { "By" } th { "State" } th { "Total" }
                th { "Replayed" } th { "Failed" } th { "Skipped" }
            }
            @for r in runs {
                tr {
                    td { (run_link(Some(r.id))) @if r.dry_run { " (dry run)" } }
                    td { (when(r.started_at)) }
                    td { (Shown(&r.requested_by)) }
                    td { (r.state.as_str()) }
                    td { (r.total) } td { (r.replayed) } td { (r.failed) } td { (r.skipped) }
                }
            }
        }
    }
}

pub(super) async fn page(
    caller: Caller,
    State(console): State<Console>,
    Query(query): Query<AuditQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(50).clamp(1, AUDIT_PAGE);
    let found = async {
        let mut conn = console.pool.get().await?;
        let entries = audit::page(&mut conn, limit, query.before).await?;
        let runs = match query.before {
            None => replay_runs::newest(&mut conn, 50).await?,
            Some(_) => Vec::new(),
        };
        Ok::<_, crate::store::StoreError>((entries, runs))
    };
    let (entries, runs) = match found.await {
        Ok(found) => found,
        Err(e) => return reply::internal(e),
    };
    let older = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    let content = html! {
        h1 { "Audit" }
        table id="audit" {
            tr {
                th { "When" } th { "Who" } th { "From" } th { "Action" } th { "Count" }
                th { "Filter" } th { "Run" } th { "Ids" }
            }
            @for e in &entries { (row(e)) }
        }
        @if let Some(before) = older {
            p { a id="older" href={ "/audit?before=" (before) } { "Older entries →" } }
        }
        @if !runs.is_empty() { (runs_table(&runs)) }
    };
    layout::signed_in(&caller, "Audit", content).into_response()
}

pub(super) async fn entry(
    caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
) -> Response {
    let found = crate::store::with_conn(&console.pool, async |conn| audit::find(conn, id).await);
    let e = match found.await {
        Ok(Some(entry)) => entry,
        Ok(None) => {
            return layout::not_found(&caller, "No audit entry has this id").into_response();
        }
        Err(e) => return reply::internal(e),
    };
    let filter = e
        .filter
        .as_ref()
        .map(|f| serde_json::to_string_pretty(f).unwrap_or_default())
        .unwrap_or_default();
    let ids: Vec<String> = e.ids.iter().map(i64::to_string).collect();
    let content = html! {
        h1 { "Audit entry " (id) }
        dl {
            dt { "When" } dd { (when(e.at)) }
            dt { "Who" } dd { (Shown(&e.actor)) }
            dt { "From" } dd { (source_and_address(&e)) }
            dt { "Action" } dd { (Shown(&e.action)) }
            dt { "Count" } dd { (e.count) }
            dt { "Run" } dd { (run_link(e.run_id)) }
        }
        h2 { "Filter" }
        pre { (Shown(&filter)) }
        h2 { "Ids (" (ids.len()) ")" }
        pre id="ids" { (ids.join(" ")) }
        p { a href="/audit" { "Back to the audit log" } }
    };
    layout::signed_in(&caller, &format!("Audit entry {id}"), content).into_response()
}
