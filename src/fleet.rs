//! The fleet: each worker beats a heartbeat row in PostgreSQL, so every replica knows how many
//! are alive and paces its calls to its share of a provider's fleet-wide rate limit
//! (`provider.max_requests_per_second`). A stopping worker leaves at once, rather than after its
//! heartbeat goes stale.

use crate::context::Context;
use crate::store::heartbeats;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Beats every `telemetry.levels_interval_ms` until `stop` fires, then leaves.
pub async fn run(context: Arc<Context>, stop: CancellationToken) {
    let interval = Duration::from_millis(context.settings.telemetry.levels_interval_ms);
    loop {
        beat(&context, interval).await;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    let leave = crate::store::with_conn(&context.pool, async |conn| {
        heartbeats::leave(conn, &context.instance_id).await
    });
    let _ = crate::store::bounded(&context.pool, leave).await;
}

/// One heartbeat: counts the live workers, and gives each provider lane its share.
async fn beat(context: &Context, interval: Duration) {
    // Seen alive by the others while three beats in a row are missing at most.
    let fresh = 3 * interval;
    let status = report(context);
    let beaten = crate::store::with_conn(&context.pool, async |conn| {
        heartbeats::beat(conn, &context.instance_id, fresh, &status).await
    });
    if let Ok(workers) = beaten.await {
        let levels = &context.metrics.levels;
        levels.live_workers.store(workers, Ordering::Relaxed);
        context.lanes.set_workers(workers as usize);
    }
}

/// What this worker reports with its heartbeat, for `payment-link-worker status`.
fn report(context: &Context) -> serde_json::Value {
    let [received, created, dead_lettered, delayed] = context.metrics.tally.read();
    serde_json::json!({
        "received": received,
        "created": created,
        "deadLettered": dead_lettered,
        "delayed": delayed,
        "lanes": context.lanes.snapshot(),
    })
}
