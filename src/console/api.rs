//! The JSON API under `/api/` (described by `src/contract/openapi.json`): what the pages call,
//! and what scripts call with `Authorization: Bearer <token>`.

use super::Console;
use super::auth::Caller;
use super::query::{ListQuery, checked};
use super::reply::{error, internal};
use super::views::ReplayRunView;
use crate::dead_letters::store::{self as store, Filter};
use crate::dead_letters::targets::ReplayTargets;
use crate::dead_letters::{self as ops, Listed, ReplayError, ReplayRequest};
use crate::store::{audit, replay_runs};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

/// The OpenAPI 3.1 document of this API.
pub const OPENAPI: &str = include_str!("../contract/openapi.json");

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/dead-letters", get(list))
        .route("/api/dead-letters/summary", get(summary))
        .route("/api/dead-letters/archive", post(archive))
        .route("/api/dead-letters/{id}", get(detail))
        .route("/api/dead-letters/{id}/body", get(body))
        .route("/api/dead-letters/{id}/edit", post(edit))
        .route("/api/replays", get(runs).post(replay))
        .route("/api/replays/{id}", get(run))
        .route("/api/replays/{id}/letters", get(run_letters))
        .route("/api/replays/{id}/resume", post(resume))
        .route("/api/audit", get(audit_log))
        .route("/api/audit/{id}", get(audit_entry))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The slowest replay rate: a job advances at least every 10 s, well within the time after which
/// another console takes a job over.
const MIN_RATE: f64 = 0.1;

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

/// Which dead letters an action applies to: listed ids, or all that match a filter.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Target {
    ids: Option<Vec<i64>>,
    filter: Option<Filter>,
    limit: Option<usize>,
    rate: Option<f64>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    accept_duplicate_risk: bool,
    #[serde(default)]
    include_failing: bool,
    #[serde(default)]
    ask_if_failing: bool,
    /// Letters sent first (a replay only).
    canary: Option<u32>,
    /// How long the canaries may take, in seconds.
    canary_wait_seconds: Option<u64>,
    /// Stop once this many letters failed again.
    stop_after_failures: Option<u32>,
    /// Stop once this share of the last `failureWindow` settled letters failed again.
    max_failure_ratio: Option<f64>,
    /// How many settled letters the ratio is judged over.
    failure_window: Option<u32>,
    /// Replays per second at the start, doubled every 10 s up to `rate`.
    start_rate: Option<f64>,
}

impl Target {
    /// The filter it stands for; `None` unless exactly one of `ids` and `filter` is given.
    fn filter(&self) -> Option<Filter> {
        match (&self.ids, &self.filter) {
            (Some(ids), None) => Some(Filter {
                ids: Some(ids.clone()),
                ..Filter::default()
            }),
            (None, Some(filter)) => Some(filter.clone()),
            _ => None,
        }
    }
}

/// Why an action's body names no dead letters, or names them twice.
const ONE_TARGET: &str = "give either \"ids\" or \"filter\"";

