//! The dead-letter store at volume: fills a fresh database with N dead letters, then times what
//! the console and the CLI ask of it (a list page, a page deep down, a filtered page, the summary,
//! text searches) and a replay of M of them through the real broker with no rate limit, watching
//! its recorded progress meanwhile; and single-letter replays through a console started fresh,
//! the first one timed apart from the later ones (a new user once saw 5.7 s). Run with `cargo bench --bench console-bench` (release
//! profile; `-- --help` lists the flags); see the README's Benchmark section.

// A test or a benchmark fails loudly, and should, on what it did not expect.
#![allow(clippy::unwrap_used)]

use anyhow::Context as _;
use lapin::BasicProperties;
use payment_link_worker::broker::messages::properties_to_json;
use payment_link_worker::dead_letters::store::{self as store, Filter};
use payment_link_worker::dead_letters::{self as ops, ReplayRequest};
use payment_link_worker::dead_letters::{Kind, State};
use payment_link_worker::store::{self as db, replay_runs};
use std::time::{Duration, Instant};

#[path = "../tests/common/sandbox.rs"]
mod sandbox;

/// Times the dead-letter store and a bulk replay at volume.
#[derive(clap::Parser)]
#[command(
    name = "console-bench",
    bin_name = "cargo bench --bench console-bench --"
)]
struct Options {
    /// Dead letters in the store.
    #[arg(long, default_value_t = 100_000)]
    dead_letters: i64,
    /// Of those, how many one replay takes (no rate limit).
    #[arg(long, default_value_t = 10_000)]
    replay: usize,
    /// Single-letter replays through a fresh console, each timed from the POST to the job's end.
    #[arg(long, default_value_t = 5)]
    console_replays: usize,
    /// Runs of each query; the median is reported.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The median time of `runs` runs of `query`.
async fn median<F, Fut, T>(runs: usize, mut query: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        query().await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = <Options as clap::Parser>::parse();
    let sandbox = sandbox::Sandbox::create("cb", "http://127.0.0.1:9", "bench-token", &[])
        .await
        .map_err(anyhow::Error::msg)?;
    let settings = sandbox.settings().map_err(anyhow::Error::msg)?;
    eprintln!("sandbox {} (removed at the end)", sandbox.id);
    let result = run(&o, &settings).await;
    sandbox::remove(&sandbox.database, &settings, Vec::new()).await;
    result
}

async fn run(o: &Options, settings: &payment_link_worker::config::Settings) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    db::migrate(&pool).await?;
    let connection =
        payment_link_worker::broker::connect(&settings.broker, "console-bench").await?;
    payment_link_worker::broker::topology::declare(&connection, &settings.broker).await?;
    let mut conn = pool.get().await?;

    // N dead letters, a fifth of each of five kinds, one a second back from now.
    let template = properties_to_json(
        &BasicProperties::default()
            .with_message_id("template".into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2),
    );
    let filled = Instant::now();
    let fill_query = diesel::sql_query(
        "INSERT INTO dead_letters (dedup_key, command_id, kind, error_message, http_status, attempts, \
           failed_at, payment_provider_id, invoice_id, customer_id, description, email, \
           original_exchange, original_routing_key, properties, body) \
         SELECT 'id:bench-' || i, 'bench-' || i, \
           (ARRAY['provider-rejected','validation','retries-exhausted','provider-auth','delivery-limit'])[1 + i % 5], \
           'the provider said no (' || i || ')', 400, 1, now() - i * interval '1 second', \
           1 + i % 7, i, 1 + i % 1000, 'Invoice ' || i, 'payer' || i || '@example.com', $2, $3, \
           jsonb_set($1::jsonb, '{message_id}', to_jsonb('bench-' || i)), \
           convert_to('{\"paymentProviderId\":1,\"amountInMajorCurrency\":1.00,\"description\":\"Invoice ' \
             || i || '\",\"invoiceId\":' || i || '}', 'UTF8') \
         FROM generate_series(1, $4) AS i",
    )
    .bind::<diesel::sql_types::Text, _>(template.to_string())
    .bind::<diesel::sql_types::Text, _>(&settings.broker.command_exchange)
    .bind::<diesel::sql_types::Text, _>(&settings.broker.command_routing_key)
    .bind::<diesel::sql_types::BigInt, _>(o.dead_letters);
    diesel_async::RunQueryDsl::execute(fill_query, &mut conn)
        .await
        .context("fill the store")?;
    diesel_async::RunQueryDsl::execute(diesel::sql_query("ANALYZE dead_letters"), &mut conn)
        .await?;
    let fill = filled.elapsed();

