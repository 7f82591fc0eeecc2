//! The fleet: each worker beats a heartbeat row in PostgreSQL, so every replica knows how many
//! are alive and paces its calls to its share of a provider's fleet-wide rate (configured as
//! `provider.max_requests_per_second`, or found from the provider's 429s and evened out between
//! the replicas here). A stopping worker leaves at once, rather than after its heartbeat goes
//! stale. What the lanes found is kept in PostgreSQL every [`REMEMBER_EVERY`] and when the
//! worker stops, and read by a worker that starts ([`recall`]), so it does not find it again.

use crate::context::Context;
use crate::provider::lanes::LaneStatus;
use crate::provider::pacing::Memory;
use crate::provider::pacing::rate::fleet_rate;
use crate::store::heartbeats;
use crate::store::paces::{self, PaceRow};
use serde::Deserialize as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a worker beats: every second, or every `telemetry.levels_interval_ms` when that is
/// shorter. The found rates travel in the beats, and a cut must reach the other replicas within
/// about a second, before they spend the provider's next window (the levels, read every 5 s by
/// default, cost far more than a beat).
pub fn beat_interval(settings: &crate::config::Settings) -> Duration {
    Duration::from_millis(settings.telemetry.levels_interval_ms.min(1000))
}

/// How often a worker writes what its lanes found (and once more when it stops).
pub const REMEMBER_EVERY: Duration = Duration::from_secs(10);