/// An action's request, checked: the caller may act (an operator, with the session's CSRF token
/// from a browser), and the body names its dead letters once.
fn action(
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<Json<Target>, axum::extract::rejection::JsonRejection>,
) -> Result<(Target, Filter), Box<Response>> {
    let refuse = |status: StatusCode, why: &str| Box::new(error(status, why));
    caller
        .may_act(headers)
        .map_err(|refusal| Box::new(refusal.into_response()))?;
    let Json(target) = body.map_err(|rejection| {
        use axum::extract::rejection::{BytesRejection, FailedToBufferBody, JsonRejection};
        let status = match &rejection {
            // The body did not come in time (the server's body deadline) or at all.
            JsonRejection::BytesRejection(BytesRejection::FailedToBufferBody(
                FailedToBufferBody::UnknownBodyError(_),
            )) => StatusCode::REQUEST_TIMEOUT,
            _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        refuse(status, &rejection.body_text())
    })?;
    let filter = target
        .filter()
        .ok_or_else(|| refuse(StatusCode::UNPROCESSABLE_ENTITY, ONE_TARGET))?;
    checked(&filter).map_err(|unusable| refuse(unusable.status(), &unusable.to_string()))?;
    Ok((target, filter))
}

async fn replay(
    caller: Caller,
    State(console): State<Console>,
    headers: HeaderMap,
    body: Result<Json<Target>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (target, filter) = match action(&caller, &headers, body) {
        Ok(action) => action,
        Err(refused) => return *refused,
    };
    if target
        .rate
        .is_some_and(|r| !(r >= MIN_RATE && r.is_finite()))
    {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rate must be at least 0.1 a second (a slower job would look stalled)",
        );
    }
    let request = ReplayRequest {
        filter,
        limit: target.limit,
        dry_run: target.dry_run,
        rate: target.rate,
        accept_duplicate_risk: target.accept_duplicate_risk,
        include_failing: target.include_failing,
        ask_if_failing: target.ask_if_failing,
        requested_by: caller.name.clone(),
        source: "console".into(),
        client_address: caller.address.map(|a| a.to_string()),
        guard: crate::dead_letters::guard::GuardRequest {
            canary: target.canary,
            canary_wait: target
                .canary_wait_seconds
                .map(std::time::Duration::from_secs),
            stop_after_failures: target.stop_after_failures,
            max_failure_ratio: target.max_failure_ratio,
            failure_window: target.failure_window,
            start_rate: target.start_rate,
        },
    };
    let mut conn = match console.pool.get().await {
        Ok(conn) => conn,
        Err(e) => return internal(e),
    };
    match ops::start(&console.settings, &mut conn, &request).await {
        Ok(started) => {
            if !request.dry_run {
                super::spawn_run(&console, started.run_id, request.rate);
            }
            (
                StatusCode::ACCEPTED,
                Json(json!({
                    "jobId": started.run_id,
                    "total": started.ids.len(),
                    "atRisk": started.at_risk.len(),
                    "failAgain": started.fail_again.len(),
                    "skipped": started.skipped.len(),
                    "dryRun": request.dry_run,
                })),
            )
                .into_response()
        }
        Err(ReplayError::DuplicateRisk { count, .. }) => {
            let refused = ReplayError::DuplicateRisk {
                count,
                window_hours: console.settings.provider.idempotency_window_hours,
                first: Vec::new(),
            };
            (
                StatusCode::CONFLICT,
                Json(json!({ "error": refused.to_string(), "atRisk": count })),
            )
                .into_response()
        }
        Err(refused @ ReplayError::FailsAgain { count }) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": refused.to_string(), "failAgain": count })),
        )
            .into_response(),
        Err(ReplayError::Invalid(why)) => error(StatusCode::UNPROCESSABLE_ENTITY, &why),
        Err(ReplayError::Other(e)) => internal(format!("{e:#}")),
    }
}

/// An edit's request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EditBody {
    /// The fields to change and their new values (`null` removes one).
    fields: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>,
    /// Why (required).
    reason: String,
}

/// Fixes a dead letter's command and sends it as a new command (operators only).
async fn edit(
    caller: Caller,
    State(console): State<Console>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Result<Json<EditBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    use crate::dead_letters::edit::{EditError, EditRequest};
    if let Err(refusal) = caller.may_act(&headers) {
        return refusal.into_response();
    }
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            return error(status, &rejection.body_text());
        }
    };
    let request = EditRequest {
        id,
        changes: body.fields,
        reason: body.reason,
        requested_by: caller.name.clone(),
        source: "console".into(),
        client_address: caller.address.map(|a| a.to_string()),
    };
    let mut conn = match console.pool.get().await {
        Ok(conn) => conn,
        Err(e) => return internal(e),
    };
    match crate::dead_letters::edit::edit(&console.settings, &mut conn, &request).await {
        Ok(edited) => (StatusCode::ACCEPTED, Json(edited)).into_response(),
        Err(refused @ EditError::NotFound(_)) => error(StatusCode::NOT_FOUND, &refused.to_string()),
        Err(refused @ EditError::NotOpen { .. }) => {
            error(StatusCode::CONFLICT, &refused.to_string())
        }
        Err(refused @ EditError::Invalid(_)) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, &refused.to_string())
        }
        Err(EditError::Other(e)) => internal(format!("{e:#}")),
    }
}

