//! The console's pages: server-rendered HTML with a little JavaScript for the actions (which call
//! the JSON API with the session's CSRF token) and for live job progress, served as files. Every
//! value shown is HTML-escaped, with invisible and reordering characters shown as `⟨U+202E⟩`; no
//! secret is ever rendered.

use super::Console;
use super::api::{self, ListQuery};
use super::auth::{COOKIE, Caller, Role, find, refused};
use super::reply;
use super::throttle::ClientAddress;
use crate::ops::dead_letters::{Listed, known_kinds};
use crate::ops::targets::{ReplayTargets, exchange_name};
use crate::store::dead_letters::{self as store, STATES};
use crate::store::{audit, replay_runs};
use crate::text::visible_block;
use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use std::fmt::Write as _;

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/dead-letters", get(list))
        .route("/dead-letters/{id}", get(detail))
        .route("/replays/{id}", get(job))
        .route("/audit", get(audit_page))
        .route("/audit/{id}", get(audit_entry_page))
        .route("/static/console.css", get(style))
        .route("/static/console.js", get(script))
}

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

/// `text` as people should read it, safe inside HTML text and attribute values: what is shown.
fn esc(text: &str) -> String {
    attr(&visible_block(text))
}

/// `text` safe inside HTML text and attribute values, unchanged otherwise: for values the page
/// sends back (a form field, a filter), which must stay exactly as they are.
fn attr(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A time both ways: relative ("5 min ago") with the exact UTC time on hover and beside it.
fn when(t: DateTime<Utc>) -> String {
    let secs = (Utc::now() - t).num_seconds();
    let relative = match secs {
        s if s < 0 => "just now".to_owned(),
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    };
    let exact = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!(
        "<time datetime=\"{exact}\" title=\"{exact}\">{relative}</time> <small class=\"muted\">{exact}</small>"
    )
}

/// A kind as a coloured badge, the same colour everywhere (colours in the style sheet; a kind
/// outside the known ones is grey).
fn kind_badge(kind: &str) -> String {
    let class = if known_kinds().contains(&kind) {
        kind
    } else {
        "other"
    };
    format!("<span class=\"badge kind-{class}\">{}</span>", esc(kind))
}

fn state_badge(state: &str) -> String {
    format!("<span class=\"state state-{0}\">{0}</span>", esc(state))
}

/// The pages' style, served as a file: the content security policy allows no inline style.
const STYLE: &str = include_str!("static/console.css");

/// The pages' script, served as a file (the content security policy runs no inline script):
/// every action asks first, says what it will touch, sends the CSRF token, and asks again
/// (naming the risk) when the API answers that a replay may create a second link.
const SCRIPT: &str = include_str!("static/console.js");

/// The frame of every signed-in page.
fn layout(caller: &Caller, title: &str, content: &str) -> Html<String> {
    let role = match caller.role {
        Role::Operator => "operator",
        Role::Viewer => "viewer",
    };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"csrf\" content=\"{csrf}\"><title>{title} · payment-link-worker</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\"></head><body><header><span>payment-link-worker</span>\
         <a href=\"/\">Overview</a><a href=\"/dead-letters?state=open\">Dead letters</a>\
         <a href=\"/audit\">Audit</a><span class=\"who\">{name} ({role}) \
         <form method=\"post\" action=\"/logout\" class=\"inline\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button class=\"secondary\" id=\"logout\">Sign out</button></form></span></header>\
         <main>{content}</main><script src=\"/static/console.js\"></script></body></html>",
        csrf = attr(caller.csrf.as_deref().unwrap_or("")),
        title = esc(title),
        name = esc(&caller.name),
    ))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

fn login_page(error: Option<&str>) -> Html<String> {
    let error = error
        .map(|e| format!("<p class=\"error\">{}</p>", esc(e)))
        .unwrap_or_default();
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign in · \
         payment-link-worker</title><link rel=\"stylesheet\" href=\"/static/console.css\"></head><body><header>\
         <span>payment-link-worker</span></header><main><h1>Sign in</h1>{error}\
         <form method=\"post\" action=\"/login\"><label>Operator token \
         <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" \
         autofocus required></label> <button id=\"sign-in\">Sign in</button></form></main></body></html>"
    ))
}

