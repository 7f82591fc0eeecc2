//! A local stand-in for the payment provider's API: bearer auth, the command's validation, a new
//! link (201) per request and the same link (200) when an `Idempotency-Key` comes again, with
//! optional latency, a rate of 503 answers, a rate limit (429 with `Retry-After`) and provider ids
//! that are down or flaky. A harness may also turn faults on and off while it runs ([`Sim`]),
//! including an applied call whose answer is lost, and read what each key got ([`KeyLedger`]).
//! For development, the compose demo, tests and the soak.

use super::PAYMENT_LINK_PATH;
use crate::command::Command;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;

/// How the simulator behaves.
#[derive(Clone, Debug, Default)]
pub struct SimOptions {
    /// The bearer token it accepts.
    pub token: String,
    /// Added before every answer.
    pub latency: Duration,
    /// Fraction of calls (0 to 1) answered 503.
    pub fail_rate: f64,
    /// Fraction of calls (0 to 1) that hang for a minute before answering, to make callers time out.
    pub stall_rate: f64,
    /// Requests per second above which calls are answered 429 with `Retry-After: 1`, as a real
    /// provider's rate limit does (changed while it runs by `PUT /_sim/rate-limit`).
    pub rate_limit: Option<u32>,
    /// Answer 429 without `Retry-After`, as providers that publish no wait do.
    pub no_retry_after: bool,
    /// Provider ids whose calls are all answered 503 (one provider down, the others up).
    pub fail_provider_ids: Vec<i64>,
    /// Provider ids whose calls are answered 503 30 % of the time (a provider that fails
    /// transiently: retries get through, and the circuit breaker's shipped threshold of half is
    /// not reached).
    pub flaky_provider_ids: Vec<i64>,
}

/// Faults a harness turns on and off while the simulator runs (per mille: of 1,000 calls).
#[derive(Default, Debug)]
pub struct Faults {
    /// Added before every answer, on top of [`SimOptions::latency`].
    pub latency_ms: AtomicU64,
    /// Calls answered 503.
    pub fail_per_mille: AtomicU32,
    /// Calls that hang for a minute before anything is done, as a provider that stopped answering.
    pub hang_per_mille: AtomicU32,
    /// Calls applied (the link is made or found) whose answer is then lost: the connection is
    /// cut instead of answered, so the caller cannot tell it from a call that never arrived.
    pub lose_per_mille: AtomicU32,
}

/// What one `Idempotency-Key` got: how the same command's calls went, for a harness's account.
#[derive(Clone, Debug, Default)]
pub struct KeyLedger {
    /// Calls made with it.
    pub requests: u64,
    /// Calls that made or found its link (answered or not).
    pub applied: u64,
    /// Applied calls whose answer was lost on purpose.
    pub lost: u64,
    /// Calls that hung (by [`Faults::hang_per_mille`] or [`SimOptions::stall_rate`]).
    pub hung: u64,
}

/// A running simulator's handle: its faults, its rate limit and its per-key ledger.
#[derive(Clone)]
pub struct Sim(Arc<SimState>);

impl Sim {
    /// The faults it applies now.
    pub fn faults(&self) -> &Faults {
        &self.0.faults
    }

    /// Sets the rate limit (requests per second; 0 for none).
    pub fn set_rate_limit(&self, limit: u32) {
        self.0.rate_limit.store(limit, Ordering::SeqCst);
    }

    /// Every key it was called with, and what the key got.
    pub async fn ledger(&self) -> HashMap<String, KeyLedger> {
        self.0.per_key.lock().await.clone()
    }
}

/// The share of a flaky provider id's calls answered 503.
const FLAKY_RATE: f64 = 0.3;

/// Requests admitted in the current one-second window, for the rate limit.
#[derive(Default)]
struct Window {
    second: u64,
    admitted: u32,
}

#[derive(Default)]
struct SimState {
    options: Option<SimOptions>,
    requests: AtomicU64,
    /// What each `Idempotency-Key` got, to tell a repeated call from a repeated link.
    per_key: Mutex<HashMap<String, KeyLedger>>,
    faults: Faults,
    next_id: AtomicI64,
    links: Mutex<HashMap<String, (String, String)>>,
    window: std::sync::Mutex<Window>,
    rate_limited: AtomicU64,
    /// The rate limit now (0: none), as `PUT /_sim/rate-limit` last set it.
    rate_limit: AtomicU32,
}

