//! The operators' console: a web page and a JSON API over the dead-letter store. Pages and API
//! share one set of handlers' logic (the pages call the API from the browser), so a script can do
//! whatever a person can. Operators sign in with a token (bearer for scripts, a session cookie
//! for browsers, with a CSRF token on every action); a `viewer` sees everything and changes
//! nothing. Replays run as background jobs (replay runs), resumed by any console when the one
//! running them stopped.

mod api;
mod auth;
mod pages;

use crate::config::Settings;
use crate::store::{self, PgPool, replay_runs};
use anyhow::Context as _;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use auth::{Operator, Role, operators, token_sha256};

/// What every handler reaches.
#[derive(Clone)]
pub struct Console {
    settings: Arc<Settings>,
    pool: PgPool,
    operators: Arc<Vec<Operator>>,
    sessions: auth::Sessions,
    /// The jobs this console is running, which it never takes over from itself.
    running: Arc<std::sync::Mutex<std::collections::HashSet<i64>>>,
    stop: CancellationToken,
}

/// The routes: pages at `/`, the JSON API under `/api/`.
pub fn router(console: Console) -> Router {
    api::routes()
        .merge(pages::routes())
        .with_state(console)
        .layer(axum::middleware::map_response(secure))
}

/// What every answer tells the browser: no framing by another site (clickjacking), scripts and
/// styles only from the page itself, no referrer leaving the console, no caching of data.
async fn secure(mut response: axum::response::Response) -> axum::response::Response {
    use axum::http::HeaderValue;
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-frame-options", "DENY"),
        (
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
        ("referrer-policy", "no-referrer"),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Serves the console on `listener` until `stop` fires; resumes stalled replay jobs meanwhile.
pub async fn serve(
    settings: Settings,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let operators = operators(&settings.console, |name| std::env::var(name).ok())?;
    if operators.is_empty() {
        anyhow::bail!(
            "no console operator is configured: add [[console.operators]] to the config file, or \
             set CONSOLE_OPERATOR_TOKEN"
        );
    }
    let pool = store::pool(&settings.database)?;
    if settings.database.run_migrations {
        crate::startup::migrate(&settings, &pool).await?;
    }
    let console = Console {
        settings: Arc::new(settings),
        pool,
        operators: Arc::new(operators),
        sessions: auth::Sessions::default(),
        running: Arc::default(),
        stop: stop.clone(),
    };
    tokio::spawn(resume_stalled_jobs(console.clone()));
    tracing::info!(address = %listener.local_addr()?, "console listening");
    axum::serve(listener, router(console))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
        .context("the console stopped")
}

/// Runs a replay job in the background until it ends (or the console stops; the job is then
/// resumed by the next console that sees it stalled).
fn spawn_job(console: &Console, run_id: i64, rate: Option<f64>) {
    if !console.running.lock().expect("jobs lock").insert(run_id) {
        return;
    }
    let console = console.clone();
    tokio::spawn(async move {
        let worked = async {
            let mut conn = console.pool.get().await?;
            crate::ops::dead_letters::work(&console.settings, &mut conn, run_id, rate).await
        };
        tokio::select! {
            () = console.stop.cancelled() => {}
            result = worked => match result {
                Ok(worked) => tracing::info!(run_id, replayed = worked.replayed.len(),
                    failed = worked.failed.len(), "replay job done"),
                Err(error) => tracing::error!(run_id, error = %format!("{error:#}"),
                    "replay job stopped; it resumes once seen stalled"),
            }
        }
        console.running.lock().expect("jobs lock").remove(&run_id);
    });
}

/// Takes over the jobs nobody has advanced for `console.job_stalled_after_ms` (their console
/// stopped) and runs them to their end; looks twice per that period.
async fn resume_stalled_jobs(console: Console) {
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
                let ours = console.running.lock().expect("jobs lock").contains(&run_id);
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
                    tracing::info!(run_id, "resuming a replay job that stopped midway");
                    spawn_job(&console, run_id, rate);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot look for stalled replay jobs"),
        }
    }
}
