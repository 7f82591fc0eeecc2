//! Guarantee: a person at a terminal can read what the worker does and act on what it says.
//! At a terminal the worker writes one short coloured line per event (JSON lines elsewhere);
//! `send --wait` shows the link, or why there is none, with a matching exit status; the
//! dead-letter listing refuses an unknown kind, lines up its columns, and a dry run warns of
//! replays that would fail again.

use crate::helpers::*;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Collects what a child writes, in the background.
pub fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = from.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    text
}

/// The worker run at a pseudo-terminal (util-linux `script`), as a person starts it.
fn worker_at_a_terminal(env: &TestEnv) -> (Child, Arc<Mutex<String>>) {
    let worker = binary(env);
    let line = format!("exec {} run", env!("CARGO_BIN_EXE_payment-link-worker"));
    let mut child = Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .envs(worker.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("util-linux script runs");
    let seen = collect(child.stdout.take().unwrap());
    (child, seen)
}

/// Stops a worker started under `script` (SIGTERM to the worker itself), bounded.
pub fn stop_at_a_terminal(mut child: Child) {
    let _ = Command::new("pkill")
        .args(["-TERM", "-P", &child.id().to_string()])
        .status();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the worker at a terminal did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn wait_for(what: &str, text: &Arc<Mutex<String>>, needle: &str) {
    eventually(what, WAIT, || async {
        text.lock().unwrap().contains(needle).then_some(())
    })
    .await;
}

/// Runs the binary to its end: (success, stdout, stderr).
pub fn run(command: &mut Command) -> (bool, String, String) {
    let out = command.output().expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `line` starts with a local time `HH:MM:SS.mmm`.
fn starts_with_a_time(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 12
        && [0, 1, 3, 4, 6, 7, 9, 10, 11]
            .iter()
            .all(|i| b[*i].is_ascii_digit())
        && b[2] == b':'
        && b[5] == b':'
        && b[8] == b'.'
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_at_a_terminal_reads_short_lines_sees_the_link_and_the_dead_letter() {
    // The simulator as a person runs it, logging one line per request.
    let mut sim = Command::new(env!("CARGO_BIN_EXE_payment-link-worker"))
        .args(["provider-sim", "--port", "0", "--token", TOKEN])
        .env("PAYMENT_LINK_WORKER__LOG__FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sim_log = collect(sim.stderr.take().unwrap());
    let address = eventually("the simulator's address", WAIT, || async {
        let log = sim_log.lock().unwrap().clone();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|l| l["address"].as_str().map(str::to_owned))
    })
    .await;
    let env = TestEnv::with(
        &format!("http://{address}"),
        &[
            ("LOG__FORMAT", "auto"),
            ("LOG__PROGRESS_INTERVAL_MS", "1000"),
            // The line per created link is at debug; the progress line sums them up.
            (
                "LOG__LEVEL",
                "payment_link_worker::pipeline::record=debug,info",
            ),
            crate::operations::INGEST,
        ],
    )
    .await;
    let (at_tty, tty) = worker_at_a_terminal(&env);
    wait_for("the worker at a terminal to start", &tty, "worker started").await;

    let good = run(binary(&env).args([
        "send",
        "--wait",
        "--command-id",
        "first-good",
        "--provider-id",
        "1",
        "--amount",
        "12.50",
        "--description",
        "Invoice 42",
    ]));
    assert!(good.0, "send --wait succeeds: {good:?}");
    let mut out = good.1.lines();
    assert_eq!(out.next(), Some("first-good"), "{good:?}");
    let event: serde_json::Value = serde_json::from_str(out.next().unwrap_or("")).unwrap();
    assert!(
        event["paymentLink"]
            .as_str()
            .is_some_and(|l| l.starts_with("https://")),
        "{good:?}"
    );
    assert!(
        good.1.contains("12.50"),
        "the amount as the provider wrote it: {good:?}"
    );

    let bad = run(binary(&env).args([
        "send",
        "--wait",
        "--command-id",
        "first-bad",
        "--provider-id",
        "1",
        "--amount",
        "0",
        "--description",
        " ",
    ]));
    assert!(!bad.0, "a dead-lettered command exits non-zero: {bad:?}");
    assert!(
        bad.2
            .contains("command first-bad was dead-lettered as validation: 2 problems:")
            && bad.2.contains("amountInMajorCurrency")
            && bad.2.contains("description"),
        "{bad:?}"
    );
    // It returns once the dead letter is in the store: a listing straight after shows it.
    assert!(
        bad.2.contains("it is dead letter ") && bad.2.contains("in the store"),
        "{bad:?}"
    );
    let listed = output(binary(&env).args(["dead-letters", "list", "--command-id", "first-bad"]));
    assert!(listed.contains("first-bad"), "{listed}");

    wait_for("the dead letter's log line", &tty, "first-bad").await;
    let lines: Vec<String> = tty
        .lock()
        .unwrap()
        .lines()
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect();
    let created = lines
        .iter()
        .find(|l| l.contains("first-good") && l.contains("payment link created"))
        .unwrap_or_else(|| panic!("a line for the link: {lines:#?}"));
    let dead = lines
        .iter()
        .find(|l| l.contains("first-bad") && l.contains("dead-lettered"))
        .unwrap_or_else(|| panic!("a line for the dead letter: {lines:#?}"));
    for line in [created, dead] {
        assert!(starts_with_a_time(line), "{line:?}");
        assert!(line.contains("\u{1b}["), "coloured at a terminal: {line:?}");
        assert!(
            line.ends_with(" ms)"),
            "the time the command took: {line:?}"
        );
        assert!(
            !line.contains("otel.") && !line.contains("messaging.") && !line.contains('{'),
            "span attributes stay in the trace: {line:?}"
        );
        assert!(line.len() < 300, "{} characters: {line:?}", line.len());
    }
    assert!(dead.contains("validation"), "{dead:?}");

    // A command id with a terminal's escape sequences and a line break is shown escaped: it can
    // neither set the terminal's title nor forge a line of its own.
    let forged = "evil\u{1b}]0;pwned\u{7}\n12:00:00.000  INFO forged payment link created";
    env.send(forged, "not json").await;
    wait_for(
        "the forged id's line",
        &tty,
        "evil⟨U+001B⟩]0;pwned⟨U+0007⟩⟨U+000A⟩12:00:00.000",
    )
    .await;
    let text = tty.lock().unwrap().clone();
    assert!(
        !text.contains("\u{1b}]0;"),
        "an escape sequence reached the terminal"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("12:00:00.000  INFO forged")),
        "a forged line: {text}"
    );
    // A busy worker at a terminal says what it did, once per interval.
    wait_for("a progress line", &tty, " created, ").await;
    let text = tty.lock().unwrap().clone();
    let progress = text
        .lines()
        .find(|l| l.contains("INFO") && l.contains(" created, ") && l.contains("dead-lettered"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        starts_with_a_time(progress) && progress.contains("/s); ") && progress.contains("last "),
        "{progress:?}"
    );

    // Off a terminal the same setting writes JSON lines, without colour; a validation failure's
    // line carries the command's correlation and trace ids like every other line of it.
    stop_at_a_terminal(at_tty);
    let mut piped = binary(&env)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let json = collect(piped.stderr.take().unwrap());
    wait_for("the piped worker to start", &json, "worker started").await;
    let invalid = run(binary(&env).args([
        "send",
        "--wait",
        "--command-id",
        "first-invalid",
        "--correlation-id",
        "corr-77",
        "--provider-id",
        "0",
        "--amount",
        "1",
        "--description",
        "x",
    ]));
    assert!(!invalid.0, "{invalid:?}");
    wait_for("the invalid command's log line", &json, "first-invalid").await;
    // The three dead letters reach the store while a worker runs to ingest them.
    crate::operations::stored(&env, &Default::default(), 3).await;
    terminate(piped);
    let json = json.lock().unwrap().clone();
    assert!(!json.contains('\u{1b}'), "no colour off a terminal: {json}");
    let mut dead_lettered = None;
    for line in json.lines().filter(|l| !l.trim().is_empty()) {
        let parsed: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a JSON line off a terminal ({e}): {line}"));
        assert!(parsed["message"].is_string(), "{line}");
        if parsed["message"] == "command dead-lettered" {
            dead_lettered = Some(parsed);
        }
    }
    let line = dead_lettered.unwrap_or_else(|| panic!("a dead-letter line: {json}"));
    assert_eq!(line["span"]["command_id"], "first-invalid", "{line}");
    assert_eq!(line["span"]["correlation_id"], "corr-77", "{line}");
    assert_eq!(
        line["span"]["trace_id"].as_str().map(str::len),
        Some(32),
        "{line}"
    );

    // The dead-letter listing: an unknown kind is a usage error naming the known ones.
    let bogus = run(binary(&env).args(["dead-letters", "list", "--kind", "bogus"]));
    assert!(!bogus.0, "{bogus:?}");
    assert!(
        bogus.2.contains("validation") && bogus.2.contains("delivery-limit"),
        "{bogus:?}"
    );
    let listing = output(binary(&env).args(["dead-letters", "list"]));
    let header = listing.lines().next().unwrap_or("");
    let row = listing
        .lines()
        .find(|l| l.contains("first-bad"))
        .unwrap_or_else(|| panic!("{listing}"));
    assert_eq!(
        header.find("KIND"),
        row.find("validation"),
        "aligned columns:\n{listing}"
    );
    assert_eq!(header.find("MESSAGE"), row.find("2 problems"), "{listing}");
    assert!(listing.contains("3 shown of 3 matching"), "{listing}");
    assert!(
        listing.contains("evil⟨U+001B⟩]0;pwned") && !listing.contains('\u{1b}'),
        "the forged id shown escaped in the table: {listing}"
    );
    // A dead letter that fails again as it is is skipped unless asked for, and counted.
    let replay = output(binary(&env).args(["dead-letters", "replay"]));
    assert!(
        replay.lines().any(|l| l.starts_with("skipping dead letter")
            && l.contains("fails again as it is (validation)")
            && l.contains("--include-failing")),
        "{replay}"
    );
    assert!(
        replay.contains("0 replayed, 0 failed, 3 skipped (see above); 3 open dead letter(s) left"),
        "{replay}"
    );
    let dry =
        output(binary(&env).args(["dead-letters", "replay", "--dry-run", "--include-failing"]));
    assert!(
        dry.lines()
            .any(|l| l.starts_with("would replay first-bad") && l.contains("(fails again")),
        "a dry run including them warns that they would fail again: {dry}"
    );

    // No worker now: --wait gives up after its timeout, non-zero.
    let unheard = run(binary(&env).args([
        "send",
        "--wait",
        "--timeout",
        "1",
        "--provider-id",
        "1",
        "--amount",
        "1",
        "--description",
        "x",
    ]));
    assert!(!unheard.0, "{unheard:?}");
    assert!(unheard.2.contains("within 1 s"), "{unheard:?}");
    terminate(sim);
}