/// The simulator's routes: the provider endpoint and `GET /_sim/stats` (request and link counts,
/// and how often one `Idempotency-Key` was called).
pub fn router(options: SimOptions) -> Router {
    controlled(options).0
}

/// The simulator's routes and the handle that changes its faults while it serves them.
pub fn controlled(options: SimOptions) -> (Router, Sim) {
    let state = Arc::new(SimState {
        rate_limit: AtomicU32::new(options.rate_limit.unwrap_or(0)),
        options: Some(options),
        next_id: AtomicI64::new(1),
        ..SimState::default()
    });
    let router = Router::new()
        .route(PAYMENT_LINK_PATH, post(create_link))
        .route("/_sim/stats", get(stats))
        .route("/_sim/rate-limit", put(set_rate_limit))
        .with_state(state.clone());
    (router, Sim(state))
}

/// Serves the simulator on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: SimOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(options))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, serde_json::json!({ "error": message }).to_string())
}

async fn stats(State(state): State<Arc<SimState>>) -> Response {
    let links = state.links.lock().await.len();
    let per_key = state.per_key.lock().await;
    json(
        StatusCode::OK,
        serde_json::json!({
            "requests": state.requests.load(Ordering::SeqCst),
            "links": state.next_id.load(Ordering::SeqCst) - 1,
            "idempotencyKeys": links,
            "maxRequestsPerKey": per_key.values().map(|k| k.requests).max().unwrap_or(0),
            "repeatedKeys": per_key.values().filter(|k| k.requests > 1).count(),
            "rateLimited": state.rate_limited.load(Ordering::SeqCst),
        })
        .to_string(),
    )
}

/// Sets the rate limit from the body (requests per second; 0 for none), as a provider that
/// changes an account's limit while it is being called.
async fn set_rate_limit(State(state): State<Arc<SimState>>, body: String) -> Response {
    match body.trim().parse::<u32>() {
        Ok(limit) => {
            state.rate_limit.store(limit, Ordering::SeqCst);
            json(
                StatusCode::OK,
                serde_json::json!({ "rateLimit": limit }).to_string(),
            )
        }
        Err(_) => error(StatusCode::BAD_REQUEST, "the body must be a whole number"),
    }
}

/// The simulator's answer; the amount is copied as decimal text so it stays exact.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SimLink<'a> {
    id: i64,
    payment_provider_id: i64,
    amount_in_major_currency: &'a RawValue,
    currency_id: i64,
    description: &'a str,
    email_address: Option<&'a str>,
    invoice_id: Option<i64>,
    adhoc_invoice_id: Option<i64>,
    customer_id: Option<i64>,
    payment_link: String,
}

/// Whether one more request fits in this second's `limit`.
fn admitted(state: &SimState, limit: u32) -> bool {
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut window = state.window.lock().expect("window lock");
    if window.second != second {
        *window = Window {
            second,
            admitted: 0,
        };
    }
    window.admitted += 1;
    window.admitted <= limit
}

/// A random draw in [0, 1) from the OS generator (no extra crate for one coin flip).
fn draw() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 76) as f64 / (1u64 << 52) as f64
}

/// Whether this call draws a fault set at `per_mille`.
fn drawn(per_mille: &AtomicU32) -> bool {
    let p = per_mille.load(Ordering::Relaxed);
    p > 0 && draw() * 1000.0 < f64::from(p)
}

/// An answer that never arrives: the body fails before its first byte, so the server cuts the
/// connection instead of finishing the response.
fn lost_answer() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("the simulator lost this answer"))
    });
    (StatusCode::CREATED, axum::body::Body::from_stream(failing)).into_response()
}

/// Notes one more call for `key` in the ledger, as `note` says.
async fn note(state: &SimState, key: Option<&str>, note: impl FnOnce(&mut KeyLedger)) {
    if let Some(key) = key {
        note(
            state
                .per_key
                .lock()
                .await
                .entry(key.to_owned())
                .or_default(),
        );
    }
}

/// Answers one call and logs it in one line: method, idempotency key, status, latency.
async fn create_link(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let response = answer(&state, &headers, &body).await;
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    tracing::info!(
        method = "POST",
        idempotency_key = key.unwrap_or("-"),
        status = response.status().as_u16(),
        latency_ms = started.elapsed().as_millis() as u64,
        "provider request"
    );
    response
}

