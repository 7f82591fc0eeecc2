//! The JSON API under `/api/` (described by `src/contract/openapi.json`): what the pages call,
//! and what scripts call with `Authorization: Bearer <token>`.

use super::Console;
use super::auth::Caller;
use super::reply::{error, internal};
use super::views::{DeadLetterView, JobView};
use crate::dead_letters::store::{self as store, Cursor, Filter, Kind, State as LetterState};
use crate::dead_letters::targets::ReplayTargets;
use crate::dead_letters::{self as ops, Listed, ReplayError, ReplayRequest};
use crate::store::{audit, replay_runs};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
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
        .route("/api/replays", get(jobs).post(replay))
        .route("/api/replays/{id}", get(job))
        .route("/api/audit", get(audit_log))
        .route("/api/audit/{id}", get(audit_entry))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The list's query: the filters the CLI has, a page size and the cursor of the next page. Kept
/// as text, so an empty form field means "any" rather than a refusal.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ListQuery {
    pub kind: Option<String>,
    pub state: Option<String>,
    pub q: Option<String>,
    pub command_id: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub provider_id: Option<String>,
    pub invoice_id: Option<String>,
    pub customer_id: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// Why `value` is not one of `names`.
fn one_of<const N: usize>(name: &str, value: &str, names: [&str; N]) -> String {
    format!("{name} must be one of {}, got {value:?}", names.join(", "))
}

/// A query value that is not empty.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// A query value parsed, naming the parameter when it does not parse.
fn parsed<T: std::str::FromStr>(
    value: &Option<String>,
    name: &str,
    what: &str,
) -> Result<Option<T>, String> {
    given(value)
        .map(|v| {
            v.parse()
                .map_err(|_| format!("{name} must be {what}, got {v:?}"))
        })
        .transpose()
}

impl ListQuery {
    /// The store's filter, or why a parameter is wrong.
    pub(super) fn filter(&self) -> Result<Filter, String> {
        let time = "an RFC 3339 time such as 2026-12-01T00:00:00Z";
        let filter = Filter {
            kind: given(&self.kind)
                .map(|k| {
                    Kind::parse(k).ok_or_else(|| one_of("kind", k, Kind::ALL.map(Kind::as_str)))
                })
                .transpose()?,
            state: given(&self.state)
                .map(|s| {
                    LetterState::parse(s).ok_or_else(|| {
                        one_of("state", s, LetterState::ALL.map(LetterState::as_str))
                    })
                })
                .transpose()?,
            command_id: given(&self.command_id).map(str::to_owned),
            since: parsed::<DateTime<Utc>>(&self.since, "since", time)?,
            until: parsed::<DateTime<Utc>>(&self.until, "until", time)?,
            provider_id: parsed(&self.provider_id, "providerId", "a whole number")?,
            invoice_id: parsed(&self.invoice_id, "invoiceId", "a whole number")?,
            customer_id: parsed(&self.customer_id, "customerId", "a whole number")?,
            search: given(&self.q).map(str::to_owned),
            ids: None,
        };
        checked(&filter)?;
        Ok(filter)
    }

    /// The page size asked for, within 1 to [`MAX_PAGE`] (default 50).
    pub(super) fn limit(&self) -> Result<i64, String> {
        Ok(parsed::<i64>(&self.limit, "limit", "a whole number")?
            .unwrap_or(50)
            .clamp(1, MAX_PAGE))
    }

    /// The filter, page size and cursor together, or why one of them is wrong.
    pub(super) fn parts(&self) -> Result<(Filter, i64, Option<Cursor>), String> {
        Ok((self.filter()?, self.limit()?, self.cursor()?))
    }

    /// The filters as query parameters (without the cursor), for the next page's link.
    pub(super) fn params(&self) -> Vec<(&'static str, String)> {
        [
            ("kind", &self.kind),
            ("state", &self.state),
            ("q", &self.q),
            ("commandId", &self.command_id),
            ("since", &self.since),
            ("until", &self.until),
            ("providerId", &self.provider_id),
            ("invoiceId", &self.invoice_id),
            ("customerId", &self.customer_id),
            ("limit", &self.limit),
        ]
        .into_iter()
        .filter_map(|(name, value)| {
            let value = value.as_deref().unwrap_or("").trim();
            (!value.is_empty()).then(|| (name, value.to_owned()))
        })
        .collect()
    }

    /// The cursor, or why it is not one this API gave.
    pub(super) fn cursor(&self) -> Result<Option<Cursor>, String> {
        given(&self.cursor)
            .map(|c| Cursor::decode(c).ok_or_else(|| "cursor is not one this API gave".to_owned()))
            .transpose()
    }
}

/// Most ids one request may name: beyond, a filter selects them.
pub(super) const MAX_IDS: usize = 10_000;
/// Most characters of a text filter (a command id, a search).
const MAX_FILTER_TEXT: usize = 1000;

