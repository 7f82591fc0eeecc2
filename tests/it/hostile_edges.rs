//! The edges an attacker reaches, each bounded as a whole: the health port under a flood of
//! half-sent requests, a command's headers by count and by size (on the command queue and written
//! straight into the dead-letter exchange), and `CC`/`BCC`, which must never route what the worker
//! republishes (a delayed copy, a dead letter, a replay). Each test puts good commands beside the
//! hostile input and checks that they still get their events.

use crate::helpers::*;
use crate::operations::{INGEST, replay, request, stored};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use payment_link_worker::broker::messages::OutboundMessage;
use payment_link_worker::broker::publisher::publish_confirmed;
use payment_link_worker::dead_letters::Kind;
use payment_link_worker::dead_letters::store::{self, Filter};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A connection from `from` (a loopback address of the test's choosing, so that it is another
/// client than the flood's) to `to`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback address");
    socket.connect(to).await.expect("connect")
}

/// The status and body of `GET path`, sent whole from `from`.
async fn get_from(from: [u8; 4], to: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = connect_from(from, to).await;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// The status of `GET path`, sent whole from `from`.
async fn status_of(from: [u8; 4], to: SocketAddr, path: &str) -> u16 {
    get_from(from, to, path).await.0
}

/// Whether the server closes `stream` before `deadline`.
async fn closed_by(stream: &mut TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_health_port_under_a_thousand_half_sent_requests_answers_and_closes_them() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    let addr = worker.http_addr().expect("the health port");
    eventually("the worker ready", WAIT, || async {
        (status_of([127, 0, 0, 3], addr, "/readyz").await == 200).then_some(())
    })
    .await;

    // One client opens 1,000 connections and sends half a request on each.
    let flood_started = tokio::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..1000 {
        let mut stream = connect_from([127, 0, 0, 1], addr).await;
        let _ = stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
            .await;
        held.push(stream);
    }

    // Another client is answered at once, and commands go on being processed.
    let asked = Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(3),
        status_of([127, 0, 0, 2], addr, "/readyz"),
    )
    .await
    .expect("/readyz answered within 3 s beside 1,000 half-sent requests");
    assert_eq!(status, 200, "after {:?}", asked.elapsed());
    for i in 0..20 {
        env.send(&format!("beside-flood-{i}"), &command_body("1.00", i + 1))
            .await;
    }
    env.messages(&events, 20, WAIT).await;

    // Every half-sent request is closed within the head's 5 s, and a margin.
    let deadline = flood_started + Duration::from_secs(9);
    let mut open = 0;
    for stream in &mut held {
        if !closed_by(stream, deadline).await {
            open += 1;
        }
    }
    assert_eq!(open, 0, "half-sent requests still open after 9 s");
}

/// A header table of `n` boolean headers whose names hold the NUL character (which the stored
/// form of a message cannot hold: each must be dropped to store it).
fn nul_named(n: usize) -> FieldTable {
    let mut headers = FieldTable::default();
    for i in 0..n {
        headers.insert(format!("\0{i}").into(), AMQPValue::Boolean(true));
    }
    headers
}

/// One long-string header of `bytes` bytes.
fn one_big(bytes: usize) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-big".into(),
        AMQPValue::LongString(LongString::from(vec![b'b'; bytes])),
    );
    headers
}

