//! Hostile messages published among good ones, so they share batches: each hostile one reaches
//! its documented outcome within the bound, its dead letter's added headers stay bounded, and
//! every good one still gets its event.

use crate::helpers::*;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString};
use payment_link_worker::broker::messages::{CREATED, FAILED, event_id};
use std::collections::BTreeMap;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Most bytes a free-text header the worker adds may hold (1 KiB and the `…` that marks a cut).
const HEADER_BOUND: usize = 1024 + '…'.len_utf8();

fn header(properties: BasicProperties, name: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(name.into(), value);
    properties.with_headers(headers)
}

fn body_with(amount: &str, description: &str, email: &str) -> String {
    format!(
        r#"{{"paymentProviderId":7,"amountInMajorCurrency":{amount},"description":{},"emailAddress":{}}}"#,
        serde_json::to_string(description).unwrap(),
        serde_json::to_string(email).unwrap()
    )
}

/// (name, properties, body, the dead letter's kind). A float NaN or a short string in a header
/// is not among them: RabbitMQ 3.10 refuses such a message at publish (INTERNAL_ERROR), so it
/// never reaches the worker here; the parser's refusal of one is a unit test.
fn hostile() -> Vec<(&'static str, BasicProperties, String, &'static str)> {
    let props = command_properties;
    let long = "x".repeat(300_000);
    vec![
        (
            "huge-exponent",
            props("h-1"),
            body_with("1e99999999999999999999", "d", "a@b.co"),
            "validation",
        ),
        (
            "min-i64-exponent",
            props("h-2"),
            body_with("1e-9223372036854775808", "d", "a@b.co"),
            "validation",
        ),
        (
            "i64-exponent",
            props("h-3"),
            body_with("7e9223372036854775807", "d", "a@b.co"),
            "validation",
        ),
        (
            "nul-description",
            props("h-4"),
            body_with("1.00", "a\u{0}b", "a@b.co"),
            "validation",
        ),
        (
            "nul-email",
            props("h-5"),
            body_with("1.00", "d", "a\u{0}@b.co"),
            "validation",
        ),
        (
            "nul-correlation-id",
            props("h-6").with_correlation_id("c\u{0}d".into()),
            command_body("1.00", 6),
            "validation",
        ),
        (
            "300-kb-email",
            props("h-9"),
            body_with("1.00", "d", &long),
            "validation",
        ),
        (
            "200-kb-string-body",
            props("h-10"),
            serde_json::to_string(&"y".repeat(200_000)).unwrap(),
            "validation",
        ),
        (
            // Valid, but the provider refuses it: its dead letter (with a NUL in a long-string
            // header it carries, being named in broker.carried_headers) is stored in the outbox
            // with the failure.
            "nul-long-string-header-stored",
            header(
                props("h-11"),
                "x-test-case",
                AMQPValue::LongString(LongString::from(b"a\0b".to_vec())),
            ),
            command_body("1.00", 666),
            "provider-rejected",
        ),
        (
            // 100 KB of header fits in RabbitMQ's frame (128 KiB) but not in the intake budget
            // (broker.max_header_bytes): dead-lettered at once, without the header.
            "100-kb-header",
            header(
                props("h-12"),
                "x-big",
                AMQPValue::LongString(LongString::from(vec![b'h'; 100_000])),
            ),
            command_body("1.00", 666),
            "validation",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_messages_end_bounded_and_good_ones_beside_them_get_their_events() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("\"invoiceId\":666"))
        .respond_with(ResponseTemplate::new(400).set_body_string("x".repeat(100_000)))
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let cases = hostile();
    // Hostile and good messages alternate, published before the worker starts, so they are
    // claimed and recorded in the same batches.
    let mut good = Vec::new();
    for (i, (_, properties, body, _)) in cases.iter().enumerate() {
        env.publish_raw(properties.clone(), body.as_bytes()).await;
        let id = format!("good-{i}");
        env.send(&id, &command_body("12.50", 100 + i as i64)).await;
        good.push(id);
    }
    let worker = env.start_worker().await;

    let letters = dead_letters_by_id(&env, cases.len()).await;
    for (name, properties, _, kind) in &cases {
        let id = properties.message_id().as_ref().unwrap().to_string();
        let letter = letters
            .get(&id)
            .unwrap_or_else(|| panic!("{name}: no dead letter"));
        assert_bounded_letter(letter, kind, name);
    }
    let stored = &letters["h-11"];
    assert_eq!(
        stored
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get("x-test-case"),
        Some(&AMQPValue::LongString(LongString::from(b"a\0b".to_vec()))),
        "a carried header round-trips exactly through the outbox"
    );

    let big = letters["h-12"]
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert!(
        !big.inner().contains_key("x-big"),
        "the oversized header left behind"
    );
    let why = letters["h-12"].header("x-error-message").unwrap();
    assert!(
        why.contains("\"x-big\" (100") && why.contains("broker.max_header_bytes"),
        "{why}"
    );

    // The refused command's failed event comes too.
    let mut published: Vec<String> = env
        .messages(&events, good.len() + 1, WAIT)
        .await
        .into_iter()
        .map(|m| m.message_id())
        .collect();
    published.sort();
    let mut expected: Vec<String> = good.iter().map(|id| event_id(CREATED, id)).collect();
    expected.push(event_id(FAILED, "h-11"));
    expected.sort();
    assert_eq!(published, expected, "every good command got its event");
    eventually("the command queue to be empty", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await == 0).then_some(())
    })
    .await;
    assert_no_panic(&worker);
}

