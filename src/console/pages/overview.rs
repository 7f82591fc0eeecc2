//! The overview: counts by state and kind, the oldest open failure, failures per hour.

use super::{kind_badge, layout, when};
use crate::console::Console;
use crate::console::auth::Caller;
use crate::console::reply;
use crate::dead_letters::State as LetterState;
use crate::dead_letters::store;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::html;

pub(super) async fn page(caller: Caller, State(console): State<Console>) -> Response {
    let figures = crate::store::with_conn(&console.pool, async |conn| store::overview(conn).await);
    let overview = match figures.await {
        Ok(o) => o,
        Err(e) => return reply::internal(e),
    };
    let peak = overview
        .last_24_hours
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let content = html! {
        h1 { "Overview" }
        div.cards {
            @for state in LetterState::ALL.map(LetterState::as_str) {
                a.card href={ "/dead-letters?state=" (state) } {
                    b id={ "count-" (state) } { (overview.by_state.get(state).copied().unwrap_or(0)) }
                    (state)
                }
            }
        }
        h2 { "Oldest open failure" }
        p { @match overview.oldest_open { Some(t) => (when(t)), None => "none" } }
        h2 { "Open, by kind" }
        table {
            tr { th { "Kind" } th { "Open" } th { "All" } }
            @for (kind, all) in &overview.by_kind {
                tr {
                    td {
                        a href={ "/dead-letters?" (serde_urlencoded::to_string([("state", "open"), ("kind", kind.as_str())]).unwrap_or_default()) } {
                            (kind_badge(kind))
                        }
                    }
                    td { (overview.open_by_kind.get(kind).copied().unwrap_or(0)) }
                    td { (all) }
                }
            }
        }
        h2 { "Failures per hour, last 24 hours" }
        // Heights as data attributes: the content security policy runs no inline style.
        div.bars {
            @for n in &overview.last_24_hours {
                div data-h=(n * 100 / peak) title=(n) {}
            }
        }
    };
    layout::signed_in(&caller, "Overview", content).into_response()
}
