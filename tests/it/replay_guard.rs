//! Guarantees: a replay run sends its canary first and goes on only once it succeeded; a run
//! whose replayed letters start failing again stops by itself at its failure ratio, says why, and
//! leaves the rest open; a stopped run resumed after the cause is fixed sends the rest; what
//! became of every replayed letter is known from the store.

use crate::helpers::*;
use crate::operations::start_and_work;
use payment_link_worker::dead_letters::guard::{GuardRequest, Settled};
use payment_link_worker::dead_letters::store::{self as store, Filter};
use payment_link_worker::dead_letters::{self, ReplayRequest, State, Worked, replay_rows};
use payment_link_worker::store::replay_runs::{self, RunState};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A provider that rejects every command (400), a worker with ingestion on, and `n` commands
/// dead-lettered by it and stored.
async fn refused(n: usize) -> (MockServer, TestEnv, WorkerHandle) {
    let (env, provider, worker) = crate::console::with_dead_letters(n, &[]).await;
    (provider, env, worker)
}

fn replay_all(guard: GuardRequest, rate: Option<f64>) -> ReplayRequest {
    ReplayRequest {
        filter: Filter {
            state: Some(State::Open),
            ..Filter::default()
        },
        limit: None,
        dry_run: false,
        rate,
        accept_duplicate_risk: false,
        include_failing: false,
        ask_if_failing: false,
        requested_by: "guard-test".into(),
        source: "cli".into(),
        client_address: None,
        guard,
    }
}

/// Starts and works a run; returns its id and how it ended.
async fn run(env: &TestEnv, request: &ReplayRequest) -> (i64, Worked) {
    let (started, worked) = start_and_work(env, request).await;
    (started.run_id, worked)
}

