//! `[provider]`: the payment provider's API, its timeouts and the rate limits it is given.

use super::check::{Checked, refuse};
use super::{Secret, SecretUrl};
use serde::Deserialize;

/// The payment provider's API.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// Base URL of the payment provider API; the worker posts to {base_url}/payment-provider-payment-link.
    pub base_url: SecretUrl,
    /// Bearer token for the provider. Required by `run`; never logged. Prefer PROVIDER_TOKEN.
    pub token: Secret,
    /// Time allowed to open a connection to the provider.
    pub connect_timeout_ms: u64,
    /// Time allowed for one whole request, connect included.
    pub timeout_ms: u64,
    /// Largest answer body read from the provider; a larger one is an invalid answer (retried).
    pub max_response_bytes: usize,
    /// Allow sending the bearer token over plain http:// to a host other than loopback.
    pub allow_plain_http: bool,
    /// Adapt each provider's concurrency limit to its answers (lower on a 503 without
    /// `Retry-After` and on timeouts; a 429 paces its rate instead).
    pub adaptive_concurrency: bool,
    /// Most calls per second to one provider id for the whole fleet (0: no limit).
    pub max_requests_per_second: f64,
    /// Per provider id, overriding the above: "ID=N,ID=N".
    pub max_requests_per_second_by_id: String,
    /// How long the provider keeps an idempotency key; older dead letters risk a second link.
    pub idempotency_window_hours: u64,
}

impl ProviderSettings {
    /// The fleet-wide rate limit of `provider_id` in calls per second, if it has one.
    pub fn rate_limit(&self, provider_id: i64) -> Option<f64> {
        let by_id = self.rate_limits_by_id().ok()?;
        let limit = by_id
            .get(&provider_id)
            .copied()
            .unwrap_or(self.max_requests_per_second);
        (limit > 0.0).then_some(limit)
    }

    /// `max_requests_per_second_by_id` read: provider id to calls per second.
    pub fn rate_limits_by_id(&self) -> Result<std::collections::HashMap<i64, f64>, String> {
        self.max_requests_per_second_by_id
            .split(',')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (id, rate) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("{pair:?} is not ID=N"))?;
                let id: i64 = id
                    .trim()
                    .parse()
                    .map_err(|_| format!("{pair:?}: the id is not a whole number"))?;
                let rate: f64 = rate
                    .trim()
                    .parse()
                    .map_err(|_| format!("{pair:?}: the rate is not a number"))?;
                if !(rate.is_finite() && rate >= 0.0) {
                    return Err(format!("{pair:?}: the rate must be 0 or more"));
                }
                Ok((id, rate))
            })
            .collect()
    }
}

impl ProviderSettings {
    /// The URL (plain http only to this machine unless allowed), timeouts and rate limits.
    pub(super) fn check(&self) -> Checked {
        let Some(url) = reqwest::Url::parse(self.base_url.expose())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
        else {
            return refuse("provider.base_url", "must be an http:// or https:// URL");
        };
        if url.scheme() == "http" && !self.allow_plain_http && !is_loopback(&url) {
            return refuse(
                "provider.base_url",
                "is plain http:// to a host other than this machine: the bearer token would travel \
                 unencrypted; use https://, or set provider.allow_plain_http = true",
            );
        }
        if self.timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return refuse(
                "provider.timeout_ms",
                "and provider.connect_timeout_ms must be above 0",
            );
        }
        let rate = self.max_requests_per_second;
        if !(rate.is_finite() && rate >= 0.0) {
            return refuse(
                "provider.max_requests_per_second",
                "must be 0 (no limit) or more",
            );
        }
        if let Err(why) = self.rate_limits_by_id() {
            return refuse(
                "provider.max_requests_per_second_by_id",
                format!("holds {why}"),
            );
        }
        if self.max_response_bytes == 0 {
            return refuse("provider.max_response_bytes", "must be above 0");
        }
        if self.idempotency_window_hours == 0 {
            return refuse("provider.idempotency_window_hours", "must be at least 1");
        }
        Ok(())
    }
}

/// Whether the URL's host is this machine (the only place plain http may carry the token by
/// default).
fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
