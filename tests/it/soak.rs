//! Guarantee: under a steady mix of commands and faults of every kind together (broker nodes
//! stopped and killed, the queue's leader killed, a rolling restart, workers killed and stopped,
//! the database failed over and made read-only, connections cut and stalled, the provider slow,
//! failing, rate-limiting, hanging and losing answers), no command is lost, none gets two links,
//! none is notified twice and nothing is left stuck; and the account that says so catches a
//! planted loss, duplicate and second link.
//!
//! The CI-sized run of `cargo bench --bench soak` (`tests/common/soak/`): 3 minutes, seed 20261207,
//! the debug binary. Uses `tests/scripts/rabbitmq-cluster` (ports 5681-5683) and two throwaway
//! PostgreSQL clusters; runs alone (`.config/nextest.toml`) and removes them even when it fails.

#[path = "../common/soak/mod.rs"]
mod harness;

use harness::schedule::{self, Kind};
use std::time::Duration;

#[test]
fn the_same_seed_draws_the_same_schedule_and_another_seed_another() {
    let show = |seed| {
        schedule::draw(seed, Duration::from_secs(600), (20, 40), &Kind::ALL, 2)
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(show(7), show(7));
    assert_ne!(show(7), show(8));
    assert!(show(7).len() >= 10, "a fault every 20-40 s in 10 minutes");
    let kinds: std::collections::HashSet<_> =
        schedule::draw(7, Duration::from_secs(3600), (20, 40), &Kind::ALL, 2)
            .iter()
            .map(|f| f.kind)
            .collect();
    assert_eq!(kinds.len(), Kind::ALL.len(), "an hour meets every kind");
}

/// The negative control plants on commands with one event each: seed 10's hour dropped a
/// command whose event had come twice, which took a duplicate away as the copy added one, and
/// the planted duplicate did not show.
#[test]
fn the_plants_are_made_on_commands_with_one_event_so_each_shows() {
    use harness::account::plant;
    use harness::collect::Event;
    use harness::load::{Class, Planned};
    let event = |id: &str, event_id: &str| Event {
        command_id: id.into(),
        event_id: event_id.into(),
        kind: "payment-link.created".into(),
        link: Some(format!("https://pay/{id}")),
        at: Duration::ZERO,
    };
    // The first command's event came twice; the next three once each.
    let mut events = vec![event("a", "e-a"), event("a", "e-a")];
    events.extend(["b", "c", "d"].map(|id| event(id, &format!("e-{id}"))));
    let planned = ["a", "b", "c", "d"]
        .map(|id| {
            let plan = Planned {
                class: Class::Valid,
                conflict: false,
                confirmed: 1,
            };
            (id.to_owned(), plan)
        })
        .into_iter()
        .collect();
    let duplicates = |events: &[Event]| {
        let ids: std::collections::HashSet<&str> =
            events.iter().map(|e| e.event_id.as_str()).collect();
        events.len() - ids.len()
    };
    let before = duplicates(&events);
    plant(&mut events, &planned).unwrap();
    // The copy and the forgery (another link under the same event id) each add one; dropping
    // a command whose event came twice would take one away.
    assert_eq!(duplicates(&events), before + 2, "the copied event shows");
    assert_eq!(
        events.iter().filter(|e| e.command_id == "a").count(),
        2,
        "a kept"
    );
    assert!(events.iter().all(|e| e.command_id != "b"), "b dropped");
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_three_minutes_of_faults_lose_nothing_double_nothing_and_the_checker_catches_a_plant()
{
    let compress = 30.0;
    let options = harness::Options {
        minutes: 3.0,
        seed: 20261207,
        rate: 50.0,
        workers: 2,
        gap: (6, 12),
        compress,
        kinds: Kind::ALL.to_vec(),
        plant: true,
        dir: std::env::temp_dir().join(format!("plw-soak-{}", std::process::id())),
        binary: env!("CARGO_BIN_EXE_payment-link-worker").into(),
        drain: harness::longest_wait(compress),
        given: None,
    };
    let report = harness::run(&options).await.expect("the soak runs");
    let text = report.text();
    println!("{text}");
    let a = &report.account;
    assert!(a.commands > 1000, "the load ran: {text}");
    assert!(report.faults.len() >= 8, "the faults ran: {text}");
    assert_eq!(report.unconfirmed, 0, "every command confirmed: {text}");
    assert!(
        report.drained_s.is_some(),
        "every command's outcome came: {text}"
    );
    assert_eq!((a.lost, a.two_links, a.created_twice), (0, 0, 0), "{text}");
    assert_eq!(a.invalid_with_link, 0, "{text}");
    assert_eq!(
        a.stuck, 0,
        "nothing left in queues, outbox or claims: {text}"
    );
    assert!(
        report.exits.is_empty(),
        "no worker exited by itself: {text}"
    );
    assert_eq!(
        report.plant_caught(),
        Some(true),
        "the negative control: {text}"
    );
    let _ = std::fs::remove_dir_all(&options.dir);
}

/// Against a broker and a database server it was given (here the suite's own), the soak draws
/// only the faults it can cause without running them, clears an earlier run's queues first, and
/// gives the same account: nothing lost, doubled or stuck, and the plants caught.
#[tokio::test(flavor = "multi_thread")]
async fn soak_against_a_given_broker_and_database_draws_only_the_faults_it_can_cause() {
    let compress = 30.0;
    let admin = crate::sandbox::admin_database_url();
    let options = harness::Options {
        minutes: 1.0,
        seed: 20261208,
        rate: 30.0,
        workers: 2,
        gap: (4, 8),
        compress,
        kinds: Kind::ALL.to_vec(),
        plant: true,
        dir: std::env::temp_dir().join(format!("plw-soak-given-{}", std::process::id())),
        binary: env!("CARGO_BIN_EXE_payment-link-worker").into(),
        drain: harness::longest_wait(compress),
        given: Some(harness::Given {
            amqp_urls: vec![crate::sandbox::amqp_url()],
            database_url: admin.clone(),
        }),
    };
    let report = harness::run(&options).await.expect("the soak runs");
    let text = report.text();
    println!("{text}");
    let _ = crate::sandbox::exec_admin(&admin, "DROP DATABASE IF EXISTS soak WITH (FORCE)").await;
    let _ = std::fs::remove_dir_all(&options.dir);
    // The seed draws three (their holds are long beside a minute).
    assert!(report.faults.len() >= 3, "the faults ran: {text}");
    for kind in Kind::ALL.iter().filter(|k| k.needs_control()) {
        assert!(
            report.faults.iter().all(|f| !f.contains(kind.name())),
            "{} needs the broker or the database run by the soak: {text}",
            kind.name()
        );
    }
    let a = &report.account;
    assert!(a.commands > 500, "the load ran: {text}");
    assert_eq!((a.lost, a.two_links, a.created_twice), (0, 0, 0), "{text}");
    assert_eq!(a.stuck, 0, "{text}");
    assert_eq!(
        report.plant_caught(),
        Some(true),
        "the negative control: {text}"
    );
}

/// A second soak on the machine refuses to start while one runs (it would remove the first's
/// clusters as leftovers), and starts once the first has ended.
#[test]
fn a_second_soak_refuses_to_start_beside_a_running_one() {
    let first = harness::RunLock::take().expect("no soak runs beside the suite's tests");
    let refused = harness::RunLock::take()
        .err()
        .expect("the second soak is refused")
        .to_string();
    assert!(
        refused.contains(&format!("another soak (process {})", std::process::id())),
        "{refused}"
    );
    drop(first);
    drop(harness::RunLock::take().expect("free again once the first has ended"));
}
