//! Guarantee: the real binary refuses a bad setting at start-up with a message naming it, and
//! never prints a secret while doing so.

use std::process::Command;

fn worker() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_payment-link-worker"));
    for (name, _) in std::env::vars() {
        if name.starts_with("PAYMENT_LINK_WORKER__")
            || [
                "AMQP_URL",
                "DATABASE_URL",
                "PROVIDER_BASE_URL",
                "PROVIDER_TOKEN",
                "RUST_LOG",
            ]
            .contains(&name.as_str())
        {
            command.env_remove(name);
        }
    }
    command
}

fn stderr_of(command: &mut Command) -> String {
    let output = command.output().expect("binary runs");
    assert!(!output.status.success(), "expected start-up to fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn unknown_setting_stops_start_up_naming_it() {
    let err = stderr_of(
        worker()
            .arg("run")
            .env("PAYMENT_LINK_WORKER__BROKER__PREFECH", "4"),
    );
    assert!(
        err.contains("PAYMENT_LINK_WORKER__BROKER__PREFECH"),
        "{err}"
    );
}

#[test]
fn malformed_setting_stops_start_up_naming_it() {
    let err = stderr_of(
        worker()
            .arg("run")
            .env("PAYMENT_LINK_WORKER__RETRY__MAX_ELAPSED_MS", "soon"),
    );
    assert!(
        err.contains("PAYMENT_LINK_WORKER__RETRY__MAX_ELAPSED_MS"),
        "{err}"
    );
}

#[test]
fn missing_token_stops_start_up_naming_it() {
    let err = stderr_of(worker().arg("run"));
    assert!(err.contains("provider.token"), "{err}");
}

#[test]
fn config_file_errors_name_the_key_with_the_option_after_the_subcommand() {
    let dir = std::env::temp_dir().join(format!("plw-bin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("worker.toml");
    std::fs::write(&file, "[broker]\nprefetch = 0\n").unwrap();
    let err = stderr_of(
        worker()
            .args(["run", "--config"])
            .arg(&file)
            .env("PROVIDER_TOKEN", "t"),
    );
    assert!(err.contains("broker.prefetch"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn connection_errors_do_not_print_secrets() {
    // Nothing listens on port 1: start-up fails at the first connection.
    let err = stderr_of(
        worker()
            .arg("run")
            .env("PROVIDER_TOKEN", "sk_live_never_print_me")
            .env("AMQP_URL", "amqp://worker:amqp-hunter2@127.0.0.1:1/%2f")
            .env(
                "DATABASE_URL",
                "postgres://app:pg-hunter2@127.0.0.1:1/links",
            )
            .env("PAYMENT_LINK_WORKER__LOG__FORMAT", "text"),
    );
    assert!(err.contains("cannot"), "{err}");
    for secret in ["sk_live_never_print_me", "amqp-hunter2", "pg-hunter2"] {
        assert!(!err.contains(secret), "{secret} printed: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_url_form_prints_its_password_on_any_error_path() {
    // A migrated database of the test's own: with migrations off the worker checks the schema,
    // then reaches for the broker.
    let env = crate::helpers::TestEnv::new("http://127.0.0.1:9").await;
    let database = env.settings.database.url.expose().to_owned();
    // Passwords written raw with the characters that end a URL's parts, and as a query parameter.
    let amqp = [
        "amqp://worker:amqp/hunter2@127.0.0.1:1/%2f",
        "amqp://worker:amqp?hunter2@127.0.0.1:1/%2f",
        "amqp://worker:amqp#hunter2@127.0.0.1:1/%2f",
        "amqp://worker:amqp@hunter2@127.0.0.1:1/%2f",
        "amqp://worker:amqp-hunter2@127.0.0.1:1/%2f",
    ];
    let postgres = [
        "postgres://app:pg/hunter2@127.0.0.1:1/links",
        "postgres://app:pg#hunter2@127.0.0.1:1/links",
        "postgres://127.0.0.1:1/links?user=app&password=pg-hunter2",
        "postgres://app:pg-hunter2@127.0.0.1:1/links",
    ];
    for url in amqp {
        // Migrations off, the schema there: the broker is what fails.
        let err = stderr_of(
            worker()
                .arg("run")
                .env("PROVIDER_TOKEN", "sk_live_never_print_me")
                .env("AMQP_URL", url)
                .env("DATABASE_URL", &database)
                .env("PAYMENT_LINK_WORKER__DATABASE__RUN_MIGRATIONS", "false"),
        );
        assert!(err.contains("RabbitMQ"), "{url}: {err}");
        for secret in ["hunter2", "sk_live_never_print_me"] {
            assert!(!err.contains(secret), "{url}: {secret} printed: {err}");
        }
    }
    for url in postgres {
        let err = stderr_of(
            worker()
                .arg("run")
                .env("PROVIDER_TOKEN", "sk_live_never_print_me")
                .env("DATABASE_URL", url),
        );
        assert!(err.contains("database"), "{url}: {err}");
        for secret in ["hunter2", "sk_live_never_print_me"] {
            assert!(!err.contains(secret), "{url}: {secret} printed: {err}");
        }
    }
}

/// The one line a failed start-up printed (every non-empty line of stderr, which must be one).
/// The one line on stderr; piped, the log writes JSON lines, and so the fatal line is one too:
/// its message.
fn one_line(err: &str) -> String {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    match serde_json::from_str::<serde_json::Value>(lines[0]) {
        Ok(line) => {
            assert_eq!(line["level"], "ERROR", "{err}");
            line["message"].as_str().unwrap().to_owned()
        }
        Err(_) => lines[0].to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_failures_are_one_line_with_the_cause_the_setting_and_the_fix() {
    let admin = crate::sandbox::admin_database_url();
    let base = admin.rsplit_once('/').unwrap().0;
    let missing = format!("plw_missing_{}", uuid::Uuid::new_v4().simple());
    let err = stderr_of(
        worker()
            .arg("run")
            .env("PROVIDER_TOKEN", "t")
            .env("DATABASE_URL", format!("{base}/{missing}")),
    );
    // Piped, the log writes JSON lines: the fatal line is one too (one format per stream);
    // with log.format = "text" it is plain.
    assert!(err.trim_start().starts_with("{\""), "{err}");
    let plain = stderr_of(
        worker()
            .arg("run")
            .env("PROVIDER_TOKEN", "t")
            .env("PAYMENT_LINK_WORKER__LOG__FORMAT", "text")
            .env("DATABASE_URL", format!("{base}/{missing}")),
    );
    assert!(plain.starts_with("payment-link-worker: "), "{plain}");
    let line = one_line(&err);
    assert!(
        line.contains(&format!("database \"{missing}\" does not exist"))
            && line.contains("createdb -h ")
            && line.contains("(from DATABASE_URL)"),
        "{line}"
    );
    assert_eq!(line.matches("does not exist").count(), 1, "{line}");

    let err = stderr_of(
        worker()
            .arg("run")
            .env("PROVIDER_TOKEN", "t")
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/links"),
    );
    let line = one_line(&err);
    assert_eq!(line.matches("connection refused").count(), 1, "{line}");
    assert!(line.contains("is PostgreSQL running"), "{line}");

    // Migrations off (a database of the test's own, migrated): the broker is what fails.
    let env = crate::helpers::TestEnv::new("http://127.0.0.1:9").await;
    let err = stderr_of(
        worker()
            .arg("run")
            .env("PROVIDER_TOKEN", "t")
            .env("PAYMENT_LINK_WORKER__DATABASE__RUN_MIGRATIONS", "false")
            .env("DATABASE_URL", env.settings.database.url.expose())
            .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
    );
    let line = one_line(&err);
    assert_eq!(line.matches("connection refused").count(), 1, "{line}");
    assert!(
        line.contains("RabbitMQ") && line.contains("(from AMQP_URL)"),
        "{line}"
    );

    let err = stderr_of(
        worker()
            .arg("run")
            .env("PAYMENT_LINK_WORKER__BROKER__PREFETCH", "0")
            .env("PROVIDER_TOKEN", "t"),
    );
    assert!(
        one_line(&err).contains("`broker.prefetch` (from PAYMENT_LINK_WORKER__BROKER__PREFETCH)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_says_what_it_applied_then_that_the_schema_is_up_to_date() {
    let admin = crate::sandbox::admin_database_url();
    let base = admin.rsplit_once('/').unwrap().0.to_owned();
    let name = format!("plw_migrate_{}", uuid::Uuid::new_v4().simple());
    crate::helpers::exec_admin(&admin, &format!("CREATE DATABASE {name}")).await;
    let url = format!("{base}/{name}");
    let migrate = move || {
        let out = worker()
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // Said once, on stdout: not also as a log line on stderr.
        let said = String::from_utf8(out.stderr).unwrap();
        assert!(
            !said.contains("up to date") && !said.contains("applied"),
            "{said}"
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    let (first, second) = tokio::task::spawn_blocking(move || (migrate(), migrate()))
        .await
        .unwrap();
    crate::helpers::exec_admin(&admin, &format!("DROP DATABASE {name} WITH (FORCE)")).await;
    assert_eq!(first.trim(), format!("applied {migrations} migration(s)"));
    assert_eq!(second.trim(), "the database schema is up to date");
}

#[test]
fn the_console_refuses_to_start_without_operators_or_with_a_guessable_token() {
    let none = stderr_of(
        worker()
            .arg("console")
            .env_remove("CONSOLE_OPERATOR_TOKEN")
            .env("PAYMENT_LINK_WORKER__CONSOLE__LISTEN", "127.0.0.1:0"),
    );
    assert!(
        none.contains("CONSOLE_OPERATOR_TOKEN") && none.contains("[[console.operators]]"),
        "{none}"
    );
    let short = stderr_of(
        worker()
            .arg("console")
            .env("CONSOLE_OPERATOR_TOKEN", "secret")
            .env("PAYMENT_LINK_WORKER__CONSOLE__LISTEN", "127.0.0.1:0"),
    );
    assert!(short.contains("at least 24 are needed"), "{short}");
    assert!(
        !short.contains("secret\n") && !short.contains("\"secret\""),
        "{short}"
    );
    let stalled = stderr_of(
        worker()
            .arg("console")
            .env("PAYMENT_LINK_WORKER__CONSOLE__JOB_STALLED_AFTER_MS", "1"),
    );
    assert!(
        stalled.contains("console.job_stalled_after_ms"),
        "{stalled}"
    );
}

#[test]
fn help_names_the_environment_each_subcommand_reads() {
    let help = |subcommand: &str| {
        let out = worker().args([subcommand, "--help"]).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let run = help("run");
    for name in [
        "PROVIDER_TOKEN",
        "AMQP_URL",
        "DATABASE_URL",
        "PROVIDER_BASE_URL",
    ] {
        assert!(run.contains(name), "run --help: {name}\n{run}");
    }
    let console = help("console");
    for name in ["CONSOLE_OPERATOR_TOKEN", "DATABASE_URL", "AMQP_URL"] {
        assert!(console.contains(name), "console --help: {name}\n{console}");
    }
}

#[test]
fn docs_configuration_md_is_what_config_reference_prints_even_with_bad_settings() {
    // A bad setting in the environment: the reference describes the settings, it does not
    // need them to be valid.
    let output = worker()
        .args(["config", "reference"])
        .env("PAYMENT_LINK_WORKER__BROKER__PREFECH", "4")
        .output()
        .expect("binary runs");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("### `broker.prefetch`"), "{printed}");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap_or_default();
    assert!(
        shipped == printed,
        "docs/configuration.md differs from `payment-link-worker config reference`; write it \
         again with `cargo run -q -- config reference > docs/configuration.md`"
    );
}

#[test]
fn a_tools_failure_is_a_plain_line_even_piped_where_the_workers_is_json() {
    // Piped, the log format `auto` writes JSON lines: right for `run`, whose stderr a log
    // collector reads; a tool's error is read by a person or a script.
    let unreachable = "postgres://postgres@127.0.0.1:1/links";
    let tool = stderr_of(worker().arg("status").env("DATABASE_URL", unreachable));
    assert!(
        tool.starts_with("payment-link-worker: ") && tool.lines().count() == 1,
        "{tool}"
    );
    let service = stderr_of(
        worker()
            .arg("run")
            .env("PROVIDER_TOKEN", "t")
            .env("DATABASE_URL", unreachable),
    );
    assert!(service.trim_start().starts_with("{\""), "{service}");
}

/// The broker's refusals are told apart by their AMQP reply, and the password never shows.
#[test]
fn a_refused_login_and_an_unknown_virtual_host_say_which_it_is_without_the_password() {
    let send = |url: &str| {
        stderr_of(
            worker()
                .args(["send", "--provider-id", "1", "--amount", "1.00"])
                .args(["--description", "d"])
                .env("PAYMENT_LINK_WORKER__BROKER__URL", url),
        )
    };
    let login = send("amqp://guest:not-the-password-7f3a@127.0.0.1:5672/%2f");
    assert!(login.contains("the broker refused the login"), "{login}");
    assert!(!login.contains("not-the-password-7f3a"), "{login}");
    let vhost = send("amqp://guest:guest@127.0.0.1:5672/plw-no-such-vhost");
    assert!(vhost.contains("check the virtual host"), "{vhost}");
}
