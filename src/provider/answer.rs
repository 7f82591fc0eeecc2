//! What a provider's answer means: the one place statuses and bodies are sorted into a link, a
//! permanent failure (dead-lettered, with its kind) or a transient one (retried), and into what
//! the answer tells the provider's pacing.

use super::pacing::Signal;
use super::retry::Attempt;
use crate::errors::ErrorKind;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::time::Duration;

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
    /// No answer came within `provider.timeout_ms`: a sign of overload, unlike a refused
    /// connection.
    pub timed_out: bool,
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
    /// 429: the provider asks us to slow down (transient): a matter of rate.
    TooManyRequests,
    /// 503: transient; with `Retry-After` a matter of rate as a 429 is, without one overload.
    Unavailable,
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
            429 => StatusClass::TooManyRequests,
            503 => StatusClass::Unavailable,
            408 | 425 | 500..=599 => StatusClass::Failing,
            400..=499 => StatusClass::Rejected,
            _ => StatusClass::Unexpected,
        }
    }

    /// What a failed answer of this class says about the provider's capacity: the one place
    /// "slow down" (the lane's rate and pause) and "overloaded" (fewer calls at once) are
    /// decided.
    pub fn signal(self, retry_after: Option<Duration>) -> Signal {
        match self {
            StatusClass::TooManyRequests => Signal::SlowDown(retry_after),
            StatusClass::Unavailable if retry_after.is_some() => Signal::SlowDown(retry_after),
            StatusClass::Unavailable => Signal::Overloaded(None),
            _ => Signal::Other,
        }
    }

    /// The kind a permanent failure of this class is dead-lettered as.
    pub fn permanent_kind(self) -> ErrorKind {
        match self {
            StatusClass::CredentialsRefused => ErrorKind::ProviderAuth,
            _ => ErrorKind::ProviderRejected,
        }
    }
}

/// Sorts an answer into success, permanent failure and transient failure.
pub(super) fn classify(
    status: u16,
    reason: &str,
    body: String,
    retry_after: Option<Duration>,
) -> Result<LinkCreated, Attempt<ProviderError>> {
    let failure = |message: String, body: &str| ProviderError {
        message,
        http_status: Some(status),
        body: (!body.is_empty()).then(|| error_body_excerpt(body)),
        timed_out: false,
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
        StatusClass::TooManyRequests | StatusClass::Unavailable | StatusClass::Failing => {
            Err(Attempt::Transient(
                failure(format!("provider answered {status} {reason}"), &body),
                retry_after,
            ))
        }
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

/// What one call's result says to the provider's pacing: an answer, even a refusal, says the
/// provider is up and how fast it is; a failed answer says what its [`StatusClass`] says; a
/// timeout is overload; anything else (no connection, an unreadable answer) nothing.
pub(super) fn signal(
    result: &Result<LinkCreated, Attempt<ProviderError>>,
    latency: Duration,
) -> Signal {
    match result {
        Ok(_) | Err(Attempt::Permanent(_)) => Signal::Answered(latency),
        Err(Attempt::Transient(error, retry_after)) => match error.http_status {
            Some(status) => StatusClass::of(status).signal(*retry_after),
            None if error.timed_out => Signal::Overloaded(None),
            None => Signal::Other,
        },
        Err(Attempt::NotNow(_)) => Signal::Other,
    }
}

/// The error and its causes, without the URL (which may carry credentials).
pub(super) fn describe_transport_error(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "provider request timed out"
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
        assert_eq!(StatusClass::of(429), StatusClass::TooManyRequests);
        assert_eq!(StatusClass::of(503), StatusClass::Unavailable);
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

    /// What each answer tells the pacing; a regression here would pace a provider on the
    /// wrong signal (a 503 without `Retry-After` cutting the rate, a timeout not counted).
    #[test]
    fn the_pacing_is_told_slow_down_overloaded_or_answered_by_class() {
        let ms = Duration::from_millis(40);
        let second = Some(Duration::from_secs(1));
        let of = |status: u16, retry_after| {
            signal(&classify(status, "", String::new(), retry_after), ms)
        };
        assert_eq!(of(429, None), Signal::SlowDown(None));
        assert_eq!(of(429, second), Signal::SlowDown(second));
        assert_eq!(of(503, second), Signal::SlowDown(second));
        assert_eq!(of(503, None), Signal::Overloaded(None));
        assert_eq!(of(500, second), Signal::Other);
        assert_eq!(of(400, None), Signal::Answered(ms));
        assert_eq!(of(201, None), Signal::Other, "a link without a body");
        assert_eq!(
            signal(&classify(201, "", LINK.to_owned(), None), ms),
            Signal::Answered(ms)
        );
        let transport = |timed_out| ProviderError {
            message: "provider request failed".into(),
            http_status: None,
            body: None,
            timed_out,
        };
        let transient = |e| Err(Attempt::Transient(e, None));
        assert_eq!(
            signal(&transient(transport(true)), ms),
            Signal::Overloaded(None)
        );
        assert_eq!(signal(&transient(transport(false)), ms), Signal::Other);
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