async fn login_form() -> Html<String> {
    login_page(None)
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

async fn login(
    State(console): State<Console>,
    ClientAddress(address): ClientAddress,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers, console.settings.console.trust_forwarded_for) {
        return (
            StatusCode::FORBIDDEN,
            login_page(Some(
                "Sign in from the console's own page: this form was sent from another site.",
            )),
        )
            .into_response();
    }
    if let Some(wait) = console.throttle.blocked(address, "sign-in") {
        let mut answer = (
            StatusCode::TOO_MANY_REQUESTS,
            login_page(Some(&format!(
                "Too many wrong tokens from this address: try again in {} s.",
                wait.as_secs().max(1)
            ))),
        )
            .into_response();
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, wait.as_secs().max(1).into());
        return answer;
    }
    let Some(operator) = find(&console.operators, form.token.trim()) else {
        refused(&console, address, "sign-in").await;
        return (
            StatusCode::UNAUTHORIZED,
            login_page(Some("That token belongs to no operator.")),
        )
            .into_response();
    };
    console.throttle.succeeded(address);
    let id = console.sessions.open(operator);
    if let Ok(mut conn) = console.pool.get().await {
        let _ = audit::record(
            &mut conn,
            &audit::NewEntry {
                actor: operator.name.clone(),
                source: "console".into(),
                action: "sign-in".into(),
                filter: None,
                count: 0,
                ids: Vec::new(),
                run_id: None,
                client_address: address.map(|a| a.to_string()),
            },
        )
        .await;
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
async fn logout(State(console): State<Console>, caller: Caller) -> Response {
    if let Some(id) = &caller.session {
        console.sessions.close(id);
    }
    (
        [(header::SET_COOKIE, format!("{COOKIE}=; Path=/; Max-Age=0"))],
        Redirect::to("/login"),
    )
        .into_response()
}

async fn overview(caller: Caller, State(console): State<Console>) -> Response {
    let figures = async {
        let mut conn = console.pool.get().await?;
        store::overview(&mut conn).await
    };
    let overview = match figures.await {
        Ok(o) => o,
        Err(e) => return reply::internal(e),
    };
    let mut html = String::from("<h1>Overview</h1><div class=\"cards\">");
    for state in STATES {
        let n = overview.by_state.get(state).copied().unwrap_or(0);
        let _ = write!(
            html,
            "<a class=\"card\" href=\"/dead-letters?state={state}\">\
             <b id=\"count-{state}\">{n}</b>{state}</a>"
        );
    }
    html.push_str("</div><h2>Oldest open failure</h2><p>");
    html.push_str(&overview.oldest_open.map_or_else(|| "none".into(), when));
    html.push_str(
        "</p><h2>Open, by kind</h2><table><tr><th>Kind</th><th>Open</th><th>All</th></tr>",
    );
    for (kind, all) in &overview.by_kind {
        let open = overview.open_by_kind.get(kind).copied().unwrap_or(0);
        let _ = write!(
            html,
            "<tr><td><a href=\"/dead-letters?{k}\">{badge}</a></td><td>{open}</td><td>{all}</td></tr>",
            k = attr(
                &serde_urlencoded::to_string([("state", "open"), ("kind", kind.as_str())])
                    .unwrap_or_default()
            ),
            badge = kind_badge(kind)
        );
    }
    let peak = overview
        .last_24_hours
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    html.push_str("</table><h2>Failures per hour, last 24 hours</h2><div class=\"bars\">");
    for n in &overview.last_24_hours {
        let _ = write!(
            html,
            "<div data-h=\"{}\" title=\"{n}\"></div>",
            n * 100 / peak
        );
    }
    html.push_str("</div>");
    layout(&caller, "Overview", &html).into_response()
}

fn options(values: &[&str], chosen: Option<&str>) -> String {
    let mut html = String::from("<option value=\"\">any</option>");
    for v in values {
        let selected = if chosen == Some(*v) { " selected" } else { "" };
        let _ = write!(html, "<option{selected}>{}</option>", esc(v));
    }
    html
}

async fn list(
    caller: Caller,
    State(console): State<Console>,
    Query(query): Query<ListQuery>,
) -> Response {
    let (filter, limit, cursor) = match query.parts() {
        Ok(parts) => parts,
        Err(why) => {
            let html = format!(
                "<h1>Dead letters</h1><p class=\"error\">{}</p><p><a href=\"/dead-letters\">Start again</a></p>",
                esc(&why)
            );
            return (
                StatusCode::BAD_REQUEST,
                layout(&caller, "Dead letters", &html),
            )
                .into_response();
        }
    };
    let found = async {
        let mut conn = console.pool.get().await?;
        let page = store::page(&mut conn, &filter, limit, cursor).await?;
        let matching = store::count(&mut conn, &filter).await?;
        Ok::<_, crate::store::StoreError>((page, matching))
    };
    let ((rows, next), matching) = match found.await {
        Ok(found) => found,
        Err(e) => return reply::internal(e),
    };
    let text = |v: &Option<String>| attr(v.as_deref().unwrap_or(""));
    let kinds = known_kinds();
    let mut html = format!(
        "<h1>Dead letters <small class=\"muted\" id=\"matching\">{matching} matching</small></h1>\
         <form class=\"filters\" method=\"get\" action=\"/dead-letters\">\
         <label>Kind<select name=\"kind\" id=\"kind\">{kind}</select></label>\
         <label>State<select name=\"state\" id=\"state\">{state}</select></label>\
         <label>Search (id, description, e-mail)<input name=\"q\" id=\"q\" value=\"{q}\"></label>\
         <label>Provider id<input name=\"providerId\" size=\"6\" value=\"{provider}\"></label>\
         <label>Invoice id<input name=\"invoiceId\" size=\"8\" value=\"{invoice}\"></label>\
         <label>Customer id<input name=\"customerId\" size=\"8\" value=\"{customer}\"></label>\
         <label>Failed since (UTC)<input name=\"since\" placeholder=\"2026-12-01T00:00:00Z\" value=\"{since}\"></label>\
         <label>until<input name=\"until\" placeholder=\"2026-12-02T00:00:00Z\" value=\"{until}\"></label>\
         <button id=\"apply\">Filter</button></form>",
        kind = options(&kinds, query.kind.as_deref()),
        state = options(&STATES, query.state.as_deref()),
        q = text(&query.q),
        provider = text(&query.provider_id),
        invoice = text(&query.invoice_id),
        customer = text(&query.customer_id),
        since = text(&query.since),
        until = text(&query.until),
    );
    if caller.role == Role::Operator {
        let filter_json = attr(&serde_json::to_string(&filter).unwrap_or_default());
        let _ = write!(
            html,
            "<div class=\"actions\"><button data-act=\"replay\" id=\"replay-selected\">Replay selected</button>\
             <button data-act=\"archive\" class=\"secondary\" id=\"archive-selected\">Archive selected</button>\
             <button data-act=\"replay\" data-scope=\"all\" data-count=\"{matching}\" data-filter=\"{filter_json}\" id=\"replay-all\">Replay all {matching} matching</button>\
             <button data-act=\"archive\" data-scope=\"all\" class=\"secondary\" data-count=\"{matching}\" data-filter=\"{filter_json}\" id=\"archive-all\">Archive all {matching} matching</button>\
             <label class=\"muted\">at most <input id=\"rate\" size=\"4\" placeholder=\"∞\"> per second</label></div>"
        );
    }
    html.push_str(
        "<table id=\"letters\"><tr><th><input type=\"checkbox\" id=\"pick-all\" title=\"select this page\"></th>\
         <th>Id</th><th>State</th><th>Kind</th><th>Command id</th><th>HTTP</th><th>Attempts</th>\
         <th>Failed</th><th>Replays</th><th>Invoice</th><th>Customer</th><th>Why</th></tr>",
    );
    let targets = ReplayTargets::new(&console.settings);
    for row in rows.into_iter().map(|r| Listed::new(r, &targets)) {
        let replayable = match &row.not_replayable_because {
            None => String::new(),
            Some(why) => format!(
                " <span class=\"not-replayable\" title=\"{}\">not replayable</span>",
                esc(why)
            ),
        };
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "–".into());
        let _ = write!(
            html,
            "<tr data-id=\"{id}\"><td><input type=\"checkbox\" class=\"pick\" value=\"{id}\"></td>\
             <td><a href=\"/dead-letters/{id}\">{id}</a></td><td>{state}{replayable}</td><td>{kind}</td>\
             <td><a href=\"/dead-letters/{id}\">{command}</a></td><td>{status}</td><td>{attempts}</td>\
             <td>{failed}</td><td>{replays}</td><td>{invoice}</td><td>{customer}</td>\
             <td class=\"msg\" title=\"{message}\">{message}</td></tr>",
            id = row.id,
            state = state_badge(&row.state),
            kind = kind_badge(&row.kind),
            command = if row.command_id.is_empty() {
                "(no message_id)".into()
            } else {
                esc(&row.command_id)
            },
            status = opt(row.http_status.map(i64::from)),
            attempts = opt(row.attempts.map(i64::from)),
            failed = when(row.failed_at),
            replays = row.replay_count,
            invoice = opt(row.invoice_id),
            customer = opt(row.customer_id),
            message = esc(&row.error_message),
        );
    }
    html.push_str("</table>");
    if let Some(next) = next {
        let mut params = filter_params(&query);
        params.push(("cursor", next.encode()));
        let _ = write!(
            html,
            "<p><a id=\"next\" href=\"/dead-letters?{}\">Next page →</a></p>",
            esc(&serde_urlencoded::to_string(&params).unwrap_or_default())
        );
    }
    layout(&caller, "Dead letters", &html).into_response()
}

