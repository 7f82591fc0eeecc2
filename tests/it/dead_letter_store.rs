//! Guarantees of the dead-letter store's ingestion: every dead letter in the queue reaches the
//! store exactly once, with its original message intact, whether the worker or the broker
//! dead-lettered it, even when the ingesting worker is killed mid-batch.

use crate::helpers::*;
use crate::operations::{INGEST, stored};
use crate::recovery::ChildWorker;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use payment_link_worker::broker::messages::{OutboundMessage, properties_from_json};
use payment_link_worker::broker::publisher::publish_confirmed;
use payment_link_worker::dead_letters::Kind;
use payment_link_worker::dead_letters::store::{self as store, Filter};
use std::collections::BTreeSet;

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// A dead letter as the worker writes it (`own_id`), or as the broker does (an `x-death` mark).
pub fn dead_letter(env: &TestEnv, i: usize, own_id: Option<&str>) -> OutboundMessage {
    let mut headers = FieldTable::default();
    match own_id {
        Some(id) => {
            headers.insert("x-dead-letter-id".into(), text(id));
            headers.insert("x-error-kind".into(), text("provider-rejected"));
            headers.insert("x-error-message".into(), text("the provider said no"));
            headers.insert("x-error-status".into(), AMQPValue::LongInt(400));
            headers.insert("x-attempts".into(), AMQPValue::LongInt(1));
            headers.insert("x-failed-at".into(), text("2026-12-01T10:00:00.000Z"));
        }
        None => {
            // As the broker writes it for the command queue's delivery limit.
            let mut death = FieldTable::default();
            death.insert("reason".into(), text("delivery_limit"));
            death.insert("queue".into(), text(&env.settings.broker.command_queue));
            headers.insert(
                "x-death".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            );
        }
    }
    headers.insert("x-custom".into(), AMQPValue::LongLongInt(i as i64));
    let properties = BasicProperties::default()
        .with_message_id(format!("ingest-{i}").into())
        .with_correlation_id(format!("corr-{i}").into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    let properties = match own_id {
        Some(_) => env.signed_dead_letter(properties),
        None => properties,
    };
    OutboundMessage {
        exchange: env.settings.broker.dead_letter_exchange.clone(),
        routing_key: env.settings.broker.command_routing_key.clone(),
        properties,
        body: command_body("2.50", i as i64 + 1).into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dead_letter_is_stored_once_intact_even_when_the_ingester_is_killed_mid_batch() {
    let env = TestEnv::with("http://127.0.0.1:9", &[INGEST]).await;
    // 4,000 dead letters, half the worker's and half the broker's, and each of the first ten of
    // the worker's published a second time (a relay's republish): 4,000 distinct ones.
    let total = 4000;
    let mut messages: Vec<OutboundMessage> = (0..total)
        .map(|i| {
            let id = format!("dl-{i}");
            dead_letter(&env, i, i.is_multiple_of(2).then_some(id.as_str()))
        })
        .collect();
    messages.extend((0..20).step_by(2).map(|i| {
        let id = format!("dl-{i}");
        dead_letter(&env, i, Some(&id))
    }));
    for chunk in messages.chunks(500) {
        let confirms = chunk.iter().map(|m| publish_confirmed(&env.channel, m));
        for confirmed in futures_util::future::join_all(confirms).await {
            confirmed.expect("the dead letter was confirmed and routed");
        }
    }

    // A worker process ingests until its first batches are committed, then is killed.
    let child = ChildWorker::start(&env);
    let at_kill = eventually("the first batch stored", WAIT, || async {
        let mut conn = env.pool.get().await.ok()?;
        let n = store::count(&mut conn, &Filter::default()).await.ok()?;
        (n > 0).then_some(n)
    })
    .await;
    child.kill();
    assert!(
        at_kill < total as i64,
        "the kill came after the whole queue was stored ({at_kill}): it tests nothing"
    );

    // Another worker takes what the killed one had not acked; nothing is lost or stored twice.
    let _worker = env.start_worker().await;
    stored(&env, &Filter::default(), total as i64).await;
    eventually("the dead-letter queue emptied", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 0).then_some(())
    })
    .await;
    let mut conn = env.pool.get().await.unwrap();
    assert_eq!(
        store::count(&mut conn, &Filter::default()).await.unwrap(),
        total as i64,
        "each dead letter once"
    );
    let by_broker = Filter {
        kind: Some(Kind::DeliveryLimit),
        ..Filter::default()
    };
    assert_eq!(
        store::count(&mut conn, &by_broker).await.unwrap(),
        total as i64 / 2
    );

    // Each stored message is the one published: body, properties and headers.
    let (page, _) = store::page(&mut conn, &Filter::default(), total as i64, None)
        .await
        .unwrap();
    let ids: BTreeSet<String> = page.iter().map(|s| s.command_id.clone()).collect();
    assert_eq!(ids.len(), total, "every command id once");
    for summary in page.iter().step_by(97) {
        let (row, _) = store::get(&mut conn, summary.id).await.unwrap().unwrap();
        let i: usize = row.command_id["ingest-".len()..].parse().unwrap();
        let sent = dead_letter(&env, i, None);
        assert_eq!(row.body, sent.body);
        let properties = properties_from_json(row.properties.clone()).unwrap();
        assert_eq!(
            properties.correlation_id(),
            sent.properties.correlation_id()
        );
        assert_eq!(properties.content_type(), sent.properties.content_type());
        let headers = properties.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get("x-custom"),
            Some(&AMQPValue::LongLongInt(i as i64)),
            "{row:?}"
        );
        assert_eq!(row.invoice_id, Some(i as i64 + 1));
        assert_eq!(row.original_exchange, env.settings.broker.command_exchange);
        assert_eq!(row.stored_with_changes, None);
        if i.is_multiple_of(2) {
            assert_eq!(
                (row.kind.as_str(), row.http_status),
                ("provider-rejected", Some(400))
            );
            assert!(
                row.dedup_key.starts_with(&format!("id:dl-{i}:")),
                "{}",
                row.dedup_key
            );
            assert_eq!(row.failed_at.to_rfc3339(), "2026-12-01T10:00:00+00:00");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_filter_selects_in_the_database_and_retention_removes_only_what_is_done() {
    use diesel_async::RunQueryDsl;
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let mut conn = env.pool.get().await.unwrap();
    // Six dead letters an hour apart: providers 1 and 2, customers 10 and 20.
    let rows: Vec<store::NewDeadLetter> = (0..6)
        .map(|i| store::NewDeadLetter {
            dedup_key: format!("id:f-{i}"),
            command_id: format!("f-{i}"),
            kind: if i < 3 {
                Kind::Worker(payment_link_worker::errors::ErrorKind::Validation)
            } else {
                Kind::Worker(payment_link_worker::errors::ErrorKind::ProviderRejected)
            },
            error_message: "why".into(),
            http_status: None,
            attempts: Some(0),
            error_body: None,
            failed_at: chrono::Utc::now() - chrono::Duration::hours(i),
            replay_count: 0,
            payment_provider_id: Some(1 + i % 2),
            invoice_id: Some(100 + i),
            adhoc_invoice_id: None,
            customer_id: Some(if i < 4 { 10 } else { 20 }),
            description: Some(format!("Invoice 50%_{i}")),
            email: Some(format!("Payer{i}@Example.com")),
            trace_id: None,
            original_exchange: "x".into(),
            original_routing_key: "k".into(),
            properties: serde_json::json!({}),
            body: b"{}".to_vec(),
            stored_with_changes: None,
        })
        .collect();
    assert_eq!(store::insert_batch(&mut conn, &rows).await.unwrap(), 6);
    assert_eq!(
        store::insert_batch(&mut conn, &rows).await.unwrap(),
        0,
        "stored once"
    );
    let now = chrono::Utc::now();
    let cases = [
        (
            Filter {
                provider_id: Some(2),
                ..Filter::default()
            },
            3,
        ),
        (
            Filter {
                customer_id: Some(20),
                ..Filter::default()
            },
            2,
        ),
        (
            Filter {
                invoice_id: Some(103),
                ..Filter::default()
            },
            1,
        ),
        (
            Filter {
                kind: Some(Kind::Worker(
                    payment_link_worker::errors::ErrorKind::Validation,
                )),
                ..Filter::default()
            },
            3,
        ),
        // Failed within the last 2.5 hours: f-0, f-1, f-2.
        (
            Filter {
                since: Some(now - chrono::Duration::minutes(150)),
                ..Filter::default()
            },
            3,
        ),
        (
            Filter {
                until: Some(now - chrono::Duration::minutes(150)),
                ..Filter::default()
            },
            3,
        ),
        // Any case, and LIKE's wildcards taken literally.
        (
            Filter {
                search: Some("payer4@example".into()),
                ..Filter::default()
            },
            1,
        ),
        (
            Filter {
                search: Some("50%_".into()),
                ..Filter::default()
            },
            6,
        ),
        (
            Filter {
                search: Some("5_%".into()),
                ..Filter::default()
            },
            0,
        ),
        (
            Filter {
                ids: Some(vec![]),
                ..Filter::default()
            },
            0,
        ),
    ];
    for (filter, n) in cases {
        assert_eq!(
            store::count(&mut conn, &filter).await.unwrap(),
            n,
            "{filter:?}"
        );
    }

    // Retention: archived and replayed ones past it go; open ones and recent ones stay.
    let all = store::open_ids(&mut conn, &Filter::default())
        .await
        .unwrap();
    store::archive(&mut conn, &all[..3]).await.unwrap();
    diesel::sql_query(format!(
        "UPDATE dead_letters SET state_changed_at = now() - interval '40 days' \
         WHERE id IN ({}, {}, {})",
        all[0], all[1], all[3]
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let removed = store::purge(&mut conn, chrono::Utc::now() - chrono::Duration::days(30))
        .await
        .unwrap();
    assert_eq!(
        removed, 2,
        "the two archived ones past retention; not the old open one"
    );
    assert_eq!(
        store::count(&mut conn, &Filter::default()).await.unwrap(),
        4
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_dead_letters_are_stored_beside_good_ones_without_stalling_ingestion() {
    let env = TestEnv::with("http://127.0.0.1:9", &[INGEST]).await;
    let good = |i: usize| dead_letter(&env, i, Some(&format!("good-{i}")));
    let hostile = |name: &str, edit: &dyn Fn(&mut OutboundMessage)| {
        let mut message = dead_letter(&env, 900, Some(name));
        message.properties = message.properties.with_message_id(name.into());
        edit(&mut message);
        // Signed as the worker would sign what it wrote: the hostile part is in the content.
        message.properties = env.signed_dead_letter(message.properties);
        message
    };
    let headers_with = |message: &OutboundMessage, name: &str, value: AMQPValue| {
        let mut headers = message.properties.headers().clone().unwrap_or_default();
        headers.insert(name.into(), value);
        message.properties.clone().with_headers(headers)
    };
    let evil: Vec<OutboundMessage> = vec![
        hostile("nul-in-id", &|m| {
            m.properties = m.properties.clone().with_message_id("a\0b".into())
        }),
        hostile("nul-header-name", &|m| {
            m.properties = headers_with(m, "x-\0name", text("v"))
        }),
        hostile("nul-in-kind", &|m| {
            m.properties = headers_with(m, "x-error-kind", text("bad\0kind"))
        }),
        hostile("binary-body", &|m| m.body = vec![0xff, 0x00, 0xfe, 0x80]),
        hostile("json-with-nul", &|m| {
            m.body = br#"{"description":"a\u0000b","invoiceId":1e400}"#.to_vec()
        }),
        hostile("huge-message-header", &|m| {
            m.properties = headers_with(m, "x-error-message", text(&"é".repeat(30_000)))
        }),
        hostile("bad-failed-at", &|m| {
            m.properties = headers_with(m, "x-failed-at", text("year 99999"))
        }),
        hostile("nul-routing-key", &|m| m.routing_key = "a\0b".into()),
    ];
    let mut all: Vec<OutboundMessage> = Vec::new();
    for (i, bad) in evil.iter().enumerate() {
        all.push(good(2 * i));
        all.push(bad.clone());
        all.push(good(2 * i + 1));
    }
    for message in &all {
        publish_confirmed(&env.channel, message)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the broker takes {:?}: {e}",
                    message.properties.message_id()
                )
            });
    }
    let _worker = env.start_worker().await;
    stored(&env, &Filter::default(), all.len() as i64).await;
    eventually("the dead-letter queue emptied", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 0).then_some(())
    })
    .await;

    // The good ones are intact; each hostile one is there, saying what could not be kept.
    let mut conn = env.pool.get().await.unwrap();
    for i in 0..2 * evil.len() {
        let (page, _) = store::page(
            &mut conn,
            &Filter {
                command_id: Some(format!("ingest-{i}")),
                ..Filter::default()
            },
            1,
            None,
        )
        .await
        .unwrap();
        let (row, _) = store::get(&mut conn, page[0].id).await.unwrap().unwrap();
        assert_eq!(
            (row.letter.body, row.letter.stored_with_changes),
            (good(i).body, None)
        );
    }
    let changed = |id: &str| {
        let id = id.to_owned();
        let pool = env.pool.clone();
        async move {
            let mut conn = pool.get().await.unwrap();
            let (page, _) = store::page(
                &mut conn,
                &Filter {
                    search: Some(id),
                    ..Filter::default()
                },
                1,
                None,
            )
            .await
            .unwrap();
            store::get(&mut conn, page[0].id).await.unwrap().unwrap().0
        }
    };
    // (A NaN header never gets this far: RabbitMQ closes the connection that sends one. The
    // ingester's unit tests cover it.)
    let nul_name = changed("nul-header-name").await;
    assert!(
        nul_name
            .letter
            .stored_with_changes
            .unwrap()
            .contains("dropped")
    );
    let nul_id = changed("a\u{FFFD}b").await;
    assert!(nul_id.letter.stored_with_changes.unwrap().contains("NUL"));
    let binary = changed("binary-body").await;
    assert_eq!(
        binary.body,
        vec![0xff, 0x00, 0xfe, 0x80],
        "bytes kept exactly"
    );
    let huge = changed("huge-message-header").await;
    assert!(
        huge.error_message.len() <= 4100,
        "bounded column: {}",
        huge.error_message.len()
    );
    let kind = changed("nul-in-kind").await;
    assert_eq!(kind.kind, Kind::Unknown, "a kind the worker does not make");
    let late = changed("bad-failed-at").await;
    assert!(
        (chrono::Utc::now() - late.failed_at).num_minutes() < 5,
        "an unreadable time becomes the ingestion time"
    );
}
