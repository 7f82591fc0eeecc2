//! The circuit breaker of one provider: when most recent calls to it failed transiently, it is
//! taken to be down. A command for it then goes to wait in a delay queue ([`Breaker::try_admit`]
//! refuses at once), holding no prefetch slot; on its last round, with no delay tier left, it
//! waits here instead ([`Breaker::admit`]). One probe call goes through per probe interval, and
//! the first probe that succeeds closes the breaker. Each state change is logged once.

use crate::config::BreakerSettings;
use crate::metrics::ProviderFigures;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The breaker's state, for logs, readiness and the heartbeat report (written as `closed`,
/// `half-open` or `open`). Ordered from best to worst, so a fleet shows its worst.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Calls go through.
    Closed,
    /// A probe call is under way.
    HalfOpen,
    /// The provider is taken to be down; calls wait for a probe to succeed.
    Open,
}

impl State {
    /// How the report and `status` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half-open",
            State::Open => "open",
        }
    }
}

struct Inner {
    state: State,
    /// Recent calls: when, and whether they failed transiently.
    window: VecDeque<(Instant, bool)>,
    /// How many calls in `window` failed, kept as calls come and go so that recording a result
    /// costs the same whatever the window holds.
    failures: usize,
    next_probe_at: Instant,
}

/// Shared by every command of a worker.
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    changed: Notify,
    /// Where the breaker shows whether it is open, for the metrics.
    figures: Option<Arc<ProviderFigures>>,
}

