//! The Kubernetes manifests (deploy/kubernetes), checked without a cluster: every overlay built
//! by kustomize validates against the Kubernetes API schemas and the operators' CRDs and passes
//! checkov (deploy/kubernetes/check/check.py); what the manifests say agrees with the code and
//! the configuration they ship; a replica that does not migrate waits for the migration Job.
//! The checkers are pinned Python tools installed by `.ci/deploy-tools`; without them these
//! tests fail, saying so.

use crate::helpers::{Reaped, TestEnv, binary, eventually, exec_admin, terminate};
use payment_link_worker::config::Settings;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The keys of the Secret `payment-link-worker` that the manifests may read (docs/kubernetes.md).
const SECRET_KEYS: [&str; 7] = [
    "PROVIDER_BASE_URL",
    "PROVIDER_TOKEN",
    "AMQP_URL",
    "RABBITMQ_SCALER_URL",
    "DATABASE_URL",
    "CONSOLE_OPERATOR_TOKEN",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the checkers' environment (`.ci/deploy-tools`).
fn python() -> PathBuf {
    let tools = std::env::var_os("PLW_DEPLOY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
            cache.join("payment-link-worker/deploy-tools")
        });
    let python = tools.join("bin/python");
    assert!(
        python.exists(),
        "the manifest checkers are not installed at {}: run .ci/deploy-tools",
        tools.display()
    );
    python
}

fn check_script() -> PathBuf {
    repo().join("deploy/kubernetes/check/check.py")
}

/// The objects kustomize builds for `overlay` (`base`, `production`, `operators`).
fn rendered(overlay: &str) -> Vec<Value> {
    let out = std::process::Command::new(python())
        .arg(check_script())
        .args(["--render", overlay])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rendering {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The settings the pods load: the defaults, the ConfigMap's file, and nothing else.
fn shipped_settings(objects: &[Value]) -> (Settings, String) {
    let config_map = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("payment-link-worker-config")
        })
        .expect("the settings ConfigMap");
    let (file, text) = config_map["data"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    let path = std::env::temp_dir().join(format!("plw-k8s-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, text.as_str().unwrap()).unwrap();
    let settings = Settings::load_from(Some(&path), Vec::new());
    let _ = std::fs::remove_file(&path);
    (
        settings.expect("the ConfigMap's settings load"),
        file.clone(),
    )
}

fn port_of(listen: &str) -> i64 {
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The container port a probe or a Service names (by name or by number).
fn resolve_port(container: &Value, port: &Value) -> i64 {
    if let Some(number) = port.as_i64() {
        return number;
    }
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == *port)
        .unwrap_or_else(|| panic!("no port named {port}"))["containerPort"]
        .as_i64()
        .unwrap()
}

/// The names the container's environment defines, in order, checking on the way that every
/// `$(NAME)` reference names one defined before it (Kubernetes expands only those) and every
/// key read from our Secret is one docs/kubernetes.md documents.
fn environment(container: &Value) -> Vec<String> {
    let mut defined: Vec<String> = Vec::new();
    let reference = regex::Regex::new(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)").unwrap();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        if let Some(value) = var["value"].as_str() {
            for used in reference.captures_iter(value) {
                assert!(
                    defined.iter().any(|d| d == &used[1]),
                    "{name} uses $({}) before it is defined",
                    &used[1]
                );
            }
        }
        let secret = &var["valueFrom"]["secretKeyRef"];
        if secret["name"] == "payment-link-worker" {
            let key = secret["key"].as_str().unwrap();
            assert!(SECRET_KEYS.contains(&key), "undocumented Secret key {key}");
        }
        defined.push(name);
    }
    defined
}

/// The container reads `--config <mount>/<file>` from the settings ConfigMap.
fn reads_config(workload: &Value, container: &Value, file: &str, subcommand: &str) {
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], subcommand);
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap();
    let expected = format!("{}/{file}", mount["mountPath"].as_str().unwrap());
    assert_eq!(args[1..], ["--config", expected.as_str()]);
    let volume = workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert!(
        volume["configMap"]["name"]
            .as_str()
            .unwrap()
            .starts_with("payment-link-worker-config")
    );
}

fn probe(container: &Value, which: &str) -> (String, i64) {
    let get = &container[which]["httpGet"];
    (
        get["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{which}"))
            .to_owned(),
        resolve_port(container, &get["port"]),
    )
}

