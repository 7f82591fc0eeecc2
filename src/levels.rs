//! The gauges read from PostgreSQL and RabbitMQ (outbox backlog, oldest command in processing,
//! queue depths, live workers through the heartbeat), refreshed on a timer rather than per
//! command, so reading them costs the hot path nothing.

use crate::context::Context;
use crate::store::{commands, heartbeats, outbox};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Refreshes the levels every `telemetry.levels_interval_ms` until `stop` fires.
pub async fn run(context: Arc<Context>, stop: CancellationToken) {
    let interval = Duration::from_millis(context.settings.telemetry.levels_interval_ms);
    loop {
        refresh(&context).await;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    // Counted out at once by the others, rather than after the heartbeat goes stale.
    let leave = async {
        let mut conn = context.pool.get().await?;
        heartbeats::leave(&mut conn, &context.instance_id).await
    };
    let _ = crate::store::bounded(&context.pool, leave).await;
}

async fn refresh(context: &Context) {
    let levels = &context.metrics.levels;
    if let Ok(mut conn) = context.pool.get().await {
        if let Ok(backlog) = outbox::unsent_count(&mut conn).await {
            levels.outbox_backlog.store(backlog, Ordering::Relaxed);
        }
        if let Ok(age) = commands::oldest_processing_age(&mut conn).await {
            levels
                .oldest_processing_age_ms
                .store(age.as_millis() as i64, Ordering::Relaxed);
        }
        // Seen alive by the others while three refreshes in a row are missing at most.
        let fresh = 3 * Duration::from_millis(context.settings.telemetry.levels_interval_ms);
        if let Ok(workers) = heartbeats::beat(&mut conn, &context.instance_id, fresh).await {
            levels.live_workers.store(workers, Ordering::Relaxed);
            context.lanes.set_workers(workers as usize);
        }
    }
    let broker = &context.settings.broker;
    for (queue, level) in [
        (&broker.dead_letter_queue, &levels.dead_letter_depth),
        (&broker.command_queue, &levels.command_queue_depth),
    ] {
        if let Ok(depth) = context.publisher.queue_depth(queue).await {
            level.store(i64::from(depth), Ordering::Relaxed);
        }
    }
}
