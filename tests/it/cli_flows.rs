//! Guarantees of the real binary: SIGTERM stops it cleanly after its work; `send` publishes a
//! command that the worker turns into an event; `dead-letters list` and `replay --dry-run` show
//! what is dead-lettered without changing it; with `OTEL_EXPORTER_OTLP_ENDPOINT` set, traces are
//! exported over OTLP/HTTP.

use crate::helpers::*;
use payment_link_worker::dead_letters::State;
use std::process::Stdio;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test(flavor = "multi_thread")]
async fn send_list_replay_and_sigterm_through_the_binary() {
    let provider = MockServer::start().await;
    let otlp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&otlp)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&otlp)
        .await;
    answer_with_link(&provider, 201, 4, "15.25", 88).await;
    let env = TestEnv::with(&provider.uri(), &[crate::operations::INGEST]).await;
    let events = env.capture_events().await;
    let worker = binary(&env)
        .arg("run")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.uri())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the worker to consume", WAIT, || async {
        let record = env
            .channel
            .queue_declare(
                env.command_queue().as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        (record.consumer_count() > 0).then_some(())
    })
    .await;

    let sent = output(binary(&env).args([
        "send",
        "--command-id",
        "cli-1",
        "--provider-id",
        "7",
        "--amount",
        "15.25",
        "--description",
        "Invoice 88",
        "--invoice-id",
        "88",
        "--customer-id",
        "99",
        "--email",
        "payer@example.com",
    ]));
    assert_eq!(sent.trim(), "cli-1");
    let event = env.next_message(&events, WAIT).await;
    assert_eq!(
        event.json()["paymentLink"],
        "https://instantpaymentlink/ref-4"
    );
    // The binary traces: the event carries the trace, and no empty `tracestate`.
    assert!(event.header("traceparent").is_some(), "{event:?}");
    assert_eq!(event.header("tracestate"), None, "{event:?}");
    let request =
        String::from_utf8(provider.received_requests().await.unwrap()[0].body.clone()).unwrap();
    assert!(
        request.contains(r#""amountInMajorCurrency":15.25"#),
        "{request}"
    );

    let dir = std::env::temp_dir().join(format!("plw-cli-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.json");
    std::fs::write(
        &file,
        r#"{"paymentProviderId":7,"amountInMajorCurrency":0,"description":"free"}"#,
    )
    .unwrap();
    let id = output(binary(&env).args(["send", "--json"]).arg(&file));
    let id = id.trim();
    assert!(
        uuid::Uuid::parse_str(id).is_ok(),
        "a fresh command id: {id}"
    );
    crate::operations::stored(&env, &Default::default(), 1).await;

    let listing = output(binary(&env).args(["dead-letters", "list", "--kind", "validation"]));
    assert!(
        listing.contains(id) && listing.contains("greater than zero"),
        "{listing}"
    );
    assert!(listing.contains("by kind: validation: 1"), "{listing}");
    let json: serde_json::Value = serde_json::from_str(&output(binary(&env).args([
        "dead-letters",
        "list",
        "--json",
    ])))
    .unwrap();
    assert_eq!(json["letters"][0]["commandId"], id);
    // `show` prints what the console's detail page shows: why, the ids, the body as sent.
    let letter_id = json["letters"][0]["id"].as_i64().unwrap().to_string();
    let shown = output(binary(&env).args(["dead-letters", "show", &letter_id]));
    assert!(
        shown.starts_with(&format!("dead letter {letter_id}  validation  open\n"))
            && shown.contains("! replayed as it is, it fails the same way again")
            && shown.contains(&format!("Command id:         {id}"))
            && shown.contains("greater than zero")
            && shown.contains("\"amountInMajorCurrency\": 0")
            && shown.contains("Replays\n  none"),
        "{shown}"
    );
    let shown: serde_json::Value = serde_json::from_str(&output(binary(&env).args([
        "dead-letters",
        "show",
        &letter_id,
        "--json",
    ])))
    .unwrap();
    assert_eq!(
        (shown["commandId"].as_str(), shown["failsAgain"].as_bool()),
        (Some(id), Some(true))
    );
    let missing = binary(&env)
        .args(["dead-letters", "show", "999999"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no dead letter has id 999999"));
    let dry = output(binary(&env).args([
        "dead-letters",
        "replay",
        "--dry-run",
        "--include-failing",
        "--operator",
        "cli-test",
    ]));
    assert!(dry.contains(&format!("would replay {id}")), "{dry}");
    assert!(dry.contains("fails again"), "{dry}");
    let open = payment_link_worker::dead_letters::store::Filter {
        state: Some(State::Open),
        ..Default::default()
    };
    crate::operations::stored(&env, &open, 1).await;
    let searched = output(binary(&env).args(["dead-letters", "list", "--search", "FREE"]));
    assert!(searched.contains(id), "{searched}");
    let archived = output(binary(&env).args(["dead-letters", "archive", "--command-id", id]));
    assert_eq!(archived.trim(), "archived 1 dead letter(s)");
    crate::operations::stored(&env, &open, 0).await;

    tokio::task::spawn_blocking(move || terminate(worker))
        .await
        .unwrap();
    let exported = otlp.received_requests().await.unwrap();
    assert!(
        exported.iter().any(|r| r.url.path() == "/v1/traces"),
        "spans were exported over OTLP: {:?}",
        exported
            .iter()
            .map(|r| r.url.path().to_owned())
            .collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_that_hears_nothing_in_time_still_starts_stdout_with_its_command_id() {
    // The topology exists (the harness declares it) but no worker runs.
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let mut command = binary(&env);
    command.args([
        "send",
        "--command-id",
        "waited-1",
        "--provider-id",
        "1",
        "--amount",
        "1.00",
        "--description",
        "nobody listens",
        "--wait",
        "--timeout",
        "1",
    ]);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success(), "no event came: a failure");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().next(), Some("waited-1"), "{stdout}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("neither its event nor a dead letter came within 1 s"),
        "{said}"
    );
}
