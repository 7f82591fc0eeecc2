//! The HTTP client of the provider API and the classification of its answers.

use super::PAYMENT_LINK_PATH;
use super::lanes::Lanes;
use super::limit::Signal;
use super::retry::{self, Attempt, GaveUp};
use crate::config::{ProviderSettings, RetrySettings, Secret};
use crate::errors::ErrorKind;
use crate::metrics::Metrics;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// How much of a provider's error body is kept for the dead letter and the log.
pub const ERROR_BODY_LIMIT: usize = 1024;

/// A link the provider created.
#[derive(Clone, Debug)]
pub struct LinkCreated {
    /// 200 or 201.
    pub http_status: u16,
    /// The body exactly as the provider sent it.
    pub body: String,
    /// The link's id, when the provider gave one.
    pub link_id: Option<i64>,
    /// The link itself.
    pub payment_link: String,
}

/// A failed provider call, permanent or the last of a transient series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderError {
    /// What went wrong, in words (never with credentials).
    pub message: String,
    /// The HTTP status, where there was an answer.
    pub http_status: Option<u16>,
    /// The start of the answer's body, where there was one.
    pub body: Option<String>,
}

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

/// What the provider's 200/201 body must contain to count as a link.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LinkBody<'a> {
    id: Option<i64>,
    #[allow(dead_code)]
    payment_provider_id: i64,
    #[serde(borrow)]
    amount_in_major_currency: &'a RawValue,
    #[allow(dead_code)]
    description: String,
    payment_link: String,
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
                })
            })?
        } else {
            lane.breaker.admit().await
        };
        let waiting = Instant::now();
        let slot = lane.limiter.acquire().await;
        // A call paced into a pause that began after it got its slot (a 429 to an earlier call)
        // waits the pause out and takes a new turn.
        lane.pace(self.lanes.workers()).await;
        while let Some(pause) = lane.limiter.paused_for() {
            tokio::time::sleep(pause).await;
            lane.pace(self.lanes.workers()).await;
        }
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
        let slowed = matches!(&result, Err(Attempt::Transient(e, retry_after)) if slow_down(e, *retry_after));
        slot.done(match &result {
            // An answer, even a refusal, says the provider is up and how fast it is.
            Ok(_) | Err(Attempt::Permanent(_)) => Signal::Answered(elapsed),
            // "Slow down" is about the rate (the lane's pace), not about calls at once.
            Err(Attempt::Transient(_, retry_after)) if slowed => Signal::SlowDown(*retry_after),
            Err(Attempt::Transient(e, retry_after)) if overloaded(e) => {
                Signal::Overloaded(*retry_after)
            }
            Err(Attempt::Transient(..) | Attempt::NotNow(_)) => Signal::Other,
        });
        match status {
            Some(status) => span.record("http.response.status_code", i64::from(status)),
            None => span.record("error.type", "transport"),
        };
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        if slowed {
            lane.slowed_down(self.lanes.workers());
        } else if result.is_ok() {
            lane.answered();
        }
        permit.record(matches!(&result, Err(Attempt::Transient(..))) && !slowed);
        // A `Retry-After` the lane can hold (within the budget) now pauses the whole lane: the
        // next attempt waits there, and that wait is not taken from the budget; the round's own
        // wait is only its backoff interval.
        let lane_pause =
            Duration::from_millis(self.retry.max_elapsed_ms.max(self.retry.max_interval_ms));
        match result {
            Err(Attempt::Transient(error, Some(after)))
                if slow_down(&error, Some(after)) && after <= lane_pause =>
            {
                Err(Attempt::Transient(error, None))
            }
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

/// What a failure keeps of an error body, for people: an excerpt of at most
/// [`ERROR_BODY_LIMIT`] bytes, NUL (which PostgreSQL's text cannot hold) shown as U+FFFD.
fn error_body_excerpt(body: &str) -> String {
    let shown = if body.contains('\0') {
        std::borrow::Cow::Owned(body.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(body)
    };
    crate::headers::excerpt(&shown, ERROR_BODY_LIMIT)
}

/// What an HTTP status from the provider means: the one place statuses are sorted. How a class
/// is retried, whether it dead-letters and as which kind, and whether it lowers the provider's
/// limit all follow from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusClass {
    /// 200, 201: a link, if the body holds one.
    Created,
    /// 401, 403: our credentials are refused (permanent: `provider-auth`).
    CredentialsRefused,
    /// 429, 503: the provider asks us to slow down (transient). A 429 or a 503 with
    /// `Retry-After` is a matter of rate (the lane's pace and pause); a 503 without one is
    /// overload, which lowers the lane's concurrency limit.
    Overloaded,
    /// 408, 425, and 5xx other than 503: transient.
    Failing,
    /// Any other 4xx: the request is refused (permanent: `provider-rejected`).
    Rejected,
    /// Anything else (1xx, 3xx, another 2xx): transient.
    Unexpected,
}

impl StatusClass {
    /// The class of `status`.
    pub fn of(status: u16) -> Self {
        match status {
            200 | 201 => StatusClass::Created,
            401 | 403 => StatusClass::CredentialsRefused,
            429 | 503 => StatusClass::Overloaded,
            408 | 425 | 500..=599 => StatusClass::Failing,
            400..=499 => StatusClass::Rejected,
            _ => StatusClass::Unexpected,
        }
    }

    /// The kind a permanent failure of this class is dead-lettered as.
    fn permanent_kind(self) -> ErrorKind {
        match self {
            StatusClass::CredentialsRefused => ErrorKind::ProviderAuth,
            _ => ErrorKind::ProviderRejected,
        }
    }
}

/// Sorts an answer into success, permanent failure and transient failure.
fn classify(
    status: u16,
    reason: &str,
    body: String,
    retry_after: Option<Duration>,
) -> Result<LinkCreated, Attempt<ProviderError>> {
    let failure = |message: String, body: &str| ProviderError {
        message,
        http_status: Some(status),
        body: (!body.is_empty()).then(|| error_body_excerpt(body)),
    };
    match StatusClass::of(status) {
        StatusClass::Created => match serde_json::from_str::<LinkBody<'_>>(&body) {
            Ok(link)
                if is_json_number(link.amount_in_major_currency)
                    && !link.payment_link.trim().is_empty()
                    && !link.payment_link.contains(char::is_control) =>
            {
                Ok(LinkCreated {
                    http_status: status,
                    link_id: link.id,
                    payment_link: link.payment_link,
                    body,
                })
            }
            Ok(_) => Err(Attempt::Transient(
                failure(
                    format!(
                        "provider answered {status} with an unexpected body: amountInMajorCurrency is not a number, or paymentLink is blank or holds control characters"
                    ),
                    &body,
                ),
                retry_after,
            )),
            Err(e) => Err(Attempt::Transient(
                failure(
                    format!("provider answered {status} with an unexpected body: {e}"),
                    &body,
                ),
                retry_after,
            )),
        },
        StatusClass::CredentialsRefused => Err(Attempt::Permanent(failure(
            format!("provider refused the credentials: {status} {reason}"),
            &body,
        ))),
        StatusClass::Overloaded | StatusClass::Failing => Err(Attempt::Transient(
            failure(format!("provider answered {status} {reason}"), &body),
            retry_after,
        )),
        StatusClass::Rejected => Err(Attempt::Permanent(failure(
            format!("provider rejected the request: {status} {reason}"),
            &body,
        ))),
        StatusClass::Unexpected => Err(Attempt::Transient(
            failure(
                format!("provider answered an unexpected {status} {reason}"),
                &body,
            ),
            retry_after,
        )),
    }
}

