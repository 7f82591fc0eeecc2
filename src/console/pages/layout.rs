//! The frame of every page: the header with the navigation and who is signed in, the style and
//! the script as files.

use super::Shown;
use crate::console::auth::Caller;
use axum::response::Html;
use maud::{DOCTYPE, Markup, html};

/// The document around a page's `content`.
fn document(title: &str, csrf: Option<&str>, header: Markup, content: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    @if let Some(csrf) = csrf { meta name="csrf" content=(csrf); }
                    title { (Shown(title)) " · payment-link-worker" }
                    link rel="stylesheet" href="/static/console.css";
                }
                body {
                    header { span { "payment-link-worker" } (header) }
                    main { (content) }
                    script src="/static/console.js" {}
                }
            }
        }
        .into_string(),
    )
}

/// A signed-in page: navigation, the caller and a sign-out button, then `content`.
pub(super) fn signed_in(caller: &Caller, title: &str, content: Markup) -> Html<String> {
    let role = caller.role.as_str();
    let csrf = caller.csrf.as_deref().unwrap_or("");
    let header = html! {
        a href="/" { "Overview" }
        a href="/dead-letters?state=open" { "Dead letters" }
        a href="/audit" { "Audit" }
        span.who {
            (Shown(&caller.name)) " (" (role) ") "
            form.inline method="post" action="/logout" {
                input type="hidden" name="csrf" value=(csrf);
                button.secondary id="logout" { "Sign out" }
            }
        }
    };
    document(title, Some(csrf), header, content)
}

/// The sign-in page, with an error to show.
pub(super) fn sign_in(error: Option<&str>) -> Html<String> {
    let content = html! {
        h1 { "Sign in" }
        @if let Some(error) = error { p.error { (Shown(error)) } }
        form method="post" action="/login" {
            label {
                "Operator token "
                input type="password" name="token" id="token" autocomplete="current-password"
                    autofocus required;
            }
            " "
            button id="sign-in" { "Sign in" }
        }
    };
    document("Sign in", None, html! {}, content)
}

/// A page saying something was not found.
pub(super) fn not_found(caller: &Caller, what: &str) -> (axum::http::StatusCode, Html<String>) {
    (
        axum::http::StatusCode::NOT_FOUND,
        signed_in(caller, "Not found", html! { h1 { (what) } }),
    )
}
