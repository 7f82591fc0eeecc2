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
