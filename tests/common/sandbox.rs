//! A private world on the shared RabbitMQ and PostgreSQL: a database of its own, broker names of
//! its own, the environment that points the worker at them, and their removal. The integration
//! tests (`tests/it/helpers.rs`) and the benchmark (`benches/payment-link-bench.rs`) both build
//! on it, so they set up and clean up the same way.

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use payment_link_worker::config::Settings;

/// PostgreSQL server the sandboxes create their databases on (`TEST_DATABASE_URL`).
pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// RabbitMQ the sandboxes use (`TEST_AMQP_URL`).
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Runs one statement on the admin database (creating and dropping sandbox databases).
pub async fn exec_admin(url: &str, sql: &str) -> Result<(), String> {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .map_err(|e| format!("PostgreSQL at {url} is not reachable: {e}"))?;
    // The simple protocol: `sql` may be several statements (a migration's down.sql).
    conn.batch_execute(sql)
        .await
        .map_err(|e| format!("{sql}: {e}"))?;
    Ok(())
}

/// One sandbox: its id, its database and the worker's environment pointing at both.
pub struct Sandbox {
    /// Unique per sandbox; in every name it owns.
    pub id: String,
    /// Its database, on the admin server.
    pub database: String,
    /// `DATABASE_URL`, `AMQP_URL`, the provider and the broker names, then the overrides
    /// (`PAYMENT_LINK_WORKER__` keys without the prefix, as `RETRY__MAX_ELAPSED_MS`).
    pub env: Vec<(String, String)>,
}

impl Sandbox {
    /// Creates the database `plw_{kind}_{id}`; broker names start with `{kind}.{id}.`.
    pub async fn create(
        kind: &str,
        provider_url: &str,
        token: &str,
        overrides: &[(&str, &str)],
    ) -> Result<Self, String> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let database = format!("plw_{kind}_{id}");
        let admin = admin_database_url();
        exec_admin(&admin, &format!("CREATE DATABASE {database}")).await?;
        let base = admin
            .rsplit_once('/')
            .ok_or("TEST_DATABASE_URL has no database path")?
            .0;
        let prefix = format!("{kind}.{id}.");
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), format!("{base}/{database}")),
            ("AMQP_URL".into(), amqp_url()),
            ("PROVIDER_BASE_URL".into(), provider_url.into()),
            ("PROVIDER_TOKEN".into(), token.into()),
        ];
        let names = [
            ("BROKER__COMMAND_EXCHANGE", "commands"),
            ("BROKER__COMMAND_QUEUE", "create"),
            ("BROKER__EVENT_EXCHANGE", "events"),
            ("BROKER__DEAD_LETTER_EXCHANGE", "dead-letter"),
            ("BROKER__DEAD_LETTER_QUEUE", "create.dead-letter"),
        ];
        for (key, value) in names {
            env.push((
                format!("PAYMENT_LINK_WORKER__{key}"),
                format!("{prefix}{value}"),
            ));
        }
        for (key, value) in overrides {
            env.push((format!("PAYMENT_LINK_WORKER__{key}"), value.to_string()));
        }
        Ok(Self { id, database, env })
    }

    /// The settings the worker reads from this environment.
    pub fn settings(&self) -> Result<Settings, String> {
        Settings::load_from(None, self.env.clone()).map_err(|e| e.to_string())
    }
}

/// Removes what a sandbox made: the queues and exchanges `settings` names (delay queues
/// included), `extra_queues`, then `database`. Best effort: whatever is gone already is skipped.
pub async fn remove(database: &str, settings: &Settings, extra_queues: Vec<String>) {
    let broker = &settings.broker;
    let mut queues = vec![
        broker.command_queue.clone(),
        broker.dead_letter_queue.clone(),
    ];
    queues.extend(extra_queues);
    for &delay_ms in &settings.retry.delay_tiers_ms {
        queues.push(payment_link_worker::broker::topology::delay_queue(
            broker, delay_ms,
        ));
    }
    let delay_exchange = payment_link_worker::broker::topology::delay_exchange(broker);
    let exchanges = [
        &broker.command_exchange,
        &broker.event_exchange,
        &broker.dead_letter_exchange,
        &delay_exchange,
    ];
    // A failed delete closes its channel: each delete gets a channel of its own, so one failure
    // (a queue another connection holds exclusively) does not leave the rest behind.
    if let Ok(connection) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await
    {
        for queue in queues {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = channel.close(200, "deleted".into()).await;
            }
        }
        for exchange in exchanges {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
                let _ = channel.close(200, "deleted".into()).await;
            }
        }
        let _ = connection.close(200, "sandbox removed".into()).await;
    }
    let _ = exec_admin(
        &admin_database_url(),
        &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
    )
    .await;
}
