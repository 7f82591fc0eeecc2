//! The shared harness: each test gets its own database and its own exchange and queue names on
//! the real PostgreSQL and RabbitMQ, starts workers in-process, and waits for conditions with a
//! bound. Everything it creates is removed when the [`TestEnv`] is dropped, pass or fail.

use lapin::options::{
    BasicGetOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use payment_link_worker::broker::messages::OutboundMessage;
use payment_link_worker::config::Settings;
use payment_link_worker::startup::{self, RunningWorker};
use payment_link_worker::store::commands::CommandRecord;
use payment_link_worker::store::outbox::OutboxRecord;
use payment_link_worker::store::{self, PgPool};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The bearer token tests configure on both sides.
pub const TOKEN: &str = "test-token";
/// How long a test waits for something that should happen in well under a second.
pub const WAIT: Duration = Duration::from_secs(15);

pub use crate::sandbox::amqp_url;

fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
    }
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A worker started by a test; dropping it stops it.
pub struct WorkerHandle {
    stop: CancellationToken,
    running: Option<RunningWorker>,
}

impl WorkerHandle {
    /// Where the worker serves /healthz, /readyz and /metrics.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.running.as_ref().expect("running").http_addr
    }

    /// The worker's Prometheus figures, as `/metrics` renders them.
    pub fn metrics(&self) -> String {
        self.running.as_ref().expect("running").metrics.render()
    }

    /// Stops taking commands, drains, and returns how the worker ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.running.take().expect("running").wait().await
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A message read back from a queue.
#[derive(Debug)]
pub struct Received {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Received {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        payment_link_worker::headers::read_text(&self.properties, name)
    }
    /// A header as an integer.
    pub fn header_int(&self, name: &str) -> Option<i64> {
        payment_link_worker::headers::read_int(&self.properties, name)
    }
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
    /// The message id.
    pub fn message_id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default()
    }
}

/// One test's private world.
pub struct TestEnv {
    pub id: String,
    pub settings: Settings,
    /// The environment the settings were built from, to start the real binary with.
    pub env: Vec<(String, String)>,
    pub pool: PgPool,
    database: String,
    /// Owns the channel below; dropping it closes the test's publishing connection.
    _connection: Connection,
    pub channel: Channel,
    extra_queues: std::sync::Mutex<Vec<String>>,
    /// The deployment's marks (the key kept in the test's database), to write letters and
    /// replays as the worker does.
    pub marks: payment_link_worker::marks::Marks,
}

impl TestEnv {
    /// A fresh database and topology names; the worker's settings point at `provider_url`.
    pub async fn new(provider_url: &str) -> Self {
        Self::with(provider_url, &[]).await
    }

    /// As [`TestEnv::new`], with extra `PAYMENT_LINK_WORKER__…` style overrides.
    pub async fn with(provider_url: &str, overrides: &[(&str, &str)]) -> Self {
        init_logs();
        let defaults = [
            // The tests' loads are sized for 32 in flight (the shipped default is 256).
            ("BROKER__PREFETCH", "32"),
            ("RETRY__INITIAL_INTERVAL_MS", "20"),
            ("RETRY__MAX_INTERVAL_MS", "100"),
            ("RETRY__MAX_ELAPSED_MS", "5000"),
            ("RETRY__DELAY_TIERS_MS", ""),
            ("WORKER__LEASE_MARGIN_MS", "1000"),
            ("PROVIDER__TIMEOUT_MS", "3000"),
            ("OUTBOX__RELAY_INTERVAL_MS", "100"),
            ("OUTBOX__INLINE_GRACE_MS", "3000"),
            ("WORKER__SHUTDOWN_GRACE_MS", "10000"),
            ("WORKER__BUSY_POLL_MS", "50"),
            ("DATABASE__POOL_SIZE", "4"),
            ("LOG__FORMAT", "text"),
            ("TELEMETRY__HTTP_LISTEN", "127.0.0.1:0"),
            ("TELEMETRY__LEVELS_INTERVAL_MS", "200"),
            // Most tests read the dead-letter queue itself; the dead-letter store's tests turn
            // ingestion on (the shipped default).
            ("DEAD_LETTERS__INGEST", "false"),
            // Tests that publish many bad commands tell their dead letters apart by this header
            // of theirs, which a dead letter carries only when it is named.
            ("BROKER__CARRIED_HEADERS", "x-test-case"),
        ];
        let all: Vec<(&str, &str)> = defaults.iter().chain(overrides).copied().collect();
        let sandbox = crate::sandbox::Sandbox::create("t", provider_url, TOKEN, &all)
            .await
            .expect("a sandbox on PostgreSQL");
        let settings = sandbox.settings().expect("test settings are valid");
        let (id, database, env) = (sandbox.id, sandbox.database, sandbox.env);
        let pool = store::pool(&settings.database).expect("pool");
        store::migrate(&pool).await.expect("migrations run");
        let marks = {
            let mut conn = pool.get().await.expect("db connection");
            payment_link_worker::marks::Marks::load(&settings, &mut conn)
                .await
                .expect("the signing key")
        };
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ is reachable");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        // The worker declares the topology too; declaring it here lets a test publish first.
        let declared =
            payment_link_worker::broker::topology::declare(&connection, &settings.broker)
                .await
                .expect("topology");
        let _ = declared.close(200, "declared".into()).await;
        Self {
            id,
            settings,
            env,
            pool,
            database,
            _connection: connection,
            channel,
            extra_queues: Default::default(),
            marks,
        }
    }

