//! The console's pages, one file each: server-rendered HTML from maud templates (checked at
//! compile time, every value escaped, with invisible and reordering characters shown as
//! `⟨U+202E⟩`), and a little JavaScript for the actions (which call the JSON API with the
//! session's CSRF token) and live job progress, served with the style as files so that the
//! content security policy runs nothing inline. No secret is ever rendered.

mod audit;
mod detail;
mod layout;
mod list;
mod login;
mod overview;
mod run;

use super::Console;
use crate::dead_letters::Kind;
use crate::text::visible_block;
use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use maud::{Markup, Render, html};

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/", get(overview::page))
        .route("/login", get(login::form).post(login::sign_in))
        .route("/logout", post(login::sign_out))
        .route("/dead-letters", get(list::page))
        .route("/dead-letters/{id}", get(detail::page))
        .route("/replays/{id}", get(run::page))
        .route("/audit", get(audit::page))
        .route("/audit/{id}", get(audit::entry))
        .route("/static/console.css", get(style))
        .route("/static/console.js", get(script))
}

/// The pages' style.
const STYLE: &str = include_str!("../static/console.css");
/// The pages' script: every action asks first, says what it will touch, sends the CSRF token,
/// and asks again (naming the risk) when the API answers that a replay may create a second link.
const SCRIPT: &str = include_str!("../static/console.js");

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

/// Text as people should read it: escaped by maud, with invisible and reordering characters
/// shown as `⟨U+…⟩` (line breaks kept, for bodies in `<pre>`). Values a page sends back (a form
/// field, a filter) are rendered plainly instead, so they stay exactly what they are.
pub(super) struct Shown<'a>(pub &'a str);

impl Render for Shown<'_> {
    fn render_to(&self, buffer: &mut String) {
        visible_block(self.0).as_ref().render_to(buffer);
    }
}

/// An optional value, or a dash.
pub(super) fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| v.to_string())
}

/// A time both ways: relative ("5 min ago") with the exact UTC time on hover and beside it.
pub(super) fn when(t: DateTime<Utc>) -> Markup {
    let secs = (Utc::now() - t).num_seconds();
    let relative = match secs {
        s if s < 0 => "just now".to_owned(),
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    };
    let exact = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    html! {
        time datetime=(exact) title=(exact) { (relative) } " " small.muted { (exact) }
    }
}

/// A kind as a coloured badge, the same colour everywhere (colours in the style sheet; a kind
/// outside the known ones is grey).
pub(super) fn kind_badge(kind: &str) -> Markup {
    let class = Kind::parse(kind).map_or("other", Kind::as_str);
    html! { span class={ "badge kind-" (class) } { (Shown(kind)) } }
}

/// A state as a badge.
pub(super) fn state_badge(state: &str) -> Markup {
    html! { span class={ "state state-" (state) } { (Shown(state)) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_shown_not_run_and_hidden_characters_are_shown() {
        let shown = html! { p { (Shown("<script>\"&")) } }.into_string();
        assert_eq!(shown, "<p>&lt;script&gt;&quot;&amp;</p>");
        let shown = html! { p title=(Shown("bidi-\u{202E}gpj.exe")) {} }.into_string();
        assert_eq!(shown, "<p title=\"bidi-⟨U+202E⟩gpj.exe\"></p>");
        assert_eq!(
            kind_badge("x\"><script>").into_string(),
            "<span class=\"badge kind-other\">x&quot;&gt;&lt;script&gt;</span>"
        );
    }
}