/// Sends the rest of a run that stopped by itself (operators only).
async fn resume(
    caller: Caller,
    State(console): State<Console>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    if let Err(refusal) = caller.may_act(&headers) {
        return refusal.into_response();
    }
    let resumed = crate::store::with_conn(&console.pool, async |conn| {
        let run = replay_runs::find(conn, id).await?;
        let taken = ops::resume(conn, id, &caller.name, "console").await?;
        Ok::<_, crate::store::StoreError>((run, taken))
    });
    match resumed.await {
        Ok((None, _)) => error(StatusCode::NOT_FOUND, "no replay run has this id"),
        Ok((Some(run), _)) if run.state != replay_runs::RunState::Stopped => error(
            StatusCode::CONFLICT,
            &format!("replay run {id} is {}, not stopped", run.state),
        ),
        Ok((Some(run), taken)) => {
            super::spawn_run(&console, id, run.rate_per_second);
            (
                StatusCode::ACCEPTED,
                Json(json!({ "jobId": id, "resumed": taken })),
            )
                .into_response()
        }
        Err(e) => internal(e),
    }
}

/// What became of every letter a run replayed, in the order it sent them.
async fn run_letters(
    _caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
) -> Response {
    let letters = crate::store::with_conn(&console.pool, async |conn| {
        let run = replay_runs::find(conn, id).await?;
        Ok::<_, crate::store::StoreError>(match run {
            None => None,
            Some(_) => Some(crate::dead_letters::replay_rows::outcomes(conn, id).await?),
        })
    });
    match letters.await {
        Ok(None) => error(StatusCode::NOT_FOUND, "no replay run has this id"),
        Ok(Some(letters)) => Json(json!({ "items": letters })).into_response(),
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

async fn archive(
    caller: Caller,
    State(console): State<Console>,
    headers: HeaderMap,
    body: Result<Json<Target>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (target, filter) = match action(&caller, &headers, body) {
        Ok(action) => action,
        Err(refused) => return *refused,
    };
    let archived = async {
        let mut conn = console.pool.get().await?;
        let from = caller.address.map(|a| a.to_string());
        ops::archive(
            &mut conn,
            &filter,
            target.limit,
            &caller.name,
            "console",
            from.as_deref(),
        )
        .await
    };
    match archived.await {
        Ok(ids) => Json(json!({ "archived": ids.len(), "ids": ids })).into_response(),
        Err(e) => internal(format!("{e:#}")),
    }
}

/// A page of the audit log: the newest entries before `before`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    pub limit: Option<i64>,
    pub before: Option<i64>,
}

/// Most audit entries in one page.
pub(super) const AUDIT_PAGE: i64 = 100;

/// An audit entry as a list shows it: at most [`audit::LISTED_IDS`] ids, and how many in all.
fn listed_entry(caller: &Caller, entry: audit::Entry) -> Value {
    let (mut entry, all) = entry.shortened();
    seen_by(caller, &mut entry);
    let mut value = serde_json::to_value(&entry).unwrap_or_default();
    value["idsCount"] = json!(all);
    value
}

/// An edit's before and after, with personal data masked unless the caller is an operator.
fn seen_by(caller: &Caller, entry: &mut audit::Entry) {
    if caller.role != crate::config::Role::Operator
        && let Some(detail) = &entry.detail
    {
        entry.detail = Some(crate::dead_letters::edit::masked(detail));
    }
}

async fn audit_log(
    caller: Caller,
    State(console): State<Console>,
    Query(query): Query<AuditQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(AUDIT_PAGE).clamp(1, AUDIT_PAGE);
    let entries = crate::store::with_conn(&console.pool, async |conn| {
        audit::page(conn, limit, query.before).await
    });
    match entries.await {
        Ok(items) => {
            let next = (items.len() as i64 == limit)
                .then(|| items.last().map(|e| e.id))
                .flatten();
            Json(json!({
                "items": items
                    .into_iter()
                    .map(|entry| listed_entry(&caller, entry))
                    .collect::<Vec<_>>(),
                "nextBefore": next,
            }))
            .into_response()
        }
        Err(e) => internal(e),
    }
}

async fn audit_entry(
    caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
) -> Response {
    let entry = crate::store::with_conn(&console.pool, async |conn| audit::find(conn, id).await);
    match entry.await {
        Ok(Some(mut entry)) => {
            seen_by(&caller, &mut entry);
            let all = entry.ids.len();
            let mut value = serde_json::to_value(&entry).unwrap_or_default();
            value["idsCount"] = json!(all);
            Json(value).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no audit entry has this id"),
        Err(e) => internal(e),
    }
}
