//! Guarantees of the console's JSON API: every endpoint answers what the OpenAPI document says
//! (each answer is validated against it); no token, a wrong token or a viewer's token cannot
//! act; a browser session must send its CSRF token; a replay job replays exactly what was asked,
//! once, and a job whose console stopped midway is finished by another, without duplicates.

use crate::helpers::*;
use crate::operations::{INGEST, stored};
use payment_link_worker::config::{OperatorSettings, Settings};
use payment_link_worker::console::token_sha256;
use payment_link_worker::dead_letters::store::Filter;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const DOCUMENT: &str = include_str!("../../src/contract/openapi.json");
pub const OPERATOR: &str = "operator-token-for-the-console-tests";
const VIEWER: &str = "viewer-token-for-the-console-tests";

/// Validates `instance` against the document's component schema `name`.
fn assert_schema(name: &str, instance: &Value) {
    let mut root: Value = serde_json::from_str(DOCUMENT).unwrap();
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    root["$ref"] = json!(format!("#/components/schemas/{name}"));
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema {name}: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{name} rejects {instance}: {errors:?}");
}

/// A console serving `settings` on a free port; stopped when dropped.
pub struct RunningConsole {
    pub base: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningConsole {
    pub async fn start(settings: &Settings) -> Self {
        let mut settings = settings.clone();
        settings.console.operators = vec![
            OperatorSettings {
                name: "olga".into(),
                role: payment_link_worker::config::Role::Operator,
                token_sha256: token_sha256(OPERATOR),
            },
            OperatorSettings {
                name: "victor".into(),
                role: payment_link_worker::config::Role::Viewer,
                token_sha256: token_sha256(VIEWER),
            },
        ];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(payment_link_worker::console::serve(
            settings,
            listener,
            stop.clone(),
        ));
        Self {
            base,
            stop,
            task: Some(task),
        }
    }

    /// Stops the console (its running jobs stop where they are).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for RunningConsole {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    let text = answer.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A request with a JSON body (the client is built without reqwest's json feature).
pub fn with_json(request: reqwest::RequestBuilder, body: &Value) -> reqwest::RequestBuilder {
    request
        .header("content-type", "application/json")
        .body(body.to_string())
}

/// A request with a sign-in form body.
pub fn with_token_form(request: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    request
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string([("token", token)]).unwrap())
}

async fn post(url: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = with_json(reqwest::Client::new().post(url), body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    let text = answer.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A worker whose provider rejects everything, and `n` dead letters of it in the store.
pub async fn with_dead_letters(
    n: usize,
    overrides: &[(&str, &str)],
) -> (TestEnv, MockServer, WorkerHandle) {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("rejected"))
        .mount(&provider)
        .await;
    let all: Vec<(&str, &str)> = [INGEST].iter().chain(overrides).copied().collect();
    let env = TestEnv::with(&provider.uri(), &all).await;
    let worker = env.start_worker().await;
    for i in 0..n {
        env.send(&format!("con-{i}"), &command_body("3.00", 500 + i as i64))
            .await;
    }
    stored(&env, &Filter::default(), n as i64).await;
    (env, provider, worker)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_as_documented_and_only_operators_act() {
    let (env, provider, _worker) = with_dead_letters(5, &[]).await;
    let events = env.capture_events().await;
    let console = RunningConsole::start(&env.settings).await;
    let api = format!("{}/api", console.base);

    // Without a token, or with a wrong one, nothing is answered.
    for token in [None, Some("not-a-token")] {
        let (status, body) = get(&format!("{api}/dead-letters"), token).await;
        assert_eq!(status, 401, "{body}");
        assert_schema("Error", &body);
    }
    // The validation can fail: an answer of another shape is refused.
    let wrong_shape = std::panic::catch_unwind(|| {
        assert_schema(
            "DeadLetterPage",
            &json!({"items": [], "nextCursor": null, "more": 1}),
        )
    });
    assert!(wrong_shape.is_err(), "an undocumented field is refused");
    // The document itself is served.
    let (status, document) = get(&format!("{api}/openapi.json"), None).await;
    assert_eq!((status, document["openapi"].as_str()), (200, Some("3.1.0")));

    // A page at a time, with a filter, as documented.
    let (status, first) = get(
        &format!("{api}/dead-letters?kind=provider-rejected&limit=2"),
        Some(VIEWER),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_schema("DeadLetterPage", &first);
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let mut seen: Vec<i64> = Vec::new();
    let mut page = first;
    loop {
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_i64().unwrap()),
        );
        let Some(cursor) = page["nextCursor"].as_str().map(str::to_owned) else {
            break;
        };
        let (status, next) = get(
            &format!("{api}/dead-letters?kind=provider-rejected&limit=2&cursor={cursor}"),
            Some(VIEWER),
        )
        .await;
        assert_eq!(status, 200, "{next}");
        assert_schema("DeadLetterPage", &next);
        page = next;
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        (seen.len(), unique.len()),
        (5, 5),
        "every dead letter once across pages: {seen:?}"
    );
    let (_, none) = get(&format!("{api}/dead-letters?kind=validation"), Some(VIEWER)).await;
    assert_eq!(none["items"], json!([]));
    let (_, searched) = get(&format!("{api}/dead-letters?q=CON-3"), Some(VIEWER)).await;
    assert_eq!(searched["items"][0]["commandId"], "con-3", "{searched}");
    let (status, bad) = get(&format!("{api}/dead-letters?cursor=nonsense"), Some(VIEWER)).await;
    assert_eq!(status, 400, "{bad}");

    let (status, summary) = get(&format!("{api}/dead-letters/summary"), Some(VIEWER)).await;
    assert_eq!(status, 200);
    assert_schema("Summary", &summary);
    assert_eq!(summary["byKind"]["provider-rejected"], 5);
    assert_eq!(summary["byState"]["open"], 5);
    assert_eq!(summary["last24Hours"][23], 5, "{summary}");

    let one = searched["items"][0]["id"].as_i64().unwrap();
    let (status, detail) = get(&format!("{api}/dead-letters/{one}"), Some(VIEWER)).await;
    assert_eq!(status, 200);
    assert_schema("DeadLetterDetail", &detail);
    assert_eq!(detail["original"]["bodyJson"]["invoiceId"], 503, "{detail}");
    assert!(
        detail["original"]["body"].is_null(),
        "a JSON body is sent once: {detail}"
    );
    assert_eq!(
        detail["original"]["exchange"],
        json!(env.settings.broker.command_exchange)
    );
    assert_eq!(detail["original"]["headers"]["x-error-status"], 400);
    assert_eq!(detail["errorBody"], "rejected");
    let (status, missing) = get(&format!("{api}/dead-letters/999999"), Some(VIEWER)).await;
    assert_eq!(status, 404);
    assert_schema("Error", &missing);

    // A viewer sees, and cannot act.
    for path in ["replays", "dead-letters/archive"] {
        let (status, refused) = post(
            &format!("{api}/{path}"),
            Some(VIEWER),
            &json!({"ids": [one]}),
        )
        .await;
        assert_eq!(status, 403, "{path}: {refused}");
        assert_schema("Error", &refused);
    }
    // Neither can anyone without a token.
    let (status, _) = post(&format!("{api}/replays"), None, &json!({"ids": [one]})).await;
    assert_eq!(status, 401);
    // A malformed request says why.
    let (status, why) = post(
        &format!("{api}/replays"),
        Some(OPERATOR),
        &json!({"ids": [one], "filter": {}}),
    )
    .await;
    assert_eq!(status, 422, "{why}");
    let (status, why) = post(
        &format!("{api}/replays"),
        Some(OPERATOR),
        &json!({"ids": [one], "bogus": 1}),
    )
    .await;
    assert_eq!(status, 422, "{why}");

    let (status, why) = post(
        &format!("{api}/replays"),
        Some(OPERATOR),
        &json!({"ids": [one], "rate": 0.001}),
    )
    .await;
    assert_eq!(status, 422, "a job that slow would look stalled: {why}");

    // The operator replays one, after the provider is fixed; the job reaches its end.
    provider.reset().await;
    answer_with_link(&provider, 201, 9, "3.00", 503).await;
    let (status, dry) = post(
        &format!("{api}/replays"),
        Some(OPERATOR),
        &json!({"ids": [one], "dryRun": true}),
    )
    .await;
    assert_eq!(status, 202, "{dry}");
    assert_schema("ReplayAccepted", &dry);
    let (status, accepted) = post(
        &format!("{api}/replays"),
        Some(OPERATOR),
        &json!({"ids": [one]}),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    assert_schema("ReplayAccepted", &accepted);
    assert_eq!(accepted["total"], 1);
    let job = accepted["jobId"].as_i64().unwrap();
    let done = eventually("the replay job to end", WAIT, || async {
        let (_, job) = get(&format!("{api}/replays/{job}"), Some(VIEWER)).await;
        (job["state"] == "done").then_some(job)
    })
    .await;
    assert_schema("ReplayJob", &done);
    assert_eq!(
        (
            done["total"].as_i64(),
            done["replayed"].as_i64(),
            done["failed"].as_i64()
        ),
        (Some(1), Some(1), Some(0))
    );
    assert_eq!(done["requestedBy"], "olga");
    // (The capture may also hold failed events of the commands' first attempts.)
    let created = loop {
        let event = env.next_message(&events, WAIT).await;
        if event.routing_key == "payment-link.created" {
            break event;
        }
    };
    assert_eq!(
        created.header("cloudEvents:subject").as_deref(),
        Some("con-3")
    );
    let (_, detail) = get(&format!("{api}/dead-letters/{one}"), Some(VIEWER)).await;
    assert_eq!(detail["state"], "replayed");
    assert_eq!(detail["replays"][0]["runId"], job);
    let (status, jobs) = get(&format!("{api}/replays"), Some(VIEWER)).await;
    assert_eq!(status, 200);
    let items = jobs["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "the dry run and the replay: {jobs}");
    for item in items {
        assert_schema("ReplayJob", item);
    }

    // Archiving all that match a filter touches only the open ones.
    let (status, archived) = post(
        &format!("{api}/dead-letters/archive"),
        Some(OPERATOR),
        &json!({"filter": {"kind": "provider-rejected"}}),
    )
    .await;
    assert_eq!(status, 200, "{archived}");
    assert_schema("Archived", &archived);
    assert_eq!(archived["archived"], 4);

    // A dead letter older than the provider's idempotency window needs the operator's word.
    let other = seen.iter().copied().find(|id| *id != one).unwrap();
    let mut conn = env.pool.get().await.unwrap();
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query(format!(
            "UPDATE payment_link_commands SET created_at = now() - interval '3 days' \
             WHERE command_id = (SELECT command_id FROM dead_letters WHERE id = {other})"
        )),
        &mut conn,
    )
    .await
    .unwrap();
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query(format!(
            "UPDATE dead_letters SET state = 'open' WHERE id = {other}"
        )),
        &mut conn,
    )
    .await
    .unwrap();
    let (status, risk) = post(
        &format!("{api}/replays"),
        Some(OPERATOR),
        &json!({"ids": [other]}),
    )
    .await;
    assert_eq!(status, 409, "{risk}");
    assert_schema("DuplicateRisk", &risk);
    assert!(
        risk["error"]
            .as_str()
            .unwrap()
            .contains("second payment link"),
        "{risk}"
    );
    let (status, accepted) = post(
        &format!("{api}/replays"),
        Some(OPERATOR),
        &json!({"ids": [other], "acceptDuplicateRisk": true}),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");

    // Everything is on record: who, what, how many, which.
    let (status, audit) = get(&format!("{api}/audit"), Some(VIEWER)).await;
    assert_eq!(status, 200);
    assert_schema("AuditPage", &audit);
    let actions: Vec<(&str, &str, i64)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| {
            (
                e["actor"].as_str().unwrap(),
                e["action"].as_str().unwrap(),
                e["count"].as_i64().unwrap(),
            )
        })
        // Refusals are written summed per window, whenever it ends: checked below.
        .filter(|(_, action, _)| *action != "bearer-refused")
        .collect();
    assert_eq!(
        actions,
        [
            ("olga", "dry-run", 1),
            ("olga", "replay", 1),
            ("olga", "archive", 4),
            ("olga", "replay", 1)
        ]
    );
    let from: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["clientAddress"].as_str().unwrap_or("none"))
        .collect();
    assert!(from.iter().all(|a| *a == "127.0.0.1"), "{from:?}");
    eventually(
        "the refused bearer token in the audit log",
        WAIT,
        || async {
            let mut conn = env.pool.get().await.ok()?;
            let log = payment_link_worker::store::audit::page(&mut conn, 100, None)
                .await
                .ok()?;
            log.iter()
                .any(|e| e.action == "bearer-refused" && e.count == 1 && e.actor == "(unknown)")
                .then_some(())
        },
    )
    .await;
    console.stop().await;
}

/// Signs in through the form; returns the session cookie and the page's CSRF token.
pub async fn sign_in(base: &str, token: &str) -> (String, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = with_token_form(client.post(format!("{base}/login")), token)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_redirection(), "{}", answer.status());
    let cookie = answer
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = client
        .get(format!("{base}/dead-letters"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("<meta name=\"csrf\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    (cookie, csrf)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_session_needs_its_csrf_token_and_a_stopped_job_is_finished_by_another_console() {
    let (env, provider, _worker) =
        with_dead_letters(40, &[("CONSOLE__JOB_STALLED_AFTER_MS", "2000")]).await;
    provider.reset().await;
    answer_with_link(&provider, 201, 5, "3.00", 1).await;
    let events = env.capture_events().await;
    let console = RunningConsole::start(&env.settings).await;
    let base = console.base.clone();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Pages need a session: without one, the sign-in form.
    let answer = client
        .get(format!("{base}/dead-letters"))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_redirection());
    assert_eq!(answer.headers()["location"], "/login");
    let refused = with_token_form(client.post(format!("{base}/login")), "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let (cookie, csrf) = sign_in(&base, OPERATOR).await;
    assert!(cookie.starts_with("plw_console="), "{cookie}");
    assert!(csrf.len() >= 32, "{csrf}");
    let page = client
        .get(format!("{base}/dead-letters?state=open"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        page.headers()["x-frame-options"],
        "DENY",
        "no framing by another site"
    );
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("40 matching"), "{html}");
    assert!(!html.contains(OPERATOR), "no secret is rendered");
    let replay = |with_csrf: bool| {
        let mut request = with_json(
            client
                .post(format!("{base}/api/replays"))
                .header("cookie", &cookie),
            &json!({"filter": {"state": "open"}, "rate": 20.0}),
        );
        if with_csrf {
            request = request.header("x-csrf-token", &csrf);
        }
        request.send()
    };
    // An action from a session without the CSRF token (what another site's page would send) is
    // refused; with it, the job starts.
    let forged = replay(false).await.unwrap();
    assert_eq!(forged.status(), 403);
    let started = replay(true).await.unwrap();
    assert_eq!(started.status(), 202);
    let started: Value = serde_json::from_str(&started.text().await.unwrap()).unwrap();
    let job = started["jobId"].as_i64().unwrap();

    // The console stops mid-way (20 a second: 40 take two seconds).
    let api = format!("{base}/api/replays/{job}");
    eventually("the job to be under way", WAIT, || async {
        let (_, job) = get(&api, Some(OPERATOR)).await;
        (job["replayed"].as_i64()? >= 5).then_some(())
    })
    .await;
    console.stop().await;
    let (partial, finished) = {
        let mut conn = env.pool.get().await.unwrap();
        let run = payment_link_worker::store::replay_runs::find(&mut conn, job)
            .await
            .unwrap()
            .unwrap();
        (run.replayed, run.finished_at)
    };
    assert!(
        partial < 40 && finished.is_none(),
        "stopped mid-way: {partial}"
    );

    // Another console sees the job stalled, takes it over, and finishes it.
    let other = RunningConsole::start(&env.settings).await;
    let api = format!("{}/api/replays/{job}", other.base);
    let done = eventually("the job finished by the other console", WAIT, || async {
        let (_, job) = get(&api, Some(VIEWER)).await;
        // `failed` if a letter the stop left unconfirmed was refused.
        (job["state"] != "running").then_some(job)
    })
    .await;
    assert_eq!(
        done["replayed"].as_i64().unwrap() + done["failed"].as_i64().unwrap(),
        40,
        "{done}"
    );
    // Every command got its link once: at most a copy published just before the stop went twice,
    // and the worker answered that copy with the same event, not a second provider call.
    // (The capture may also hold the failed events of the commands' first attempts.)
    let mut created = std::collections::BTreeSet::new();
    while created.len() < 40 {
        let event = env.next_message(&events, WAIT).await;
        if event.routing_key == "payment-link.created" {
            created.insert(event.header("cloudEvents:subject").unwrap());
        }
    }
    let calls = provider.received_requests().await.unwrap();
    let mut keys: Vec<String> = calls
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(
        (calls.len(), keys.len()),
        (40, 40),
        "one provider call per command"
    );
    other.stop().await;
}

/// A replay job with a canary, through the API: it stops after the canary, the job says why and
/// what became of each letter (as documented), a viewer cannot resume it, an operator can, and
/// the resumed job finishes once the provider is fixed.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_stopped_by_its_canary_is_shown_and_resumed_through_the_api() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("bad e-mail address"))
        .mount(&provider)
        .await;
    let env = TestEnv::with(&provider.uri(), &[INGEST]).await;
    let _worker = env.start_worker().await;
    for i in 0..4 {
        env.send(&format!("api-canary-{i}"), &command_body("1.00", 700 + i))
            .await;
    }
    stored(&env, &Filter::default(), 4).await;
    let console = RunningConsole::start(&env.settings).await;
    let api = format!("{}/api", console.base);

    // A bad guard is refused, naming the setting.
    let (status, refused) = post(
        &format!("{api}/replays"),
        Some(OPERATOR),
        &json!({ "filter": { "state": "open" }, "maxFailureRatio": 2 }),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("max-failure-ratio")
    );

    let (status, started) = post(
        &format!("{api}/replays"),
        Some(OPERATOR),
        &json!({ "filter": { "state": "open" }, "canary": 1, "canaryWaitSeconds": 30 }),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let job = started["jobId"].as_i64().unwrap();
    let stopped = eventually("the job stopped after its canary", WAIT, || async {
        let (_, view) = get(&format!("{api}/replays/{job}"), Some(VIEWER)).await;
        (view["state"] == "stopped").then_some(view)
    })
    .await;
    assert_schema("ReplayJob", &stopped);
    assert_eq!(stopped["replayed"], 1);
    assert_eq!(stopped["guard"]["canary"], 1);
    assert_eq!(stopped["outcomes"]["failedAgain"], 1);
    assert_eq!(stopped["failedAgain"][0]["kind"], "provider-rejected");
    assert!(
        stopped["stopReason"]
            .as_str()
            .unwrap()
            .contains("the canary failed again")
    );
    let (status, letters) = get(&format!("{api}/replays/{job}/letters"), Some(VIEWER)).await;
    assert_eq!(status, 200);
    assert_eq!(letters["items"].as_array().unwrap().len(), 1);
    assert_eq!(letters["nextAfter"], Value::Null, "one page holds it all");
    assert_schema("LetterOutcome", &letters["items"][0]);
    // A page at a time: a full page says where the next starts; the next is empty and last.
    let (_, first) = get(
        &format!("{api}/replays/{job}/letters?limit=1"),
        Some(VIEWER),
    )
    .await;
    let after = first["nextAfter"].as_i64().expect("a full page has a next");
    let (_, rest) = get(
        &format!("{api}/replays/{job}/letters?after={after}&limit=1"),
        Some(VIEWER),
    )
    .await;
    assert_eq!(rest["items"], json!([]), "{rest}");
    assert_eq!(rest["nextAfter"], Value::Null, "{rest}");

    let (status, _) = post(
        &format!("{api}/replays/{job}/resume"),
        Some(VIEWER),
        &json!({}),
    )
    .await;
    assert_eq!(status, 403, "a viewer cannot resume");
    provider.reset().await;
    answer_with_link(&provider, 201, 4, "1.00", 1).await;
    let (status, resumed) = post(
        &format!("{api}/replays/{job}/resume"),
        Some(OPERATOR),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, resumed["resumed"].as_i64()),
        (202, Some(3)),
        "{resumed}"
    );
    let (status, again) = post(
        &format!("{api}/replays/{job}/resume"),
        Some(OPERATOR),
        &json!({}),
    )
    .await;
    assert_eq!(status, 409, "only a stopped job resumes: {again}");
    let done = eventually("the resumed job got its three links", WAIT, || async {
        let (_, view) = get(&format!("{api}/replays/{job}"), Some(VIEWER)).await;
        (view["state"] == "done" && view["outcomes"]["succeeded"] == 3).then_some(view)
    })
    .await;
    assert_eq!(done["replayed"], 4);
    assert_eq!(done["stopReason"], Value::Null);
    console.stop().await;
}
