//! The JSON API under `/api/` (described by `src/contract/openapi.json`): what the pages call,
//! and what scripts call with `Authorization: Bearer <token>`.

use super::Console;
use super::auth::Caller;
use super::query::ListQuery;
use super::reply::{Path, Query};
use super::reply::{error, internal};
use super::views::ReplayRunView;
use crate::dead_letters::Listed;
use crate::dead_letters::store;
use crate::dead_letters::targets::ReplayTargets;
use crate::store::replay_runs;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

/// The OpenAPI 3.1 document of this API.
pub const OPENAPI: &str = include_str!("../contract/openapi.json");

mod actions;
mod audit;

pub(super) use audit::{AUDIT_PAGE, AuditQuery};

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/dead-letters", get(list))
        .route("/api/dead-letters/summary", get(summary))
        .route("/api/dead-letters/archive", post(actions::archive))
        .route("/api/dead-letters/{id}", get(detail))
        .route("/api/dead-letters/{id}/body", get(body))
        .route("/api/dead-letters/{id}/edit", post(actions::edit))
        .route("/api/replays", get(runs).post(actions::replay))
        .route("/api/replays/{id}", get(run))
        .route("/api/replays/{id}/letters", get(run_letters))
        .route("/api/replays/{id}/resume", post(actions::resume))
        .route("/api/audit", get(audit::log))
        .route("/api/audit/{id}", get(audit::entry))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn list(
    _caller: Caller,
    State(console): State<Console>,
    Query(query): Query<ListQuery>,
) -> Response {
    let (filter, limit, cursor) = match query.parts() {
        Ok(parts) => parts,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let targets = ReplayTargets::new(&console.settings);
    let page = crate::store::with_conn(&console.pool, async |conn| {
        let (items, next) = store::page(conn, &filter, limit, cursor).await?;
        Ok::<_, crate::store::StoreError>((Listed::all(conn, items, &targets).await?, next))
    });
    match page.await {
        Ok((items, next)) => Json(json!({
            "items": items,
            "nextCursor": next.map(|c| c.encode()),
        }))
        .into_response(),
        Err(e) => internal(e),
    }
}

async fn summary(_caller: Caller, State(console): State<Console>) -> Response {
    let overview = crate::store::with_conn(&console.pool, async |conn| store::overview(conn).await);
    match overview.await {
        Ok(overview) => Json(overview).into_response(),
        Err(e) => internal(e),
    }
}

async fn detail(_caller: Caller, State(console): State<Console>, Path(id): Path<i64>) -> Response {
    match super::views::dead_letter(&console, id).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no dead letter has this id"),
        Err(e) => internal(e),
    }
}

/// A dead letter's body, whole, as a file to save: the page and the detail show at most its
/// first bytes.
async fn body(_caller: Caller, State(console): State<Console>, Path(id): Path<i64>) -> Response {
    let found = crate::store::with_conn(&console.pool, async |conn| {
        crate::dead_letters::store::get(conn, id).await
    });
    match found.await {
        Ok(Some((row, _))) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"dead-letter-{id}.body\""),
                ),
            ],
            row.letter.body,
        )
            .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no dead letter has this id"),
        Err(e) => internal(e),
    }
}

/// A page of the run's letters: after the previous page's `nextAfter`, at most `limit`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LettersQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

/// What became of the letters a run replayed, in the order it sent them, a page at a time.
async fn run_letters(
    _caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
    Query(query): Query<LettersQuery>,
) -> Response {
    use crate::dead_letters::replay_rows::{LETTERS_PAGE, outcomes_page};
    let limit = query.limit.unwrap_or(LETTERS_PAGE);
    let letters = crate::store::with_conn(&console.pool, async |conn| {
        let run = replay_runs::find(conn, id).await?;
        Ok::<_, crate::store::StoreError>(match run {
            None => None,
            Some(_) => Some(outcomes_page(conn, id, query.after, limit).await?),
        })
    });
    match letters.await {
        Ok(None) => error(StatusCode::NOT_FOUND, "no replay run has this id"),
        Ok(Some((letters, next))) => {
            Json(json!({ "items": letters, "nextAfter": next })).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn run(_caller: Caller, State(console): State<Console>, Path(id): Path<i64>) -> Response {
    match crate::console::views::replay_run(&console, id).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no replay run has this id"),
        Err(e) => internal(e),
    }
}

async fn runs(_caller: Caller, State(console): State<Console>) -> Response {
    let runs = crate::store::with_conn(&console.pool, async |conn| {
        replay_runs::newest(conn, 50).await
    });
    match runs.await {
        Ok(runs) => {
            let items: Vec<ReplayRunView> = runs.iter().map(ReplayRunView::from).collect();
            Json(json!({ "items": items })).into_response()
        }
        Err(e) => internal(e),
    }
}
