//! The console in a real browser (headless Chromium driven by playwright-core, see
//! `tests/browser/console.mjs`): sign in, filter by kind, open a dead letter, replay a selection,
//! watch the job end, find the audit entry. Screenshots of each page go to
//! `target/console-screenshots/`. Needs `chromium` and `npm ci` in `tests/browser` (`.ci/run`
//! installs both); without them this test fails, it does not skip.

use crate::console::{OPERATOR, RunningConsole, with_dead_letters};
use crate::helpers::*;
use crate::operations::stored;
use payment_link_worker::dead_letters::State;
use payment_link_worker::dead_letters::store::{self as store, Filter};
use std::path::PathBuf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_filters_inspects_and_replays_in_chromium() {
    let (env, provider, _worker) = with_dead_letters(3, &[]).await;
    // One of another kind, which the kind filter must hide.
    env.send(
        "browser-invalid",
        r#"{"paymentProviderId":1,"amountInMajorCurrency":-1,"description":"x"}"#,
    )
    .await;
    stored(&env, &Filter::default(), 4).await;
    provider.reset().await;
    answer_with_link(&provider, 201, 3, "3.00", 1).await;
    let console = RunningConsole::start(&env.settings).await;

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shots = root.join("target").join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = root.join("tests").join("browser").join("console.mjs");
    let base = console.base.clone();
    let shots_dir = shots.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("CONSOLE_URL", base)
            .env("CONSOLE_TOKEN", OPERATOR)
            .env("OPERATOR_NAME", "olga")
            .env("FILTER_KIND", "provider-rejected")
            .env("SHOTS_DIR", shots_dir)
            .output()
            .expect("node runs (see tests/browser)")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "the browser steps failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let outcome: serde_json::Value =
        serde_json::from_slice(output.stdout.trim_ascii()).expect("the script's JSON outcome");
    let chosen: Vec<i64> = outcome["replayed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(chosen.len(), 2);

    // What the page showed is what happened: the two chosen ones replayed, the rest still open.
    let mut conn = env.pool.get().await.unwrap();
    for id in &chosen {
        let (row, replays) = store::get(&mut conn, *id).await.unwrap().unwrap();
        assert_eq!(
            (row.state.as_str(), replays.len()),
            ("replayed", 1),
            "{row:?}"
        );
        assert_eq!(row.kind, "provider-rejected");
    }
    let open = Filter {
        state: Some(State::Open),
        ..Filter::default()
    };
    assert_eq!(store::count(&mut conn, &open).await.unwrap(), 1);
    // The invalid one was fixed on its page: edited, and its copy sent under a new id.
    let edited = outcome["edited"].as_i64().unwrap();
    let (row, _) = store::get(&mut conn, edited).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.edited_into.as_deref()),
        (State::Edited, Some("browser-invalid~edit1"))
    );
    eventually("the edited command to succeed", WAIT, || async {
        (env.record("browser-invalid~edit1").await?.status == "succeeded").then_some(())
    })
    .await;
    eventually("the two replayed commands to succeed", WAIT, || async {
        let mut done = 0;
        for i in 0..3 {
            if env.record(&format!("con-{i}")).await?.status == "succeeded" {
                done += 1;
            }
        }
        (done == 2).then_some(())
    })
    .await;
    for page in [
        "login", "overview", "list", "detail", "job", "audit", "edited",
    ] {
        let file = shots.join(format!("{page}.png"));
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 1000,
            "a screenshot of the {page} page at {}",
            file.display()
        );
    }
    console.stop().await;
}
