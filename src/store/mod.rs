//! Step 3, record: PostgreSQL through diesel-async. The command table is the idempotency record
//! shared by every replica ([`claims`] decides, [`outcomes`] records); the outbox holds what must
//! be published, written in the same transaction as the outcome it reports. Every batched write
//! goes through the one [`batch::Batcher`].

pub mod audit;
pub mod batch;
pub mod claims;
pub mod commands;
pub mod heartbeats;
pub mod outbox;
pub mod outcomes;
pub mod paces;
pub mod replay_runs;
pub mod retention;
pub mod schema;
pub mod sessions;

use crate::config::DatabaseSettings;
use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::deadpool::{Object, Pool, PoolError};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use std::time::Duration;

/// The migrations in `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// A pool of async PostgreSQL connections.
pub type PgPool = Pool<AsyncPgConnection>;
/// A connection checked out of the pool.
pub type PgConn = Object<AsyncPgConnection>;

/// A database operation failed; the caller decides whether to wait and try again.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot get a database connection: {0}")]
    /// No connection could be had.
    Pool(#[from] PoolError),
    #[error("database query failed: {0}")]
    /// A statement failed.
    Query(#[from] diesel::result::Error),
    #[error("cannot run database migrations: {0}")]
    /// Migrations (or the pool set-up) failed.
    Migration(String),
    #[error("database write failed: {0}")]
    /// A batched write failed; every command in the batch tries again.
    Batch(String),
    #[error("the database did not answer within {0:?} (database.statement_timeout_ms)")]
    /// A step got no answer in time; the database counts as away.
    TimedOut(Duration),
    #[error("the database refused the command's data: {0}")]
    /// The database is there but refuses this request's data: trying again cannot help.
    Refused(String),
}

impl StoreError {
    /// Whether trying again cannot help: the database refused the data itself.
    pub fn is_refusal(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as K, Error};
        match self {
            StoreError::Refused(_) => true,
            StoreError::Query(Error::DatabaseError(kind, _)) => matches!(
                kind,
                K::UniqueViolation
                    | K::ForeignKeyViolation
                    | K::NotNullViolation
                    | K::CheckViolation
                    | K::ExclusionViolation
                    | K::RestrictViolation
            ),
            _ => false,
        }
    }

    /// Whether the host is read-only (SQLSTATE 25006: a standby, or a primary a failover
    /// demoted): not the data's fault, and a new connection may reach the new primary.
    pub fn is_read_only(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as K, Error};
        matches!(
            self,
            StoreError::Query(Error::DatabaseError(K::ReadOnlyTransaction, _))
        )
    }

    /// Whether this may be the data's fault (an error PostgreSQL answered with, other than the
    /// ones that say the database or the transaction is the trouble). Such an error is tried
    /// once more alone before it counts as a refusal.
    pub fn may_be_the_data(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as K, Error};
        let StoreError::Query(Error::DatabaseError(kind, info)) = self else {
            return false;
        };
        // diesel names only a few SQLSTATEs; query_canceled (57014), deadlock_detected (40P01)
        // and admin_shutdown (57P01) come as Unknown with the server's message alone.
        let message = info.message();
        matches!(kind, K::Unknown)
            && !message.starts_with("canceling statement")
            && !message.contains("deadlock")
            && !message.contains("terminating connection")
    }
}

/// Builds the pool; connections are opened lazily, so this succeeds while the database is down.
/// Every wait is bounded: opening a connection by `database.connect_timeout_ms`, waiting for a
/// free or recycled one, and each statement by `database.statement_timeout_ms` (set on the server
/// too, with `idle_in_transaction_session_timeout`), so a database that hangs is a database that
/// is away, never a worker that hangs.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    use diesel_async::pooled_connection::ManagerConfig;
    let connect = Duration::from_millis(settings.connect_timeout_ms);
    let statement = Duration::from_millis(settings.statement_timeout_ms);
    let session = format!(
        "SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}",
        settings.statement_timeout_ms, settings.idle_in_transaction_timeout_ms
    );
    let mut config = ManagerConfig::<AsyncPgConnection>::default();
    config.custom_setup = Box::new(move |url| {
        let (url, session) = (url.to_owned(), session.clone());
        Box::pin(async move {
            use diesel_async::{AsyncConnection, SimpleAsyncConnection};
            let mut conn = tokio::time::timeout(connect, AsyncPgConnection::establish(&url))
                .await
                .map_err(|_| {
                    diesel::ConnectionError::BadConnection(format!(
                        "no answer within {} ms (database.connect_timeout_ms)",
                        connect.as_millis()
                    ))
                })??;
            conn.batch_execute(&session)
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            Ok(conn)
        })
    });
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        settings.url.expose(),
        config,
    );
    Pool::builder(manager)
        // A connection opened before the database last said "read-only" (a failover demoted
        // its host) is dropped instead of reused: a new one goes through the URL's hosts again
        // and, with `target_session_attrs=read-write`, reaches the new primary.
        .pre_recycle(deadpool::managed::Hook::sync_fn(|_, metrics| {
            if opened_before_demotion(metrics.created) {
                Err(deadpool::managed::HookError::Message(
                    "opened before a failover".into(),
                ))
            } else {
                Ok(())
            }
        }))
        .max_size(settings.pool_size)
        .runtime(deadpool::Runtime::Tokio1)
        .create_timeout(Some(connect))
        .wait_timeout(Some(statement))
        .recycle_timeout(Some(statement))
        .build()
        .map_err(|e| StoreError::Migration(format!("cannot build the connection pool: {e}")))
}