/// The list's filters as query parameters (without the cursor), for the next page's link.
fn filter_params(query: &ListQuery) -> Vec<(&'static str, String)> {
    [
        ("kind", &query.kind),
        ("state", &query.state),
        ("q", &query.q),
        ("commandId", &query.command_id),
        ("since", &query.since),
        ("until", &query.until),
        ("providerId", &query.provider_id),
        ("invoiceId", &query.invoice_id),
        ("customerId", &query.customer_id),
        ("limit", &query.limit),
    ]
    .into_iter()
    .filter_map(|(name, value)| {
        let value = value.as_deref().unwrap_or("").trim();
        (!value.is_empty()).then(|| (name, value.to_owned()))
    })
    .collect()
}

/// JSON text re-indented, every token kept as written (numbers are never re-formatted, so an
/// amount reads exactly as it was sent); `None` when it is not JSON.
fn pretty_json(text: &str) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = String::with_capacity(text.len() * 2);
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                let empty = matches!(chars.clone().find(|c| !c.is_whitespace()), Some('}' | ']'));
                if !empty {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                if !(out.ends_with('{') || out.ends_with('[')) {
                    depth = depth.saturating_sub(1);
                    newline(&mut out, depth);
                }
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

fn field(html: &mut String, name: &str, value: &Value) {
    let shown = match value {
        Value::Null => "–".to_owned(),
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    };
    let _ = write!(html, "<dt>{}</dt><dd>{shown}</dd>", esc(name));
}

async fn detail(caller: Caller, State(console): State<Console>, Path(id): Path<i64>) -> Response {
    let letter = match api::detail_json(&console, id).await {
        Ok(Some(letter)) => letter,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                layout(&caller, "Not found", "<h1>No dead letter has this id</h1>"),
            )
                .into_response();
        }
        Err(response) => return response,
    };
    let s = |k: &str| letter[k].as_str().unwrap_or("").to_owned();
    let mut html = format!(
        "<h1>Dead letter {id} {kind} {state}</h1>",
        kind = kind_badge(&s("kind")),
        state = state_badge(&s("state")),
    );
    if letter["failsAgain"] == Value::Bool(true) {
        html.push_str("<p class=\"warn\">Replayed as it is, this command fails the same way again: its body or id is what was wrong. Send a corrected command instead.</p>");
    }
    if letter["duplicateRisk"] == Value::Bool(true) {
        html.push_str("<p class=\"warn\">Its first provider call is older than the provider's idempotency window: a replay may create a second payment link.</p>");
    }
    if let Some(why) = letter["notReplayableBecause"].as_str() {
        let _ = write!(
            html,
            "<p class=\"warn\" id=\"not-replayable\">Not replayable: {}. A replay skips it; archive \
             it, or send a corrected command.</p>",
            esc(why)
        );
    }
    if caller.role == Role::Operator && s("state") == "open" {
        let replay = if letter["replayable"] == Value::Bool(true) {
            format!(
                "<button data-act=\"replay\" data-ids=\"[{id}]\" id=\"replay-one\">Replay</button>"
            )
        } else {
            String::new()
        };
        let _ = write!(
            html,
            "<div class=\"actions\">{replay}\
             <button data-act=\"archive\" class=\"secondary\" data-ids=\"[{id}]\" id=\"archive-one\">Archive</button></div>"
        );
    }
    html.push_str("<h2>Why</h2><dl>");
    for (name, key) in [
        ("Error", "message"),
        ("HTTP status", "httpStatus"),
        ("Provider answer", "errorBody"),
        ("Provider calls", "attempts"),
        ("Replays so far", "replayCount"),
        ("Command id", "commandId"),
        ("Trace id", "traceId"),
        ("Provider id", "providerId"),
        ("Invoice id", "invoiceId"),
        ("Ad hoc invoice id", "adhocInvoiceId"),
        ("Customer id", "customerId"),
        ("Description", "description"),
        ("E-mail", "email"),
        ("Stored with changes", "storedWithChanges"),
    ] {
        field(&mut html, name, &letter[key]);
    }
    if let Some(t) = letter["failedAt"]
        .as_str()
        .and_then(|t| t.parse::<DateTime<Utc>>().ok())
    {
        let _ = write!(html, "<dt>Failed</dt><dd>{}</dd>", when(t));
    }
    if let Some(previous) = letter["previousId"].as_i64() {
        let _ = write!(
            html,
            "<dt>Replayed from</dt><dd><a href=\"/dead-letters/{previous}\">dead letter {previous}</a></dd>"
        );
    }
    html.push_str("</dl><h2>Original message</h2><dl>");
    let exchange = letter["original"]["exchange"].as_str().unwrap_or("");
    field(
        &mut html,
        "Exchange",
        &Value::String(exchange_name(exchange)),
    );
    field(&mut html, "Routing key", &letter["original"]["routingKey"]);
    html.push_str("</dl><details open><summary>Properties</summary><pre>");
    html.push_str(&esc(&serde_json::to_string_pretty(
        &letter["original"]["properties"],
    )
    .unwrap_or_default()));
    html.push_str("</pre></details><details open><summary>Headers</summary><pre id=\"headers\">");
    html.push_str(&esc(&serde_json::to_string_pretty(
        &letter["original"]["headers"],
    )
    .unwrap_or_default()));
    let body = match letter["original"]["body"].as_str() {
        Some(text) => pretty_json(text).unwrap_or_else(|| text.to_owned()),
        None => format!("({} bytes, not UTF-8)", letter["original"]["bodyBytes"]),
    };
    let _ = write!(
        html,
        "</pre></details><details open><summary>Body ({} bytes)</summary><pre id=\"body\">{}</pre></details>",
        letter["original"]["bodyBytes"],
        esc(&body)
    );
    html.push_str("<h2>Replays</h2><table><tr><th>Run</th><th>When</th><th>Outcome</th></tr>");
    for replay in letter["replays"].as_array().into_iter().flatten() {
        let at = replay["replayedAt"]
            .as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok());
        let _ = write!(
            html,
            "<tr><td><a href=\"/replays/{run}\">{run}</a></td><td>{at}</td><td>{outcome}</td></tr>",
            run = replay["runId"],
            at = at.map(when).unwrap_or_default(),
            outcome = esc(replay["outcome"].as_str().unwrap_or("")),
        );
    }
    html.push_str("</table>");
    layout(&caller, &format!("Dead letter {id}"), &html).into_response()
}