/// Sends `n` good commands and waits for their events: how long that took.
async fn good_batch(env: &TestEnv, events: &str, prefix: &str, n: i64) -> Duration {
    let started = Instant::now();
    for i in 0..n {
        env.send(&format!("{prefix}-{i}"), &command_body("3.10", i + 1))
            .await;
    }
    env.messages(events, n as usize, Duration::from_secs(60))
        .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_headers_or_one_near_the_frame_size_cost_the_good_commands_nothing() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 1, "3.10", 1).await;
    let env = TestEnv::with(&provider.uri(), &[INGEST]).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    good_batch(&env, &events, "warm", 50).await;
    let alone = good_batch(&env, &events, "alone", 500).await;

    // The hostile ones: as commands, and written straight into the dead-letter exchange.
    let hostile = [
        ("nul-names", nul_named(12_000)),
        ("near-frame", one_big(130_000)),
    ];
    for (name, headers) in &hostile {
        env.publish_raw(
            command_properties(&format!("cmd-{name}")).with_headers(headers.clone()),
            command_body("1.00", 9).as_bytes(),
        )
        .await;
        let letter = OutboundMessage {
            exchange: env.settings.broker.dead_letter_exchange.clone(),
            routing_key: env.settings.broker.command_routing_key.clone(),
            properties: command_properties(&format!("dlx-{name}")).with_headers(headers.clone()),
            body: command_body("1.00", 9).into_bytes(),
        };
        publish_confirmed(&env.channel, &letter)
            .await
            .expect("the letter was confirmed");
    }
    let beside = good_batch(&env, &events, "beside", 500).await;
    assert!(
        beside <= alone * 2 + Duration::from_secs(2),
        "500 good commands took {beside:?} beside the hostile ones, {alone:?} alone"
    );

    // Each hostile command is dead-lettered at once, as invalid, its reason naming the headers;
    // each hostile letter is stored with what could be kept; a dead letter after them is stored.
    let mut conn = env.pool.get().await.unwrap();
    for (name, _) in &hostile {
        let command = format!("cmd-{name}");
        let filter = Filter {
            command_id: Some(command.clone()),
            ..Filter::default()
        };
        stored(&env, &filter, 1).await;
        let (page, _) = store::page(&mut conn, &filter, 1, None).await.unwrap();
        let (row, _) = store::get(&mut conn, page[0].id).await.unwrap().unwrap();
        assert_eq!(
            row.kind,
            Kind::Worker(payment_link_worker::errors::ErrorKind::Validation),
            "{command}"
        );
        assert!(
            row.error_message.contains("intake budget"),
            "{command}: {}",
            row.error_message
        );
        let letter = Filter {
            command_id: Some(format!("dlx-{name}")),
            ..Filter::default()
        };
        stored(&env, &letter, 1).await;
    }
    env.send("after", "not json").await;
    let after = Filter {
        command_id: Some("after".into()),
        ..Filter::default()
    };
    stored(&env, &after, 1).await;
}

/// `CC` and `BCC` naming `queue` (on the default exchange) and `key` (on any exchange).
fn routing_headers(queue: &str, key: &str) -> FieldTable {
    let list = |items: &[&str]| {
        AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(|i| AMQPValue::LongString(LongString::from(i.as_bytes().to_vec())))
                .collect::<Vec<_>>(),
        ))
    };
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), list(&[queue, key]));
    headers.insert("BCC".into(), list(&[queue, key]));
    headers
}

