//! Signing in and out. The sign-in form is refused when a browser says it came from another
//! site; wrong tokens count toward the per-address throttle.

use super::layout;
use crate::console::Console;
use crate::console::auth::{COOKIE, Caller, find, refused};
use crate::console::throttle::ClientAddress;
use crate::store::audit;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

pub(super) async fn form() -> Html<String> {
    layout::sign_in(None)
}

/// Whether a sign-in form was posted from the console's own page, so another site cannot sign
/// a visitor in as someone else (login CSRF). Browsers say where a request comes from in
/// `Sec-Fetch-Site` (set by the browser, not by pages); older ones only in `Origin`, which must
/// then name this console. A request with neither (a script) is let through.
fn same_origin(headers: &HeaderMap, trust_forwarded: bool) -> bool {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = value("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    let Some(origin) = value("origin") else {
        return true;
    };
    let authority = origin.split_once("://").map(|(_, rest)| rest);
    let host = trust_forwarded
        .then(|| value("x-forwarded-host"))
        .flatten()
        .or_else(|| value("host"));
    authority.is_some() && authority == host
}

pub(super) async fn sign_in(
    State(console): State<Console>,
    ClientAddress(address, via_proxy): ClientAddress,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers, via_proxy) {
        let why = "Sign in from the console's own page: this form was sent from another site.";
        return (StatusCode::FORBIDDEN, layout::sign_in(Some(why))).into_response();
    }
    if let Some(wait) = console.throttle.blocked(address, "sign-in") {
        let secs = wait.as_secs().max(1);
        let why = format!("Too many wrong tokens from this address: try again in {secs} s.");
        let mut answer =
            (StatusCode::TOO_MANY_REQUESTS, layout::sign_in(Some(&why))).into_response();
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.into());
        return answer;
    }
    let Some(operator) = find(&console.operators, form.token.trim()) else {
        refused(&console, address, "sign-in").await;
        let why = "That token belongs to no operator.";
        return (StatusCode::UNAUTHORIZED, layout::sign_in(Some(why))).into_response();
    };
    console.throttle.succeeded(address);
    let id = match console.sessions.open(operator).await {
        Ok(id) => id,
        Err(error) => {
            tracing::warn!(%error, "cannot store a console session");
            let why = "The console cannot reach its database: try again shortly.";
            return (StatusCode::SERVICE_UNAVAILABLE, layout::sign_in(Some(why))).into_response();
        }
    };
    if let Ok(mut conn) = console.pool.get().await {
        let entry = audit::NewEntry {
            actor: operator.name.clone(),
            source: "console".into(),
            action: "sign-in".into(),
            filter: None,
            count: 0,
            ids: Vec::new(),
            run_id: None,
            client_address: address.map(|a| a.to_string()),
            detail: None,
        };
        let _ = audit::record(&mut conn, &entry).await;
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200"),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

/// Ends the session on the server and in the browser. The session cookie is `SameSite=Strict`,
/// so another site's form cannot send it: the CSRF field is not needed here, and a wrong one
/// never leaves a cleared cookie in front of a session that still works.
pub(super) async fn sign_out(State(console): State<Console>, caller: Caller) -> Response {
    if let Some(id) = &caller.session
        && let Err(error) = console.sessions.close(id).await
    {
        tracing::warn!(%error, "cannot end a console session in the database");
    }
    (
        [(header::SET_COOKIE, format!("{COOKIE}=; Path=/; Max-Age=0"))],
        Redirect::to("/login"),
    )
        .into_response()
}