    /// `properties` with the worker's mark over its dead-letter headers, as the worker writes a
    /// dead letter.
    pub fn signed_dead_letter(&self, properties: BasicProperties) -> BasicProperties {
        let mut headers = properties.headers().clone().unwrap_or_default();
        let id = properties.message_id().as_ref().map(|m| m.to_string());
        self.marks
            .sign_dead_letter(&mut headers, id.as_deref().unwrap_or(""));
        properties.with_headers(headers)
    }

    /// `properties` with the worker's mark over its counters, as a replay sends a command.
    pub fn signed_counters(&self, properties: BasicProperties) -> BasicProperties {
        let mut headers = properties.headers().clone().unwrap_or_default();
        let id = properties.message_id().as_ref().map(|m| m.to_string());
        self.marks
            .sign_counters(&mut headers, id.as_deref().unwrap_or(""));
        properties.with_headers(headers)
    }

    /// The context a worker with this test's settings would build, without a consumer: to drive
    /// the pipeline directly. Declares the delay queues its settings name (removed on drop).
    pub async fn context(&self) -> payment_link_worker::startup::Context {
        let tiers = &self.settings.retry.delay_tiers_ms;
        payment_link_worker::broker::topology::declare_delay_queues(
            &self.channel,
            &self.settings.broker,
            tiers,
        )
        .await
        .expect("delay queues");
        let metrics = payment_link_worker::metrics::MetricsHandle::new().expect("metrics");
        payment_link_worker::startup::Context::new(
            self.settings.clone(),
            self.pool.clone(),
            metrics.metrics.clone(),
            format!("plw-direct-{}", self.id),
        )
        .await
        .expect("context")
    }

    /// Starts a worker with this test's settings.
    pub async fn start_worker(&self) -> WorkerHandle {
        self.start_worker_with(self.settings.clone()).await
    }

    /// Starts a worker with adjusted settings.
    pub async fn start_worker_with(&self, settings: Settings) -> WorkerHandle {
        let stop = CancellationToken::new();
        let running = startup::start(settings, stop.clone())
            .await
            .expect("worker starts");
        WorkerHandle {
            stop,
            running: Some(running),
        }
    }

    /// A confirm channel of its own on the test's connection: a publish the broker refuses closes
    /// it, not [`TestEnv::channel`].
    pub async fn fresh_channel(&self) -> Channel {
        let channel = self._connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        channel
    }

    /// Publishes raw bytes with the given properties to the command exchange, confirmed.
    pub async fn publish_raw(&self, properties: BasicProperties, body: &[u8]) {
        let message = OutboundMessage {
            exchange: self.settings.broker.command_exchange.clone(),
            routing_key: self.settings.broker.command_routing_key.clone(),
            properties,
            body: body.to_vec(),
        };
        payment_link_worker::broker::publisher::publish_confirmed(&self.channel, &message)
            .await
            .expect("the command was confirmed and routed");
    }

