//! Start-up: check the settings, migrate, connect, build the [`Context`] every command's
//! processing shares (pool, publisher, provider client, batching writers), and spawn the
//! long-running tasks (health server, gauges, consumer). What follows start-up is in
//! [`crate::consumer`].

pub use crate::context::Context;

use crate::config::Settings;
use crate::consumer::{self, Session};
use crate::metrics::MetricsHandle;
use crate::store::{self, PgPool};
use crate::{fleet, health, levels};
use anyhow::Context as _;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A started worker; [`RunningWorker::wait`] returns once it has stopped.
pub struct RunningWorker {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The lease owner name, for tests and logs.
    pub instance_id: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served, when enabled.
    pub http_addr: Option<std::net::SocketAddr>,
    /// The worker's figures.
    pub metrics: Arc<MetricsHandle>,
}

impl RunningWorker {
    /// Waits until the worker has stopped, and says how.
    pub async fn wait(self) -> anyhow::Result<()> {
        let ended = self.task.await.context("the worker task panicked");
        // Flushes the last figures to OTLP, when configured.
        self.metrics.shutdown();
        ended?
    }
}

/// Connects, migrates, declares the topology and starts consuming; returns once commands are
/// being taken, or with an error naming what could not be reached. After that, the worker rides
/// out broker outages by reconnecting. It stops taking commands when `stop` fires, then drains.
pub async fn start(settings: Settings, stop: CancellationToken) -> anyhow::Result<RunningWorker> {
    settings.check_for_worker()?;
    let instance_id = format!("plw-{}", uuid::Uuid::new_v4().simple());
    let pool = store::pool(&settings.database)?;
    if settings.database.run_migrations {
        migrate(&settings, &pool).await?;
    } else {
        wait_for_schema(&settings, &pool, &stop).await?;
    }
    let session = Session::open(&settings, &instance_id).await?;
    let metrics = Arc::new(MetricsHandle::new()?);
    let context =
        Context::new(settings, pool, metrics.metrics.clone(), instance_id.clone()).await?;
    let background = CancellationToken::new();
    let http_addr = serve_health(&context, &metrics, &background).await?;
    fleet::recall(&context).await;
    let context = Arc::new(context);
    tracing::info!(instance_id, queue = %context.settings.broker.command_queue,
        prefetch = context.settings.broker.prefetch, "worker started");
    tokio::spawn(levels::run(context.clone(), background.clone()));
    let fleet = tokio::spawn(fleet::run(context.clone(), background.clone()));
    tokio::spawn(crate::retention::run(
        context.settings.clone(),
        context.pool.clone(),
        context.metrics.clone(),
        background.clone(),
    ));
    tokio::spawn(crate::progress::run(context.clone(), background.clone()));
    if context.settings.dead_letters.ingest {
        tokio::spawn(crate::dead_letters::ingest::run(
            context.settings.clone(),
            context.pool.clone(),
            format!("{instance_id} dead-letter ingester"),
            context.metrics.levels.clone(),
            background.clone(),
        ));
    }
    let task = tokio::spawn(async move {
        let ended = consumer::run(context, session, stop).await;
        background.cancel();
        // The heartbeat task leaves (so the others count this worker out at once) and writes
        // what the lanes found, before the process ends; each of its steps is bounded.
        let _ = tokio::time::timeout(LEAVE_WITHIN, fleet).await;
        ended
    });
    Ok(RunningWorker {
        task,
        instance_id,
        http_addr,
        metrics,
    })
}

/// The longest a stopping worker waits for its heartbeat task to write what its lanes found and
/// remove its heartbeat row.
const LEAVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Applies the pending migrations and logs what it did; a failure is one line saying why.
pub async fn migrate(settings: &Settings, pool: &PgPool) -> anyhow::Result<usize> {
    let applied = apply_migrations(settings, pool).await?;
    match applied {
        0 => tracing::info!("the database schema is up to date"),
        applied => tracing::info!(applied, "applied database migrations"),
    }
    Ok(applied)
}

/// How often a replica that does not migrate looks whether the schema has caught up.
const SCHEMA_POLL: Duration = Duration::from_secs(2);

/// With `database.run_migrations = false` (a migration Job applies them, as on Kubernetes),
/// waits until the database has every migration this binary knows: a replica of a new version
/// that starts before its migration ran waits instead of failing on a missing column. Says once
/// what it waits for; an unreachable database stops start-up as usual.
pub async fn wait_for_schema(
    settings: &Settings,
    pool: &PgPool,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut said = false;
    loop {
        let missing = match store::unapplied_migrations(pool).await {
            Ok(missing) => missing,
            Err(error) => {
                return Err(crate::diagnose::database(
                    settings,
                    "read the schema's version",
                    error,
                )
                .await);
            }
        };
        if missing.is_empty() {
            if said {
                tracing::info!("the database schema is up to date; starting");
            }
            return Ok(());
        }
        if !said {
            tracing::warn!(missing = missing.len(), newest = %missing.last().map_or("", String::as_str),
                "waiting for the database schema: migrations not applied yet (database.run_migrations \
                 is false; run `payment-link-worker migrate`, the migration Job on Kubernetes)");
            said = true;
        }
        tokio::select! {
            () = stop.cancelled() => anyhow::bail!("stopped while waiting for the database schema"),
            () = tokio::time::sleep(SCHEMA_POLL) => {}
        }
    }
}

/// Applies the pending migrations and returns how many, saying nothing (for `migrate`, which
/// prints it once itself); a failure is one line saying why.
pub async fn apply_migrations(settings: &Settings, pool: &PgPool) -> anyhow::Result<usize> {
    match store::migrate(pool).await {
        Ok(applied) => Ok(applied),
        Err(error) => Err(crate::diagnose::database(settings, "migrate the database", error).await),
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `telemetry.http_listen`, unless it is empty.
async fn serve_health(
    context: &Context,
    metrics: &Arc<MetricsHandle>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let listen = context.settings.telemetry.http_listen.trim();
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (telemetry.http_listen)"))?;
    let addr = listener.local_addr()?;
    let probe = health::Probe {
        metrics: metrics.clone(),
        pool: context.pool.clone(),
        lanes: context.lanes.clone(),
        consuming: context.consuming.clone(),
        publisher: context.publisher.clone(),
        instance_id: context.instance_id.clone(),
    };
    tokio::spawn(health::serve(listener, probe, stop.clone()));
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    Ok(Some(addr))
}
