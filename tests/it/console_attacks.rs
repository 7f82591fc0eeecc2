//! The console under attack: clients that hold connections open, guess tokens, sign people in
//! or out from another site, send huge or invalid input, or hide characters in what operators
//! read. Each is bounded or refused, and real operators are still served.

use crate::console::{OPERATOR, RunningConsole, sign_in, with_json, with_token_form};
use crate::helpers::*;
use crate::operations::{INGEST, stored};
use payment_link_worker::broker::messages::OutboundMessage;
use payment_link_worker::broker::publisher::publish_confirmed;
use payment_link_worker::config::Settings;
use payment_link_worker::console::token_sha256;
use payment_link_worker::dead_letters::store::Filter;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A GET with `token` as the bearer token.
async fn get_as(url: &str, token: &str) -> reqwest::Response {
    client().get(url).bearer_auth(token).send().await.unwrap()
}

fn with_console(env: &TestEnv, change: impl FnOnce(&mut Settings)) -> Settings {
    let mut settings = env.settings.clone();
    change(&mut settings);
    settings
}

/// Reads until the peer closes the connection; how long that took, or `None` past `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

fn address(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_clients_are_cut_off_and_cannot_keep_operators_out() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let settings = with_console(&env, |s| {
        s.console.header_read_timeout_ms = 1000;
        s.console.request_timeout_ms = 1000;
        s.console.max_connections = 8;
        s.console.keep_alive_idle_ms = 30_000;
    });
    let console = RunningConsole::start(&settings).await;
    let at = address(&console.base);

    // Half a request line, then nothing: closed once the head's time is up.
    let mut half = TcpStream::connect(&at).await.unwrap();
    half.write_all(b"GET /login HT").await.unwrap();
    let took = closed_within(&mut half, Duration::from_secs(5)).await;
    assert!(
        took.is_some(),
        "a half-sent request is still open after 5 s"
    );

    // Five times the connection limit held half-sent: a real request is still answered.
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut stream = TcpStream::connect(&at).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(stream);
    }
    let answer = client()
        .get(format!("{}/login", console.base))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("answered while 40 half-sent requests are held");
    assert_eq!(answer.status(), 200);

    // A body that never comes: the whole request's time runs out (408).
    let mut slow = TcpStream::connect(&at).await.unwrap();
    slow.write_all(
        format!(
            "POST /api/replays HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPERATOR}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"ids\":"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut answer))
        .await
        .expect("answered within 5 s")
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("content-security-policy"), "{head}");
    drop(held);
    console.stop().await;

    // A kept-alive connection on which nothing moves is closed.
    let settings = with_console(&env, |s| s.console.keep_alive_idle_ms = 1000);
    let console = RunningConsole::start(&settings).await;
    let mut idle = TcpStream::connect(address(&console.base)).await.unwrap();
    idle.write_all(b"GET /static/console.css HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let took = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(
        took.is_some_and(|t| t >= Duration::from_millis(800)),
        "closed after about a second of idling, not at once nor never: {took:?}"
    );
    console.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_or_invalid_input_is_refused_with_the_reason_and_every_answer_is_secured() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let console = RunningConsole::start(&env.settings).await;
    let base = &console.base;
    let secured = |answer: &reqwest::Response| {
        let csp = answer.headers()["content-security-policy"]
            .to_str()
            .unwrap();
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert_eq!(answer.headers()["x-frame-options"], "DENY");
    };

    // The HTTP layer's own refusals carry the security headers too.
    let long = client()
        .get(format!("{base}/login?{}", "a".repeat(9 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 414);
    secured(&long);
    let large = client()
        .get(format!("{base}/login"))
        .header("x-large", "b".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(large.status(), 431);
    secured(&large);

    // Pages run no inline script or style: the policy would refuse an injected one.
    let page = get_as(&format!("{base}/dead-letters"), OPERATOR).await;
    secured(&page);
    let html = page.text().await.unwrap();
    assert!(html.contains("<script src=\"/static/console.js\"></script>"));
    assert!(!html.contains("<script>") && !html.contains("<style>") && !html.contains(" style="));

    // Too many ids, a body past the limit, NUL characters: refused, saying what is wrong.
    let replay = |body: String| {
        client()
            .post(format!("{base}/api/replays"))
            .bearer_auth(OPERATOR)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let ids: Vec<i64> = (1..=10_001).collect();
    let answer = replay(json!({"ids": ids, "dryRun": true}).to_string())
        .await
        .unwrap();
    assert_eq!(answer.status(), 422);
    assert!(answer.text().await.unwrap().contains("at most 10000 ids"));
    let answer = replay(json!({"ids": ids[..10_000], "dryRun": true}).to_string())
        .await
        .unwrap();
    assert_eq!(answer.status(), 202, "10,000 ids are taken");
    let million = format!("{{\"ids\":[{}1]}}", "1,".repeat(1_000_000));
    let answer = replay(million).await.unwrap();
    assert_eq!(answer.status(), 413);
    let answer = replay(json!({"filter": {"search": "a\u{0}b"}}).to_string())
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    assert!(answer.text().await.unwrap().contains("NUL"));
    for path in [
        "/api/dead-letters?q=%00",
        "/dead-letters?q=%00",
        "/api/dead-letters?commandId=x%00",
    ] {
        let answer = get_as(&format!("{base}{path}"), OPERATOR).await;
        assert_eq!(answer.status(), 400, "{path}");
        assert!(answer.text().await.unwrap().contains("NUL"), "{path}");
    }
    // A query or a path that does not parse is refused in the API's one shape, `{"error": why}`,
    // saying what is wrong (it was axum's plain text).
    for path in [
        "/api/replays/1/letters?limit=abc",
        "/api/replays/1/letters?after=1e99",
        "/api/audit?before=x",
        "/api/replays/abc",
        "/api/replays/99999999999999999999/letters",
        "/api/dead-letters/abc",
        "/api/audit/-x",
        "/dead-letters/abc",
    ] {
        let answer = get_as(&format!("{base}{path}"), OPERATOR).await;
        assert_eq!(answer.status(), 400, "{path}");
        let text = answer.text().await.unwrap();
        let why: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path} was not answered in JSON: {text}"));
        let why = why["error"].as_str().unwrap_or_default();
        assert!(
            why.contains("parse") || why.contains("invalid"),
            "{path}: {why}"
        );
    }
    console.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_out_ends_the_session_and_another_site_cannot_sign_anyone_in() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let console = RunningConsole::start(&env.settings).await;
    let base = &console.base;

    // Sign-out with a wrong CSRF field: the session is over on the server too.
    let (cookie, _csrf) = sign_in(base, OPERATOR).await;
    let out = client()
        .post(format!("{base}/logout"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=wrong")
        .send()
        .await
        .unwrap();
    assert!(out.status().is_redirection());
    let after = client()
        .get(format!("{base}/api/dead-letters"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401, "the old session no longer works");

    // A sign-in form posted from another site is refused, whatever the token.
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let answer = with_token_form(client().post(format!("{base}/login")), OPERATOR)
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 403, "{name}: {value}");
        assert!(answer.headers().get("set-cookie").is_none());
    }
    let own = format!("http://{}", address(base));
    let answer = with_token_form(client().post(format!("{base}/login")), OPERATOR)
        .header("origin", own)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_redirection(), "{}", answer.status());
    console.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_tokens_are_throttled_logged_counted_and_audited_without_the_token() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = "a-console-token-of-thirty-two-ch";
    let child = binary(&env)
        .arg("console")
        .env("CONSOLE_OPERATOR_TOKEN", token)
        .env(
            "PAYMENT_LINK_WORKER__CONSOLE__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("PAYMENT_LINK_WORKER__CONSOLE__AUTH_FAILURES_ALLOWED", "3")
        .env("PAYMENT_LINK_WORKER__LOG__FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    eventually("the console to answer", WAIT, || async {
        reqwest::get(format!("{base}/login")).await.ok().map(|_| ())
    })
    .await;
    // The figures are there before anything was refused.
    let before = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        before.contains("console_auth_failures_total{how=\"sign-in\",outcome=\"refused\"} 0"),
        "{before}"
    );

    let guess = "guess-0000-this-is-not-the-token";
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let answer = get_as(&format!("{base}/api/dead-letters"), guess).await;
        statuses.push(answer.status().as_u16());
        if answer.status() == 429 {
            retry_after = answer.headers().get("retry-after").cloned();
        }
    }
    assert_eq!(statuses, [401, 401, 401, 401, 429, 429]);
    assert!(retry_after.is_some_and(|r| r.to_str().unwrap().parse::<u64>().unwrap() >= 1));
    // While blocked even the right token is not looked at, nor a sign-in form.
    let right = get_as(&format!("{base}/api/dead-letters"), token).await;
    assert_eq!(right.status(), 429);
    let form = with_token_form(client().post(format!("{base}/login")), guess)
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 429);
    assert!(form.headers().contains_key("retry-after"));

    let figures = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        figures.contains("console_auth_failures_total{how=\"bearer\",outcome=\"refused\"} 4"),
        "{figures}"
    );
    assert!(
        figures.contains("console_auth_failures_total{how=\"bearer\",outcome=\"throttled\"} 3"),
        "{figures}"
    );

    // Once the block has passed (a second), the right token works and clears the address;
    // tries while it lasts are answered 429 and count for nothing.
    eventually(
        "the right token answered once the block passed",
        WAIT,
        || async {
            let status = get_as(&format!("{base}/api/dead-letters"), token)
                .await
                .status();
            (status == 200).then_some(())
        },
    )
    .await;

    // In the audit log with the address and the count, summed per address and window (one or
    // two entries, as the window fell); in the log at warn, never the token.
    let refused = eventually("the refusals in the audit log", WAIT, || async {
        let mut conn = env.pool.get().await.ok()?;
        let log = payment_link_worker::store::audit::page(&mut conn, 100, None)
            .await
            .ok()?;
        let refused: Vec<_> = log
            .into_iter()
            .filter(|e| e.action == "bearer-refused")
            .collect();
        (refused.iter().map(|e| e.count).sum::<i32>() == 4).then_some(refused)
    })
    .await;
    assert!(refused.len() <= 2, "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|e| e.client_address.as_deref() == Some("127.0.0.1"))
    );
    let stderr = { terminate_keep(child) };
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("console authentication refused"))
        .collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("\"WARN\"") && l.contains("127.0.0.1")),
        "{stderr}"
    );
    assert!(
        !stderr.contains(guess) && !stderr.contains(token),
        "{stderr}"
    );
}