/// Takes a connection from `pool` and runs `step` on it: the one way a caller outside a
/// batching writer reaches the database.
pub async fn with_conn<T>(
    pool: &PgPool,
    step: impl AsyncFnOnce(&mut PgConn) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut conn = pool.get().await?;
    step(&mut conn).await
}

/// Runs one database step, bounded by [`step_limit`].
pub async fn bounded<T>(
    pool: &PgPool,
    step: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let limit = step_limit(pool);
    let result = tokio::time::timeout(limit, step)
        .await
        .unwrap_or(Err(StoreError::TimedOut(limit)));
    if let Err(error) = &result
        && error.is_read_only()
    {
        note_demotion(pool);
    }
    result
}

/// When a database host last answered that it is read-only (a standby, or a primary demoted by
/// a failover), as an instant; connections opened before it are not reused.
static DEMOTED_AT: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

fn opened_before_demotion(created: std::time::Instant) -> bool {
    DEMOTED_AT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some_and(|at| created <= at)
}

/// Records that the host behind a connection is read-only now, and drops the idle connections
/// (the one in use is dropped when it comes back, by the pool's recycle hook): the next ones go
/// to whichever host is the primary. The command is retried, never dead-lettered.
fn note_demotion(pool: &PgPool) {
    let now = std::time::Instant::now();
    *DEMOTED_AT.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    pool.retain(|_, metrics| metrics.created > now);
    tracing::warn!(
        "the database host answered that it is read-only (a failover?); reconnecting to the \
         primary"
    );
}

/// How long the worker waits for one database step (`database.statement_timeout_ms`, as the pool
/// was built with), with a little more for the server's own timeout to answer first.
pub fn step_limit(pool: &PgPool) -> Duration {
    pool.timeouts().recycle.unwrap_or(Duration::from_secs(30)) + Duration::from_secs(1)
}

/// The embedded migrations the database has not applied yet (by version): what a replica started
/// with `database.run_migrations = false` waits for someone (the migration Job) to apply.
pub async fn unapplied_migrations(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    use diesel::migration::MigrationSource;
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Applied {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let mut conn = pool.get().await?;
    // A database nobody has migrated has no version table yet: nothing is applied.
    let exists: Vec<Applied> = diesel::sql_query(
        "SELECT 'x' AS version WHERE to_regclass('__diesel_schema_migrations') IS NOT NULL",
    )
    .load(&mut conn)
    .await?;
    let applied: Vec<String> = if exists.is_empty() {
        Vec::new()
    } else {
        diesel::sql_query("SELECT version FROM __diesel_schema_migrations")
            .load::<Applied>(&mut conn)
            .await?
            .into_iter()
            .map(|a| a.version)
            .collect()
    };
    let embedded = MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
        .map_err(|e| StoreError::Migration(e.to_string()))?;
    Ok(embedded
        .iter()
        .map(|m| m.name().version().to_string())
        .filter(|v| !applied.contains(v))
        .collect())
}

/// Advisory lock key that serializes migrations when several replicas start at once.
const MIGRATION_LOCK: i64 = 0x0070_6c77_5f6d_6967; // "plw_mig"

/// Runs the pending migrations, one replica at a time. Needs a multi-threaded runtime (the
/// harness blocks in place).
pub async fn migrate(pool: &PgPool) -> Result<usize, StoreError> {
    use diesel_async::RunQueryDsl;
    let mut lock_conn = pool.get().await?;
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<diesel::sql_types::BigInt, _>(MIGRATION_LOCK)
        .execute(&mut lock_conn)
        .await?;
    let conn = pool.get().await?;
    let result = tokio::task::block_in_place(|| {
        let mut harness = diesel_async::AsyncMigrationHarness::new(conn);
        harness
            .run_pending_migrations(MIGRATIONS)
            .map(|applied| applied.len())
            .map_err(|e| StoreError::Migration(e.to_string()))
    });
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<diesel::sql_types::BigInt, _>(MIGRATION_LOCK)
        .execute(&mut lock_conn)
        .await?;
    result
}
