//! Step 4, call: the payment provider's API. The client makes the calls; `answer` classifies
//! every answer as success, permanent failure or transient failure, and what it tells the
//! provider's pacing; `pacing` decides how fast and how many at once; the retry module decides
//! how long to keep trying; the simulator stands in for the provider in development, the compose
//! demo and the tests.

pub mod answer;
pub mod breaker;
pub mod client;
pub mod lanes;
pub mod pacing;
pub mod retry;
pub mod sim;

/// The provider endpoint, under the configured base URL.
pub const PAYMENT_LINK_PATH: &str = "/payment-provider-payment-link";