async fn job(caller: Caller, State(console): State<Console>, Path(id): Path<i64>) -> Response {
    let run = match api::job_value(&console, id).await {
        Ok(Some(run)) => run,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                layout(&caller, "Not found", "<h1>No replay job has this id</h1>"),
            )
                .into_response();
        }
        Err(response) => return response,
    };
    let html = format!(
        "<h1>Replay job {id}</h1><div id=\"job\" data-id=\"{id}\"></div>\
         <div class=\"progress\"><div id=\"bar\"></div></div>\
         <dl><dt>State</dt><dd id=\"state\">{state}</dd><dt>Total</dt><dd id=\"total\">{total}</dd>\
         <dt>Replayed</dt><dd id=\"replayed\">{replayed}</dd><dt>Failed</dt><dd id=\"failed\">{failed}</dd>\
         <dt>Skipped</dt><dd id=\"skipped\">{skipped}</dd><dt>Requested by</dt><dd>{by}</dd>\
         <dt>Filter</dt><dd><code>{filter}</code></dd><dt>Rate</dt><dd>{rate}</dd></dl>\
         <p><a href=\"/dead-letters?state=open\">Back to the open dead letters</a></p>",
        state = esc(run["state"].as_str().unwrap_or("")),
        total = run["total"],
        replayed = run["replayed"],
        failed = run["failed"],
        skipped = run["skipped"],
        by = esc(run["requestedBy"].as_str().unwrap_or("")),
        filter = esc(&run["filter"].to_string()),
        rate = if run["rate"].is_null() {
            "no limit".into()
        } else {
            format!("{} per second", run["rate"])
        },
    );
    layout(&caller, &format!("Replay job {id}"), &html).into_response()
}