fn is_json_number(raw: &RawValue) -> bool {
    raw.get()
        .starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// The error and its causes, without the URL (which may carry credentials).
/// Whether a transient failure says the provider is overloaded (429, 503, a timeout) rather than
/// broken or unreachable.
fn overloaded(error: &ProviderError) -> bool {
    match error.http_status {
        Some(status) => StatusClass::of(status) == StatusClass::Overloaded,
        None => error.message.starts_with(TIMED_OUT),
    }
}

/// Whether an answer only asks us to slow down (a 429, or a 503 with `Retry-After`): the
/// provider is up, so the circuit breaker does not count it as a failure; the lane's limit and
/// pause deal with it.
fn slow_down(error: &ProviderError, retry_after: Option<Duration>) -> bool {
    match error.http_status {
        Some(429) => true,
        Some(503) => retry_after.is_some(),
        _ => false,
    }
}

/// How a timed-out request's message starts.
const TIMED_OUT: &str = "provider request timed out";

fn describe_transport_error(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        TIMED_OUT
    } else if error.is_connect() {
        "cannot connect to the provider"
    } else {
        "provider request failed"
    };
    let mut message = kind.to_owned();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(status: u16, body: &str) -> &'static str {
        match classify(status, "", body.to_owned(), None) {
            Ok(_) => "ok",
            Err(Attempt::Permanent(_)) => "permanent",
            Err(Attempt::Transient(..)) => "transient",
            Err(Attempt::NotNow(_)) => "not now",
        }
    }

    const LINK: &str = r#"{"id":9,"paymentProviderId":1,"amountInMajorCurrency":7.50,"description":"d","paymentLink":"https://pay/x"}"#;

    /// Found by the fuzz target: NUL shown as U+FFFD grew the excerpt past its bound.
    #[test]
    fn an_error_body_of_nuls_stays_bounded() {
        let excerpt = error_body_excerpt(&"\0".repeat(2_000));
        assert!(excerpt.len() <= ERROR_BODY_LIMIT + '…'.len_utf8());
        assert!(!excerpt.contains('\0'));
    }

    #[test]
    fn classifies_statuses() {
        assert_eq!(kind(200, LINK), "ok");
        assert_eq!(kind(201, LINK), "ok");
        for status in [400, 401, 403, 404, 409, 422] {
            assert_eq!(kind(status, "{}"), "permanent", "{status}");
        }
        assert_eq!(StatusClass::of(429), StatusClass::Overloaded);
        assert_eq!(StatusClass::of(503), StatusClass::Overloaded);
        assert_eq!(StatusClass::of(500), StatusClass::Failing);
        assert_eq!(
            StatusClass::of(403).permanent_kind(),
            ErrorKind::ProviderAuth
        );
        assert_eq!(
            StatusClass::of(404).permanent_kind(),
            ErrorKind::ProviderRejected
        );
        for status in [408, 425, 429, 500, 502, 503, 504] {
            assert_eq!(kind(status, ""), "transient", "{status}");
        }
        assert_eq!(kind(201, "{}"), "transient");
        assert_eq!(kind(200, "<html>"), "transient");
        assert_eq!(kind(201, &LINK.replace("7.50", "\"7.50\"")), "transient");
    }

    #[test]
    fn success_keeps_the_body_verbatim() {
        let link = classify(201, "Created", LINK.to_owned(), None).unwrap();
        assert_eq!(link.body, LINK);
        assert_eq!(link.link_id, Some(9));
        assert_eq!(link.payment_link, "https://pay/x");
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let future = (chrono::Utc::now() + chrono::TimeDelta::seconds(120)).to_rfc2822();
        let wait = parse_retry_after(&future).unwrap();
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Provider answers as a hostile or broken provider might send them.
    fn answer() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            ".{0,2000}",
            "[\\[\\]{}\",:0-9a-zA-Z\\\\u .-]{0,200}",
            (any::<String>(), any::<String>(), any::<i64>(), any::<f64>()).prop_map(
                |(link, description, id, amount)| {
                    serde_json::json!({
                        "id": id, "paymentProviderId": 1, "amountInMajorCurrency": amount,
                        "description": description, "paymentLink": link,
                    })
                    .to_string()
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the status, body and `Retry-After`, the classifier answers (no panic), a
        /// link it accepts can be stored, and what it quotes of the body is bounded and NUL-free.
        #[test]
        fn any_answer_is_classified_and_what_is_kept_can_be_stored(
            status in 100u16..600,
            body in answer(),
            retry_after in ".{0,40}",
        ) {
            match classify(status, "", body, parse_retry_after(&retry_after)) {
                Ok(link) => {
                    prop_assert!(!link.payment_link.contains(char::is_control));
                    prop_assert!(!link.body.contains('\0'));
                }
                Err(Attempt::Permanent(error) | Attempt::Transient(error, _) | Attempt::NotNow(error)) => {
                    if let Some(body) = error.body {
                        prop_assert!(body.len() <= ERROR_BODY_LIMIT + '…'.len_utf8());
                        prop_assert!(!body.contains('\0'));
                    }
                }
            }
        }
    }
}
