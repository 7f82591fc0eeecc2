//! A generative hostile publisher: batches of messages with generated properties and headers
//! (names of any characters, the worker's and the broker's own marks forged, `CC`/`BCC`, every
//! AMQP field type, counts past the intake budget, sizes up to the frame, tables nested past the
//! depth bound) and bodies, published beside good commands to the real worker binary, the real
//! broker and PostgreSQL; some go straight into the dead-letter exchange, as any AMQP user may
//! write there. After each batch:
//! - every message has ended: an event for it, or its dead letter in the store;
//! - the good commands got their events within a bound of their time alone;
//! - nothing reached a queue or routing key other than the worker's own (spies stay empty);
//! - the worker's resident memory stayed under its pod's limit.
//!
//! CI runs 12 cases; `PROPTEST_CASES=200 cargo nextest run -E 'test(hostile_generated)'`
//! runs more. A shrunk failure is kept in `proptest-regressions/hostile_generated.txt` and tried
//! first on every later run.

use crate::helpers::*;
use crate::operations::INGEST;
use crate::recovery::ChildWorker;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString};
use payment_link_worker::broker::messages::OutboundMessage;
use payment_link_worker::broker::publisher::publish_confirmed;
use payment_link_worker::dead_letters::store::{self, Filter};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use std::time::{Duration, Instant};
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Good commands published beside each batch.
const GOOD: usize = 20;
/// Longest a batch may take to end, every message of it accounted for.
const BATCH_BOUND: Duration = Duration::from_secs(60);
/// The worker's memory limit in the shipped Kubernetes manifests.
const RSS_LIMIT_KIB: u64 = 256 * 1024;
/// Most header bytes a generated message carries: below the frame (128 KiB) with room for the
/// rest of the properties, so that the broker takes every generated message.
const FRAME_ROOM: usize = 120_000;
/// The invoice id the provider answers 503 to (a transient failure: a delayed copy, then a
/// dead letter).
const TRANSIENT_INVOICE: i64 = 503;

/// Names a publisher may choose that mean something to the worker or the broker.
const MARKS: [&str; 16] = [
    "CC",
    "BCC",
    "x-death",
    "x-replay-count",
    "x-delay-round",
    "x-attempts",
    "x-dead-letter-id",
    "x-error-kind",
    "x-error-message",
    "x-failed-at",
    "x-original-exchange",
    "x-original-routing-key",
    "x-original-body-bytes",
    "x-delivery-count",
    "traceparent",
    "timestamp_in_ms",
];

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(&MARKS[..]).prop_map(str::to_owned),
        3 => "\\PC{1,20}",
        1 => "[\\x00-\\x1f\\u{202e}\\u{e0041}]{1,6}",
        1 => "x{200,250}",
    ]
}

/// A header value of any type RabbitMQ takes in a table (a NaN, an infinity or a short string
/// it refuses at publish, so none is generated), nested up to four deep.
fn value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        (-1e30f32..1e30).prop_map(AMQPValue::Float),
        (-1e300f64..1e300).prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        "\\PC{0,40}".prop_map(|s| AMQPValue::LongString(LongString::from(s.into_bytes()))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6)
                .prop_map(|items| AMQPValue::FieldArray(FieldArray::from(items))),
            prop::collection::vec(("\\PC{0,8}", inner), 0..6).prop_map(|entries| {
                let mut table = FieldTable::default();
                for (name, value) in entries {
                    table.insert(name.as_str().into(), value);
                }
                AMQPValue::FieldTable(table)
            }),
        ]
    })
}

/// What a generated message's headers look like as a whole.
#[derive(Clone, Debug)]
enum Shape {
    /// A few headers of any kind.
    Few(Vec<(String, AMQPValue)>),
    /// More headers than the intake budget allows.
    Many(usize),
    /// One header of this many bytes.
    Big(usize),
    /// One array nested this deep.
    Deep(usize),
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        6 => prop::collection::vec((name(), value()), 0..12).prop_map(Shape::Few),
        1 => (200usize..3000).prop_map(Shape::Many),
        1 => (1000usize..110_000).prop_map(Shape::Big),
        1 => (6usize..40).prop_map(Shape::Deep),
    ]
}

