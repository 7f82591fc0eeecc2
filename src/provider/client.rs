//! The HTTP client of the provider API: one command's calls, each through its provider's lane
//! (breaker and pacing), retried within the budget. What an answer means is [`super::answer`]'s.

use super::PAYMENT_LINK_PATH;
use super::answer::{
    LinkCreated, ProviderError, StatusClass, classify, describe_transport_error, parse_retry_after,
    signal,
};
use super::lanes::Lanes;
use super::pacing::Signal;
use super::retry::{self, Attempt, GaveUp};
use crate::config::{ProviderSettings, RetrySettings, Secret};
use crate::errors::ErrorKind;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// A failed call that will be retried, as a repeated problem: logged in full the first time,
/// then summarised per interval until that provider stops answering so.
fn retry_problem(provider_id: i64, error: &ProviderError, key: String) -> crate::repeats::Problem {
    let (what, fix) = match error.http_status {
        Some(429) => (
            format!("provider {provider_id} answers 429 Too Many Requests"),
            "it is limiting our rate; set provider.max_requests_per_second below its limit",
        ),
        Some(status) => (
            format!("provider {provider_id} answers {status}"),
            "calls are retried with backoff; the circuit breaker opens if it persists",
        ),
        None => (
            format!("provider {provider_id} calls fail: {}", error.message),
            "calls are retried with backoff; check that provider.base_url is reachable",
        ),
    };
    crate::repeats::Problem {
        key,
        what,
        fix: fix.to_owned(),
        ends_when_quiet: true,
    }
}

/// The final result of a provider call with its retries.
#[derive(Debug)]
pub struct CallResult {
    /// The link, or why there is none.
    pub outcome: Result<LinkCreated, (ErrorKind, ProviderError)>,
    /// HTTP requests made, including the failed ones.
    pub attempts: i32,
}

/// One command's call, as every attempt of it needs it.
struct Call<'a> {
    provider_id: i64,
    command_id: &'a str,
    request_json: &'a str,
    carried_trace: &'a [(String, String)],
    /// Whether an open circuit may end the round at once (a delay tier is left to wait in).
    may_park: bool,
    /// Time spent waiting for the lane (its limit, its pause, its pace), not taken from the
    /// retry budget.
    queued_ms: AtomicU64,
}

/// The provider API client; cheap to clone.
#[derive(Clone)]
pub struct ProviderClient {
    http: reqwest::Client,
    url: reqwest::Url,
    /// The URL without credentials, for spans and logs.
    url_for_logs: String,
    token: Secret,
    retry: RetrySettings,
    lanes: Arc<Lanes>,
    max_response_bytes: usize,
}

