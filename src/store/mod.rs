//! Step 3, record: PostgreSQL through diesel-async. The command table is the idempotency record
//! shared by every replica ([`claims`] decides, [`outcomes`] records); the outbox holds what must
//! be published, written in the same transaction as the outcome it reports. Every batched write
//! goes through the one [`batch::Batcher`].

pub mod batch;
pub mod claims;
pub mod commands;
pub mod outbox;
pub mod outcomes;
pub mod replay_runs;
pub mod schema;

use crate::config::DatabaseSettings;
use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::deadpool::{Object, Pool, PoolError};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

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

    /// Whether this may be the data's fault (an error PostgreSQL answered with, other than the
    /// ones that say the database or the transaction is the trouble). Such an error is tried
    /// once more alone before it counts as a refusal.
    fn may_be_the_data(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as K, Error};
        let StoreError::Query(Error::DatabaseError(kind, info)) = self else {
            return false;
        };
        let message = info.message();
        matches!(kind, K::Unknown)
            && !message.starts_with("canceling statement")
            && !message.contains("deadlock")
            && !message.contains("terminating connection")
    }
}

/// Builds the pool; connections are opened lazily, so this succeeds while the database is down.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(settings.url.expose());
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .build()
        .map_err(|e| StoreError::Migration(format!("cannot build the connection pool: {e}")))
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
