//! The API's actions (operators only): replay, edit, archive, resume. Each checks that the caller
//! may act before it reads its body's target.

use super::super::Console;
use super::super::auth::Caller;
use super::super::query::checked;
use super::super::reply::{error, internal};
use crate::console::reply::Path;
use crate::dead_letters::guard::GuardRequest;
use crate::dead_letters::store::Filter;
use crate::dead_letters::{self as ops, ReplayError, ReplayRequest};
use crate::store::replay_runs;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

/// The slowest replay rate: a job advances at least every 10 s, well within the time after which
/// another console takes a job over.
const MIN_RATE: f64 = 0.1;

/// Which dead letters an action applies to: listed ids, or all that match a filter.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Target {
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
    /// The replay it asks for, by `caller`, of the letters `filter` selects.
    fn request(&self, filter: Filter, caller: &Caller) -> ReplayRequest {
        ReplayRequest {
            filter,
            limit: self.limit,
            dry_run: self.dry_run,
            rate: self.rate,
            accept_duplicate_risk: self.accept_duplicate_risk,
            include_failing: self.include_failing,
            ask_if_failing: self.ask_if_failing,
            requested_by: caller.name.clone(),
            source: "console".into(),
            client_address: caller.address.map(|a| a.to_string()),
            guard: GuardRequest {
                canary: self.canary,
                canary_wait: self.canary_wait_seconds.map(std::time::Duration::from_secs),
                stop_after_failures: self.stop_after_failures,
                max_failure_ratio: self.max_failure_ratio,
                failure_window: self.failure_window,
                start_rate: self.start_rate,
            },
        }
    }

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

/// A replay's or an archiving's request as its handler takes it: the caller, who may act, and
/// the dead letters its body names once (see [`action`]); a refusal is answered before the
/// handler runs.
pub(super) struct Action {
    caller: Caller,
    target: Target,
    filter: Filter,
}

impl axum::extract::FromRequest<Console> for Action {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        console: &Console,
    ) -> Result<Self, Response> {
        use axum::extract::FromRequestParts;
        let (mut parts, body) = request.into_parts();
        let caller = Caller::from_request_parts(&mut parts, console)
            .await
            .map_err(IntoResponse::into_response)?;
        let headers = parts.headers.clone();
        let request = axum::extract::Request::from_parts(parts, body);
        let body = Json::<Target>::from_request(request, console).await;
        let (target, filter) = action(&caller, &headers, body).map_err(|refused| *refused)?;
        Ok(Action {
            caller,
            target,
            filter,
        })
    }
}

pub(super) async fn replay(
    State(console): State<Console>,
    Action {
        caller,
        target,
        filter,
    }: Action,
) -> Response {
    if target
        .rate
        .is_some_and(|r| !(r >= MIN_RATE && r.is_finite()))
    {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rate must be at least 0.1 a second (a slower job would look stalled)",
        );
    }
    let request = target.request(filter, &caller);
    let mut conn = match console.pool.get().await {
        Ok(conn) => conn,
        Err(e) => return internal(e),
    };
    match ops::start(&console.settings, &mut conn, &request).await {
        Ok(started) => {
            if !request.dry_run {
                super::super::spawn_run(&console, started.run_id, request.rate);
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
        Err(refused) => replay_refused(&console, refused),
    }
}

/// A replay the store refused, as the API answers it: 409 with the count when letters are at
/// risk of a second link or would fail again, 422 for a bad request.
fn replay_refused(console: &Console, refused: ReplayError) -> Response {
    match refused {
        ReplayError::DuplicateRisk { count, .. } => {
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
        refused @ ReplayError::FailsAgain { count } => (
            StatusCode::CONFLICT,
            Json(json!({ "error": refused.to_string(), "failAgain": count })),
        )
            .into_response(),
        ReplayError::Invalid(why) => error(StatusCode::UNPROCESSABLE_ENTITY, &why),
        ReplayError::Other(e) => internal(format!("{e:#}")),
    }
}

/// An edit's request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EditBody {
    /// The fields to change and their new values (`null` removes one).
    fields: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>,
    /// Why (required).
    reason: String,
}

/// Fixes a dead letter's command and sends it as a new command (operators only).
pub(super) async fn edit(
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
pub(super) async fn resume(
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
            super::super::spawn_run(&console, id, run.rate_per_second);
            (
                StatusCode::ACCEPTED,
                Json(json!({ "jobId": id, "resumed": taken })),
            )
                .into_response()
        }
        Err(e) => internal(e),
    }
}

pub(super) async fn archive(State(console): State<Console>, action: Action) -> Response {
    let archived = async {
        let mut conn = console.pool.get().await?;
        let from = action.caller.address.map(|a| a.to_string());
        ops::archive(
            &mut conn,
            &action.filter,
            action.target.limit,
            &action.caller.name,
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
