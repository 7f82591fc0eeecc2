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

/// Implements an extractor above as axum's own, its rejection answered in the one shape.
macro_rules! in_one_shape {
    ($ours:ident, $axums:path) => {
        impl<T, S> axum::extract::FromRequestParts<S> for $ours<T>
        where
            T: serde::de::DeserializeOwned + Send,
            S: Send + Sync,
        {
            type Rejection = Response;

            async fn from_request_parts(
                parts: &mut axum::http::request::Parts,
                state: &S,
            ) -> Result<Self, Response> {
                use $axums as Axums;
                match Axums::<T>::from_request_parts(parts, state).await {
                    Ok(Axums(value)) => Ok($ours(value)),
                    Err(rejection) => Err(error(rejection.status(), &rejection.body_text())),
                }
            }
        }
    };
}

in_one_shape!(Query, axum::extract::Query);
in_one_shape!(Path, axum::extract::Path);