/// Beats every [`beat_interval`] until `stop` fires, then leaves; writes what the lanes found
/// every [`REMEMBER_EVERY`] and on the way out.
pub async fn run(context: Arc<Context>, stop: CancellationToken) {
    let interval = beat_interval(&context.settings);
    let mut remembered = tokio::time::Instant::now();
    loop {
        beat(&context, interval).await;
        if remembered.elapsed() >= REMEMBER_EVERY {
            remember(&context).await;
            remembered = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    remember(&context).await;
    let leave = crate::store::with_conn(&context.pool, async |conn| {
        heartbeats::leave(conn, &context.instance_id).await
    });
    let _ = crate::store::bounded(&context.pool, leave).await;
}

/// Reads what the fleet last found of each provider into the lanes, before the first command:
/// a worker that starts calls at it rather than from slow start. A database that cannot say
/// leaves the lanes to find it again.
pub async fn recall(context: &Context) {
    let limit = crate::provider::lanes::MAX_LANES as i64;
    let read =
        crate::store::with_conn(&context.pool, async |conn| paces::recall(conn, limit).await);
    match crate::store::bounded(&context.pool, read).await {
        Ok(rows) => {
            tracing::debug!(
                providers = rows.len(),
                "recalled the fleet's provider paces"
            );
            context.lanes.recall(rows.into_iter().map(|row| {
                let age = Duration::from_millis(row.age_ms.max(0) as u64);
                (row.pace.provider_id, memory(&row.pace), age)
            }));
        }
        Err(error) => tracing::warn!(
            error = %error,
            "cannot read the providers' remembered paces; each lane finds its own again"
        ),
    }
}

/// Writes what the lanes found; a failure waits for the next time (a stale memory only costs a
/// restarted worker a few seconds of finding).
async fn remember(context: &Context) {
    let rows: Vec<PaceRow> = context
        .lanes
        .memories()
        .into_iter()
        .map(|(provider_id, m)| PaceRow {
            provider_id,
            found_rate: m.found,
            refused_rate: m.refused,
            concurrency: m.concurrency,
            slow_start: m.slow_start,
        })
        .collect();
    let write = crate::store::with_conn(&context.pool, async |conn| {
        paces::remember(conn, &rows).await
    });
    if let Err(error) = crate::store::bounded(&context.pool, write).await {
        tracing::debug!(error = %error, "could not write the providers' paces; will try again");
    }
}

/// A remembered row as the lanes take it.
fn memory(row: &PaceRow) -> Memory {
    let positive = |r: Option<f64>| r.filter(|r| r.is_finite() && *r > 0.0);
    Memory {
        found: positive(row.found_rate),
        refused: positive(row.refused_rate),
        concurrency: row.concurrency,
        slow_start: row.slow_start,
    }
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
    let read = crate::store::with_conn(&context.pool, async |conn| {
        heartbeats::alive(conn, fresh).await
    });
    if let Ok(alive) = read.await {
        for (provider_id, (found, since_cut)) in fleet_rates(&alive) {
            context
                .lanes
                .lane(provider_id)
                .pacer
                .rate
                .adopt(found, since_cut);
        }
    }
}

/// The rate the fleet found for each provider, from the live replicas' reports: the mean of the
/// rates they found (so replicas that each found their own converge on one, and one that joins
/// takes its share at once instead of calling unpaced), and the latest cut among them (so none
/// probes upward right after another was told to slow down). While the latest cut is within
/// [`FRESH_CUT`](crate::provider::pacing::rate::FRESH_CUT), the mean is over the replicas cut in that same episode (within a second of it):
/// the mean with replicas cut earlier, or not at all, would lift the latest cut back over the
/// limit, and the lane would swing around it.
fn fleet_rates(
    alive: &[heartbeats::Alive],
) -> std::collections::BTreeMap<i64, (f64, Option<Duration>)> {
    // Each provider's reports: its found rate and how long ago it was cut (aged by its beat).
    let mut reports: std::collections::BTreeMap<i64, Vec<(f64, Option<u64>)>> = Default::default();
    for worker in alive {
        for lane in Report::of(worker.status.as_ref()).lanes {
            let Some(found) = lane.found_rate.filter(|r| r.is_finite() && *r > 0.0) else {
                continue;
            };
            let since = lane
                .since_cut_ms
                .map(|ms| ms.saturating_add(worker.age_ms.max(0) as u64));
            reports
                .entry(lane.provider_id)
                .or_default()
                .push((found, since));
        }
    }
    reports
        .into_iter()
        .map(|(id, rates)| (id, fleet_rate(&rates)))
        .collect()
}

/// What a worker reports with its heartbeat: its totals since it started, for `status`, and its
/// lanes, for `status` and for the other replicas' paces (the found rates). Written here and
/// read back by both, as this one type.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Report {
    /// Commands received since the worker started.
    pub received: u64,
    /// Links made since the worker started.
    pub created: u64,
    /// Commands dead-lettered since the worker started.
    pub dead_lettered: u64,
    /// Commands sent to a delay queue since the worker started.
    pub delayed: u64,
    /// Its lane of each provider it called lately.
    pub lanes: Vec<LaneStatus>,
}

impl Report {
    /// A heartbeat row's report; empty when there is none or an older version wrote it in
    /// another shape.
    pub fn of(status: Option<&serde_json::Value>) -> Report {
        status
            .and_then(|s| Report::deserialize(s).ok())
            .unwrap_or_default()
    }
}

/// What this worker reports with its heartbeat.
fn report(context: &Context) -> serde_json::Value {
    let [received, created, dead_lettered, delayed] = context.metrics.tally.read();
    let report = Report {
        received,
        created,
        dead_lettered,
        delayed,
        lanes: context.lanes.snapshot(),
    };
    serde_json::to_value(report).expect("a report is plain data")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::pacing::rate::FRESH_CUT;

    fn worker(age_ms: i64, lanes: serde_json::Value) -> heartbeats::Alive {
        heartbeats::Alive {
            instance_id: "w".into(),
            age_ms,
            status: Some(serde_json::json!({ "lanes": lanes })),
        }
    }

    #[test]
    fn replicas_converge_on_the_mean_of_the_rates_they_found_and_the_latest_cut() {
        let lane = |id: i64, found: Option<f64>, since: Option<u64>| {
            serde_json::json!({"providerId": id, "limit": 1, "inFlight": 0, "queued": 0,
                "calls": 0, "breaker": "closed", "maxRequestsPerSecond": null,
                "foundRate": found, "sinceCutMs": since})
        };
        let alive = vec![
            worker(
                0,
                serde_json::json!([lane(1, Some(100.0), Some(4000)), lane(2, None, None)]),
            ),
            worker(500, serde_json::json!([lane(1, Some(200.0), Some(3000))])),
            // Older workers report no found rate at all, or garbage.
            heartbeats::Alive {
                instance_id: "old".into(),
                age_ms: 10,
                status: None,
            },
            worker(0, serde_json::json!([lane(1, Some(f64::NAN), None)])),
        ];
        let rates = fleet_rates(&alive);
        assert_eq!(rates.len(), 1, "provider 2 was found by nobody: {rates:?}");
        let (found, since) = rates[&1];
        assert_eq!(found, 150.0, "no cut within {FRESH_CUT:?}: the mean");
        assert_eq!(
            since,
            Some(Duration::from_millis(3500)),
            "the latest cut, aged by its beat"
        );
    }

    #[test]
    fn the_latest_cut_outweighs_earlier_ones_and_replicas_that_were_not_told_to_slow_down() {
        let lane = |found: f64, since: u64| {
            serde_json::json!([{"providerId": 1, "limit": 1, "inFlight": 0, "queued": 0,
                "calls": 0, "breaker": "closed", "maxRequestsPerSecond": null,
                "foundRate": found, "sinceCutMs": since}])
        };
        let alive = vec![
            worker(0, lane(180.0, 5000)),
            worker(0, lane(150.0, 2500)),
            worker(500, lane(96.0, 1000)),
            worker(200, lane(104.0, 1200)),
        ];
        let (found, since) = fleet_rates(&alive)[&1];
        assert_eq!(found, 100.0, "the mean of the latest episode's cuts only");
        assert_eq!(since, Some(Duration::from_millis(1400)));
    }
}
