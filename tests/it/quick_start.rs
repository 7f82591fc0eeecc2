//! Guarantee: the README's quick start is what a newcomer sees. Its commands are run, in its
//! order, through the built binary (the long-running ones at a pseudo-terminal, as a person
//! starts them), and what they print is compared with the README's output blocks, ids, times,
//! durations and rates aside; the test's own exchange and queue names are shown as the defaults.

use crate::first_hour::{collect, wait_for};
use crate::helpers::*;
use payment_link_worker::config::Settings;
use payment_link_worker::provider::sim::SimOptions;
use regex::Regex;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One command of the quick start and the output the README shows for it.
#[derive(Debug)]
struct Step {
    args: Vec<String>,
    shown: String,
}

/// Splits a shell command line as sh would for the quick start's simple words and quotes.
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let (mut word, mut quote, mut started) = (String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                started = true;
            }
            (None, c) if c.is_whitespace() => {
                if started || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                started = false;
            }
            (None, c) => word.push(c),
        }
    }
    if started || !word.is_empty() {
        words.push(word);
    }
    words
}

/// The quick start's commands that have an output block, in order.
fn steps(readme: &str) -> Vec<Step> {
    let start = readme.find("## Quick start").expect("a quick start");
    let end = start + readme[start..].find("\n## Everyday commands").unwrap();
    let section = &readme[start..end];
    let blocks = Regex::new(r"(?s)```sh\n(.*?)```\n```text\n(.*?)```").unwrap();
    blocks
        .captures_iter(section)
        .filter_map(|c| {
            let line = c[1]
                .lines()
                .rfind(|l| l.starts_with("payment-link-worker "))?
                .to_owned();
            // The output redirected away is not what the block shows.
            let line = line.split(" > ").next().unwrap();
            let mut args = words(line);
            args.remove(0);
            Some(Step {
                args,
                shown: c[2].to_owned(),
            })
        })
        .collect()
}

