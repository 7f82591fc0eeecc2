//! How fast and how many at once this worker calls one provider: the one place that decides
//! from the provider's answers. The client asks for a [`Pacer::turn`] before each call and
//! [`Pacer::report`]s how it went, as a [`Signal`] (which `StatusClass` alone derives from the
//! answer); nothing else reads a provider's push-back.
//!
//! - [`rate`]: the rate the fleet calls the provider at. Unpaced until its first "slow down"
//!   (a 429, or a 503 with `Retry-After`), then found from what it took, shared between the
//!   replicas through their heartbeats, under a configured `provider.max_requests_per_second`.
//! - [`concurrency`]: how many calls may be under way at once (AIMD with slow start), lowered
//!   only by overload (a 503 without `Retry-After`, a timeout), and the `Retry-After` pause that
//!   holds every call to the provider, not only the one that got it.
//!
//! What a lane found ([`Memory`]) is kept in PostgreSQL by the fleet's heartbeat task, so a worker
//! that starts calls at what the fleet last found, trusted less the older it is ([`trust`]),
//! rather than from slow start.

pub mod concurrency;
pub mod rate;
mod schedule;
#[cfg(test)]
mod simulation;

use concurrency::{Figures, Limiter, Slot};
use rate::Rate;
use std::sync::Arc;
use std::time::Duration;

/// How a call ended, as the pacing sees it (from `StatusClass::signal`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Signal {
    /// Answered (a link, or a 4xx that says the provider is up), after this long: the provider
    /// took the call, and its latency says how loaded it is.
    Answered(Duration),
    /// The provider is overloaded (a 503 without `Retry-After`, a timeout): fewer calls at once.
    Overloaded(Option<Duration>),
    /// The provider asks to slow down (429, 503 with `Retry-After`): a matter of rate, which
    /// [`rate`] finds; [`concurrency`] only pauses the lane for the `Retry-After`.
    SlowDown(Option<Duration>),
    /// Another failure (a 5xx other than 503, no connection, an unreadable answer): says
    /// nothing about load.
    Other,
}

/// What a lane found of its provider, worth starting from again: kept in PostgreSQL
/// (`store::paces`) so a worker that starts is paced from its first call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Memory {
    /// The fleet rate found (none while the provider never pushed back).
    pub found: Option<f64>,
    /// The fleet rate it last refused.
    pub refused: Option<f64>,
    /// Calls at once the lane had reached.
    pub concurrency: f64,
    /// Whether it was still doubling them (no push-back yet).
    pub slow_start: bool,
}

/// How much of a remembered rate is trusted `age` after it was written: all of it for a minute
/// (a restart or a rollout), then half as much for every hour after (a provider's limit may have
/// changed since; a rate too low grows back in seconds, one too high costs a `Retry-After`).
pub fn trust(age: Duration) -> f64 {
    let stale = age.saturating_sub(Duration::from_secs(60));
    0.5f64.powf(stale.as_secs_f64() / 3600.0)
}

/// One provider's pacing in this worker: its concurrency limit and its rate.
pub struct Pacer {
    /// How many calls may be under way at once, and the `Retry-After` pause.
    pub limiter: Limiter,
    /// The rate this worker's calls are spaced at.
    pub rate: Rate,
}

impl Pacer {
    /// Starts slow (see [`Limiter::new`]: a few calls at once, doubling up to `prefetch`, when
    /// `adaptive`; `prefetch` from the start otherwise), unpaced under a `configured` fleet rate;
    /// pauses of up to `max_pause` hold the lane.
    pub fn new(
        provider_id: i64,
        prefetch: usize,
        adaptive: bool,
        configured: Option<f64>,
        max_pause: Duration,
        figures: Arc<Figures>,
    ) -> Self {
        Self {
            limiter: Limiter::new(prefetch, adaptive, max_pause, figures.clone()),
            rate: Rate::new(provider_id, configured, figures),
        }
    }

    /// Waits until this worker may call the provider: a slot under the concurrency limit, then
    /// its turn under the rate; a call whose turn falls in a pause that began after it got its
    /// slot (a 429 to an earlier call) waits the pause out and takes a new turn.
    pub async fn turn(&self, workers: usize) -> Slot<'_> {
        let slot = self.limiter.acquire().await;
        self.rate.pace(workers).await;
        while let Some(pause) = self.limiter.paused_for() {
            tokio::time::sleep(pause).await;
            self.rate.pace(workers).await;
        }
        slot
    }

    /// What this lane found worth remembering: none while it has learned nothing (never pushed
    /// back, and its calls at once not grown past where a lane starts).
    pub fn memory(&self) -> Option<Memory> {
        let (found, refused) = self.rate.memory();
        let (concurrency, slow_start, grown) = self.limiter.memory();
        (found.is_some() || grown).then_some(Memory {
            found,
            refused,
            concurrency,
            slow_start,
        })
    }

    /// Starts from `memory`, written `age` ago: its rate, trusted as [`trust`] says, and its
    /// calls at once. What the fleet's heartbeats said already (a lane made after the first beat)
    /// comes first.
    pub fn recall(&self, memory: Memory, age: Duration) {
        if let Some(found) = memory.found {
            self.rate.recall(found, memory.refused, trust(age));
        }
        self.limiter.recall(memory.concurrency, memory.slow_start);
    }

    /// How the call that held `slot` went. Returns whether the lane holds the answer's
    /// `Retry-After` (within `max_pause`): the next call waits there, so the command's own
    /// retry need not wait for it again.
    pub fn report(&self, slot: Slot<'_>, signal: Signal, workers: usize) -> bool {
        slot.done(signal);
        match signal {
            Signal::SlowDown(retry_after) => {
                self.rate.slowed_down(workers);
                retry_after.is_some_and(|after| after <= self.limiter.max_pause())
            }
            Signal::Answered(_) => {
                self.rate.answered();
                false
            }
            Signal::Overloaded(_) | Signal::Other => false,
        }
    }
}
