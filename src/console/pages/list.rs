//! The dead-letter list: every filter the CLI has (done by the database), keyset pagination, a
//! checkbox per row, and the bulk actions for operators. Its columns are one table
//! ([`COLUMNS`]) that feeds both the header and the cells.

use super::{Shown, kind_badge, layout, or_dash, state_badge, when};
use crate::console::Console;
use crate::console::auth::{Caller, Role};
use crate::console::query::ListQuery;
use crate::console::reply;
use crate::console::reply::Query;
use crate::dead_letters::store;
use crate::dead_letters::targets::ReplayTargets;
use crate::dead_letters::{Kind, Listed, State as LetterState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};

/// A column of the list: its title and how a row fills its cell.
struct Column {
    title: &'static str,
    cell: fn(&Listed) -> Markup,
}

/// The list's columns, in order (after the selection checkbox).
const COLUMNS: [Column; 11] = [
    Column {
        title: "Id",
        cell: |l| html! { a href={ "/dead-letters/" (l.id) } { (l.id) } },
    },
    Column {
        title: "State",
        cell: |l| {
            html! {
                (state_badge(l.state.as_str()))
                @if let Some(why) = &l.not_replayable_because {
                    " " span.not-replayable title=(Shown(why)) { "not replayable" }
                }
            }
        },
    },
    Column {
        title: "Kind",
        cell: |l| kind_badge(l.kind.as_str()),
    },
    Column {
        title: "Command id",
        cell: |l| {
            html! {
                a href={ "/dead-letters/" (l.id) } {
                    @if l.command_id.is_empty() { "(no message_id)" } @else { (Shown(&l.command_id)) }
                }
            }
        },
    },
    Column {
        title: "HTTP",
        cell: |l| html! { (or_dash(l.http_status)) },
    },
    Column {
        title: "Attempts",
        cell: |l| html! { (or_dash(l.attempts)) },
    },
    Column {
        title: "Failed",
        cell: |l| when(l.failed_at),
    },
    Column {
        title: "Replays",
        cell: |l| html! { (l.times_replayed) },
    },
    Column {
        title: "Invoice",
        cell: |l| html! { (or_dash(l.invoice_id)) },
    },
    Column {
        title: "Customer",
        cell: |l| html! { (or_dash(l.customer_id)) },
    },
    Column {
        title: "Why",
        cell: |l| html! { (Shown(&l.error_message)) },
    },
];

/// The select options of a filter, `chosen` selected; the first is "any".
fn options(values: &[&str], chosen: Option<&str>) -> Markup {
    html! {
        option value="" { "any" }
        @for v in values { option selected[chosen == Some(*v)] { (v) } }
    }
}

/// The filter form; field values are sent back as they are.
fn filters(query: &ListQuery) -> Markup {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    html! {
        form.filters method="get" action="/dead-letters" {
            label { "Kind" select name="kind" id="kind" { (options(&Kind::ALL.map(Kind::as_str), query.kind.as_deref())) } }
            label { "State" select name="state" id="state" { (options(&LetterState::ALL.map(LetterState::as_str), query.state.as_deref())) } }
            label { "Search (id, description, e-mail)" input name="q" id="q" value=(text(&query.q)); }
            label { "Provider id" input name="providerId" size="6" value=(text(&query.provider_id)); }
            label { "Invoice id" input name="invoiceId" size="8" value=(text(&query.invoice_id)); }
            label { "Customer id" input name="customerId" size="8" value=(text(&query.customer_id)); }
            label { "Failed since (UTC)" input name="since" placeholder="2026-12-01T00:00:00Z" value=(text(&query.since)); }
            label { "until" input name="until" placeholder="2026-12-02T00:00:00Z" value=(text(&query.until)); }
            button id="apply" { "Filter" }
        }
    }
}

/// The operator's bulk actions on the selection or on everything that matches.
fn actions(filter_json: &str, matching: i64) -> Markup {
    html! {
        div.actions {
            button data-act="replay" id="replay-selected" { "Replay selected" }
            button.secondary data-act="archive" id="archive-selected" { "Archive selected" }
            button data-act="replay" data-scope="all" data-count=(matching) data-filter=(filter_json) id="replay-all" {
                "Replay all " (matching) " matching"
            }
            button.secondary data-act="archive" data-scope="all" data-count=(matching) data-filter=(filter_json) id="archive-all" {
                "Archive all " (matching) " matching"
            }
            label.muted { "at most " input id="rate" size="4" placeholder="∞"; " per second" }
            label.muted { ", starting at " input id="start-rate" size="4" placeholder="rate"; " (doubling every 10 s)" }
            label.muted { ", canary " input id="canary" size="3" placeholder="auto"; }
            label.muted { ", stop when " input id="max-failure-ratio" size="4" placeholder="0.5"; " of the last 20 fail again" }
        }
    }
}

pub(super) async fn page(
    caller: Caller,
    State(console): State<Console>,
    Query(query): Query<ListQuery>,
) -> Response {
    let (filter, limit, cursor) = match query.parts() {
        Ok(parts) => parts,
        Err(why) => {
            let content = html! {
                h1 { "Dead letters" }
                p.error { (Shown(&why)) }
                p { a href="/dead-letters" { "Start again" } }
            };
            let page = layout::signed_in(&caller, "Dead letters", content);
            return (StatusCode::BAD_REQUEST, page).into_response();
        }
    };
    let targets = ReplayTargets::new(&console.settings);
    let found = async {
        let mut conn = console.pool.get().await?;
        let (rows, next) = store::page(&mut conn, &filter, limit, cursor).await?;
        let rows = Listed::all(&mut conn, rows, &targets).await?;
        let matching = store::count(&mut conn, &filter).await?;
        Ok::<_, crate::store::StoreError>(((rows, next), matching))
    };
    let ((rows, next), matching) = match found.await {
        Ok(found) => found,
        Err(e) => return reply::internal(e),
    };
    let next = next.map(|next| {
        let mut params = query.params();
        params.push(("cursor", next.encode()));
        serde_urlencoded::to_string(&params).unwrap_or_default()
    });
    let content = html! {
        h1 { "Dead letters " small.muted id="matching" { (matching) " matching" } }
        (filters(&query))
        @if caller.role == Role::Operator {
            (actions(&serde_json::to_string(&filter).unwrap_or_default(), matching))
        }
        table id="letters" {
            tr {
                th { input type="checkbox" id="pick-all" title="select this page"; }
                @for column in &COLUMNS { th { (column.title) } }
            }
            @for row in &rows {
                tr data-id=(row.id) {
                    td { input type="checkbox" class="pick" value=(row.id); }
                    @for column in &COLUMNS {
                        @if column.title == "Why" {
                            td.msg title=(Shown(&row.error_message)) { ((column.cell)(row)) }
                        } @else {
                            td { ((column.cell)(row)) }
                        }
                    }
                }
            }
        }
        @if let Some(next) = next {
            p { a id="next" href={ "/dead-letters?" (next) } { "Next page →" } }
        }
    };
    layout::signed_in(&caller, "Dead letters", content).into_response()
}
