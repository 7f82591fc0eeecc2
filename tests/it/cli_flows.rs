//! Guarantees of the real binary: SIGTERM stops it cleanly after its work; `send` publishes a
//! command that the worker turns into an event; `dead-letters list` and `replay --dry-run` show
//! what is dead-lettered without changing it; with `OTEL_EXPORTER_OTLP_ENDPOINT` set, traces are
//! exported over OTLP/HTTP.

use crate::helpers::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn binary(env: &TestEnv) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_payment-link-worker"));
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

fn output(command: &mut Command) -> String {
    let out = command.output().expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Sends SIGTERM and waits (bounded) for a clean exit.
fn terminate(mut child: std::process::Child) {
    let status = Command::new("kill")
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
    let env = TestEnv::new(&provider.uri()).await;
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
    eventually("the bad command dead-lettered", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 1).then_some(())
    })
    .await;

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
    let dry = output(binary(&env).args([
        "dead-letters",
        "replay",
        "--dry-run",
        "--operator",
        "cli-test",
    ]));
    assert!(dry.contains(&format!("would replay {id}")), "{dry}");
    eventually("the dead letter still there", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 1).then_some(())
    })
    .await;

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
