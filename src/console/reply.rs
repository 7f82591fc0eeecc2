//! The console's error answers, one shape for every refusal and failure (`{"error": why}`),
//! shared by the API, the pages and the sign-in checks.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A JSON error answer: `{"error": why}`.
pub(crate) fn error(status: StatusCode, why: &str) -> Response {
    (status, Json(json!({ "error": why }))).into_response()
}

/// A failure inside the console: logged in full, answered without detail.
pub(crate) fn internal(cause: impl std::fmt::Display) -> Response {
    tracing::error!(error = %cause, "console request failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the request failed inside the console (its log says why)",
    )
}

/// axum's `Query`, with a query that does not parse (`?limit=abc`) refused in the one shape
/// above, naming what is wrong, rather than as axum's plain text.
pub(crate) struct Query<T>(pub T);

/// axum's `Path`, with a path that does not parse (`/api/replays/abc`) refused in the one shape.
pub(crate) struct Path<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(query)) => Ok(Query(query)),
            Err(rejection) => Err(error(rejection.status(), &rejection.body_text())),
        }
    }
}

impl<T, S> axum::extract::FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(path)) => Ok(Path(path)),
            Err(rejection) => Err(error(rejection.status(), &rejection.body_text())),
        }
    }
}