/// One hostile message, before its id and routing are settled.
#[derive(Clone, Debug)]
struct Hostile {
    /// Its headers, `CC`/`BCC` aside.
    shape: Shape,
    /// Which spy names `CC` and `BCC` list (0: the queue, 1: the routing key, 2: the command
    /// queue itself).
    cc: Option<Vec<usize>>,
    bcc: Option<Vec<usize>>,
    /// Without a message id (the command id).
    no_id: bool,
    /// Odd characters after the id's unique prefix.
    id_tail: String,
    correlation_id: Option<String>,
    content_type: Option<String>,
    timestamp: Option<u64>,
    priority: Option<u8>,
    body: Vec<u8>,
    /// Written straight into the dead-letter exchange rather than published as a command.
    to_dead_letters: bool,
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let invoice = prop_oneof![2 => 1i64..1000, 2 => Just(TRANSIENT_INVOICE), 1 => any::<i64>()];
    let amount = prop_oneof![3 => "[1-9][0-9]{0,6}\\.[0-9]{2}", 1 => "-?[0-9e.+-]{1,30}"];
    let email = prop_oneof![3 => Just("payer@example.com".to_owned()), 1 => "\\PC{0,20}"];
    prop_oneof![
        3 => (invoice, amount, "\\PC{1,40}", email).prop_map(|(invoice, amount, description, email)| format!(
            r#"{{"paymentProviderId":7,"amountInMajorCurrency":{amount},"description":{},"emailAddress":{},"invoiceId":{invoice},"customerId":9}}"#,
            serde_json::to_string(&description).unwrap(),
            serde_json::to_string(&email).unwrap()
        ).into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    (
        shape(),
        prop::option::of(prop::collection::vec(0usize..3, 1..4)),
        prop::option::of(prop::collection::vec(0usize..3, 1..4)),
        prop::bool::weighted(0.1),
        "\\PC{0,12}",
        prop::option::of("\\PC{0,40}"),
        prop::option::of(prop_oneof![
            4 => Just("application/json".to_owned()),
            1 => "\\PC{0,30}"
        ]),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<u8>()),
        body(),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(
                shape,
                cc,
                bcc,
                no_id,
                id_tail,
                correlation_id,
                content_type,
                timestamp,
                priority,
                body,
                to_dead_letters,
            )| {
                Hostile {
                    shape,
                    cc,
                    bcc,
                    no_id,
                    id_tail,
                    correlation_id,
                    content_type,
                    timestamp,
                    priority,
                    body,
                    to_dead_letters,
                }
            },
        )
}

/// The names a spy listens on, and the routing headers that name them.
struct Spies {
    queue: String,
    key: String,
    on_dead_letters: String,
    on_events: String,
    command_queue: String,
    /// Every event, whatever its routing key (not a spy: where the account is read).
    capture: String,
}

impl Spies {
    fn named(&self, which: &[usize]) -> AMQPValue {
        let names = [&self.queue, &self.key, &self.command_queue];
        AMQPValue::FieldArray(FieldArray::from(
            which
                .iter()
                .map(|i| AMQPValue::LongString(LongString::from(names[*i].as_bytes().to_vec())))
                .collect::<Vec<_>>(),
        ))
    }
}

/// The message as published: its id (`None` without one) and where it goes.
fn build(
    env: &TestEnv,
    spies: &Spies,
    h: &Hostile,
    prefix: &str,
) -> (Option<String>, OutboundMessage) {
    let mut headers = FieldTable::default();
    match &h.shape {
        // The broker refuses a `CC` or `BCC` that is not an array of strings (PRECONDITION_FAILED
        // at publish): those come from `cc` and `bcc` only.
        Shape::Few(entries) => {
            for (name, value) in entries.iter().filter(|(n, _)| n != "CC" && n != "BCC") {
                headers.insert(name.as_str().into(), value.clone());
            }
        }
        Shape::Many(n) => {
            for i in 0..*n {
                headers.insert(format!("\0h{i}").into(), AMQPValue::Boolean(true));
            }
        }
        Shape::Big(bytes) => {
            headers.insert(
                "x-big".into(),
                AMQPValue::LongString(LongString::from(vec![b'b'; *bytes])),
            );
        }
        Shape::Deep(depth) => {
            let mut value = AMQPValue::Boolean(true);
            for _ in 0..*depth {
                value = AMQPValue::FieldArray(FieldArray::from(vec![value]));
            }
            headers.insert("x-deep".into(), value);
        }
    }
    // What the publisher routes by on its own publish is its own doing; a letter written into the
    // dead-letter exchange carries none, so that the spies see only what the worker publishes.
    if !h.to_dead_letters {
        if let Some(cc) = &h.cc {
            headers.insert("CC".into(), spies.named(cc));
        }
        if let Some(bcc) = &h.bcc {
            headers.insert("BCC".into(), spies.named(bcc));
        }
    }
    // Within the frame: drop the largest headers until the rest fits.
    while payment_link_worker::intake::header_bytes(&headers) > FRAME_ROOM {
        let largest = headers
            .inner()
            .iter()
            .max_by_key(|(n, v)| {
                let mut one = FieldTable::default();
                one.insert((*n).clone(), (*v).clone());
                payment_link_worker::intake::header_bytes(&one)
            })
            .map(|(n, _)| n.clone())
            .unwrap();
        let mut rest = FieldTable::default();
        for (n, v) in headers.inner() {
            if *n != largest {
                rest.insert(n.clone(), v.clone());
            }
        }
        headers = rest;
    }
    let id = (!h.no_id || h.to_dead_letters).then(|| {
        let tail: String = h.id_tail.chars().take(12).collect();
        format!("{prefix}{tail}")
    });
    let mut properties = BasicProperties::default().with_headers(headers);
    if let Some(id) = &id {
        properties = properties.with_message_id(id.as_str().into());
    }
    if let Some(c) = &h.correlation_id {
        properties = properties.with_correlation_id(c.as_str().into());
    }
    if let Some(c) = &h.content_type {
        properties = properties.with_content_type(c.as_str().into());
    }
    if let Some(t) = h.timestamp {
        properties = properties.with_timestamp(t);
    }
    if let Some(p) = h.priority {
        properties = properties.with_priority(p);
    }
    let broker = &env.settings.broker;
    let exchange = if h.to_dead_letters {
        &broker.dead_letter_exchange
    } else {
        &broker.command_exchange
    };
    let message = OutboundMessage {
        exchange: exchange.clone(),
        routing_key: broker.command_routing_key.clone(),
        properties,
        body: h.body.clone(),
    };
    (id, message)
}

/// The worker process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Every event's subject (the command id it reports) taken from `queue` now.
async fn drain_subjects(env: &TestEnv, queue: &str, into: &mut Vec<String>) {
    while let Some(event) = env.try_get(queue).await {
        into.push(event.header("cloudEvents:subject").unwrap_or_default());
    }
}

/// Every stored dead letter's command id.
async fn stored_ids(env: &TestEnv) -> Vec<String> {
    let Ok(mut conn) = env.pool.get().await else {
        return Vec::new();
    };
    store::page(&mut conn, &Filter::default(), 100_000, None)
        .await
        .map(|(page, _)| page.into_iter().map(|s| s.command_id).collect())
        .unwrap_or_default()
}

/// What the batches have seen so far.
#[derive(Default)]
struct Account {
    /// Every event's subject.
    seen: Vec<String>,
    /// Generated messages sent without a message id (their dead letters have none).
    id_less: usize,
    /// Generated commands that reached the provider (an event was published for them).
    reached: usize,
}

/// One batch: the hostile messages beside `GOOD` good commands; how long the good ones took.
async fn batch(
    env: &TestEnv,
    spies: &Spies,
    case: usize,
    hostile: &[Hostile],
    worker_pid: u32,
    account: &mut Account,
) -> Result<Duration, TestCaseError> {
    let Account {
        seen,
        id_less,
        reached: reached_provider,
    } = account;
    let started = Instant::now();
    let mut expected = Vec::new();
    let mut good = Vec::new();
    for (i, h) in hostile.iter().enumerate() {
        let prefix = format!("c{case}-{i}-");
        let (id, message) = build(env, spies, h, &prefix);
        let channel = env.fresh_channel().await;
        let published = publish_confirmed(&channel, &message).await;
        let _ = channel.close(200, "published".into()).await;
        published.map_err(|e| {
            TestCaseError::fail(format!("the broker refused message {i} ({message:?}): {e}"))
        })?;
        match id {
            Some(_) => expected.push(prefix),
            None => *id_less += 1,
        }
        for g in 0..GOOD / hostile.len().max(1) + 1 {
            let id = format!("good-{case}-{i}-{g}");
            env.send(&id, &command_body("2.00", 1 + g as i64)).await;
            good.push(id);
        }
    }
    let mut good_took = None;
    let deadline = Instant::now() + BATCH_BOUND;
    loop {
        drain_subjects(env, &spies.capture, seen).await;
        let stored = stored_ids(env).await;
        if good_took.is_none() && good.iter().all(|g| seen.contains(g)) {
            good_took = Some(started.elapsed());
        }
        let ended = |prefix: &String| {
            seen.iter().any(|s| s.starts_with(prefix.as_str()))
                || stored.iter().any(|s| s.starts_with(prefix.as_str()))
        };
        let open: Vec<&String> = expected.iter().filter(|p| !ended(p)).collect();
        let id_less_stored = stored.iter().filter(|s| s.is_empty()).count();
        if good_took.is_some() && open.is_empty() && id_less_stored >= *id_less {
            break;
        }
        if Instant::now() > deadline {
            return Err(TestCaseError::fail(format!(
                "after {BATCH_BOUND:?}: not ended {open:?}; id-less stored {id_less_stored} of \
                 {id_less}; good ones done: {}",
                good_took.is_some()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for queue in [&spies.queue, &spies.on_dead_letters, &spies.on_events] {
        if let Some(copy) = env.try_get(queue).await {
            return Err(TestCaseError::fail(format!(
                "a message reached {queue}: {copy:?}"
            )));
        }
    }
    *reached_provider += expected
        .iter()
        .filter(|p| seen.iter().any(|s| s.starts_with(p.as_str())))
        .count();
    let rss = rss_kib(worker_pid);
    prop_assert!(rss < RSS_LIMIT_KIB, "the worker holds {rss} KiB");
    Ok(good_took.expect("set before the loop ends"))
}

/// Sends `n` good commands named `prefix-N` and waits for their events: how long that took.
async fn good_alone(env: &TestEnv, capture: &str, prefix: &str, n: usize) -> Duration {
    let started = Instant::now();
    let ids: Vec<String> = (0..n).map(|g| format!("{prefix}-{g}")).collect();
    for (g, id) in ids.iter().enumerate() {
        env.send(id, &command_body("2.00", 1 + g as i64)).await;
    }
    let mut seen = Vec::new();
    while !ids.iter().all(|id| seen.contains(id)) {
        assert!(
            started.elapsed() < BATCH_BOUND,
            "{n} events for {prefix} within {BATCH_BOUND:?}"
        );
        drain_subjects(env, capture, &mut seen).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_publishers_never_stall_steer_or_swell_the_worker() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains(format!(
            "\"invoiceId\":{TRANSIENT_INVOICE},"
        )))
        .respond_with(ResponseTemplate::new(503))
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 1, "2.00", 1).await;
    let env = TestEnv::with(
        &provider.uri(),
        &[
            INGEST,
            ("RETRY__MAX_ELAPSED_MS", "200"),
            ("RETRY__DELAY_TIERS_MS", "500"),
            ("BREAKER__MIN_CALLS", "1000000"),
        ],
    )
    .await;
    let key = format!("t.{}.spy-key", env.id);
    let spies = Spies {
        queue: env.spy("", &format!("t.{}.spy-queue", env.id)).await,
        on_dead_letters: env
            .spy(&env.settings.broker.dead_letter_exchange, &key)
            .await,
        on_events: env.spy(&env.settings.broker.event_exchange, &key).await,
        key,
        command_queue: env.command_queue(),
        capture: env.capture_events().await,
    };
    let worker = ChildWorker::start(&env);
    let pid = worker.pid();
    good_alone(&env, &spies.capture, "warm-up", 1).await;
    let alone = good_alone(&env, &spies.capture, "alone", GOOD).await;

    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(12);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 20,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/hostile_generated.txt",
        ))),
        ..Config::default()
    });
    let runtime = tokio::runtime::Handle::current();
    let case = std::sync::atomic::AtomicUsize::new(0);
    let state = std::sync::Mutex::new(Account::default());
    // The error (the failing input) is only unwrapped below, so its size does not matter.
    #[allow(clippy::result_large_err)]
    let result = tokio::task::block_in_place(|| {
        runner.run(&prop::collection::vec(hostile(), 1..6), |hostile| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut account = state.lock().unwrap();
            let took = runtime.block_on(batch(&env, &spies, n, &hostile, pid, &mut account))?;
            prop_assert!(
                took <= alone * 2 + Duration::from_secs(3),
                "the good commands took {took:?} beside the batch, {alone:?} alone"
            );
            Ok(())
        })
    });
    drop(worker);
    result.unwrap();
    // The generator must reach the provider (a command valid whatever its headers), or the
    // routing of delayed copies and dead letters after a call is not exercised.
    let reached = state.lock().unwrap().reached;
    eprintln!("{reached} generated commands reached the provider");
    assert!(
        reached * 10 >= cases as usize,
        "only {reached} generated commands in {cases} cases reached the provider"
    );
}