#[test]
fn every_overlay_validates_against_the_kubernetes_and_operator_schemas_and_passes_checkov() {
    let out = std::process::Command::new(python())
        .arg(check_script())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("manifests: all checks passed"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for overlay in ["base:", "production:", "operators:"] {
        assert!(text.contains(overlay), "{overlay} was not checked: {text}");
    }
}

#[test]
fn the_rendered_manifests_agree_with_the_code() {
    for overlay in ["base", "production", "operators"] {
        let objects = rendered(overlay);
        let (settings, file) = shipped_settings(&objects);
        // Migrations: the Job runs them, the long-running processes do not.
        assert!(!settings.database.run_migrations, "{overlay}");
        let job = find(&objects, "Job", "payment-link-worker-migrate").expect("the migration Job");
        reads_config(job, container(job, "migrate"), &file, "migrate");

        // The worker: probes on the health port, the grace period above the longest stop.
        let worker = find(&objects, "Deployment", "payment-link-worker").unwrap();
        let main = container(worker, "worker");
        reads_config(worker, main, &file, "run");
        let health = port_of(&settings.telemetry.http_listen);
        assert_eq!(probe(main, "livenessProbe"), ("/healthz".into(), health));
        assert_eq!(probe(main, "startupProbe"), ("/healthz".into(), health));
        assert_eq!(probe(main, "readinessProbe"), ("/readyz".into(), health));
        let grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        let longest = payment_link_worker::consumer::longest_stop(&settings);
        assert!(
            Duration::from_secs(grace) > longest,
            "{overlay}: terminationGracePeriodSeconds {grace} s is not above the worker's \
             longest stop, {longest:?}"
        );
        let worker_env = environment(main);
        for needed in [
            "PROVIDER_TOKEN",
            "PROVIDER_BASE_URL",
            "AMQP_URL",
            "DATABASE_URL",
        ] {
            assert!(
                worker_env.iter().any(|n| n == needed),
                "{overlay}: {needed}"
            );
        }
        assert!(
            worker.pointer("/spec/replicas").is_none(),
            "{overlay}: the autoscaler owns the worker's replica count"
        );

        // KEDA: the queue the worker consumes, a target of 4 x prefetch, a host the worker's
        // environment holds, a cool-down longer than the 300 s delay tier.
        let scaled = find(&objects, "ScaledObject", "payment-link-worker").unwrap();
        assert_eq!(
            scaled["spec"]["scaleTargetRef"]["name"],
            "payment-link-worker"
        );
        let trigger = &scaled["spec"]["triggers"][0];
        assert_eq!(trigger["type"], "rabbitmq");
        let meta = &trigger["metadata"];
        assert_eq!(meta["queueName"], settings.broker.command_queue.as_str());
        assert_eq!(meta["mode"], "QueueLength");
        assert_eq!(meta["protocol"], "amqp");
        assert_eq!(
            meta["value"],
            (4 * settings.broker.prefetch).to_string().as_str()
        );
        let host = meta["hostFromEnv"].as_str().unwrap();
        assert!(worker_env.iter().any(|n| n == host), "{overlay}: {host}");
        let min_workers = scaled["spec"]["minReplicaCount"].as_i64().unwrap();
        assert!(min_workers >= 1);
        let tiers = &settings.retry.delay_tiers_ms;
        let cooldown = scaled["spec"]["cooldownPeriod"].as_u64().unwrap() * 1000;
        let down = scaled
            .pointer("/spec/advanced/horizontalPodAutoscalerConfig/behavior/scaleDown/stabilizationWindowSeconds")
            .and_then(Value::as_u64)
            .unwrap()
            * 1000;
        let tier = tiers.iter().copied().find(|t| *t >= 300_000).unwrap();
        assert!(
            cooldown > tier && down > tier,
            "{overlay}: {cooldown} {down} vs {tier}"
        );

        // The console: its port, probes and Service, its operator token from the Secret.
        let console = find(&objects, "Deployment", "payment-link-console").unwrap();
        let web = container(console, "console");
        reads_config(console, web, &file, "console");
        let listen = port_of(&settings.console.listen);
        assert_eq!(probe(web, "readinessProbe").1, listen);
        assert_eq!(probe(web, "livenessProbe").1, listen);
        assert!(
            environment(web)
                .iter()
                .any(|n| n == "CONSOLE_OPERATOR_TOKEN")
        );
        let service = find(&objects, "Service", "payment-link-console").unwrap();
        assert_eq!(
            resolve_port(web, &service["spec"]["ports"][0]["targetPort"]),
            listen
        );
        environment(container(job, "migrate"));

        // A disruption budget exactly where more than one replica runs.
        let console_replicas = console["spec"]["replicas"].as_i64().unwrap_or(1);
        for (component, replicas) in [("worker", min_workers), ("console", console_replicas)] {
            let budget = objects.iter().find(|o| {
                o["kind"] == "PodDisruptionBudget"
                    && o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
                        == component
            });
            assert_eq!(
                budget.is_some(),
                replicas > 1,
                "{overlay}: {component} has {replicas} replica(s)"
            );
            if let Some(budget) = budget {
                assert_eq!(budget["spec"]["maxUnavailable"], 1);
            }
        }

        // Every pod: non-root, read-only root, no capabilities, the default seccomp profile.
        for workload in [worker, console, job] {
            let pod = &workload["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"],
                "RuntimeDefault"
            );
            assert_eq!(pod["automountServiceAccountToken"], false);
            for c in pod["containers"].as_array().unwrap() {
                let security = &c["securityContext"];
                assert_eq!(security["readOnlyRootFilesystem"], true);
                assert_eq!(security["allowPrivilegeEscalation"], false);
                assert_eq!(security["capabilities"]["drop"][0], "ALL");
            }
        }
    }
    // docs/kubernetes.md names every Secret key a platform team must fill in.
    let guide = std::fs::read_to_string(repo().join("docs/kubernetes.md")).unwrap();
    for key in SECRET_KEYS {
        assert!(guide.contains(key), "docs/kubernetes.md: {key}");
    }
}

