//! Guarantee: the on-call engineer's dashboard and alerts (deploy/observability) work against
//! the real thing: every rule passes `promtool check rules`, every alert is shown firing and
//! silent by `promtool test rules` and has a runbook section, and a real Prometheus scraping a
//! running worker and console evaluates every rule and every dashboard query without an error
//! and without naming a metric nobody exports.

use crate::console::RunningConsole;
use crate::helpers::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn observability(file: &str) -> PathBuf {
    repo().join("deploy/observability").join(file)
}

/// A Debian `prometheus` package program, or a failure that says how to get it.
fn prometheus_program(name: &str) -> Command {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} is not installed: install Debian's prometheus package (.ci/run does)"
    );
    Command::new(name)
}

/// The alert names of rules.yml, in order.
fn alert_names() -> Vec<String> {
    let rules = std::fs::read_to_string(observability("rules.yml")).unwrap();
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_alert_passes_promtool_is_tested_firing_and_silent_and_has_a_runbook_section() {
    for args in [
        vec!["check", "rules", "rules.yml"],
        vec!["test", "rules", "rules.test.yml"],
    ] {
        let out = prometheus_program("promtool")
            .args(&args)
            .current_dir(observability(""))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let alerts = alert_names();
    assert!(alerts.len() >= 11, "{alerts:?}");
    // Each alert's tests: one where it fires (an expected alert listed) and one where it is
    // expected silent (`exp_alerts: []`).
    let tests = std::fs::read_to_string(observability("rules.test.yml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let runbook = std::fs::read_to_string(repo().join("docs/runbook.md")).unwrap();
    let rules = std::fs::read_to_string(observability("rules.yml")).unwrap();
    for alert in &alerts {
        let outcomes: Vec<&str> = lines
            .windows(2)
            .filter(|w| w[0] == format!("alertname: {alert}"))
            .map(|w| w[1])
            .collect();
        assert!(
            outcomes.contains(&"exp_alerts:"),
            "{alert} is never tested firing"
        );
        assert!(
            outcomes.contains(&"exp_alerts: []"),
            "{alert} is never tested silent"
        );
        let anchor = alert.to_lowercase();
        assert!(
            rules.contains(&format!("runbook_url: docs/runbook.md#{anchor}")),
            "{alert} has no runbook_url to its section"
        );
        assert!(
            runbook.contains(&format!("\n## {alert}\n")),
            "docs/runbook.md has no section for {alert}"
        );
        for part in ["**Means:**", "**Confirm:**", "**Act"] {
            let section = runbook
                .split(&format!("\n## {alert}\n"))
                .nth(1)
                .unwrap()
                .split("\n## ")
                .next()
                .unwrap();
            assert!(section.contains(part), "{alert}'s section lacks {part}");
        }
    }
}

/// The dashboard's queries, with Grafana's variables given values Prometheus takes.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(observability("dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "the dashboard has a Prometheus datasource variable"
    );
    let rows: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        rows,
        [
            "Flow",
            "Provider",
            "Broker and database",
            "Dead letters and replays",
            "Fleet"
        ]
    );
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            queries.push((
                format!("panel {:?}", panel["title"].as_str().unwrap()),
                expr.replace("$__rate_interval", "1m"),
            ));
        }
    }
    queries
}