/// The letters `run_id` holds that are open (left for a resume).
async fn left_open(env: &TestEnv, run_id: i64) -> usize {
    let mut conn = env.pool.get().await.unwrap();
    let open = store::open_ids(&mut conn, &Filter::default())
        .await
        .unwrap();
    let mut held = 0;
    for id in open {
        let (row, _) = store::get(&mut conn, id).await.unwrap().unwrap();
        held += usize::from(row.replay_run_id == Some(run_id));
    }
    held
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_canary_fails_again_stops_with_the_rest_left_open() {
    let (provider, env, _worker) = refused(50).await;
    let calls_before = provider.received_requests().await.unwrap().len();

    // The shipped defaults: a run of more than 10 letters sends one canary first.
    let (run_id, worked) = run(&env, &replay_all(GuardRequest::default(), None)).await;

    let reason = worked.stopped.expect("the run stopped by itself");
    assert!(
        reason.contains("canary") && reason.contains("provider-rejected"),
        "{reason}"
    );
    assert_eq!(worked.replayed.len(), 1, "only the canary was sent");
    assert_eq!(
        provider.received_requests().await.unwrap().len() - calls_before,
        1,
        "one provider call: the canary's"
    );
    assert_eq!(left_open(&env, run_id).await, 49);
    let mut conn = env.pool.get().await.unwrap();
    let recorded = replay_runs::find(&mut conn, run_id).await.unwrap().unwrap();
    assert_eq!(recorded.state, RunState::Stopped);
    assert_eq!(recorded.stop_reason.as_deref(), Some(reason.as_str()));
    let outcomes = replay_rows::outcomes(&mut conn, run_id).await.unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(
        outcomes[0].settled,
        Settled::FailedAgain("provider-rejected".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_starts_failing_stops_at_its_ratio_and_a_resume_sends_the_rest() {
    let (provider, env, worker) = refused(40).await;
    // The provider is fixed for 19 calls (the canary and 18 more), then refuses again.
    provider.reset().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_raw(provider_answer(1, "1.00", 1), "application/json"),
        )
        .up_to_n_times(19)
        .with_priority(1)
        .mount(&provider)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("bad e-mail address"))
        .with_priority(2)
        .mount(&provider)
        .await;
    let guard = GuardRequest {
        max_failure_ratio: Some(0.6),
        failure_window: Some(5),
        ..GuardRequest::default()
    };
    let (run_id, worked) = run(&env, &replay_all(guard, Some(10.0))).await;

    let reason = worked.stopped.expect("the run stopped by itself");
    assert!(reason.contains("of the last 5 settled"), "{reason}");
    assert!(reason.contains("provider-rejected"), "{reason}");
    let mut conn = env.pool.get().await.unwrap();
    let first = replay_rows::outcomes(&mut conn, run_id).await.unwrap();
    let succeeded = first
        .iter()
        .filter(|o| o.settled == Settled::Succeeded)
        .count();
    let failed = first
        .iter()
        .filter(|o| matches!(o.settled, Settled::FailedAgain(_)))
        .count();
    assert_eq!(succeeded, 19, "{first:?}");
    assert!(failed >= 3, "{first:?}");
    let left = left_open(&env, run_id).await;
    assert!(left > 0, "the run stopped before its end");
    assert_eq!(worked.replayed.len() + left, 40);
    assert_eq!(
        replay_runs::find(&mut conn, run_id)
            .await
            .unwrap()
            .unwrap()
            .state,
        RunState::Stopped
    );

    // Fixed for good: a resume sends what the run left open (its canary first), and they succeed.
    provider.reset().await;
    answer_with_link(&provider, 201, 2, "1.00", 1).await;
    let taken = dead_letters::resume(&mut conn, run_id, "guard-test", "cli")
        .await
        .unwrap();
    assert_eq!(taken, left);
    let resumed = dead_letters::work(&env.settings, &mut conn, run_id, None)
        .await
        .unwrap();
    assert_eq!(resumed.stopped, None);
    assert_eq!(resumed.replayed.len(), left);
    assert_eq!(left_open(&env, run_id).await, 0);
    let run = replay_runs::find(&mut conn, run_id).await.unwrap().unwrap();
    assert_eq!((run.state, run.stop_reason), (RunState::Done, None));
    eventually("every resumed letter succeeded", WAIT, || async {
        let mut conn = env.pool.get().await.ok()?;
        let outcomes = replay_rows::outcomes(&mut conn, run_id).await.ok()?;
        let succeeded = outcomes
            .iter()
            .filter(|o| o.settled == Settled::Succeeded)
            .count();
        (outcomes.len() == 40 && succeeded == 19 + left).then_some(())
    })
    .await;
    // The worker counts what became of the replays too.
    let metrics = worker.metrics();
    let settled =
        |label| crate::observability::sample(&metrics, "payment_link_replays_settled_total", label);
    assert_eq!(
        settled("outcome=\"succeeded\""),
        Some((19 + left) as f64),
        "{metrics}"
    );
    assert_eq!(
        settled("error_type=\"provider-rejected\",outcome=\"failed-again\""),
        Some((40 - 19 - left) as f64),
        "every letter sent before the resume and not among the 19 failed again: {metrics}"
    );
    let log = payment_link_worker::store::audit::page(&mut conn, 10, None)
        .await
        .unwrap();
    assert!(
        log.iter()
            .any(|e| e.action == "resume" && e.run_id == Some(run_id)),
        "the resume is on record"
    );
}

/// The CLI's way, as docs/operations.md shows it: the replay stops after its canary and exits
/// non-zero saying why and how to resume; `dead-letters run` shows each letter's outcome; the
/// resume sends the rest once the provider is fixed.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_says_why_a_run_stopped_shows_each_outcome_and_resumes() {
    let (provider, env, _worker) = refused(12).await;
    let replay = binary(&env)
        .args(["dead-letters", "replay", "--operator", "olga"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr),
    );
    eprintln!("$ payment-link-worker dead-letters replay\n{stdout}{stderr}");
    assert!(!replay.status.success(), "a stopped run exits non-zero");
    assert!(
        stdout.contains("canary: dead letter 1 goes first; the rest only once it got its link")
            && stdout.contains("replay run 1: 1 replayed, 0 failed, 0 skipped (see above)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("stopped: the canary failed again: dead letter")
            && stderr.contains("(provider-rejected)")
            && stderr.contains("dead-letters replay --resume 1"),
        "{stderr}"
    );
    let shown = output(binary(&env).args(["dead-letters", "run", "1"]));
    eprintln!("$ payment-link-worker dead-letters run 1\n{shown}");
    assert!(
        shown.contains("replay run 1  stopped  by olga (cli)"),
        "{shown}"
    );
    assert!(
        shown.contains("outcomes: 0 succeeded, 1 failed again, 0 pending"),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("1 ") && l.contains("failed again: provider-rejected  con-")),
        "{shown}"
    );
    let json: serde_json::Value = serde_json::from_str(&output(binary(&env).args([
        "dead-letters",
        "run",
        "1",
        "--json",
    ])))
    .unwrap();
    assert_eq!(json["run"]["state"], "stopped");
    assert_eq!(json["letters"][0]["outcome"], "failedAgain");
    assert_eq!(json["letters"][0]["kind"], "provider-rejected");

    provider.reset().await;
    answer_with_link(&provider, 201, 3, "1.00", 1).await;
    let resumed = output(binary(&env).args(["dead-letters", "replay", "--resume", "1"]));
    eprintln!("$ payment-link-worker dead-letters replay --resume 1\n{resumed}");
    assert!(
        resumed.contains("replay run 1 resumed: 11 dead letter(s) it left open"),
        "{resumed}"
    );
    assert!(
        resumed.contains("11 replayed, 0 failed, 0 skipped (see above)"),
        "{resumed}"
    );
}

/// A run with a start rate sends its first batches at that rate and doubles it every 10 s up to
/// its own rate: the batches (one per second of sending, each recorded in one transaction, so
/// sharing one `replayed_at`) are 4 letters at first, then 8, never more.
#[tokio::test(flavor = "multi_thread")]
async fn a_ramping_run_starts_at_its_start_rate_and_doubles_it() {
    let (_provider, env, worker) = refused(56).await;
    worker.stop().await.unwrap();
    let guard = GuardRequest {
        canary: Some(0),
        max_failure_ratio: Some(1.0),
        start_rate: Some(4.0),
        ..GuardRequest::default()
    };
    let (run_id, worked) = run(&env, &replay_all(guard, Some(8.0))).await;
    assert_eq!(worked.replayed.len(), 56, "{worked:?}");
    #[derive(diesel::QueryableByName)]
    struct Batch {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        letters: i64,
    }
    let mut conn = env.pool.get().await.unwrap();
    let batches: Vec<i64> = diesel_async::RunQueryDsl::load::<Batch>(
        diesel::sql_query(
            "SELECT count(*) AS letters FROM dead_letter_replays WHERE run_id = $1 \
             GROUP BY replayed_at ORDER BY replayed_at",
        )
        .bind::<diesel::sql_types::BigInt, _>(run_id),
        &mut conn,
    )
    .await
    .unwrap()
    .into_iter()
    .map(|b| b.letters)
    .collect();
    assert_eq!(
        batches[0], 4,
        "the first batch goes at the start rate: {batches:?}"
    );
    assert!(batches.contains(&8), "the rate doubled: {batches:?}");
    assert!(
        batches.iter().all(|&n| n <= 8),
        "never above the run's rate: {batches:?}"
    );
    let first_eight = batches.iter().position(|&n| n == 8).unwrap();
    assert!(
        batches[..first_eight].iter().all(|&n| n == 4),
        "4 a batch until it doubles: {batches:?}"
    );
}
