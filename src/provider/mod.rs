//! Step 4, call: the payment provider's API. The client classifies every answer as success,
//! permanent failure or transient failure; the retry module decides how long to keep trying; the
//! simulator stands in for the provider in development, the compose demo and the tests.

pub mod breaker;
pub mod client;
pub mod lanes;
pub mod limit;
pub mod retry;
pub mod sim;

/// The provider endpoint, under the configured base URL.
pub const PAYMENT_LINK_PATH: &str = "/payment-provider-payment-link";
