//! The operators' console: a web page and a JSON API over the dead-letter store. Pages and API
//! share one set of handlers' logic (the pages call the API from the browser), so a script can do
//! whatever a person can. Operators sign in with a token (bearer for scripts, a session cookie
//! for browsers, with a CSRF token on every action); a `viewer` sees everything and changes
//! nothing. Replays run as background jobs (replay runs), resumed by any console when the one
//! running them stopped.

mod api;
mod auth;
mod pages;
mod query;
mod reply;
mod throttle;
mod views;

use crate::config::Settings;
use crate::dead_letters::Worked;
use crate::store::{self, PgPool, replay_runs};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use auth::{Operator, Role, operator_config, operators, parse_token_sha256, token_sha256};
pub use throttle::TrustedProxies;

/// What every handler reaches.
#[derive(Clone)]
pub struct Console {
    settings: Arc<Settings>,
    pool: PgPool,
    operators: Arc<Vec<Operator>>,
    sessions: auth::Sessions,
    /// The jobs this console is running, which it never takes over from itself.
    running: Arc<std::sync::Mutex<std::collections::HashSet<i64>>>,
    throttle: throttle::Throttle,
    /// Whose `X-Forwarded-*` headers are believed.
    trusted_proxies: throttle::TrustedProxies,
    /// The console's own figures, served at `/metrics`.
    registry: prometheus::Registry,
    stop: CancellationToken,
}

/// Most bytes in a request body: 10,000 ids with room to spare.
const BODY_LIMIT: usize = 256 * 1024;
/// Longest request target (path and query) answered; longer ones get 414.
const MAX_URI_BYTES: usize = 8 * 1024;
/// Most bytes of request headers answered; more get 431.
const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Most request header lines answered; more get 431.
const MAX_HEADERS: usize = 100;

/// The routes: pages at `/`, the JSON API under `/api/`, the pages' script and style under
/// `/static/`, the console's figures at `/metrics`; every answer bounded in time and carrying the
/// security headers.
pub fn router(console: Console) -> Router {
    let timeout = Duration::from_millis(console.settings.console.request_timeout_ms);
    let hosted = console.clone();
    api::routes()
        .merge(pages::routes())
        .route("/metrics", get(metrics))
        .with_state(console)
        .layer(axum::middleware::from_fn_with_state(hosted, host_check))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(axum::middleware::from_fn(limits))
        .layer(axum::middleware::map_response(secure))
}

/// With `console.public_host` set, refuses (421) a request that names another host: a page of
/// another site that points a DNS name of its own at the console (DNS rebinding) reaches it
/// under that name, and is turned away. Behind a trusted proxy, its `X-Forwarded-Host` counts.
async fn host_check(
    axum::extract::State(console): axum::extract::State<Console>,
    request: Request,
    next: Next,
) -> Response {
    let public = console.settings.console.public_host.trim();
    if public.is_empty() {
        return next.run(request).await;
    }
    let named = named_host(&request, &console.trusted_proxies);
    if named.is_some_and(|h| h.eq_ignore_ascii_case(public)) {
        return next.run(request).await;
    }
    reply::error(
        StatusCode::MISDIRECTED_REQUEST,
        "this console answers only to its own address (console.public_host)",
    )
}

/// The host a request names: its `Host`, or behind a trusted proxy its `X-Forwarded-Host`.
fn named_host(request: &Request, trusted: &throttle::TrustedProxies) -> Option<String> {
    let via_proxy = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .is_some_and(|peer| trusted.contains(peer.0.ip()));
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    via_proxy
        .then(|| header("x-forwarded-host"))
        .flatten()
        .or_else(|| header("host"))
}

/// Refuses request targets and headers larger than any page or script of ours sends, with our
/// own answer (hyper's, far above these, would carry none of the security headers).
async fn limits(request: Request, next: Next) -> Response {
    let uri = request.uri().to_string().len();
    if uri > MAX_URI_BYTES {
        return reply::error(
            StatusCode::URI_TOO_LONG,
            &format!("the request target is {uri} bytes; at most {MAX_URI_BYTES} are read"),
        );
    }
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return reply::error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &format!(
                "{} header lines of {bytes} bytes; at most {MAX_HEADERS} lines and \
                 {MAX_HEADER_BYTES} bytes are read",
                headers.len()
            ),
        );
    }
    next.run(request).await
}