/// Stops the console with SIGTERM and returns what it wrote to stderr.
fn terminate_keep(child: std::process::Child) -> String {
    let pid = child.id();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn hash_token_refuses_a_short_token_and_prints_the_operator_lines() {
    let run = |token: &str, args: &[&str]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_payment-link-worker"))
            .args(["console", "hash-token"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{token}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let short = run("twenty-three-characters", &[]);
    assert!(!short.status.success());
    let said = String::from_utf8_lossy(&short.stderr);
    assert!(said.contains("at least 24"), "{said}");
    assert!(!said.contains("twenty-three-characters"), "{said}");
    let token = "twenty-four-characters!!";
    let ok = run(token, &["--name", "alice", "--role", "viewer"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let lines = String::from_utf8(ok.stdout).unwrap();
    assert_eq!(
        lines,
        format!(
            "[[console.operators]]\nname = \"alice\"\nrole = \"viewer\"\ntoken_sha256 = \"{}\"\n",
            token_sha256(token)
        )
    );
    // What it prints is a configuration the console takes.
    let parsed: toml::Value = toml::from_str(&lines).unwrap();
    assert_eq!(
        parsed["console"]["operators"][0]["name"].as_str(),
        Some("alice")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hidden_characters_are_shown_and_the_audit_stays_small_however_large_its_entries() {
    let env = TestEnv::with("http://127.0.0.1:9", &[INGEST]).await;
    let sneaky = "bidi-\u{202E}gpj.exe";
    let mut message = OutboundMessage {
        exchange: env.settings.broker.dead_letter_exchange.clone(),
        routing_key: env.settings.broker.command_routing_key.clone(),
        properties: command_properties(sneaky),
        body: command_body("1.00", 1).into_bytes(),
    };
    message.properties = with_header(message.properties, "x-dead-letter-id", "sneaky-1");
    message.properties = with_header(message.properties, "x-error-kind", "validation");
    message.properties = with_header(message.properties, "x-error-message", "bad \u{2066}note");
    publish_confirmed(&env.channel, &message).await.unwrap();
    let _worker = env.start_worker().await;
    stored(&env, &Filter::default(), 1).await;
    let console = RunningConsole::start(&env.settings).await;
    let base = &console.base;
    let page = |path: String| async move { get_as(&path, OPERATOR).await.text().await.unwrap() };
    let list = page(format!("{base}/dead-letters")).await;
    let id = list
        .split("<tr data-id=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    let detail = page(format!("{base}/dead-letters/{id}")).await;
    for html in [&list, &detail] {
        assert!(html.contains("bidi-⟨U+202E⟩gpj.exe"), "{html}");
        assert!(html.contains("bad ⟨U+2066⟩note"), "{html}");
        assert!(!html.contains('\u{202E}') && !html.contains('\u{2066}'));
    }

    // Three replays of 10,000 ids each, and one old entry as large as a million ids made it.
    let mut conn = env.pool.get().await.unwrap();
    for _ in 0..3 {
        let ids: Vec<i64> = (1..=10_000).collect();
        let answer = with_json(
            client()
                .post(format!("{base}/api/replays"))
                .bearer_auth(OPERATOR),
            &json!({"ids": ids, "dryRun": true}),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(answer.status(), 202);
    }
    let huge = format!(
        "[{}]",
        (1..200_000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    exec_admin(
        env.settings.database.url.expose(),
        &format!(
            "INSERT INTO audit_log (actor, source, action, filter, count, ids) VALUES \
             ('old', 'console', 'replay', '{{\"ids\": {huge}}}', 199999, ARRAY(SELECT generate_series(1, 199999)::bigint))"
        ),
    )
    .await;
    let stored_filters: Vec<usize> = payment_link_worker::store::replay_runs::newest(&mut conn, 3)
        .await
        .unwrap()
        .iter()
        .map(|r| r.filter.as_ref().unwrap().to_string().len())
        .collect();
    assert!(
        stored_filters.iter().all(|n| *n < 2000),
        "{stored_filters:?}"
    );
    let audit_html = page(format!("{base}/audit")).await;
    assert!(audit_html.len() < 100_000, "{} bytes", audit_html.len());
    assert!(audit_html.contains("the whole entry"));
    let api: Value = serde_json::from_str(&page(format!("{base}/api/audit")).await).unwrap();
    let old = api["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["actor"] == "old")
        .unwrap();
    assert_eq!(old["idsCount"].as_i64(), Some(199_999));
    assert_eq!(old["ids"].as_array().unwrap().len(), 100);
    assert!(
        api.to_string().len() < 100_000,
        "{} bytes",
        api.to_string().len()
    );
    let whole: Value =
        serde_json::from_str(&page(format!("{base}/api/audit/{}", old["id"])).await).unwrap();
    assert_eq!(whole["ids"].as_array().unwrap().len(), 199_999);
    console.stop().await;
}

/// A client that connects from `from` (a loopback address of the test's choosing).
fn client_from(from: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(std::net::IpAddr::from(from))
        .build()
        .unwrap()
}

async fn status_from(from: [u8; 4], url: &str, token: &str) -> u16 {
    client_from(from)
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_tokens_slow_an_address_and_a_flood_but_never_shut_out_the_right_token() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let settings = with_console(&env, |s| {
        s.console.auth_failures_allowed = 5;
        s.console.auth_failures_per_minute = 40;
    });
    let console = RunningConsole::start(&settings).await;
    let url = format!("{}/api/dead-letters", console.base);

    // Wrong tokens from one address (say, a NAT shared with an attacker): past the allowance,
    // one try a second is looked at, however many came before; the right token from the same
    // address is paced like the rest, never shut out.
    let nat = [127, 0, 0, 21];
    let guess = "guess-0000-this-is-not-the-token";
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(status_from(nat, &url, guess).await);
    }
    assert_eq!(
        statuses[..6],
        [401, 401, 401, 401, 401, 401],
        "{statuses:?}"
    );
    assert!(statuses[6..].iter().all(|s| *s == 429), "{statuses:?}");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1050)).await;
        assert_eq!(
            status_from(nat, &url, guess).await,
            401,
            "looked at, a second on"
        );
    }
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(
        status_from(nat, &url, OPERATOR).await,
        200,
        "the right token a second after the last wrong one"
    );

    // An operator signs in from another address; then wrong tokens from 30 more addresses, each
    // under its own allowance, fill the minute's budget (40, the first address's 10 included)
    // for all of them together.
    let operator = [127, 0, 0, 22];
    assert_eq!(status_from(operator, &url, OPERATOR).await, 200);
    for i in 0..30u8 {
        let status = status_from([127, 0, 1, i], &url, "guess-0000-this-is-not-the-token").await;
        assert_eq!(status, 401, "address {i} within its own allowance");
    }
    // A new address shares one try a second with every other new one; the operator's is spared.
    let first = status_from([127, 0, 2, 1], &url, "guess-0000-this-is-not-the-token").await;
    let second = status_from([127, 0, 2, 2], &url, "guess-0000-this-is-not-the-token").await;
    assert_eq!((first, second), (401, 429));
    assert_eq!(status_from(operator, &url, OPERATOR).await, 200);
    assert_eq!(status_from(operator, &url, OPERATOR).await, 200);
    console.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_public_host_set_a_request_naming_another_host_is_refused() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let settings = with_console(&env, |s| s.console.public_host = "console.test:8088".into());
    let console = RunningConsole::start(&settings).await;
    let get = |host: &'static str| {
        let url = format!("{}/login", console.base);
        async move {
            client()
                .get(url)
                .header("host", host)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get("attacker.example").await, 421);
    assert_eq!(get("console.test:8088").await, 200);
    assert_eq!(get("CONSOLE.test:8088").await, 200);
    console.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_trickling_sign_in_bodies_from_one_client_cannot_keep_others_out() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let settings = with_console(&env, |s| {
        s.console.max_connections = 16;
        s.console.max_connections_per_address = 4;
        s.console.header_read_timeout_ms = 2000;
        s.console.request_timeout_ms = 30_000;
    });
    let console = RunningConsole::start(&settings).await;
    let at: std::net::SocketAddr = address(&console.base).parse().unwrap();
    // One client opens 60 connections, each sending a 100 KB sign-in body a byte at a time,
    // and keeps reopening them.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut attackers = Vec::new();
    for _ in 0..60 {
        let stop = stop.clone();
        attackers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.31:0".parse().unwrap()).unwrap();
                let Ok(mut stream) = socket.connect(at).await else {
                    continue;
                };
                let head = "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: \
                            application/x-www-form-urlencoded\r\nContent-Length: 102400\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    continue;
                }
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    if stream.write_all(b"t").await.is_err() {
                        break;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Another client is answered, again and again, while the trickle goes on.
    for _ in 0..5 {
        let started = Instant::now();
        let answer = client_from([127, 0, 0, 32])
            .get(format!("{}/login", console.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("answered beside 60 trickling connections");
        assert_eq!(answer.status(), 200, "after {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    for attacker in attackers {
        let _ = attacker.await;
    }
    console.stop().await;
}

#[test]
fn hash_token_at_a_terminal_does_not_echo_the_token() {
    use std::io::{Read as _, Write as _};
    let token = "typed-at-a-terminal-0123456789";
    // util-linux `script` gives the command a pseudo-terminal fed from this test's pipe.
    let command = format!(
        "{} console hash-token --name tess",
        env!("CARGO_BIN_EXE_payment-link-worker")
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("util-linux script runs");
    let mut stdout = child.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    // The token is typed only once the prompt shows (echo is off by then).
    let started = std::time::Instant::now();
    while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("token (not shown)") {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "no prompt: {}",
            String::from_utf8_lossy(&seen.lock().unwrap())
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{token}\r").as_bytes()).unwrap();
    stdin.flush().unwrap();
    let status = child.wait().unwrap();
    drop(stdin);
    reader.join().unwrap();
    let screen = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(status.success(), "{screen}");
    assert!(
        screen.contains(&token_sha256(token)),
        "the operator lines: {screen}"
    );
    assert!(!screen.contains(token), "the token was echoed: {screen}");
}