/// A worker started with `run_migrations = false` against a database whose newest migration is
/// not applied yet (as when a new version's pods start before its migration Job ran), once it
/// says it waits; with its log's path.
async fn replica_waiting_for_the_schema(env: &TestEnv) -> (Reaped, PathBuf) {
    let database = env.settings.database.url.expose().to_owned();
    // The newest migration undone by its own down.sql, so the test follows each new migration.
    let migrations = repo().join("migrations");
    let newest = std::fs::read_dir(&migrations)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .max()
        .unwrap();
    exec_admin(
        &database,
        &std::fs::read_to_string(newest.join("down.sql")).unwrap(),
    )
    .await;
    exec_admin(
        &database,
        "DELETE FROM __diesel_schema_migrations \
         WHERE version = (SELECT max(version) FROM __diesel_schema_migrations)",
    )
    .await;
    let log = std::env::temp_dir().join(format!("plw-wait-{}.log", env.id));
    let child = binary(env)
        .arg("run")
        .env("PAYMENT_LINK_WORKER__DATABASE__RUN_MIGRATIONS", "false")
        .env("PAYMENT_LINK_WORKER__TELEMETRY__HTTP_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut worker = Reaped::new(child);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(
        "the worker says it waits",
        Duration::from_secs(30),
        || async {
            read()
                .contains("waiting for the database schema")
                .then_some(())
        },
    )
    .await;
    assert!(
        worker.get().try_wait().unwrap().is_none(),
        "the worker exited instead of waiting: {}",
        read()
    );
    assert!(!read().contains("worker started"), "{}", read());
    (worker, log)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_does_not_migrate_waits_for_the_schema_then_starts() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let (worker, log) = replica_waiting_for_the_schema(&env).await;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();

    // The migration Job's command: the worker notices and starts.
    let migrated = crate::helpers::output(binary(&env).arg("migrate"));
    assert!(migrated.contains("applied 1 migration(s)"), "{migrated}");
    eventually("the worker starts", Duration::from_secs(30), || async {
        read().contains("worker started").then_some(())
    })
    .await;
    assert!(read().contains("the database schema is up to date; starting"));
    // Stopped at once after it started: it still drains and exits cleanly (its signal handler
    // is in place before start-up begins).
    terminate(worker.take());
    let _ = std::fs::remove_file(&log);
}

/// A pod deleted while its worker waits for the schema stops at once and cleanly (SIGTERM used
/// to take its default action there: the process was killed, not stopped).
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_stopped_while_it_waits_for_the_schema_exits_cleanly() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let (worker, log) = replica_waiting_for_the_schema(&env).await;
    terminate(worker.take());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("stopped before starting"), "{said}");
    let _ = std::fs::remove_file(&log);
}

/// The operators overlay ships deploy/observability's rules as a PrometheusRule and scrapes the
/// ports the processes serve /metrics on: the two copies of the rules cannot drift apart.
#[test]
fn the_operators_overlay_monitors_the_worker_with_the_same_rules() {
    let objects = rendered("operators");
    let rule = find(&objects, "PrometheusRule", "payment-link-worker").expect("a PrometheusRule");
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(repo().join("deploy/observability/rules.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rule["spec"]["groups"], plain["groups"]);

    let (settings, _) = shipped_settings(&objects);
    for (name, component, listen) in [
        (
            "payment-link-worker",
            "worker",
            &settings.telemetry.http_listen,
        ),
        ("payment-link-console", "console", &settings.console.listen),
    ] {
        let monitor = find(&objects, "PodMonitor", name).expect("a PodMonitor");
        assert_eq!(
            monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
            component
        );
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["path"], "/metrics");
        let workload = find(&objects, "Deployment", name).unwrap();
        let port = resolve_port(container(workload, component), &endpoint["port"]);
        assert_eq!(port, port_of(listen), "{name}");
    }
}