    /// Publishes a JSON command with this id.
    pub async fn send(&self, command_id: &str, body: &str) {
        self.publish_raw(command_properties(command_id), body.as_bytes())
            .await;
    }

    /// A queue bound to the event exchange for every routing key, deleted with the test.
    pub async fn capture_events(&self) -> String {
        let queue = format!("t.{}.capture.{}", self.id, uuid::Uuid::new_v4().simple());
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("capture queue");
        self.channel
            .queue_bind(
                queue.as_str().into(),
                self.settings.broker.event_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind capture queue");
        self.extra_queues.lock().unwrap().push(queue.clone());
        queue
    }

    /// A queue that receives what is published to `exchange` with `routing_key`, deleted with
    /// the test: for the default exchange (`""`) the queue is named `routing_key`; an exchange
    /// other than the test's own and `amq.*` is declared auto-delete (it goes with the queue).
    pub async fn spy(&self, exchange: &str, routing_key: &str) -> String {
        let queue = if exchange.is_empty() {
            routing_key.to_owned()
        } else {
            format!("t.{}.spy.{}", self.id, uuid::Uuid::new_v4().simple())
        };
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("spy queue");
        self.extra_queues.lock().unwrap().push(queue.clone());
        if exchange.is_empty() {
            return queue;
        }
        let broker = &self.settings.broker;
        let ours = [
            &broker.command_exchange,
            &broker.event_exchange,
            &broker.dead_letter_exchange,
        ];
        if !exchange.starts_with("amq.") && !ours.iter().any(|e| e.as_str() == exchange) {
            self.channel
                .exchange_declare(
                    exchange.into(),
                    lapin::ExchangeKind::Topic,
                    lapin::options::ExchangeDeclareOptions {
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("spied exchange");
        }
        self.channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind spy queue");
        queue
    }

    /// Takes the next message from `queue`, waiting up to `limit`.
    pub async fn next_message(&self, queue: &str, limit: Duration) -> Received {
        eventually(&format!("a message on {queue}"), limit, || async {
            self.try_get(queue).await
        })
        .await
    }

    /// Takes `n` messages from `queue`, waiting up to `limit` for all of them.
    pub async fn messages(&self, queue: &str, n: usize, limit: Duration) -> Vec<Received> {
        let mut got = Vec::with_capacity(n);
        let started = Instant::now();
        while got.len() < n {
            let left = limit.saturating_sub(started.elapsed());
            assert!(
                !left.is_zero(),
                "timed out with {} of {n} messages on {queue}",
                got.len()
            );
            got.push(self.next_message(queue, left).await);
        }
        got
    }

    /// Takes a message from `queue` if there is one now.
    pub async fn try_get(&self, queue: &str) -> Option<Received> {
        let message = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")?;
        Some(Received {
            routing_key: message.delivery.routing_key.to_string(),
            properties: message.delivery.properties.clone(),
            body: message.delivery.data.clone(),
        })
    }

    /// Messages ready in `queue` (not counting those delivered and unacknowledged).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        payment_link_worker::broker::queue_depth(&self.channel, queue)
            .await
            .expect("queue exists")
    }

    /// Outbox rows not yet confirmed by the broker (`None` while the database cannot be read).
    pub async fn unsent(&self) -> Option<i64> {
        let mut conn = self.pool.get().await.ok()?;
        payment_link_worker::store::outbox::unsent_count(&mut conn)
            .await
            .ok()
    }

    /// Messages ready in `queue` and its consumers; `None` while the queue is not there (a
    /// channel of its own: a missing queue closes it).
    pub async fn queue_counts(&self, queue: &str) -> Option<(u32, u32)> {
        let channel = self._connection.create_channel().await.ok()?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = channel.close(200, "counted".into()).await;
        Some((declared.message_count(), declared.consumer_count()))
    }

    /// The dead-letter queue's name.
    pub fn dead_letter_queue(&self) -> String {
        self.settings.broker.dead_letter_queue.clone()
    }

    /// The command queue's name.
    pub fn command_queue(&self) -> String {
        self.settings.broker.command_queue.clone()
    }

    /// A command's row.
    pub async fn record(&self, command_id: &str) -> Option<CommandRecord> {
        let mut conn = self.pool.get().await.expect("db connection");
        store::commands::find(&mut conn, command_id)
            .await
            .expect("query")
    }

    /// The event the worker would publish again for a command (kept on its row or in the outbox).
    pub async fn recorded_event(&self, command_id: &str) -> Option<OutboundMessage> {
        let mut conn = self.pool.get().await.expect("db connection");
        store::commands::recorded_event(&mut conn, command_id)
            .await
            .expect("query")
            .map(|event| event.expect("readable event"))
    }

    /// Every outbox row of a command.
    pub async fn outbox(&self, command_id: &str) -> Vec<OutboxRecord> {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        use payment_link_worker::store::schema::outbox::dsl as o;
        let mut conn = self.pool.get().await.expect("db connection");
        o::outbox
            .filter(o::command_id.eq(command_id))
            .order(o::id)
            .select(OutboxRecord::as_select())
            .load(&mut conn)
            .await
            .expect("query")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let database = self.database.clone();
        let settings = self.settings.clone();
        let extra = self.extra_queues.lock().unwrap().drain(..).collect();
        // Drop runs inside the test's runtime, which cannot block on itself: clean up from a
        // thread with a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(crate::sandbox::remove(&database, &settings, extra));
        });
        let _ = cleanup.join();
    }
}