/// Whether the store can take `filter` as it is; if not, what is wrong with it: a NUL character
/// (which PostgreSQL text cannot hold), an overlong text, too many ids.
pub(super) fn checked(filter: &Filter) -> Result<(), String> {
    for (name, value) in [
        ("commandId", &filter.command_id),
        ("search", &filter.search),
    ] {
        let Some(value) = value else { continue };
        if value.contains('\0') {
            return Err(format!(
                "{name} contains a NUL character (U+0000), which no dead letter can hold"
            ));
        }
        if value.chars().count() > MAX_FILTER_TEXT {
            return Err(format!(
                "{name} is longer than {MAX_FILTER_TEXT} characters"
            ));
        }
    }
    if filter.ids.as_ref().is_some_and(|ids| ids.len() > MAX_IDS) {
        return Err(format!(
            "at most {MAX_IDS} ids in one request: select more with a filter (kind, time, \
             provider, search) instead"
        ));
    }
    Ok(())
}

/// The slowest replay rate: a job advances at least every 10 s, well within the time after which
/// another console takes a job over.
const MIN_RATE: f64 = 0.1;

/// Most rows in one page.
pub(super) const MAX_PAGE: i64 = 500;

async fn list(
    _caller: Caller,
    State(console): State<Console>,
    Query(query): Query<ListQuery>,
) -> Response {
    let (filter, limit, cursor) = match query.parts() {
        Ok(parts) => parts,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let page = async {
        let mut conn = console.pool.get().await?;
        store::page(&mut conn, &filter, limit, cursor).await
    };
    let targets = ReplayTargets::new(&console.settings);
    match page.await {
        Ok((items, next)) => Json(json!({
            "items": items.into_iter().map(|i| Listed::new(i, &targets)).collect::<Vec<_>>(),
            "nextCursor": next.map(|c| c.encode()),
        }))
        .into_response(),
        Err(e) => internal(e),
    }
}

async fn summary(_caller: Caller, State(console): State<Console>) -> Response {
    let overview = async {
        let mut conn = console.pool.get().await?;
        store::overview(&mut conn).await
    };
    match overview.await {
        Ok(overview) => Json(overview).into_response(),
        Err(e) => internal(e),
    }
}

async fn detail(_caller: Caller, State(console): State<Console>, Path(id): Path<i64>) -> Response {
    match DeadLetterView::load(&console, id).await {
        Ok(Some(view)) => Json(view).into_response(),
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
        let status = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        refuse(status, &rejection.body_text())
    })?;
    let filter = target
        .filter()
        .ok_or_else(|| refuse(StatusCode::UNPROCESSABLE_ENTITY, ONE_TARGET))?;
    checked(&filter).map_err(|why| {
        let status = if why.contains("NUL") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        refuse(status, &why)
    })?;
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
        requested_by: caller.name.clone(),
        source: "console".into(),
        client_address: caller.address.map(|a| a.to_string()),
    };
    let mut conn = match console.pool.get().await {
        Ok(conn) => conn,
        Err(e) => return internal(e),
    };
    match ops::start(&console.settings, &mut conn, &request).await {
        Ok(started) => {
            if !request.dry_run {
                super::spawn_job(&console, started.run_id, request.rate);
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
        Err(ReplayError::Other(e)) => internal(format!("{e:#}")),
    }
}

async fn job(_caller: Caller, State(console): State<Console>, Path(id): Path<i64>) -> Response {
    match JobView::load(&console, id).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no replay job has this id"),
        Err(e) => internal(e),
    }
}

async fn jobs(_caller: Caller, State(console): State<Console>) -> Response {
    let runs = async {
        let mut conn = console.pool.get().await?;
        replay_runs::newest(&mut conn, 50).await
    };
    match runs.await {
        Ok(runs) => {
            let items: Vec<JobView> = runs.iter().map(JobView::from).collect();
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
fn listed_entry(entry: audit::Entry) -> Value {
    let (entry, all) = entry.shortened();
    let mut value = serde_json::to_value(&entry).unwrap_or_default();
    value["idsCount"] = json!(all);
    value
}

async fn audit_log(
    _caller: Caller,
    State(console): State<Console>,
    Query(query): Query<AuditQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(AUDIT_PAGE).clamp(1, AUDIT_PAGE);
    let entries = async {
        let mut conn = console.pool.get().await?;
        audit::page(&mut conn, limit, query.before).await
    };
    match entries.await {
        Ok(items) => {
            let next = (items.len() as i64 == limit)
                .then(|| items.last().map(|e| e.id))
                .flatten();
            Json(json!({
                "items": items.into_iter().map(listed_entry).collect::<Vec<_>>(),
                "nextBefore": next,
            }))
            .into_response()
        }
        Err(e) => internal(e),
    }
}

async fn audit_entry(
    _caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
) -> Response {
    let entry = async {
        let mut conn = console.pool.get().await?;
        audit::find(&mut conn, id).await
    };
    match entry.await {
        Ok(Some(entry)) => {
            let all = entry.ids.len();
            let mut value = serde_json::to_value(&entry).unwrap_or_default();
            value["idsCount"] = json!(all);
            Json(value).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no audit entry has this id"),
        Err(e) => internal(e),
    }
}