/// Leave to make one call; report its result with [`Permit::record`].
pub struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Arc<Self> {
        Self::build(settings, None)
    }

    /// A closed breaker that shows whether it is open in `figures` (its provider's metrics).
    pub fn showing(settings: BreakerSettings, figures: Arc<ProviderFigures>) -> Arc<Self> {
        Self::build(settings, Some(figures))
    }

    fn build(settings: BreakerSettings, figures: Option<Arc<ProviderFigures>>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            inner: Mutex::new(Inner {
                state: State::Closed,
                window: VecDeque::new(),
                failures: 0,
                next_probe_at: Instant::now(),
            }),
            changed: Notify::new(),
            figures,
        })
    }

    /// Open and probing both pause the provider's calls: the figure is 1 for either.
    fn show(&self, open: bool) {
        if let Some(figures) = &self.figures {
            figures
                .circuit_open
                .store(i64::from(open), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.inner.lock().expect("breaker lock").state
    }

    /// Waits until a call may be made: at once while closed; while open, until this caller
    /// becomes the next probe or another probe has closed the breaker.
    pub async fn admit(self: &Arc<Self>) -> Permit {
        loop {
            let notified = self.changed.notified();
            let wait = {
                let mut inner = self.inner.lock().expect("breaker lock");
                let now = Instant::now();
                match inner.state {
                    State::Closed => return self.permit(false),
                    State::Open if now >= inner.next_probe_at => {
                        inner.state = State::HalfOpen;
                        tracing::info!("provider circuit half-open: sending a probe call");
                        return self.permit(true);
                    }
                    State::Open => inner.next_probe_at - now,
                    State::HalfOpen => Duration::from_millis(self.settings.probe_interval_ms),
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// A call's leave without waiting: while closed, or when it is time for a probe; `None` while
    /// the provider is taken to be down (the caller parks the command instead of holding it).
    pub fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        let mut inner = self.inner.lock().expect("breaker lock");
        match inner.state {
            State::Closed => Some(self.permit(false)),
            State::Open if Instant::now() >= inner.next_probe_at => {
                inner.state = State::HalfOpen;
                tracing::info!("provider circuit half-open: sending a probe call");
                Some(self.permit(true))
            }
            State::Open | State::HalfOpen => None,
        }
    }

    /// Whether [`Breaker::try_admit`] would refuse now, without taking the next probe's turn: a
    /// command can then be parked before any database work is spent on it.
    pub fn refusing(&self) -> bool {
        let inner = self.inner.lock().expect("breaker lock");
        match inner.state {
            State::Closed => false,
            State::Open => Instant::now() < inner.next_probe_at,
            State::HalfOpen => true,
        }
    }

    fn permit(self: &Arc<Self>, probe: bool) -> Permit {
        Permit {
            breaker: self.clone(),
            probe,
            recorded: false,
        }
    }

    fn on_result(&self, probe: bool, failed: bool) {
        let mut inner = self.inner.lock().expect("breaker lock");
        let now = Instant::now();
        let probe_interval = Duration::from_millis(self.settings.probe_interval_ms);
        if probe {
            if failed {
                inner.state = State::Open;
                inner.next_probe_at = now + probe_interval;
            } else {
                inner.state = State::Closed;
                inner.window.clear();
                inner.failures = 0;
                self.show(false);
                tracing::info!("provider circuit closed: the probe call succeeded; resuming");
                self.changed.notify_waiters();
            }
            return;
        }
        let window = Duration::from_millis(self.settings.window_ms);
        inner.window.push_back((now, failed));
        inner.failures += usize::from(failed);
        while let Some(&(at, old_failed)) = inner.window.front() {
            if now.duration_since(at) <= window {
                break;
            }
            inner.window.pop_front();
            inner.failures -= usize::from(old_failed);
        }
        let calls = inner.window.len();
        let failures = inner.failures;
        if inner.state == State::Closed
            && calls >= self.settings.min_calls
            && failures as f64 >= self.settings.failure_ratio * calls as f64
        {
            inner.state = State::Open;
            inner.next_probe_at = now + probe_interval;
            self.show(true);
            tracing::warn!(
                failures,
                calls,
                probe_interval_ms = self.settings.probe_interval_ms,
                "provider circuit open: the provider looks down; pausing calls and probing"
            );
        }
    }
}

impl Permit {
    /// Reports the call: `failed` when it failed transiently (the kind of failure that says the
    /// provider is down; a 4xx answer says it is up).
    pub fn record(mut self, failed: bool) {
        self.recorded = true;
        self.breaker.on_result(self.probe, failed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A probe abandoned mid-call must not leave the breaker waiting for it forever.
        if !self.recorded && self.probe {
            self.breaker.on_result(true, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(probe_interval_ms: u64) -> Arc<Breaker> {
        Breaker::new(BreakerSettings {
            failure_ratio: 0.5,
            min_calls: 4,
            window_ms: 60_000,
            probe_interval_ms,
        })
    }

    #[tokio::test]
    async fn opens_on_mostly_failing_calls_and_closes_on_a_good_probe() {
        let b = breaker(50);
        for failed in [false, true, true, true] {
            b.admit().await.record(failed);
        }
        assert_eq!(b.state(), State::Open);
        let started = Instant::now();
        let probe = b.admit().await;
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "waited for the probe interval"
        );
        assert_eq!(b.state(), State::HalfOpen);
        // Others wait while the probe is out…
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.admit().await.record(false) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        // …and go once it succeeds.
        probe.record(false);
        waiter.await.unwrap();
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test]
    async fn try_admit_refuses_while_open_and_lets_the_probe_through_when_due() {
        let b = breaker(30);
        assert!(b.try_admit().is_some(), "closed: admitted");
        assert!(!b.refusing());
        for _ in 0..4 {
            b.admit().await.record(true);
        }
        assert_eq!(b.state(), State::Open);
        assert!(b.refusing());
        assert!(b.try_admit().is_none(), "open: refused at once");
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(!b.refusing(), "a probe is due: the next command makes it");
        assert_eq!(b.state(), State::Open, "asking took no probe's turn");
        let probe = b.try_admit().expect("the probe is due");
        assert!(b.refusing(), "the probe is out");
        assert!(b.try_admit().is_none(), "one probe at a time");
        probe.record(false);
        assert!(!b.refusing());
        assert!(b.try_admit().is_some(), "closed again");
    }

    #[tokio::test]
    async fn a_failed_probe_keeps_it_open_and_few_calls_do_not_open_it() {
        let b = breaker(10);
        for _ in 0..3 {
            b.admit().await.record(true);
        }
        assert_eq!(b.state(), State::Closed, "below min_calls");
        b.admit().await.record(true);
        assert_eq!(b.state(), State::Open);
        b.admit().await.record(true);
        assert_eq!(b.state(), State::Open);
        drop(b.admit().await);
        assert_eq!(
            b.state(),
            State::Open,
            "an abandoned probe counts as failed"
        );
    }

    #[tokio::test]
    async fn failures_that_left_the_window_no_longer_count() {
        let b = Breaker::new(BreakerSettings {
            failure_ratio: 0.5,
            min_calls: 4,
            window_ms: 1_000,
            probe_interval_ms: 10,
        });
        for _ in 0..3 {
            b.admit().await.record(true);
        }
        // Let those three failures age out of the window (the wait is the condition itself).
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        for failed in [false, false, false, true] {
            b.admit().await.record(failed);
        }
        // Counting the old failures too would make it 4 of 7 and open the breaker.
        assert_eq!(b.state(), State::Closed);
        b.admit().await.record(true);
        assert_eq!(b.state(), State::Closed, "2 of 5 recent calls failed");
        b.admit().await.record(true);
        assert_eq!(b.state(), State::Open, "3 of 6 recent calls failed");
    }
}