async fn answer(state: &SimState, headers: &HeaderMap, body: &[u8]) -> Response {
    let options = state.options.as_ref().expect("router sets options");
    state.requests.fetch_add(1, Ordering::SeqCst);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    note(state, key.as_deref(), |k| k.requests += 1).await;
    let latency =
        options.latency + Duration::from_millis(state.faults.latency_ms.load(Ordering::Relaxed));
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(refused) = refused_before_reading(state, headers, key.as_deref()).await {
        return refused;
    }
    let command = match Command::parse(body) {
        Ok(command) => command,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.0),
    };
    if let Some(refused) = refused_for_its_provider(options, &command) {
        return refused;
    }
    link(state, key, &command).await
}

/// The simulator's answer before it reads the request: the bearer token refused, the call
/// hung, rate-limited or failed as the options and faults say; none when it goes on.
async fn refused_before_reading(
    state: &SimState,
    headers: &HeaderMap,
    key: Option<&str>,
) -> Option<Response> {
    let options = state.options.as_ref().expect("router sets options");
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.and_then(|v| v.strip_prefix("Bearer ")) {
        None => return Some(error(StatusCode::UNAUTHORIZED, "missing bearer token")),
        Some(token) if token != options.token => {
            return Some(error(StatusCode::FORBIDDEN, "bearer token not accepted"));
        }
        Some(_) => {}
    }
    if (options.stall_rate > 0.0 && draw() < options.stall_rate)
        || drawn(&state.faults.hang_per_mille)
    {
        note(state, key, |k| k.hung += 1).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    let limit = state.rate_limit.load(Ordering::SeqCst);
    if limit > 0 && !admitted(state, limit) {
        state.rate_limited.fetch_add(1, Ordering::SeqCst);
        let mut answer = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
        if !options.no_retry_after {
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        return Some(answer);
    }
    let failing = (options.fail_rate > 0.0 && draw() < options.fail_rate)
        || drawn(&state.faults.fail_per_mille);
    failing.then(|| error(StatusCode::SERVICE_UNAVAILABLE, "simulated outage"))
}

/// A 503 for a command whose provider id the options say is down or flaky.
fn refused_for_its_provider(options: &SimOptions, command: &Command) -> Option<Response> {
    let provider = command.payment_provider_id;
    if options.fail_provider_ids.contains(&provider) {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated outage of this provider id",
        ));
    }
    (options.flaky_provider_ids.contains(&provider) && draw() < FLAKY_RATE).then(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated transient failure of this provider id",
        )
    })
}

/// The link for `command`: made once per `Idempotency-Key` (the same request again gets the
/// same link; another request with the key a 422), its answer lost when the faults say so.
async fn link(state: &SimState, key: Option<String>, command: &Command) -> Response {
    let request = command.canonical_request_json();
    let lose = drawn(&state.faults.lose_per_mille);
    let mut links = state.links.lock().await;
    if let Some(key) = &key
        && let Some((earlier_request, answer)) = links.get(key)
    {
        return if *earlier_request == request {
            let answer = answer.clone();
            drop(links);
            applied(state, Some(key), lose).await;
            if lose {
                return lost_answer();
            }
            json(StatusCode::OK, answer)
        } else {
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key reused with another request",
            )
        };
    }
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let amount = RawValue::from_string(command.amount.to_json_number()).expect("decimal is JSON");
    let answer = serde_json::to_string(&SimLink {
        id,
        payment_provider_id: command.payment_provider_id,
        amount_in_major_currency: &amount,
        currency_id: 1,
        description: &command.description,
        email_address: command.email_address.as_ref().map(|e| e.as_str()),
        invoice_id: command.invoice_id,
        adhoc_invoice_id: command.adhoc_invoice_id,
        customer_id: command.customer_id,
        payment_link: format!("https://instantpaymentlink/sim-{id}"),
    })
    .expect("plain fields serialize");
    if let Some(key) = &key {
        links.insert(key.clone(), (request, answer.clone()));
    }
    drop(links);
    applied(state, key.as_deref(), lose).await;
    if lose {
        return lost_answer();
    }
    json(StatusCode::CREATED, answer)
}

/// Notes an applied call for `key`, and whether its answer is about to be lost.
async fn applied(state: &SimState, key: Option<&str>, lost: bool) {
    note(state, key, |k| {
        k.applied += 1;
        k.lost += u64::from(lost);
    })
    .await;
}