/// The expressions of rules.yml's recording rules and alerts, as Prometheus loaded them.
fn loaded_rules(rules: &Value) -> Vec<(String, String)> {
    rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| {
            (
                format!("rule {}", r["name"].as_str().unwrap()),
                r["query"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The metric names a PromQL expression reads: what is left once strings, label matchers,
/// ranges, groupings, functions, keywords and numbers are taken out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let grouping =
        regex::Regex::new(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
            .unwrap();
    let strings = regex::Regex::new(r#""[^"]*"|\{[^}]*\}|\[[^\]]*\]"#).unwrap();
    let expr = strings.replace_all(expr, " ");
    let expr = grouping.replace_all(&expr, " ");
    // Numbers and durations (`1/60`, `1h`) are words that start with a digit.
    let word = regex::Regex::new(r"[A-Za-z0-9_:.]+(\s*\()?").unwrap();
    let keywords = [
        "and", "or", "unless", "bool", "offset", "by", "without", "inf", "nan",
    ];
    word.find_iter(&expr)
        .map(|m| m.as_str())
        .filter(|w| !w.ends_with('(') && !w.starts_with(|c: char| c.is_ascii_digit() || c == '.'))
        .filter(|w| !keywords.contains(&w.to_lowercase().as_str()))
        .map(str::to_owned)
        .collect()
}

/// Metrics the rules read from other exporters (kube-state-metrics), and Prometheus's own.
const NOT_OURS: [&str; 3] = [
    "kube_deployment_status_replicas_available",
    "kube_deployment_spec_replicas",
    "ALERTS",
];

async fn api(base: &str, path: &str, query: &[(&str, &str)]) -> Value {
    // reqwest is built without its query feature: the query string is encoded here.
    let query = serde_urlencoded::to_string(query).unwrap();
    let answer = reqwest::Client::new()
        .get(format!("{base}{path}?{query}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let body: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_evaluates_every_rule_and_dashboard_query_against_a_running_worker() {
    let provider = wiremock::MockServer::start().await;
    answer_with_link(&provider, 201, 1, "2.00", 1).await;
    let env = TestEnv::with(&provider.uri(), &[("TELEMETRY__LEVELS_INTERVAL_MS", "200")]).await;
    // The binary's tracing (this test has its own process under nextest): commands belong to
    // traces, whose ids the latency histograms' exemplars carry.
    let _telemetry = payment_link_worker::telemetry::init(&env.settings.log).unwrap();
    let _events = env.capture_events().await;
    let worker = env.start_worker().await;
    let console = RunningConsole::start(&env.settings).await;
    // Traffic for every family: links, a dead letter, a refused console token.
    // Stamped with their publish time, so the queue-wait histogram has samples, and each in a
    // trace of its own.
    let traces: Vec<String> = (0..5u128)
        .map(|i| format!("{:032x}", 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_0000 + i))
        .collect();
    for (i, trace) in traces.iter().enumerate() {
        let stamped = with_int_header(
            command_properties(&format!("prom-{i}")),
            "timestamp_in_ms",
            chrono::Utc::now().timestamp_millis(),
        );
        let stamped = with_header(
            stamped,
            "traceparent",
            &format!("00-{trace}-00f067aa0ba902b7-01"),
        );
        env.publish_raw(stamped, command_body("2.00", 1).as_bytes())
            .await;
    }
    env.send("prom-bad", r#"{"paymentProviderId":"x"}"#).await;
    let refused = reqwest::Client::new()
        .get(format!("{}/api/dead-letters", console.base))
        .bearer_auth("not-a-token-anybody-has-0000")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    eventually("the commands to reach their outcomes", WAIT, || async {
        let metrics = worker.metrics();
        (metrics.contains("payment_link_provider_calls_total{")
            && metrics
                .contains("payment_link_commands_dead_lettered_total{error_type=\"validation\""))
        .then_some(())
    })
    .await;

    let dir = std::env::temp_dir().join(format!("plw-prometheus-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n\
             \x20 - job_name: worker\n    static_configs: [{{targets: [\"{worker}\"]}}]\n\
             \x20 - job_name: console\n    static_configs: [{{targets: [\"{console}\"]}}]\n",
            rules = observability("rules.yml").display().to_string(),
            worker = worker.http_addr().unwrap(),
            console = console.base.trim_start_matches("http://"),
        ),
    )
    .unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _prometheus = Reaped::new(
        prometheus_program("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .arg("--enable-feature=exemplar-storage")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let limit = Duration::from_secs(60);
    eventually(
        "Prometheus to scrape the worker and the console",
        limit,
        || async {
            let targets = reqwest::get(format!("{base}/api/v1/targets")).await.ok()?;
            let targets: Value = serde_json::from_str(&targets.text().await.ok()?).ok()?;
            let active = targets["data"]["activeTargets"].as_array()?.clone();
            (active.len() == 2 && active.iter().all(|t| t["health"] == "up")).then_some(())
        },
    )
    .await;
    // Every rule evaluated at least twice over scraped data, without an error.
    let rules = eventually("every rule to be evaluated", limit, || async {
        let rules = api(&base, "/api/v1/rules", &[]).await;
        let all: Vec<Value> = rules["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        let evaluated = all.iter().all(|r| {
            r["lastEvaluation"]
                .as_str()
                .is_some_and(|t| !t.starts_with("0001"))
        });
        (evaluated && !all.is_empty()).then_some(rules)
    })
    .await;
    // A few scrapes of every target, so that rate() over them has points to work with.
    eventually("three scrapes of each target", limit, || async {
        let answer = api(
            &base,
            "/api/v1/query",
            &[("query", "min(count_over_time(up[5m]))")],
        )
        .await;
        let scrapes: f64 = answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()?;
        (scrapes >= 3.0).then_some(())
    })
    .await;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{rule}");
        }
    }
    let alerts = alert_names();
    let loaded = loaded_rules(&rules);
    assert!(
        alerts
            .iter()
            .all(|a| loaded.iter().any(|(name, _)| name == &format!("rule {a}"))),
        "Prometheus loaded every alert: {loaded:?}"
    );

    let exported: BTreeSet<String> = serde_json::from_value(
        api(&base, "/api/v1/label/__name__/values", &[]).await["data"].clone(),
    )
    .unwrap();
    let recorded: BTreeSet<String> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .filter(|r| r["type"] == "recording")
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    let mut problems = Vec::new();
    let mut checked = 0;
    for (what, expr) in dashboard_queries().into_iter().chain(loaded) {
        let answer = api(&base, "/api/v1/query", &[("query", &expr)]).await;
        if answer["status"] != "success" {
            problems.push(format!("{what}: {expr}: {}", answer["error"]));
        }
        for name in metric_names(&expr) {
            if !exported.contains(&name)
                && !recorded.contains(&name)
                && !NOT_OURS.contains(&name.as_str())
            {
                problems.push(format!("{what}: {expr}: nobody exports {name}"));
            }
        }
        checked += 1;
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(checked > 40, "{checked} queries checked");
    // What the queries read is there: the figures of the traffic above.
    let created = api(
        &base,
        "/api/v1/query",
        &[("query", "sum(payment_link_commands_succeeded_total)")],
    )
    .await;
    assert_eq!(created["data"]["result"][0]["value"][1], "5", "{created}");

    // Scraped as OpenMetrics, the latency histograms brought the traces of the commands above.
    let now = chrono::Utc::now().timestamp();
    for family in [
        "http_client_request_duration_seconds_bucket",
        "payment_link_command_time_to_outcome_seconds_bucket",
    ] {
        let (start, end) = ((now - 600).to_string(), (now + 60).to_string());
        let found = api(
            &base,
            "/api/v1/query_exemplars",
            &[("query", family), ("start", &start), ("end", &end)],
        )
        .await;
        let ids: Vec<&str> = found["data"]
            .as_array()
            .unwrap_or_else(|| panic!("{found}"))
            .iter()
            .flat_map(|series| series["exemplars"].as_array().unwrap().iter())
            .filter_map(|e| e["labels"]["trace_id"].as_str())
            .collect();
        assert!(
            ids.iter().any(|id| traces.iter().any(|t| t == id)),
            "{family}: exemplars {ids:?}, commands' traces {traces:?}"
        );
    }

    drop(_prometheus);
    let _ = std::fs::remove_dir_all(&dir);
    console.stop().await;
    worker.stop().await.unwrap();
}

#[test]
fn metric_names_are_read_from_an_expression_as_prometheus_would() {
    let names = metric_names(
        r#"sum by (le, outcome) (rate(a_bucket{x="y"}[5m])) / on () b > 3 * c:rec:rate1d and time() - d offset 1h"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["a_bucket", "b", "c:rec:rate1d", "d"]
    );
}