    let all = Filter::default();
    let open_kind = Filter {
        state: Some(State::Open),
        kind: Some(Kind::Worker(
            payment_link_worker::errors::ErrorKind::Validation,
        )),
        ..Filter::default()
    };
    let search = |text: &str| Filter {
        search: Some(text.into()),
        ..Filter::default()
    };
    let mut rows: Vec<(&str, Duration, u128)> = Vec::new();
    let first_page = median(o.runs, || async {
        let mut conn = pool.get().await?;
        Ok(store::page(&mut conn, &all, 50, None).await?)
    })
    .await?;
    rows.push(("list: first page of 50, no filter", first_page, 200));
    // A page 1,000 rows down, reached by its cursor (what "next page" does 20 times).
    let mut cursor = None;
    for _ in 0..20 {
        cursor = store::page(&mut conn, &all, 50, cursor).await?.1;
    }
    let deep = median(o.runs, || async {
        let mut conn = pool.get().await?;
        Ok(store::page(&mut conn, &all, 50, cursor).await?)
    })
    .await?;
    rows.push(("list: page 21 by its cursor", deep, 200));
    let filtered = median(o.runs, || async {
        let mut conn = pool.get().await?;
        Ok(store::page(&mut conn, &open_kind, 50, None).await?)
    })
    .await?;
    rows.push(("list: open and one kind, first page", filtered, 200));
    let counted = median(o.runs, || async {
        let mut conn = pool.get().await?;
        Ok(store::count(&mut conn, &open_kind).await?)
    })
    .await?;
    rows.push(("count matching (open and one kind)", counted, 200));
    let summary = median(o.runs, || async {
        let mut conn = pool.get().await?;
        Ok(store::overview(&mut conn).await?)
    })
    .await?;
    rows.push(("summary (counts by kind and state, per hour)", summary, 200));
    for (label, text) in [
        ("search: part of a command id", "ench-9999"),
        ("search: an e-mail address", "payer77777@"),
        ("search: a word no row has", "nowhere"),
    ] {
        let filter = search(text);
        let took = median(o.runs, || async {
            let mut conn = pool.get().await?;
            let page = store::page(&mut conn, &filter, 50, None).await?;
            let n = store::count(&mut conn, &filter).await?;
            Ok((page, n))
        })
        .await?;
        rows.push((label, took, 500));
    }

    let console_replays = through_a_fresh_console(o, settings, &mut conn).await?;