#[tokio::test(flavor = "multi_thread")]
async fn cc_and_bcc_never_route_the_workers_copies() {
    let provider = MockServer::start().await;
    for (invoice, status) in [(500, 503), (400, 400)] {
        Mock::given(method("POST"))
            .and(body_string_contains(format!("\"invoiceId\":{invoice},")))
            .respond_with(ResponseTemplate::new(status))
            .mount(&provider)
            .await;
    }
    let env = TestEnv::with(
        &provider.uri(),
        &[
            INGEST,
            ("RETRY__MAX_ELAPSED_MS", "200"),
            ("RETRY__DELAY_TIERS_MS", "600000"),
        ],
    )
    .await;
    // Where CC/BCC would send copies: a queue by name (the default exchange, where delayed
    // copies go) and a routing key on the dead-letter and command exchanges.
    let named = env.spy("", &format!("t.{}.cc-target", env.id)).await;
    let key = format!("t.{}.other-key", env.id);
    let on_dead_letters = env
        .spy(&env.settings.broker.dead_letter_exchange, &key)
        .await;
    let on_commands = env.spy(&env.settings.broker.command_exchange, &key).await;
    let headers = routing_headers(&named, &key);
    for (id, invoice) in [("cc-delayed", 500), ("cc-dead", 400)] {
        env.publish_raw(
            command_properties(id).with_headers(headers.clone()),
            command_body("1.00", invoice).as_bytes(),
        )
        .await;
    }
    // The publisher's own publish went to the command exchange's CC key: that copy is theirs.
    env.messages(&on_commands, 2, WAIT).await;
    let _worker = env.start_worker().await;

    // The delayed copy waits in its delay queue; the dead letter is stored; its replay comes
    // back, is refused again and stored again.
    let delay_queue =
        payment_link_worker::broker::topology::delay_queue(&env.settings.broker, 600_000);
    eventually("the delayed copy parked", WAIT, || async {
        (env.queue_depth(&delay_queue).await == 1).then_some(())
    })
    .await;
    let dead = Filter {
        command_id: Some("cc-dead".into()),
        ..Filter::default()
    };
    stored(&env, &dead, 1).await;
    replay(&env, &request(dead.clone(), None, false)).await;
    stored(&env, &dead, 2).await;

    for queue in [&named, &on_dead_letters, &on_commands] {
        let copy = env.try_get(queue).await;
        assert!(
            copy.is_none(),
            "a copy reached {queue} through CC/BCC: {copy:?}"
        );
    }
    let parked = env.next_message(&delay_queue, WAIT).await;
    let carried = parked.properties.headers().clone().unwrap_or_default();
    assert!(
        !carried.inner().contains_key("CC") && !carried.inner().contains_key("BCC"),
        "{carried:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_command_is_kept_as_its_first_bytes_and_its_length() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    let env = TestEnv::with(&provider.uri(), &[INGEST]).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    let huge = format!(
        r#"{{"paymentProviderId":7,"amountInMajorCurrency":1,"description":"{}"}}"#,
        "d".repeat(40 << 20)
    );
    env.send("huge", &huge).await;
    env.send("after-huge", &command_body("1.00", 5)).await;
    env.messages(&events, 1, WAIT).await;

    let filter = Filter {
        command_id: Some("huge".into()),
        ..Filter::default()
    };
    stored(&env, &filter, 1).await;
    let mut conn = env.pool.get().await.unwrap();
    let (page, _) = store::page(&mut conn, &filter, 1, None).await.unwrap();
    let (row, _) = store::get(&mut conn, page[0].id).await.unwrap().unwrap();
    assert_eq!(
        row.kind,
        Kind::Worker(payment_link_worker::errors::ErrorKind::Validation)
    );
    assert_eq!(
        row.body.len(),
        payment_link_worker::pipeline::fate::OVERSIZED_PREFIX
    );
    assert!(huge.as_bytes().starts_with(&row.body));
    let properties =
        payment_link_worker::broker::messages::properties_from_json(row.properties.clone())
            .unwrap();
    assert_eq!(
        payment_link_worker::headers::read_whole(
            &properties,
            payment_link_worker::headers::ORIGINAL_BODY_BYTES
        ),
        Some(huge.len() as i64)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_whose_connection_the_broker_closes_reconnects_and_fails_at_most_one_letter() {
    use crate::recovery::{BrokerUser, rabbitmqctl};
    let env = TestEnv::with("http://127.0.0.1:9", &[INGEST]).await;
    let worker = env.start_worker().await;
    let total = 60;
    for i in 0..total {
        let letter = crate::dead_letter_store::dead_letter(&env, i, Some(&format!("rc-{i}")));
        publish_confirmed(&env.channel, &letter)
            .await
            .expect("the letter was confirmed");
    }
    stored(&env, &Filter::default(), total as i64).await;
    worker.stop().await.expect("the ingesting worker stops");

    // The replay connects as a broker user of its own, so that the broker can close exactly its
    // connection, a second into a 3-second run.
    let user = BrokerUser::create(format!("plw-replay-{}", env.id));
    let mut settings = env.settings.clone();
    settings.broker.url = payment_link_worker::config::SecretUrl::new(format!(
        "amqp://{}:recovery-pass@127.0.0.1:5672/%2f",
        user.0
    ));
    let mut request = request(Filter::default(), None, false);
    request.rate = Some(20.0);
    request.accept_duplicate_risk = true;
    let mut conn = env.pool.get().await.unwrap();
    let started = payment_link_worker::dead_letters::start(&settings, &mut conn, &request)
        .await
        .unwrap();
    let run = tokio::spawn({
        let settings = settings.clone();
        let pool = env.pool.clone();
        async move {
            let mut conn = pool.get().await.unwrap();
            payment_link_worker::dead_letters::work(
                &settings,
                &mut conn,
                started.run_id,
                Some(20.0),
            )
            .await
        }
    });
    eventually("a third of the replay published", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await >= 20).then_some(())
    })
    .await;
    rabbitmqctl(&[
        "close_all_user_connections",
        &user.0,
        "closed by the replay test",
    ]);
    let worked = run.await.unwrap().expect("the run ends");
    assert!(
        worked.failed.len() <= 1,
        "{} letters failed with the connection: {worked:?}",
        worked.failed.len()
    );
    assert_eq!(worked.replayed.len() + worked.failed.len(), total);
    eventually("every replayed copy in the command queue", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await as usize >= worked.replayed.len())
            .then_some(())
    })
    .await;
}