impl ProviderClient {
    /// Builds the client with the configured timeouts; redirects are not followed (a redirected
    /// POST would silently turn into a GET).
    pub fn new(
        settings: &ProviderSettings,
        retry: &RetrySettings,
        lanes: Arc<Lanes>,
    ) -> anyhow::Result<Self> {
        let base = settings.base_url.expose().trim_end_matches('/');
        let url = reqwest::Url::parse(&format!("{base}{PAYMENT_LINK_PATH}"))
            .map_err(|e| anyhow::anyhow!("`provider.base_url` is not a valid URL: {e}"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .timeout(Duration::from_millis(settings.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("payment-link-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let url_for_logs = crate::config::redact_url(url.as_str());
        Ok(Self {
            http,
            url,
            url_for_logs,
            token: settings.token.clone(),
            max_response_bytes: settings.max_response_bytes,
            retry: retry.clone(),
            lanes,
        })
    }

    /// Whether the circuit of `provider_id` is open now (a call would be refused and no probe is
    /// due), so that a command which may wait in a delay queue goes there straight away.
    pub fn circuit_open(&self, provider_id: i64) -> bool {
        self.lanes.lane(provider_id).breaker.refusing()
    }

    /// Asks for a link, retrying transient failures within the retry budget. The command id is
    /// the `Idempotency-Key`, so a retried or repeated request cannot make a second link. Each
    /// call goes through the lane of `provider_id` (its breaker and its concurrency limit).
    pub async fn create_link(
        &self,
        provider_id: i64,
        command_id: &str,
        request_json: &str,
        carried_trace: &[(String, String)],
        may_park: bool,
        metrics: &Metrics,
    ) -> CallResult {
        // Held for the whole sequence, so that the lane (and its breaker's count) is kept
        // between tries however many other providers' lanes come and go.
        let _lane = self.lanes.lane(provider_id);
        let attempts = AtomicI32::new(0);
        let call = Call {
            provider_id,
            command_id,
            request_json,
            carried_trace,
            may_park,
            queued_ms: AtomicU64::new(0),
        };
        let queued = || Duration::from_millis(call.queued_ms.load(Ordering::Relaxed));
        let result = retry::retry_spending(
            &self.retry,
            || self.attempt(&call, &attempts, metrics),
            |error: &ProviderError, wait| {
                metrics.retry();
                let key = format!("provider {provider_id} {:?}", error.http_status);
                let problem = || retry_problem(provider_id, error, key.clone());
                crate::repeats::occurred(problem, &key, || {
                    tracing::warn!(command_id, http_status = error.http_status, error = %error.message,
                        retry_in_ms = wait.as_millis() as u64, "provider call failed; retrying");
                });
            },
            queued,
        )
        .await;
        let attempts = attempts.load(Ordering::SeqCst);
        let outcome = match result {
            Ok(link) => Ok(link),
            Err(GaveUp::Permanent(error)) => {
                let class = error
                    .http_status
                    .map_or(StatusClass::Rejected, StatusClass::of);
                Err((class.permanent_kind(), error))
            }
            Err(GaveUp::Exhausted(mut error)) => {
                error.message = format!(
                    "gave up after {attempts} attempts within retry.max_elapsed_ms={}: {}",
                    self.retry.max_elapsed_ms, error.message
                );
                Err((ErrorKind::RetriesExhausted, error))
            }
        };
        CallResult { outcome, attempts }
    }

    /// One HTTP call, admitted by its provider's circuit breaker and concurrency limit and
    /// reported to both, in a client span whose trace context goes to the provider. While the
    /// provider's circuit is open, a command that may park does not wait here holding its
    /// prefetch slot: the round ends ([`Attempt::NotNow`]) and it waits in a delay queue.
    async fn attempt(
        &self,
        call: &Call<'_>,
        attempts: &AtomicI32,
        metrics: &Metrics,
    ) -> Result<LinkCreated, Attempt<ProviderError>> {
        let lane = self.lanes.lane(call.provider_id);
        let permit = if call.may_park {
            lane.breaker.try_admit().ok_or_else(|| {
                Attempt::NotNow(ProviderError {
                    message: format!(
                        "the circuit for paymentProviderId {} is open: that provider looks down",
                        call.provider_id
                    ),
                    http_status: None,
                    body: None,
                    timed_out: false,
                })
            })?
        } else {
            lane.breaker.admit().await
        };
        let waiting = Instant::now();
        let slot = lane.pacer.turn(self.lanes.workers()).await;
        call.queued_ms
            .fetch_add(waiting.elapsed().as_millis() as u64, Ordering::Relaxed);
        // Counted once the request is sure to be made: a parked round made none.
        let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
        let (command_id, request_json, carried_trace) =
            (call.command_id, call.request_json, call.carried_trace);
        let span = if crate::telemetry::child_spans() {
            tracing::info_span!(
                "POST",
                otel.kind = "client",
                http.request.method = "POST",
                url.full = %self.url_for_logs,
                server.address = self.url.host_str().unwrap_or(""),
                http.request.resend_count = attempt - 1,
                http.response.status_code = tracing::field::Empty,
                error.type = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let started = Instant::now();
        let result = self
            .call(command_id, request_json, carried_trace, attempt)
            .instrument(span.clone())
            .await;
        let status = match &result {
            Ok(link) => Some(link.http_status),
            Err(Attempt::Permanent(e) | Attempt::Transient(e, _) | Attempt::NotNow(e)) => {
                e.http_status
            }
        };
        let elapsed = started.elapsed();
        metrics.provider_call(status, elapsed);
        let signal = signal(&result, elapsed);
        match status {
            Some(status) => span.record("http.response.status_code", i64::from(status)),
            None => span.record("error.type", "transport"),
        };
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        // "Slow down" says the provider is up: the breaker does not count it as a failure.
        let slowed = matches!(signal, Signal::SlowDown(_));
        permit.record(matches!(&result, Err(Attempt::Transient(..))) && !slowed);
        // A `Retry-After` the lane holds now pauses the whole lane: the next attempt waits
        // there, and that wait is not taken from the budget; the round's own wait is only its
        // backoff interval.
        let held = lane.pacer.report(slot, signal, self.lanes.workers());
        match result {
            Err(Attempt::Transient(error, Some(_))) if held => Err(Attempt::Transient(error, None)),
            other => other,
        }
    }

    async fn call(
        &self,
        command_id: &str,
        request_json: &str,
        carried_trace: &[(String, String)],
        attempt: i32,
    ) -> Result<LinkCreated, Attempt<ProviderError>> {
        let mut request = self
            .http
            .post(self.url.clone())
            .bearer_auth(self.token.expose())
            .header("Idempotency-Key", command_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(request_json.to_owned());
        for (name, value) in crate::telemetry::outgoing(carried_trace) {
            request = request.header(name, value);
        }
        tracing::debug!(command_id, attempt, "calling the provider");
        let response = request.send().await.map_err(|e| {
            Attempt::Transient(
                ProviderError {
                    message: describe_transport_error(&e),
                    http_status: None,
                    body: None,
                    timed_out: e.is_timeout(),
                },
                None,
            )
        })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let reason = response.status().canonical_reason().unwrap_or("");
        let body = read_capped(response, self.max_response_bytes)
            .await
            .map_err(|message| {
                let message = format!("provider answered {status} but {message}");
                let error = ProviderError {
                    message,
                    http_status: Some(status),
                    body: None,
                    timed_out: false,
                };
                Attempt::Transient(error, None)
            })?;
        classify(status, reason, body, retry_after)
    }
}

/// Reads an answer's body, at most `cap` bytes of it (a larger body is not read further), as
/// text (invalid UTF-8 replaced).
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<String, String> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        format!(
            "the body could not be read: {}",
            describe_transport_error(&e)
        )
    })? {
        if bytes.len() + chunk.len() > cap {
            return Err(format!(
                "the body is larger than provider.max_response_bytes ({cap})"
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