/// Runs one statement on the admin database (creating and dropping test databases).
pub async fn exec_admin(url: &str, sql: &str) {
    crate::sandbox::exec_admin(url, sql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Makes `provider` answer every call (not matched by an earlier mock) with `status` and a link
/// built by [`provider_answer`].
pub async fn answer_with_link(
    provider: &wiremock::MockServer,
    status: u16,
    link_id: i64,
    amount: &str,
    invoice_id: i64,
) {
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(status).set_body_raw(
            provider_answer(link_id, amount, invoice_id),
            "application/json",
        ))
        .mount(provider)
        .await;
}

/// Serves the provider simulator on a free port; returns its base URL and its stop switch.
pub async fn start_simulator(
    options: payment_link_worker::provider::sim::SimOptions,
) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(payment_link_worker::provider::sim::serve(
        listener,
        options,
        stop.clone(),
    ));
    (url, stop)
}

/// Everything the simulator counts (`GET /_sim/stats`).
pub async fn simulator_counters(url: &str) -> serde_json::Value {
    let text = reqwest::get(format!("{url}/_sim/stats"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The simulator's counters: requests received and links made.
pub async fn simulator_stats(url: &str) -> (u64, u64) {
    let stats = simulator_counters(url).await;
    (
        stats["requests"].as_u64().unwrap(),
        stats["links"].as_u64().unwrap(),
    )
}

/// The simulator's repeat counters: the most requests one `Idempotency-Key` got, and how many
/// keys got more than one.
pub async fn simulator_repeats(url: &str) -> (u64, u64) {
    let stats = simulator_counters(url).await;
    (
        stats["maxRequestsPerKey"].as_u64().unwrap(),
        stats["repeatedKeys"].as_u64().unwrap(),
    )
}

/// Properties of a well-formed command.
pub fn command_properties(command_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(command_id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// Adds a text header.
pub fn with_header(properties: BasicProperties, name: &str, value: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        name.into(),
        AMQPValue::LongString(value.as_bytes().to_vec().into()),
    );
    properties.with_headers(headers)
}

/// Adds an integer header.
pub fn with_int_header(properties: BasicProperties, name: &str, value: i64) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(name.into(), AMQPValue::LongLongInt(value));
    properties.with_headers(headers)
}

/// A command body with this amount (as JSON number text) and invoice id.
pub fn command_body(amount: &str, invoice_id: i64) -> String {
    format!(
        r#"{{"paymentProviderId":7,"amountInMajorCurrency":{amount},"description":"Invoice {invoice_id}","emailAddress":"payer@example.com","invoiceId":{invoice_id},"customerId":99}}"#
    )
}

/// A provider answer for a command body built by [`command_body`], in an unusual layout so a
/// test can tell a verbatim copy from a re-serialization.
pub fn provider_answer(link_id: i64, amount: &str, invoice_id: i64) -> String {
    format!(
        r#"{{ "paymentLink": "https://instantpaymentlink/ref-{link_id}", "id": {link_id}, "paymentProviderId": 7, "amountInMajorCurrency": {amount}, "currencyId": 826, "description": "Invoice {invoice_id}", "emailAddress": "payer@example.com", "invoiceId": {invoice_id}, "adhocInvoiceId": null, "customerId": 99 }}"#
    )
}

/// A message the worker must refuse, and what its dead letter must say.
pub struct BadCase {
    pub name: &'static str,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    pub reason: &'static str,
}

/// One bad command of every kind: not JSON, not UTF-8, wrong shape, no message id, wrong content
/// type, too large, missing fields, wrong types, absurd numbers, blank text, bad email, bad ids.
pub fn bad_commands() -> Vec<BadCase> {
    let good = command_body("1.00", 1).into_bytes();
    let props = command_properties;
    let huge = format!(
        r#"{{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let case = |name, properties, body: &[u8], reason| BadCase {
        name,
        properties,
        body: body.to_vec(),
        reason,
    };
    vec![
        case("not-json", props("bad-1"), b"hello", "not valid JSON"),
        case("not-utf8", props("bad-2"), &[0x7b, 0xff, 0xfe, 0x7d], "not valid UTF-8"),
        case("array", props("bad-3"), b"[1,2,3]", "not a command object"),
        case("no-message-id", BasicProperties::default().with_content_type("application/json".into()), &good, "message_id"),
        case("wrong-content-type", props("bad-5").with_content_type("text/plain".into()), &good, "content_type must be application/json"),
        case("too-large", props("bad-6"), huge.as_bytes(), "broker.max_message_bytes"),
        case("missing-provider-id", props("bad-7"), br#"{"amountInMajorCurrency":1,"description":"d"}"#, "paymentProviderId is required"),
        case("string-amount", props("bad-8"), br#"{"paymentProviderId":1,"amountInMajorCurrency":"1.00","description":"d"}"#, "must be a JSON number"),
        case("negative-amount", props("bad-9"), br#"{"paymentProviderId":1,"amountInMajorCurrency":-5,"description":"d"}"#, "greater than zero"),
        case("too-precise", props("bad-10"), br#"{"paymentProviderId":1,"amountInMajorCurrency":0.12345,"description":"d"}"#, "at most 4 digits after"),
        case("absurd-amount", props("bad-11"), br#"{"paymentProviderId":1,"amountInMajorCurrency":1e300,"description":"d"}"#, "at most 16 digits before"),
        case("blank-description", props("bad-12"), br#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":" "}"#, "description must not be blank"),
        case("bad-email", props("bad-13"), br#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"d","emailAddress":"x@"}"#, "emailAddress"),
        case("zero-id", props("bad-14"), br#"{"paymentProviderId":1,"amountInMajorCurrency":1,"description":"d","invoiceId":0}"#, "invoiceId must be a positive integer"),
    ]
}

/// The real binary, with the test's settings in its environment.
pub fn binary(env: &TestEnv) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_payment-link-worker"));
    command
        .envs(env.env.iter().map(|(k, v)| (k, v)))
        .env_remove("RUST_LOG");
    for name in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ] {
        command.env_remove(name);
    }
    command
}

/// Runs the binary to its end; its stdout, or a failure with its stderr.
pub fn output(command: &mut std::process::Command) -> String {
    let out = command.output().expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A child process that is killed (with its own children, such as the program `script` runs) if
/// the test ends without stopping it, a failed assertion included: a worker left running would
/// declare its queues again after the test's clean-up removed them.
pub struct Reaped(Option<std::process::Child>);

impl Reaped {
    /// Guards `child`.
    pub fn new(child: std::process::Child) -> Self {
        Self(Some(child))
    }

    /// The child, for the test to stop it itself.
    pub fn take(mut self) -> std::process::Child {
        self.0.take().expect("not taken yet")
    }

    /// The child, while guarded.
    pub fn get(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("not taken yet")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = std::process::Command::new("pkill")
                .args(["-KILL", "-P", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends SIGTERM and waits (bounded) for a clean exit.
pub fn terminate(mut child: std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean exit after SIGTERM: {status}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no exit within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free loopback port, bound then released for a process that cannot be told to pick one and
/// say which (Prometheus, a console started as a program).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
