//! The console's browser sessions live in PostgreSQL: two console processes behind one address
//! (a load balancer without sticky sessions) both know a session, signing out on one ends it on
//! both, and a session outlives a console restart.

use crate::console::{sign_in, with_token_form};
use crate::helpers::{Reaped, TestEnv, binary, eventually, free_port, terminate};
use diesel::sql_types::{Bytea, Text};
use diesel_async::RunQueryDsl;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const TOKEN: &str = "operator-token-for-the-session-tests";

/// `payment-link-worker console` on `port`, answering once it is up.
async fn console(env: &TestEnv, port: u16) -> Reaped {
    console_of(env, port, "operator").await
}

/// As [`console`], with the token's operator named `operator`.
async fn console_of(env: &TestEnv, port: u16, operator: &str) -> Reaped {
    let child = binary(env)
        .arg("console")
        .env("CONSOLE_OPERATOR_NAME", operator)
        .env("CONSOLE_OPERATOR_TOKEN", TOKEN)
        .env(
            "PAYMENT_LINK_WORKER__CONSOLE__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Reaped::new(child);
    eventually("the console answers", Duration::from_secs(30), || async {
        reqwest::get(format!("http://127.0.0.1:{port}/login"))
            .await
            .ok()
            .filter(|a| a.status() == 200)
    })
    .await;
    child
}

/// A load balancer without sticky sessions: each new connection goes to the next backend in
/// turn. Returns its address and how many connections each backend got.
async fn round_robin(backends: Vec<u16>) -> (String, Arc<Vec<AtomicUsize>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let counts: Arc<Vec<AtomicUsize>> = Arc::new(backends.iter().map(|_| 0.into()).collect());
    let seen = counts.clone();
    tokio::spawn(async move {
        for turn in 0.. {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let which = turn % backends.len();
            seen[which].fetch_add(1, Ordering::SeqCst);
            let port = backends[which];
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (address, counts)
}

/// A client that opens a new connection for every request, as a load balancer's clients spread.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Whether the page answers for `cookie` (200) rather than sending to the sign-in form.
async fn signed_in(base: &str, cookie: &str) -> bool {
    let answer = client()
        .get(format!("{base}/dead-letters"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    match answer.status().as_u16() {
        200 => true,
        303 | 307 | 302 => false,
        other => panic!("{base}/dead-letters answered {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_consoles_behind_one_address_share_sessions_which_outlive_a_restart() {
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let (a, b) = (free_port(), free_port());
    let console_a = console(&env, a).await;
    let console_b = console(&env, b).await;
    let (front, counts) = round_robin(vec![a, b]).await;

    // Signed in through the front, the session works on every request, whichever console
    // answers it, and an action with the session's CSRF token is accepted by both.
    let (cookie, csrf) = sign_in(&front, TOKEN).await;
    for _ in 0..6 {
        assert!(
            signed_in(&front, &cookie).await,
            "a console forgot the session"
        );
    }
    for port in [a, b] {
        let dry_run = crate::console::with_json(
            client()
                .post(format!("http://127.0.0.1:{port}/api/replays"))
                .header("cookie", &cookie)
                .header("x-csrf-token", &csrf),
            &serde_json::json!({"filter": {"state": "open"}, "dryRun": true}),
        )
        .send()
        .await
        .unwrap();
        assert!(
            dry_run.status().is_success(),
            "console on {port}: {}",
            dry_run.status()
        );
    }
    let spread: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert!(
        spread.iter().all(|n| *n >= 3),
        "connections per console: {spread:?}"
    );

    // The database holds the cookie's digest, never the cookie.
    let value = cookie.split_once('=').unwrap().1.to_owned();
    let digest: Vec<u8> = Sha256::digest(value.as_bytes()).to_vec();
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        operator: String,
    }
    let mut conn = env.pool.get().await.unwrap();
    let rows: Vec<Row> =
        diesel::sql_query("SELECT operator FROM console_sessions WHERE id_sha256 = $1")
            .bind::<Bytea, _>(&digest)
            .load(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1, "one stored session for the cookie");
    assert_eq!(rows[0].operator, "operator");
    let leaked: Vec<Row> = diesel::sql_query(
        "SELECT operator FROM console_sessions WHERE position($1 in \
         encode(id_sha256, 'escape') || csrf || operator) > 0",
    )
    .bind::<Text, _>(&value)
    .load(&mut conn)
    .await
    .unwrap();
    assert!(leaked.is_empty(), "the cookie's value is stored");

    // Both consoles stop; a new one on the first one's address still knows the session.
    terminate(console_a.take());
    terminate(console_b.take());
    let _console_c = console(&env, a).await;
    assert!(
        signed_in(&format!("http://127.0.0.1:{a}"), &cookie).await,
        "the session did not outlive the restart"
    );

    // A console whose configuration no longer has that operator does not know their session.
    let elsewhere = free_port();
    let renamed = console_of(&env, elsewhere, "someone-else").await;
    assert!(
        !signed_in(&format!("http://127.0.0.1:{elsewhere}"), &cookie).await,
        "a removed operator's session still works"
    );
    terminate(renamed.take());

    // Signing out through one console ends the session for every console.
    let console_d = console(&env, b).await;
    let out = client()
        .post(format!("http://127.0.0.1:{b}/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(out.status().is_redirection(), "{}", out.status());
    assert!(!signed_in(&format!("http://127.0.0.1:{a}"), &cookie).await);
    assert!(!signed_in(&format!("http://127.0.0.1:{b}"), &cookie).await);
    // A wrong token still gets no session, through either console.
    let refused = with_token_form(client().post(format!("{front}/login")), "not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    terminate(console_d.take());
}