/// Most characters of an entry's filter a list shows; the whole is on the entry's own page.
const LISTED_FILTER_CHARS: usize = 300;
/// Ids an entry shows in the list.
const LISTED_IDS: usize = 20;

/// Who acted, from where.
fn source_and_address(e: &audit::Entry) -> String {
    match &e.client_address {
        Some(address) => format!("{} from {}", esc(&e.source), esc(address)),
        None => esc(&e.source),
    }
}

async fn audit_page(
    caller: Caller,
    State(console): State<Console>,
    Query(query): Query<api::AuditQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(50).clamp(1, api::AUDIT_PAGE);
    let found = async {
        let mut conn = console.pool.get().await?;
        let entries = audit::page(&mut conn, limit, query.before).await?;
        let runs = if query.before.is_none() {
            replay_runs::newest(&mut conn, 50).await?
        } else {
            Vec::new()
        };
        Ok::<_, crate::store::StoreError>((entries, runs))
    };
    let (entries, runs) = match found.await {
        Ok(found) => found,
        Err(e) => return reply::internal(e),
    };
    let mut html = String::from(
        "<h1>Audit</h1><table id=\"audit\"><tr><th>When</th><th>Who</th><th>From</th><th>Action</th>\
         <th>Count</th><th>Filter</th><th>Job</th><th>Ids</th></tr>",
    );
    for e in &entries {
        let ids: Vec<String> = e
            .ids
            .iter()
            .take(LISTED_IDS)
            .map(|i| format!("<a href=\"/dead-letters/{i}\">{i}</a>"))
            .collect();
        let whole = format!("<a href=\"/audit/{}\">the whole entry</a>", e.id);
        let more = if e.ids.len() > LISTED_IDS {
            format!(" … and {} more ({whole})", e.ids.len() - LISTED_IDS)
        } else {
            String::new()
        };
        let filter = e.filter.as_ref().map(Value::to_string).unwrap_or_default();
        let filter = if filter.chars().count() > LISTED_FILTER_CHARS {
            let cut: String = filter.chars().take(LISTED_FILTER_CHARS).collect();
            format!("<code>{}</code> … ({whole})", esc(&cut))
        } else {
            format!("<code>{}</code>", esc(&filter))
        };
        let _ = write!(
            html,
            "<tr><td>{at}</td><td>{who}</td><td>{from}</td><td>{action}</td><td>{count}</td>\
             <td>{filter}</td><td>{run}</td><td>{ids}{more}</td></tr>",
            at = when(e.at),
            who = esc(&e.actor),
            from = source_and_address(e),
            action = esc(&e.action),
            count = e.count,
            run = e
                .run_id
                .map(|r| format!("<a href=\"/replays/{r}\">{r}</a>"))
                .unwrap_or_default(),
            ids = ids.join(" "),
        );
    }
    html.push_str("</table>");
    if entries.len() as i64 == limit
        && let Some(last) = entries.last()
    {
        let _ = write!(
            html,
            "<p><a id=\"older\" href=\"/audit?before={}\">Older entries →</a></p>",
            last.id
        );
    }
    if !runs.is_empty() {
        html.push_str("<h2>Replay jobs</h2><table><tr><th>Job</th><th>Started</th><th>By</th><th>State</th><th>Total</th><th>Replayed</th><th>Failed</th><th>Skipped</th></tr>");
    }
    for r in &runs {
        let _ = write!(
            html,
            "<tr><td><a href=\"/replays/{id}\">{id}</a>{dry}</td><td>{at}</td><td>{by}</td><td>{state}</td><td>{total}</td><td>{replayed}</td><td>{failed}</td><td>{skipped}</td></tr>",
            id = r.id,
            dry = if r.dry_run { " (dry run)" } else { "" },
            at = when(r.started_at),
            by = esc(&r.requested_by),
            state = esc(&r.state),
            total = r.total,
            replayed = r.replayed,
            failed = r.failed,
            skipped = r.skipped,
        );
    }
    if !runs.is_empty() {
        html.push_str("</table>");
    }
    layout(&caller, "Audit", &html).into_response()
}