/// A provider answer for the command with this invoice id.
async fn answer_for(provider: &MockServer, invoice_id: i64, answer: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(body_string_contains(format!("\"invoiceId\":{invoice_id},")))
        .respond_with(answer)
        .mount(provider)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_provider_answers_end_each_command_bounded_and_spare_the_others() {
    let provider = MockServer::start().await;
    let nul_link = r#"{"paymentLink":"https://x/\u0000","id":1,"paymentProviderId":7,"amountInMajorCurrency":1,"description":"d"}"#;
    let mut nul_error = b"refused \0 because\0".to_vec();
    nul_error.extend(std::iter::repeat_n(b'z', 100_000));
    // (invoice id, answer, the dead letter's kind)
    let cases: Vec<(i64, ResponseTemplate, &str)> = vec![
        (
            201,
            ResponseTemplate::new(200).set_body_string("[]"),
            "retries-exhausted",
        ),
        (
            202,
            ResponseTemplate::new(200).set_body_string("null"),
            "retries-exhausted",
        ),
        (
            203,
            ResponseTemplate::new(201).set_body_string("x".repeat(2 << 20)),
            "retries-exhausted",
        ),
        (
            204,
            ResponseTemplate::new(201).set_body_string(nul_link),
            "retries-exhausted",
        ),
        (
            205,
            ResponseTemplate::new(400).set_body_bytes(nul_error),
            "provider-rejected",
        ),
        (
            206,
            ResponseTemplate::new(503).insert_header("Retry-After", "18446744073709551615"),
            "retries-exhausted",
        ),
        (
            207,
            ResponseTemplate::new(503).insert_header("Retry-After", "99999999999999999999999"),
            "retries-exhausted",
        ),
        (
            208,
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT"),
            "retries-exhausted",
        ),
        (
            209,
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "Mon, 01 Jan 1900 00:00:00 GMT"),
            "retries-exhausted",
        ),
        (
            210,
            ResponseTemplate::new(503).insert_header("Retry-After", "-5"),
            "retries-exhausted",
        ),
        (
            211,
            ResponseTemplate::new(503).insert_header("Retry-After", "soon, maybe"),
            "retries-exhausted",
        ),
    ];
    for (invoice_id, answer, _) in &cases {
        answer_for(&provider, *invoice_id, answer.clone()).await;
    }
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    // Half the calls here fail on purpose: the breaker (tested on its own) stays out of the way.
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("RETRY__MAX_ELAPSED_MS", "400"),
            ("BREAKER__MIN_CALLS", "1000000"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    let mut good = Vec::new();
    for (invoice_id, _, _) in &cases {
        env.send(
            &format!("bad-{invoice_id}"),
            &command_body("1.00", *invoice_id),
        )
        .await;
        let id = format!("good-{invoice_id}");
        env.send(&id, &command_body("12.50", 1000 + invoice_id))
            .await;
        good.push(id);
    }
    let worker = env.start_worker().await;

    let letters = dead_letters_by_id(&env, cases.len()).await;
    for (invoice_id, _, kind) in &cases {
        let letter = &letters[&format!("bad-{invoice_id}")];
        assert_bounded_letter(letter, kind, &invoice_id.to_string());
    }
    let too_big = letters["bad-203"].header("x-error-message").unwrap();
    assert!(too_big.contains("provider.max_response_bytes"), "{too_big}");

    // The failed events of the refused commands come too; the created ones are the good ones.
    let published: Vec<String> = env
        .messages(&events, good.len() + cases.len(), WAIT)
        .await
        .into_iter()
        .map(|m| m.message_id())
        .collect();
    for id in &good {
        assert!(
            published.contains(&event_id(CREATED, id)),
            "{id} got its event"
        );
    }
    for (invoice_id, _, _) in &cases {
        let id = format!("bad-{invoice_id}");
        assert!(
            published.contains(&event_id(FAILED, &id)),
            "{id} got its failed event"
        );
    }
    assert_no_panic(&worker);
}

/// The next `n` dead letters, by command id.
async fn dead_letters_by_id(env: &TestEnv, n: usize) -> BTreeMap<String, Received> {
    env.messages(&env.dead_letter_queue(), n, WAIT)
        .await
        .into_iter()
        .map(|m| (m.message_id(), m))
        .collect()
}

/// The dead letter has the expected kind, and its added free-text headers are bounded and hold
/// no NUL (they were stored).
fn assert_bounded_letter(letter: &Received, kind: &str, what: &str) {
    assert_eq!(
        letter.header("x-error-kind").as_deref(),
        Some(kind),
        "{what}"
    );
    for name in ["x-error-message", "x-error-body"] {
        if let Some(text) = letter.header(name) {
            assert!(
                text.len() <= HEADER_BOUND,
                "{what}: {name} of {} bytes",
                text.len()
            );
            assert!(!text.contains('\0'), "{what}: {name} holds NUL");
        }
    }
    assert!(
        letter.header("x-error-message").is_some(),
        "{what}: a message"
    );
}

/// The worker processed everything without a panic (it counts them).
fn assert_no_panic(worker: &WorkerHandle) {
    let metrics = worker.metrics();
    let panics = metrics
        .lines()
        .find(|l| l.starts_with("payment_link_commands_panics_total"))
        .map(|l| l.rsplit(' ').next().unwrap_or("").to_owned());
    assert!(
        panics.is_none() || panics.as_deref() == Some("0"),
        "{panics:?}"
    );
    assert!(
        metrics.contains("payment_link_commands_received_total"),
        "the figures are the worker's"
    );
}

/// Runs SQL on this test's own database.
async fn exec(env: &TestEnv, sql: &str) {
    use diesel_async::RunQueryDsl;
    let mut conn = env.pool.get().await.expect("db connection");
    diesel::sql_query(sql)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn data_the_database_refuses_ends_unstorable_and_spares_its_batch() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("\"invoiceId\":777,"))
        .respond_with(ResponseTemplate::new(201).set_body_string(
            r#"{"paymentLink":"https://instantpaymentlink/evil","id":777,"paymentProviderId":7,"amountInMajorCurrency":1.00,"description":"d"}"#,
        ))
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    let env = TestEnv::new(&provider.uri()).await;
    // What this database refuses and the validation does not foresee: a constraint (class 23)
    // on the claim, a data exception (class 22) on the claim, and one on recording the link.
    exec(&env, "ALTER TABLE payment_link_commands ADD CONSTRAINT no_evil CHECK (description <> 'evil-check')").await;
    exec(
        &env,
        "CREATE FUNCTION refuse_evil() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.description = 'evil-data' OR NEW.payment_link LIKE '%/evil' THEN \
         RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023'; END IF; RETURN NEW; END $$",
    )
    .await;
    exec(
        &env,
        "CREATE TRIGGER refuse_evil BEFORE INSERT OR UPDATE ON payment_link_commands \
         FOR EACH ROW EXECUTE FUNCTION refuse_evil()",
    )
    .await;
    let events = env.capture_events().await;
    let evil = [
        (
            "evil-1",
            r#"{"paymentProviderId":7,"amountInMajorCurrency":1,"description":"evil-check"}"#
                .to_owned(),
        ),
        (
            "evil-2",
            r#"{"paymentProviderId":7,"amountInMajorCurrency":1,"description":"evil-data"}"#
                .to_owned(),
        ),
        ("evil-3", command_body("1.00", 777)),
    ];
    let mut good = Vec::new();
    for (i, (id, body)) in evil.iter().enumerate() {
        env.send(id, body).await;
        for j in 0..3 {
            let id = format!("good-{i}-{j}");
            env.send(&id, &command_body("3.00", (10 * i + j) as i64 + 1))
                .await;
            good.push(id);
        }
    }
    let worker = env.start_worker().await;

    let letters = env
        .messages(&env.dead_letter_queue(), evil.len(), WAIT)
        .await;
    for letter in &letters {
        assert_eq!(
            letter.header("x-error-kind").as_deref(),
            Some("unstorable"),
            "{}",
            letter.message_id()
        );
        assert!(letter.header("x-error-message").unwrap().contains("refuse"));
    }
    let mut ids: Vec<String> = letters.iter().map(|l| l.message_id()).collect();
    ids.sort();
    assert_eq!(ids, ["evil-1", "evil-2", "evil-3"]);
    let mut published: Vec<String> = env
        .messages(&events, good.len(), WAIT)
        .await
        .into_iter()
        .map(|m| m.message_id())
        .collect();
    published.sort();
    let mut expected: Vec<String> = good.iter().map(|id| event_id(CREATED, id)).collect();
    expected.sort();
    assert_eq!(
        published, expected,
        "every good command in the same batches got its event"
    );
    eventually("the command queue to be empty", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await == 0).then_some(())
    })
    .await;
    assert_no_panic(&worker);
}