/// What every answer tells the browser: no framing by another site (clickjacking), scripts and
/// styles only from the console's own files (no inline script or style runs, so an injected one
/// would not either), no referrer leaving the console (`same-origin`: with `no-referrer`, browsers
/// send `Origin: null` on the sign-in form, which could not then be told from another site's), no caching of data.
async fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-frame-options", "DENY"),
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("referrer-policy", "same-origin"),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// The console's figures in Prometheus text (refused and throttled authentications).
async fn metrics(State(console): State<Console>) -> Response {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&console.registry.gather())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Serves the console on `listener` until `stop` fires; resumes stalled replay runs meanwhile.
pub async fn serve(
    settings: Settings,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let operators = operators(&settings.console, |name| std::env::var(name).ok())?;
    if operators.is_empty() {
        anyhow::bail!(
            "no console operator is configured: add [[console.operators]] to the config file \
             (payment-link-worker console hash-token prints one), or set CONSOLE_OPERATOR_TOKEN"
        );
    }
    let pool = store::pool(&settings.database)?;
    if settings.database.run_migrations {
        crate::startup::migrate(&settings, &pool).await?;
    } else {
        crate::startup::wait_for_schema(&settings, &pool, &stop).await?;
    }
    let registry = prometheus::Registry::new();
    let console = Console {
        throttle: throttle::Throttle::new(
            settings.console.auth_failures_allowed,
            settings.console.auth_failures_per_minute,
            &registry,
        ),
        trusted_proxies: throttle::TrustedProxies::parse(&settings.console.trust_forwarded_for)
            .map_err(|why| anyhow::anyhow!("`console.trust_forwarded_for` {why}"))?,
        registry,
        settings: Arc::new(settings),
        sessions: auth::Sessions::new(pool.clone()),
        pool,
        operators: Arc::new(operators),
        running: Arc::default(),
        stop: stop.clone(),
    };
    tokio::spawn(resume_stalled_runs(console.clone()));
    tokio::spawn(audit_refusals(console.clone()));
    tracing::info!(address = %listener.local_addr()?, "console listening");
    let limits = crate::http_server::Limits::console(&console.settings.console);
    crate::http_server::serve(listener, router(console), limits, stop).await;
    Ok(())
}

/// Runs a replay run in the background until it ends (or the console stops; the run is then
/// resumed by the next console that sees it stalled).
fn spawn_run(console: &Console, run_id: i64, rate: Option<f64>) {
    if !console.running.lock().expect("runs lock").insert(run_id) {
        return;
    }
    let console = console.clone();
    tokio::spawn(async move {
        let worked = async {
            let mut conn = console.pool.get().await?;
            crate::dead_letters::work(&console.settings, &mut conn, run_id, rate).await
        };
        tokio::select! {
            () = console.stop.cancelled() => {}
            result = worked => match result {
                Ok(Worked { stopped: Some(reason), .. }) => tracing::warn!(run_id, %reason,
                    "replay run stopped by itself; resume it once the cause is fixed"),
                Ok(worked) => tracing::info!(run_id, replayed = worked.replayed.len(),
                    failed = worked.failed.len(), "replay run done"),
                Err(error) => tracing::error!(run_id, error = %format!("{error:#}"),
                    "replay run stopped; it resumes once seen stalled"),
            }
        }
        console.running.lock().expect("runs lock").remove(&run_id);
    });
}

/// Writes the refused authentications to the audit log, summed by address and kind, once per
/// [`throttle::AUDIT_WINDOW`] (and once more when the console stops).
async fn audit_refusals(console: Console) {
    let mut every = tokio::time::interval(throttle::AUDIT_WINDOW);
    every.tick().await;
    loop {
        let stopping = tokio::select! {
            () = console.stop.cancelled() => true,
            _ = every.tick() => false,
        };
        let entries = console.throttle.take_unaudited();
        if !entries.is_empty() {
            let written = crate::store::with_conn(&console.pool, async |conn| {
                for (address, how, count) in &entries {
                    let entry = crate::store::audit::NewEntry {
                        actor: "(unknown)".into(),
                        source: "console".into(),
                        action: format!("{how}-refused"),
                        filter: None,
                        count: *count,
                        ids: Vec::new(),
                        run_id: None,
                        client_address: address.map(|a| a.to_string()),
                        detail: None,
                    };
                    crate::store::audit::record(conn, &entry).await?;
                }
                Ok(())
            });
            if let Err(error) = written.await {
                tracing::warn!(%error, refusals = entries.len(),
                    "cannot write refused authentications to the audit log");
            }
        }
        if stopping {
            return;
        }
    }
}

/// Takes over the jobs nobody has advanced for `console.job_stalled_after_ms` (their console
/// stopped) and runs them to their end; looks twice per that period.
async fn resume_stalled_runs(console: Console) {
    let stalled = Duration::from_millis(console.settings.console.job_stalled_after_ms);
    let mut every = tokio::time::interval(stalled / 2);
    loop {
        tokio::select! {
            () = console.stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let taken = async {
            let mut conn = console.pool.get().await?;
            let mut taken = Vec::new();
            for run_id in replay_runs::stalled(&mut conn, stalled).await? {
                let ours = console.running.lock().expect("runs lock").contains(&run_id);
                if !ours && replay_runs::take_over(&mut conn, run_id, stalled).await? {
                    let rate = replay_runs::find(&mut conn, run_id)
                        .await?
                        .and_then(|r| r.rate_per_second);
                    taken.push((run_id, rate));
                }
            }
            Ok::<_, store::StoreError>(taken)
        };
        match taken.await {
            Ok(taken) => {
                for (run_id, rate) in taken {
                    tracing::info!(run_id, "resuming a replay run that stopped midway");
                    spawn_run(&console, run_id, rate);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot look for stalled replay runs"),
        }
    }
}