async fn audit_entry_page(
    caller: Caller,
    State(console): State<Console>,
    Path(id): Path<i64>,
) -> Response {
    let found = async {
        let mut conn = console.pool.get().await?;
        audit::find(&mut conn, id).await
    };
    let e = match found.await {
        Ok(Some(entry)) => entry,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                layout(&caller, "Not found", "<h1>No audit entry has this id</h1>"),
            )
                .into_response();
        }
        Err(e) => return reply::internal(e),
    };
    let ids: Vec<String> = e.ids.iter().map(i64::to_string).collect();
    let html = format!(
        "<h1>Audit entry {id}</h1><dl><dt>When</dt><dd>{at}</dd><dt>Who</dt><dd>{who}</dd>\
         <dt>From</dt><dd>{from}</dd><dt>Action</dt><dd>{action}</dd><dt>Count</dt><dd>{count}</dd>\
         <dt>Job</dt><dd>{run}</dd></dl><h2>Filter</h2><pre>{filter}</pre>\
         <h2>Ids ({n})</h2><pre id=\"ids\">{ids}</pre><p><a href=\"/audit\">Back to the audit log</a></p>",
        at = when(e.at),
        who = esc(&e.actor),
        from = source_and_address(&e),
        action = esc(&e.action),
        count = e.count,
        run = e
            .run_id
            .map(|r| format!("<a href=\"/replays/{r}\">{r}</a>"))
            .unwrap_or_else(|| "–".into()),
        filter = esc(&e
            .filter
            .as_ref()
            .map(|f| serde_json::to_string_pretty(f).unwrap_or_default())
            .unwrap_or_default()),
        n = ids.len(),
        ids = ids.join(" "),
    );
    layout(&caller, &format!("Audit entry {id}"), &html).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_indented_without_touching_a_digit() {
        let body = r#"{"amountInMajorCurrency":3.00,"d":"a, {b}: \"c\"","e":[],"f":{"g":[1,2e3]}}"#;
        let pretty = pretty_json(body).unwrap();
        assert!(
            pretty.contains("\"amountInMajorCurrency\": 3.00,"),
            "{pretty}"
        );
        assert!(pretty.contains(r#""d": "a, {b}: \"c\"""#), "{pretty}");
        assert!(pretty.contains("\"e\": []"), "{pretty}");
        assert!(pretty.contains("2e3"), "{pretty}");
        let compact: String = pretty.split_whitespace().collect();
        let original: String = body.split_whitespace().collect();
        assert_eq!(compact.replace(": ", ":"), original.replace(": ", ":"));
        assert_eq!(pretty_json("not json"), None);
    }

    #[test]
    fn markup_in_values_is_shown_not_run() {
        assert_eq!(esc("<script>\"'&"), "&lt;script&gt;&quot;&#39;&amp;");
        assert_eq!(esc("bidi-\u{202E}gpj.exe"), "bidi-⟨U+202E⟩gpj.exe");
        assert_eq!(attr("bidi-\u{202E}<"), "bidi-\u{202E}&lt;");
    }
}
