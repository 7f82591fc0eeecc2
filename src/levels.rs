//! The gauges read from PostgreSQL and RabbitMQ (outbox backlog, oldest command in processing,
//! queue depths), refreshed on a timer rather than per command, so reading them costs the hot
//! path nothing. The live workers are counted by the heartbeat ([`crate::fleet`]).

use crate::context::Context;
use crate::store::{commands, outbox, replay_runs, retention};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Refreshes the levels every `telemetry.levels_interval_ms` until `stop` fires.
pub async fn run(context: Arc<Context>, stop: CancellationToken) {
    let interval = Duration::from_millis(context.settings.telemetry.levels_interval_ms);
    loop {
        refresh(&context).await;
        crate::repeats::tick();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// How far back "replay runs that ended failed lately" looks (the alert fires while any did).
const FAILED_RUNS_WINDOW: Duration = Duration::from_secs(3600);

/// Milliseconds since `at` (0 when there is none).
fn age_ms(at: Option<chrono::DateTime<chrono::Utc>>) -> i64 {
    at.map_or(0, |t| (chrono::Utc::now() - t).num_milliseconds().max(0))
}

async fn refresh(context: &Context) {
    let levels = &context.metrics.levels;
    if let Ok(mut conn) = context.pool.get().await {
        if let Ok((backlog, oldest)) = outbox::unsent(&mut conn).await {
            levels.outbox_backlog.store(backlog, Ordering::Relaxed);
            levels
                .outbox_oldest_unsent_age_ms
                .store(age_ms(oldest), Ordering::Relaxed);
        }
        if let Ok((idle_since, failed)) = replay_runs::watch(&mut conn, FAILED_RUNS_WINDOW).await {
            levels
                .replay_running_idle_ms
                .store(age_ms(idle_since), Ordering::Relaxed);
            levels
                .replay_runs_failed_recent
                .store(failed, Ordering::Relaxed);
        }
        if let Ok(kept) = retention::kept(&mut conn).await {
            levels
                .oldest_kept_age_ms
                .store(age_ms(kept.oldest_completed), Ordering::Relaxed);
            levels
                .commands_bytes
                .store(kept.commands_bytes, Ordering::Relaxed);
            levels
                .outbox_bytes
                .store(kept.outbox_bytes, Ordering::Relaxed);
            levels
                .dead_letters_bytes
                .store(kept.dead_letters_bytes, Ordering::Relaxed);
        }
        if let Ok(age) = commands::oldest_processing_age(&mut conn).await {
            levels
                .oldest_processing_age_ms
                .store(age.as_millis() as i64, Ordering::Relaxed);
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
