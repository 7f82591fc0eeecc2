//! The audit log as the API answers it: pages of entries, and one entry whole, with an edit's
//! personal data masked for viewers.

use super::super::Console;
use super::super::auth::Caller;
use super::super::reply::{error, internal};
use crate::console::reply::{Path, Query};
use crate::store::audit;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// A page of the audit log: the newest entries before `before`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::console) struct AuditQuery {
    pub limit: Option<i64>,
    pub before: Option<i64>,
}

/// Most audit entries in one page.
pub(in crate::console) const AUDIT_PAGE: i64 = 100;

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

/// A page of the audit log, newest first.
pub(super) async fn log(
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

/// One audit entry, with all its ids.
pub(super) async fn entry(
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
