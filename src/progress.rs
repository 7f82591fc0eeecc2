//! The worker's progress line for people: where logs are short lines (a terminal), one line every
//! `log.progress_interval_ms` while it is busy says what it did (created, dead-lettered, delayed,
//! per second), so nobody needs a line per command to see it go; those lines are at `debug`.

use crate::context::Context;
use crate::telemetry::Output;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Writes the progress line until `stop` fires; returns at once where logs are JSON lines (the
/// metrics say the same to machines) or the interval is 0.
pub async fn run(context: Arc<Context>, stop: CancellationToken) {
    let interval = Duration::from_millis(context.settings.log.progress_interval_ms);
    if interval.is_zero() || Output::for_stderr(context.settings.log.format).json {
        return;
    }
    let tally = &context.metrics.tally;
    let mut before = tally.read();
    let mut since = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = tally.read();
        let [received, created, dead_lettered, delayed] =
            std::array::from_fn(|i| now[i] - before[i]);
        if received + created + dead_lettered + delayed > 0 {
            let seconds = since.elapsed().as_secs_f64();
            let waiting = context
                .metrics
                .levels
                .command_queue_depth
                .load(Ordering::Relaxed);
            tracing::info!(
                "last {:.0} s: {created} created, {dead_lettered} dead-lettered, {delayed} \
                 delayed ({:.1}/s); {waiting} waiting in the queue",
                seconds,
                (created + dead_lettered) as f64 / seconds
            );
        }
        before = now;
        since = Instant::now();
    }
}
