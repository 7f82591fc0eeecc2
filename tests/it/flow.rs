//! Guarantee: a newcomer sees the flow without writing code and without a flooded log. `send
//! --count` sends many commands on one connection; with no queue bound for the events, the
//! worker says so once and then in a summary line per interval (not once per event per retry);
//! `events` binds a queue, prints every event, and the problem's end is logged.

use crate::first_hour::{collect, run, wait_for};
use crate::helpers::*;
use payment_link_worker::provider::sim::SimOptions;
use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

const COMMANDS: usize = 1000;
const LONG: Duration = Duration::from_secs(90);

fn warnings(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["level"] == "WARN")
        .collect()
}

/// The worker binary, its log (stderr) collected, once it has started.
async fn logged_worker(env: &TestEnv) -> (Reaped, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut worker = Reaped::new(
        binary(env)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let log = collect(worker.get().stderr.take().unwrap());
    wait_for("the worker to start", &log, "worker started").await;
    (worker, log)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_unroutable_events_make_a_few_summary_lines_and_events_prints_them_all() {
    let (sim, _stop) = start_simulator(SimOptions {
        token: TOKEN.into(),
        ..SimOptions::default()
    })
    .await;
    let env = TestEnv::with(
        &sim,
        &[
            ("LOG__FORMAT", "json"),
            ("LOG__SUMMARY_INTERVAL_MS", "2000"),
            ("OUTBOX__MAX_RETRY_INTERVAL_MS", "500"),
        ],
    )
    .await;
    let (worker, log) = logged_worker(&env).await;

    let sent = run(binary(&env).args([
        "send",
        "--count",
        &COMMANDS.to_string(),
        "--command-id",
        "bulk",
        "--provider-id",
        "1",
        "--amount",
        "1.00",
        "--description",
        "bulk",
    ]));
    assert!(sent.0, "{sent:?}");
    let ids: HashSet<&str> = sent.1.lines().collect();
    assert_eq!(ids.len(), COMMANDS, "one distinct id per confirmed command");
    assert!(ids.iter().all(|id| id.starts_with("bulk-")), "{:?}", sent.1);
    assert!(
        sent.2
            .contains(&format!("sent {COMMANDS} command(s) on one connection"))
            && sent
                .2
                .contains(&format!("{COMMANDS} confirmed, 0 refused, 0 skipped")),
        "{sent:?}"
    );

    // Every command is done; its event waits in the outbox, retried every half second.
    eventually("every event to wait in the outbox", LONG, || async {
        let unsent = env.unsent().await?;
        (unsent as usize >= COMMANDS).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    eventually("a summary line for the unroutable events", WAIT, || async {
        let text = log.lock().unwrap().clone();
        warnings(&text)
            .iter()
            .any(|w| {
                let message = w["message"].as_str().unwrap_or("");
                message.contains("more time(s) in the last")
                    && message.contains("no queue is bound to exchange")
                    && message.contains("payment-link-worker events")
            })
            .then_some(())
    })
    .await;
    // At most the first line per kind of problem, plus a summary per interval so far.
    let text = log.lock().unwrap().clone();
    let warned = warnings(&text);
    let intervals = started.elapsed().as_secs() / 2 + 8;
    assert!(
        (warned.len() as u64) <= intervals,
        "{} warning lines for {COMMANDS} unroutable events (at most {intervals}): {:#?}",
        warned.len(),
        warned.iter().map(|w| &w["message"]).collect::<Vec<_>>()
    );

    // `events` binds a queue: the relay gets every event through, and `events` prints each.
    let mut events = Reaped::new(
        binary(&env)
            .args(["events", "--count", &COMMANDS.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let printed = collect(events.get().stdout.take().unwrap());
    let events = std::sync::Mutex::new(events);
    let finished = eventually("events to print every event", LONG, || {
        let exited = events.lock().unwrap().get().try_wait().unwrap();
        async move { exited.map(|status| status.success()) }
    })
    .await;
    assert!(finished, "events exits 0 after --count events");
    let printed = printed.lock().unwrap().clone();
    let commands: HashSet<String> = printed
        .lines()
        .map(|l| {
            let event: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("a JSON line ({e}): {l}"));
            assert_eq!(event["type"], "payment-link.created", "{l}");
            assert!(event["body"]["paymentLink"].is_string(), "{l}");
            event["commandId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(commands.len(), COMMANDS, "every command's event, once");
    wait_for(
        "the problem's end to be logged",
        &log,
        "ended (resolved): messages wait in the outbox",
    )
    .await;
    terminate(worker.take());
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_parked_for_a_failing_provider_make_one_warning_and_summaries_not_one_each() {
    const PARKED: usize = 60;
    let (sim, _stop) = start_simulator(SimOptions {
        token: TOKEN.into(),
        fail_rate: 1.0,
        ..SimOptions::default()
    })
    .await;
    let env = TestEnv::with(
        &sim,
        &[
            ("LOG__FORMAT", "json"),
            ("LOG__SUMMARY_INTERVAL_MS", "2000"),
            ("RETRY__MAX_ELAPSED_MS", "100"),
            ("RETRY__DELAY_TIERS_MS", "600000"),
            // Every command makes its calls (an open circuit would park them without a call,
            // which is logged at info already).
            ("BREAKER__MIN_CALLS", "1000000"),
        ],
    )
    .await;
    let (worker, log) = logged_worker(&env).await;
    for i in 0..PARKED {
        env.send(&format!("parked-{i}"), &command_body("2.50", i as i64 + 1))
            .await;
    }
    let delay_queue =
        payment_link_worker::broker::topology::delay_queue(&env.settings.broker, 600_000);
    eventually("every command parked", LONG, || async {
        (env.queue_depth(&delay_queue).await as usize == PARKED).then_some(())
    })
    .await;
    eventually("a summary line for the parked commands", WAIT, || async {
        let text = log.lock().unwrap().clone();
        warnings(&text)
            .iter()
            .any(|w| {
                let message = w["message"].as_str().unwrap_or("");
                message.contains("more time(s) in the last")
                    && message.contains("exhausted their retries and wait in delay queues")
            })
            .then_some(())
    })
    .await;
    let text = log.lock().unwrap().clone();
    let parked: Vec<_> = warnings(&text)
        .into_iter()
        .filter(|w| {
            w["message"]
                .as_str()
                .is_some_and(|m| m.contains("command waits in a delay queue"))
        })
        .collect();
    assert_eq!(
        parked.len(),
        1,
        "one warning per provider for {PARKED} parked commands: {parked:#?}"
    );
    let infos = text
        .lines()
        .filter(|l| l.contains("\"INFO\"") && l.contains("command waits in a delay queue"))
        .count();
    assert_eq!(infos, PARKED - 1, "each other command still has its line");
    terminate(worker.take());
}

#[tokio::test(flavor = "multi_thread")]
async fn json_lines_on_stdin_are_sent_on_one_connection_and_a_bad_line_is_named() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    // The topology, as a worker would declare it (none runs: the commands stay queued).
    let worker = env.start_worker().await;
    let mut send = binary(&env)
        .args(["send", "--json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    worker.stop().await.unwrap();
    {
        use std::io::Write as _;
        let mut stdin = send.stdin.take().unwrap();
        let good = command_body("3.10", 1);
        writeln!(stdin, "{good}\n\nnot json\n{good}").unwrap();
    }
    let out = send.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "a skipped line fails the run: {stderr}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stderr.contains("skipped line 3: not JSON"), "{stderr}");
    assert!(
        stderr.contains("2 confirmed, 0 refused, 1 skipped"),
        "{stderr}"
    );
    eventually("both commands in the queue", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await == 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_rate_the_replicas_and_the_queues_during_a_run() {
    let (sim, _stop) = start_simulator(SimOptions {
        token: TOKEN.into(),
        ..SimOptions::default()
    })
    .await;
    let env = TestEnv::new(&sim).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    for i in 0..20 {
        env.send(&format!("status-{i}"), &command_body("2.00", i + 1))
            .await;
    }
    env.messages(&events, 20, WAIT).await;
    // The heartbeat carries the worker's totals; wait for one after the work.
    let status = eventually("a heartbeat reporting the work", WAIT, || async {
        let out = binary(&env).args(["status", "--json"]).output().unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (status["replicas"][0]["report"]["created"].as_u64()? >= 20).then_some(status)
    })
    .await;
    let minute = &status["lastMinute"];
    assert_eq!(minute["created"], 20, "{status}");
    assert!(minute["perSecond"].as_f64().unwrap() > 0.0, "{status}");
    assert!(minute["p50Ms"].as_f64().is_some(), "{status}");
    assert_eq!(status["replicas"].as_array().unwrap().len(), 1, "{status}");
    let provider = &status["providers"][0];
    assert!(provider["perSecond"].as_f64().unwrap() > 0.0, "{status}");
    assert_eq!(provider["breaker"], "closed", "{status}");
    let command_queue = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == env.command_queue())
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(
        (
            command_queue["ready"].as_u64(),
            command_queue["consumers"].as_u64()
        ),
        (Some(0), Some(1))
    );

    let screen = output(binary(&env).arg("status"));
    assert!(screen.contains("LAST MINUTE  20 created ("), "{screen}");
    assert!(screen.contains("REPLICAS ALIVE  1"), "{screen}");
    worker.stop().await.unwrap();
}