/// Runs SQL on the test's own database.
async fn sql(env: &TestEnv, statement: &str) {
    use diesel_async::RunQueryDsl;
    let mut conn = env.pool.get().await.unwrap();
    diesel::sql_query(statement)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_letter_the_database_refuses_is_stored_reduced_and_a_stuck_ingester_says_so() {
    let env = TestEnv::with("http://127.0.0.1:9", &[INGEST]).await;
    // This test's database refuses a letter named "poison" whole, and one named "stuck" in any form.
    sql(
        &env,
        "ALTER TABLE dead_letters ADD CONSTRAINT t_poison \
         CHECK (command_id <> 'ingest-poison' OR properties = '{}'::jsonb)",
    )
    .await;
    sql(
        &env,
        "ALTER TABLE dead_letters ADD CONSTRAINT t_stuck CHECK (command_id <> 'ingest-stuck')",
    )
    .await;
    let worker = env.start_worker().await;
    let addr = worker.http_addr().unwrap();
    let letter = |i: usize, id: &str| {
        let mut letter = crate::dead_letter_store::dead_letter(&env, i, Some(&format!("rf-{i}")));
        letter.properties = env.signed_dead_letter(letter.properties.with_message_id(id.into()));
        letter
    };
    for (i, id) in ["before", "ingest-poison", "after"].iter().enumerate() {
        publish_confirmed(&env.channel, &letter(i, id))
            .await
            .unwrap();
    }
    stored(&env, &Filter::default(), 3).await;
    let mut conn = env.pool.get().await.unwrap();
    let poison = Filter {
        command_id: Some("ingest-poison".into()),
        ..Filter::default()
    };
    let (page, _) = store::page(&mut conn, &poison, 1, None).await.unwrap();
    let (row, _) = store::get(&mut conn, page[0].id).await.unwrap().unwrap();
    let why = row.stored_with_changes.clone().unwrap_or_default();
    assert!(why.contains("the database refused the letter"), "{why}");
    assert_eq!(
        row.kind,
        Kind::Worker(payment_link_worker::errors::ErrorKind::ProviderRejected),
        "its reason is kept"
    );

    // A letter refused in any form: ingestion is stuck, and says so; once the database takes it,
    // it is stored and ingestion is well again.
    publish_confirmed(&env.channel, &letter(3, "ingest-stuck"))
        .await
        .unwrap();
    let failing = eventually("readiness to say ingestion fails", WAIT, || async {
        let body = body_of(addr, "/readyz").await;
        body.contains("\"deadLetterIngestion\":\"failing")
            .then_some(body)
    })
    .await;
    assert!(
        worker.metrics().lines().any(
            |l| l.starts_with("payment_link_dead_letter_ingest_failures") && !l.ends_with(" 0")
        ),
        "{failing}"
    );
    sql(&env, "ALTER TABLE dead_letters DROP CONSTRAINT t_stuck").await;
    stored(&env, &Filter::default(), 4).await;
    eventually("readiness to say ingestion is well", WAIT, || async {
        let body = body_of(addr, "/readyz").await;
        body.contains("\"deadLetterIngestion\":\"ok\"")
            .then_some(())
    })
    .await;
}

/// The body of `GET path`.
async fn body_of(to: SocketAddr, path: &str) -> String {
    get_from([127, 0, 0, 1], to, path).await.1
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_dead_letter_is_stored_foreign_and_skipped_by_replay_all() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&provider)
        .await;
    let env = TestEnv::with(&provider.uri(), &[INGEST]).await;
    let _worker = env.start_worker().await;
    // The worker's own dead letter, and one written into the dead-letter exchange by someone
    // else that claims to be the worker's, from the future.
    env.send("real-refused", &command_body("1.00", 1)).await;
    let mut forged = command_properties("forged-letter");
    for (name, value) in [
        ("x-dead-letter-id", "forged-id"),
        ("x-error-kind", "provider-rejected"),
        ("x-error-message", "the provider said no"),
        ("x-failed-at", "2099-01-01T00:00:00.000Z"),
        ("x-dead-letter-mark", "00112233445566778899aabbccddeeff"),
    ] {
        forged = with_header(forged, name, value);
    }
    forged = with_int_header(forged, "x-replay-count", 7);
    let letter = OutboundMessage {
        exchange: env.settings.broker.dead_letter_exchange.clone(),
        routing_key: env.settings.broker.command_routing_key.clone(),
        properties: forged,
        body: command_body("1.00", 2).into_bytes(),
    };
    publish_confirmed(&env.channel, &letter).await.unwrap();
    stored(&env, &Filter::default(), 2).await;

    let mut conn = env.pool.get().await.unwrap();
    let one = |id: &str| Filter {
        command_id: Some(id.into()),
        ..Filter::default()
    };
    let (page, _) = store::page(&mut conn, &one("forged-letter"), 1, None)
        .await
        .unwrap();
    let (row, _) = store::get(&mut conn, page[0].id).await.unwrap().unwrap();
    assert_eq!(row.kind, Kind::Foreign);
    assert!(
        row.error_message.contains("claims provider-rejected"),
        "{}",
        row.error_message
    );
    assert_eq!(row.replay_count, 0, "a forged replay count is not believed");
    assert!(
        row.failed_at < chrono::Utc::now() + chrono::Duration::minutes(1),
        "a forged time is not believed: {}",
        row.failed_at
    );
    let (page, _) = store::page(&mut conn, &one("real-refused"), 1, None)
        .await
        .unwrap();
    assert_eq!(
        page[0].kind,
        Kind::Worker(payment_link_worker::errors::ErrorKind::ProviderRejected),
        "the worker's own is believed"
    );

    // "Replay all" replays the worker's own and skips the foreign one.
    let mut all = request(Filter::default(), None, false);
    all.include_failing = false;
    let started = payment_link_worker::dead_letters::start(&env.settings, &mut conn, &all)
        .await
        .unwrap();
    assert_eq!(started.ids.len(), 1, "{started:?}");
    assert!(
        started.skipped.iter().any(|(id, _)| *id == row.id),
        "{started:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn large_letters_are_kept_bounded_and_the_console_shows_their_start() {
    use crate::console::{OPERATOR, RunningConsole, sign_in};
    let env = TestEnv::with("http://127.0.0.1:9", &[INGEST]).await;
    let _worker = env.start_worker().await;
    // Straight into the dead-letter exchange: 40 MB (over broker.max_message_bytes) and 200 KB
    // of text (under it, over what a page shows).
    let huge = vec![b'h'; 40 << 20];
    let text: Vec<u8> = "line of text\n".repeat(200 * 1024 / 13).into_bytes();
    for (id, body) in [("dlx-huge", &huge), ("dlx-text", &text)] {
        let letter = OutboundMessage {
            exchange: env.settings.broker.dead_letter_exchange.clone(),
            routing_key: env.settings.broker.command_routing_key.clone(),
            properties: command_properties(id),
            body: body.clone(),
        };
        publish_confirmed(&env.channel, &letter).await.unwrap();
    }
    stored(&env, &Filter::default(), 2).await;
    let row = |id: &'static str| {
        let pool = env.pool.clone();
        async move {
            let mut conn = pool.get().await.unwrap();
            let filter = Filter {
                command_id: Some(id.into()),
                ..Filter::default()
            };
            let (page, _) = store::page(&mut conn, &filter, 1, None).await.unwrap();
            store::get(&mut conn, page[0].id).await.unwrap().unwrap().0
        }
    };
    let kept = row("dlx-huge").await;
    assert_eq!(
        kept.body.len(),
        payment_link_worker::pipeline::fate::OVERSIZED_PREFIX
    );
    let why = kept.stored_with_changes.clone().unwrap_or_default();
    assert!(why.contains(&format!("{} bytes", huge.len())), "{why}");

    let console = RunningConsole::start(&env.settings).await;
    let (cookie, _) = sign_in(&console.base, OPERATOR).await;
    let letter = row("dlx-text").await;
    let page = reqwest::Client::new()
        .get(format!("{}/dead-letters/{}", console.base, letter.id))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("id=\"body-cut\""),
        "the page says the body is cut"
    );
    assert!(
        page.len() < 100 * 1024,
        "the page holds the body's start, not all of it: {} bytes",
        page.len()
    );
    let whole = reqwest::Client::new()
        .get(format!(
            "{}/api/dead-letters/{}/body",
            console.base, letter.id
        ))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.bytes().await.unwrap().as_ref(), &text[..]);
    console.stop().await;
}

/// The most resident memory a process has had, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn five_twenty_megabyte_commands_stay_under_the_workers_memory_limit() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    let env = TestEnv::with(&provider.uri(), &[INGEST]).await;
    let worker = crate::recovery::ChildWorker::start(&env);
    let events = env.capture_events().await;
    env.send("warm-up", &command_body("1.00", 1)).await;
    env.messages(&events, 1, WAIT).await;
    let big = format!(
        r#"{{"paymentProviderId":7,"amountInMajorCurrency":1,"description":"{}"}}"#,
        "d".repeat(20 << 20)
    );
    for i in 0..5 {
        env.send(&format!("big-{i}"), &big).await;
    }
    stored(&env, &Filter::default(), 5).await;
    let peak = peak_rss_kib(worker.pid());
    eprintln!("the worker's peak resident memory: {peak} KiB");
    assert!(
        peak > 0 && peak < 256 * 1024,
        "the worker's peak resident memory was {peak} KiB (its pod's limit is 256 MiB)"
    );
}
