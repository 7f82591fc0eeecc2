//! The retention sweep: every `retention.sweep_interval_ms`, one replica (the one that takes a
//! PostgreSQL advisory lock) removes what is past its window, in batches with a pause between
//! them so the command path keeps its pace: completed commands after `retention.commands_hours`
//! (with their sent outbox rows), finished replay runs and their history after
//! `retention.replay_runs_days`, audit entries after `retention.audit_days`.

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::store::{PgPool, StoreError, retention};
use chrono::Utc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Rows removed by one statement.
const BATCH: i64 = 5000;
/// Shortest pause between two batches.
const PAUSE: Duration = Duration::from_millis(50);
/// A batch is followed by a pause this many times as long as it took: a backlog holds the
/// database a fifth of the time at most, so the command path keeps its pace while it goes.
const PAUSE_FACTOR: u32 = 4;

/// Runs until `stop` fires.
pub async fn run(settings: Settings, pool: PgPool, metrics: Arc<Metrics>, stop: CancellationToken) {
    let every = Duration::from_millis(settings.retention.sweep_interval_ms);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let started = Instant::now();
        let outcome = sweep(&settings, &pool, &metrics, &stop).await;
        if let Ok(Some(_)) = outcome {
            metrics
                .levels
                .retention_last_sweep_s
                .store(Utc::now().timestamp(), std::sync::atomic::Ordering::Relaxed);
        }
        match outcome {
            Ok(None) => tracing::debug!("another replica is sweeping"),
            Ok(Some(swept)) if swept.total() == 0 => {
                tracing::debug!("retention sweep: nothing past its window")
            }
            Ok(Some(swept)) => tracing::info!(
                commands = swept.commands,
                replay_runs = swept.replay_runs,
                audit_entries = swept.audit,
                took_ms = started.elapsed().as_millis() as u64,
                "retention sweep removed what was past its window"
            ),
            Err(error) => tracing::warn!(%error, "retention sweep failed; trying at the next one"),
        }
    }
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Command rows.
    pub commands: usize,
    /// Replay runs.
    pub replay_runs: usize,
    /// Audit entries.
    pub audit: usize,
}

impl Swept {
    fn total(&self) -> usize {
        self.commands + self.replay_runs + self.audit
    }
}

/// One sweep, if this replica takes the lock (`None`: another one holds it).
pub async fn sweep(
    settings: &Settings,
    pool: &PgPool,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<Option<Swept>, StoreError> {
    let mut conn = pool.get().await?;
    if !retention::try_lock(&mut conn).await? {
        return Ok(None);
    }
    let retention_settings = &settings.retention;
    let days = |d: f64| chrono::Duration::milliseconds((d * 86_400_000.0) as i64);
    let now = Utc::now();
    let commands_before = now
        - chrono::Duration::from_std(retention_settings.commands())
            .unwrap_or(chrono::Duration::MAX);
    let runs_before = now - days(retention_settings.replay_runs_days);
    let audit_before = now - days(retention_settings.audit_days);
    let swept = async {
        let mut swept = Swept::default();
        for (table, counted) in [
            ("payment_link_commands", &mut swept.commands),
            ("replay_runs", &mut swept.replay_runs),
            ("audit_log", &mut swept.audit),
        ] {
            loop {
                let batch_started = Instant::now();
                let n = match table {
                    "payment_link_commands" => {
                        retention::commands(&mut conn, commands_before, BATCH).await?
                    }
                    "replay_runs" => retention::replay_runs(&mut conn, runs_before, BATCH).await?,
                    _ => retention::audit(&mut conn, audit_before, BATCH).await?,
                };
                metrics.removed(table, n);
                *counted += n;
                if n < BATCH as usize || !pause(stop, batch_started.elapsed()).await {
                    break;
                }
            }
        }
        Ok::<_, StoreError>(swept)
    }
    .await;
    // The lock is the session's: give it back before the connection returns to the pool.
    let _ = retention::unlock(&mut conn).await;
    swept.map(Some)
}

/// Waits between two batches ([`PAUSE_FACTOR`] times as long as the last one took, at least
/// [`PAUSE`]); false when stopping.
async fn pause(stop: &CancellationToken, last_batch: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep((last_batch * PAUSE_FACTOR).max(PAUSE)) => true,
    }
}