    // A replay of M matching dead letters, no rate limit, progress read from the run meanwhile.
    let request = ReplayRequest {
        include_failing: true,
        ask_if_failing: false,
        filter: Filter {
            kind: Some(Kind::Worker(
                payment_link_worker::errors::ErrorKind::ProviderRejected,
            )),
            ..Filter::default()
        },
        limit: Some(o.replay),
        dry_run: false,
        rate: None,
        accept_duplicate_risk: false,
        requested_by: "console-bench".into(),
        source: "cli".into(),
        client_address: None,
        guard: payment_link_worker::dead_letters::guard::GuardRequest::off(),
    };
    let replay_started = Instant::now();
    let started = ops::start(settings, &mut conn, &request).await?;
    let run_id = started.run_id;
    let watcher = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Ok(mut conn) = pool.get().await else {
                    continue;
                };
                let Ok(Some(run)) = replay_runs::find(&mut conn, run_id).await else {
                    continue;
                };
                seen.push(run.replayed);
                if run.state != payment_link_worker::store::replay_runs::RunState::Running {
                    return seen;
                }
            }
        })
    };
    let worked = ops::work(settings, &mut conn, run_id, None).await?;
    let replay = replay_started.elapsed();
    let progress = watcher.await?;
    anyhow::ensure!(
        worked.replayed.len() == o.replay && worked.failed.is_empty(),
        "replayed {} of {}, {} failed",
        worked.replayed.len(),
        o.replay,
        worked.failed.len()
    );
    let depth = payment_link_worker::broker::queue_depth(
        &connection.create_channel().await?,
        &settings.broker.command_queue,
    )
    .await?;
    let _ = connection.close(200, "bench done".into()).await;

    println!(
        "\nDead-letter store with {} dead letters (filled in {:.1} s); median of {} runs\n",
        o.dead_letters,
        fill.as_secs_f64(),
        o.runs
    );
    println!("| query | time | target | met |");
    println!("| --- | --- | --- | --- |");
    for (label, took, target) in &rows {
        let met = took.as_millis() < *target;
        println!(
            "| {label} | {} | < {target} ms | {} |",
            ms(*took),
            if met { "yes" } else { "no" }
        );
    }
    let met = replay < Duration::from_secs(60);
    println!(
        "| replay {} matching, no rate limit (confirmed, recorded) | {:.1} s ({:.0}/s) | < 60 s | {} |",
        o.replay,
        replay.as_secs_f64(),
        o.replay as f64 / replay.as_secs_f64(),
        if met { "yes" } else { "no" }
    );
    for (i, took) in console_replays.iter().enumerate() {
        let which = if i == 0 { "first" } else { "later" };
        let met = took.as_millis() < 500;
        println!(
            "| console ({which}): replay of one letter, POST to done | {} | < 500 ms | {} |",
            ms(*took),
            if met { "yes" } else { "no" }
        );
    }
    println!(
        "\nProgress read every 250 ms during the replay: {} readings, {:?} … {:?}; {} commands in the command queue afterwards.",
        progress.len(),
        progress.first(),
        progress.last(),
        depth
    );
    Ok(())
}

/// Starts a console in this process (as `payment-link-worker console` would) and replays one
/// letter at a time through its API, each timed from the POST to the job's end, the first apart:
/// whatever the console does once (its pool, its broker connection) shows there.
async fn through_a_fresh_console(
    o: &Options,
    settings: &payment_link_worker::config::Settings,
    conn: &mut payment_link_worker::store::PgConn,
) -> anyhow::Result<Vec<Duration>> {
    const TOKEN: &str = "console-bench-operator-token";
    let retried = Filter {
        kind: Some(Kind::Worker(
            payment_link_worker::errors::ErrorKind::RetriesExhausted,
        )),
        ..Filter::default()
    };
    let (letters, _) = store::page(conn, &retried, o.console_replays as i64, None).await?;
    let mut settings = settings.clone();
    settings.console.operators = vec![payment_link_worker::config::OperatorSettings {
        name: "bench".into(),
        role: payment_link_worker::config::Role::Operator,
        token_sha256: payment_link_worker::console::token_sha256(TOKEN),
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    let console = tokio::spawn(payment_link_worker::console::serve(
        settings,
        listener,
        stop.clone(),
    ));
    let client = reqwest::Client::new();
    // Up when it answers; not timed, as the first replay is what a user waits for.
    let up = Instant::now();
    while client.get(format!("{base}/metrics")).send().await.is_err() {
        anyhow::ensure!(
            up.elapsed() < Duration::from_secs(30),
            "the console did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut times = Vec::new();
    for letter in &letters {
        let started = Instant::now();
        let answer = client
            .post(format!("{base}/api/replays"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(serde_json::json!({"ids": [letter.id], "includeFailing": true}).to_string())
            .send()
            .await?;
        anyhow::ensure!(
            answer.status() == 202,
            "replay refused: {}",
            answer.status()
        );
        let job: serde_json::Value = serde_json::from_str(&answer.text().await?)?;
        let job = job["jobId"].as_i64().context("no jobId")?;
        loop {
            let view: serde_json::Value = serde_json::from_str(
                &client
                    .get(format!("{base}/api/replays/{job}"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await?
                    .text()
                    .await?,
            )?;
            match view["state"].as_str() {
                Some("running") => {}
                Some("done") => break,
                other => anyhow::bail!("job {job} ended {other:?}: {view}"),
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "job {job} still running after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(started.elapsed());
    }
    stop.cancel();
    console.await??;
    Ok(times)
}