/// What may differ between two runs: ids, times, durations, addresses, colour, alignment; and,
/// where `loose`, every decimal figure (rates, latencies).
fn normalised(text: &str, names: &[(String, String)], loose: bool) -> Vec<String> {
    let mut text = Regex::new(r"\x1b\[[0-9;]*[A-Za-z]")
        .unwrap()
        .replace_all(text, "")
        .replace('\r', "");
    for (ours, default) in names {
        text = text.replace(ours.as_str(), default);
    }
    let mut rules = vec![
        (r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z", "TIMESTAMP"),
        (r"\b\d{2}:\d{2}:\d{2}(\.\d{3})?\b", "TIME"),
        (
            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "UUID",
        ),
        (r"plw-[0-9a-f]+…?", "plw-ID"),
        (r"\d+\.\d+\.\d+\.\d+:\d+", "ADDRESS"),
        (r"\b\d+(\.\d+)? (ms|s)\b", "N $2"),
        (r"\b\d+(\.\d+)?/s\b", "N/s"),
    ];
    if loose {
        rules.push((r"\b\d+\.\d+\b", "N.N"));
        // A provider lane's concurrency limit, which slow start and the provider's answers move.
        rules.push((
            r"(?m)^(\s*\d+\s+N\.N\s+\d+\s+\d+\s+)\d+(\s+(closed|open|half-open)\b)",
            "${1}N${2}",
        ));
    }
    for (pattern, with) in rules {
        text = Regex::new(pattern)
            .unwrap()
            .replace_all(&text, with)
            .into_owned();
    }
    let spaces = Regex::new(r"\s+").unwrap();
    text.lines()
        .map(|l| spaces.replace_all(l.trim(), " ").into_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Asserts that `printed` is what the README shows for `step`.
fn same(step: &Step, printed: &str, names: &[(String, String)], loose: bool) {
    let (shown, printed) = (
        normalised(&step.shown, names, loose),
        normalised(printed, names, loose),
    );
    assert_eq!(
        printed,
        shown,
        "`payment-link-worker {}` prints (left) what the README does not show (right)",
        step.args.join(" ")
    );
}

/// The binary run at a pseudo-terminal (util-linux `script`), its output collected.
fn at_a_terminal(env: &TestEnv, args: &[String]) -> (Reaped, Arc<Mutex<String>>) {
    let mut line = format!("exec {}", env!("CARGO_BIN_EXE_payment-link-worker"));
    for arg in args {
        line.push_str(&format!(" '{arg}'"));
    }
    let mut child = Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .envs(
            binary(env)
                .get_envs()
                .filter_map(|(k, v)| v.map(|v| (k, v))),
        )
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("util-linux script runs");
    let seen = collect(child.stdout.take().unwrap());
    (Reaped::new(child), seen)
}

/// Stops a command started under `script` (SIGTERM to the command itself), bounded.
fn stop(child: Reaped) {
    crate::first_hour::stop_at_a_terminal(child.take());
}

/// The test's own exchange and queue names, each with the default it stands for.
fn names(settings: &Settings) -> Vec<(String, String)> {
    let defaults = Settings::load_from(None, std::iter::empty()).unwrap();
    let (ours, theirs) = (&settings.broker, &defaults.broker);
    let mut names = vec![
        (ours.command_queue.clone(), theirs.command_queue.clone()),
        (
            ours.dead_letter_queue.clone(),
            theirs.dead_letter_queue.clone(),
        ),
        (ours.event_exchange.clone(), theirs.event_exchange.clone()),
        (
            ours.command_exchange.clone(),
            theirs.command_exchange.clone(),
        ),
        (
            ours.dead_letter_exchange.clone(),
            theirs.dead_letter_exchange.clone(),
        ),
    ];
    // Longest first, so a name that starts with another is replaced whole.
    names.sort_by_key(|(ours, _)| std::cmp::Reverse(ours.len()));
    names
}

/// The binary with its output captured, writing as it would at the newcomer's terminal.
fn captured(env: &TestEnv) -> Command {
    let mut command = binary(env);
    command.env("PAYMENT_LINK_WORKER__LOG__FORMAT", "text");
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_quick_start_prints_what_it_shows() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let steps = steps(&readme);
    let step = |first: &str, second: Option<&str>| {
        steps
            .iter()
            .find(|s| s.args[0] == first && second.is_none_or(|w| s.args.contains(&w.to_owned())))
            .unwrap_or_else(|| panic!("the quick start shows `{first}`: {steps:#?}"))
    };
    let (sim, _stop) = start_simulator(SimOptions {
        token: TOKEN.into(),
        ..SimOptions::default()
    })
    .await;
    // As shipped, but for the names, the ports and the simulator's address.
    let env = TestEnv::with(
        &sim,
        &[
            ("LOG__FORMAT", "auto"),
            ("BROKER__PREFETCH", "256"),
            ("RETRY__DELAY_TIERS_MS", "10000,60000,300000,1800000"),
            crate::operations::INGEST,
        ],
    )
    .await;
    let names = names(&env.settings);
    // A fresh database, as a newcomer's is: the worker creates its tables.
    {
        use diesel_async::SimpleAsyncConnection as _;
        let mut conn = env.pool.get().await.unwrap();
        conn.batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            .await
            .unwrap();
    }

    // The worker, at a terminal: its first lines.
    let run = step("run", None);
    let (worker, worker_out) = at_a_terminal(&env, &run.args);
    wait_for("the worker to start", &worker_out, "worker started").await;
    let first_lines: String = {
        let text = worker_out.lock().unwrap().clone();
        let lines: Vec<&str> = text.lines().collect();
        let end = lines
            .iter()
            .position(|l| l.contains("worker started"))
            .unwrap();
        lines[..=end].join("\n")
    };
    same(run, &first_lines, &names, false);

    // The events, at a terminal, from before the first send.
    let events = step("events", None);
    let (watcher, watched) = at_a_terminal(&env, &events.args);
    wait_for("events to listen", &watched, "listening for events").await;

    let good = step("send", Some("--wait"));
    let sent = captured(&env).args(&good.args).output().unwrap();
    assert!(sent.status.success(), "{sent:?}");
    same(good, &String::from_utf8_lossy(&sent.stdout), &names, false);

    let bad = steps
        .iter()
        .find(|s| s.args.contains(&"0".to_owned()) && s.args[0] == "send")
        .expect("a command that cannot succeed");
    let failed = captured(&env).args(&bad.args).output().unwrap();
    assert!(!failed.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    same(bad, &printed, &names, false);

    let list = step("dead-letters", Some("list"));
    same(
        list,
        &output(captured(&env).args(&list.args)),
        &names,
        false,
    );

    // What the events terminal showed by then (it goes on showing the bulk send's events).
    wait_for("the event in the events terminal", &watched, "sim-1").await;
    same(events, &watched.lock().unwrap(), &names, false);

    let many = step("send", Some("--count"));
    let sent = captured(&env).args(&many.args).output().unwrap();
    assert!(sent.status.success(), "{sent:?}");
    same(many, &String::from_utf8_lossy(&sent.stderr), &names, true);

    // status --watch once everything is done and reported: its last screen.
    eventually("every command done", LONG, || async {
        let unsent = env.unsent().await?;
        let screen = output(captured(&env).arg("status"));
        let done = screen.contains("LAST MINUTE  1001 created") && screen.contains("created 1001 ");
        (unsent == 0 && done).then_some(())
    })
    .await;
    let status = step("status", None);
    let (screen, screens) = at_a_terminal(&env, &status.args);
    wait_for("a status screen", &screens, "OPEN DEAD LETTERS").await;
    stop(screen);
    let text = screens.lock().unwrap().clone();
    let last = text
        .rsplit("\x1b[H\x1b[2J")
        .find(|s| s.contains("OPEN DEAD LETTERS"));
    same(status, last.unwrap(), &names, true);
    stop(watcher);
    stop(worker);
}

const LONG: Duration = Duration::from_secs(60);

#[test]
fn words_are_split_as_sh_splits_them() {
    assert_eq!(
        words(r#"send --description "Invoice 42" --x " " 'a b'"#),
        ["send", "--description", "Invoice 42", "--x", " ", "a b"]
    );
}

/// A fresh clone's test command works: the README's is the one `.ci/run` runs (`--locked` aside),
/// and nothing the tests, the benchmarks or CI run lives outside the repository.
#[test]
fn the_readme_test_command_is_what_ci_runs_and_needs_nothing_outside_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let readme = read("README.md");
    let tests = readme
        .split("\n## Tests\n")
        .nth(1)
        .expect("a Tests section");
    let shown = tests
        .lines()
        .find(|l| l.starts_with("cargo nextest run"))
        .and_then(|l| l.split('#').next())
        .expect("the test command")
        .trim()
        .to_owned();
    let ci = read(".ci/run");
    let run = ci
        .lines()
        .rfind(|l| l.starts_with("cargo nextest run"))
        .expect(".ci/run runs the suite")
        .replace(" --locked", "");
    assert_eq!(shown, run.trim(), "README and .ci/run differ");

    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() && name != "node_modules" {
                files(&path, out);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    let mut all = Vec::new();
    for dir in ["tests", "benches", ".ci", ".config"] {
        files(&root.join(dir), &mut all);
    }
    let outside: Vec<String> = all
        .iter()
        .filter(|path| {
            // Spelt in two, so this file does not find itself.
            std::fs::read_to_string(path)
                .is_ok_and(|text| text.contains(&format!("{}/shared/", "..")))
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        outside.is_empty(),
        "files reaching outside the repository: {outside:?}"
    );
    let script = root.join("tests/scripts/rabbitmq-cluster");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&script).unwrap().permissions().mode();
    assert!(mode & 0o111 != 0, "{} is not executable", script.display());
}
