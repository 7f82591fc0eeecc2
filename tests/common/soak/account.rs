//! The exact account at the end of a run: per command id, what was sent and what came of it,
//! and the totals the run is judged by (lost, two links, stuck: each must be 0). `plant` is the
//! negative control: it changes what the collector saw (one command's events dropped, one
//! event copied, one second link forged) so the account can be shown to catch each.

use super::collect::Event;
use super::load::{Class, Planned};
use payment_link_worker::provider::sim::KeyLedger;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A dead letter in the worker's store.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub command_id: String,
    pub kind: String,
}

/// What was left behind once the run drained and the workers stopped.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Leftovers {
    /// Messages in the command queue, the delay queues and the dead-letter queue, by queue.
    pub queues: BTreeMap<String, u32>,
    /// Outbox rows never confirmed by the broker.
    pub outbox_unsent: i64,
    /// Commands still marked as being processed.
    pub processing: i64,
    /// The first few of them.
    pub processing_ids: Vec<String>,
}

impl Leftovers {
    pub fn total(&self) -> i64 {
        self.queues.values().map(|n| i64::from(*n)).sum::<i64>()
            + self.outbox_unsent
            + self.processing
    }
}

/// The totals.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Account {
    /// Distinct command ids sent (confirmed by the broker at least once).
    pub commands: usize,
    pub created: usize,
    /// Commands that ended with a `payment-link.failed` event or a dead letter and no link.
    pub failed: usize,
    /// Dead letters stored, by kind.
    pub dead_letters: BTreeMap<String, usize>,
    /// Command ids (or a conflicting copy) without their outcome. Must be 0.
    pub lost: usize,
    /// Command ids with two or more different links. Must be 0.
    pub two_links: usize,
    /// Invalid commands that got a link. Must be 0.
    pub invalid_with_link: usize,
    /// Commands with two created events of different ids (a notifier would notify twice). Must be 0.
    pub created_twice: usize,
    /// Events delivered more than once with the same event id (at-least-once; a notifier drops
    /// them by id).
    pub duplicate_events: usize,
    /// Provider calls that applied a key already applied, and of those how many followed an
    /// answer the simulator lost or a call that hung (the rest followed a worker or database
    /// fault between the call and its record). Not an error: the key made them harmless.
    pub repeated_calls: u64,
    pub repeated_after_lost_answer: u64,
    /// Messages, rows and claims left behind. Must be 0.
    pub stuck: i64,
    /// Up to 10 examples of each error, for the report.
    pub examples: BTreeMap<String, Vec<String>>,
}

impl Account {
    /// Lost, two links, a link for an invalid command, a command notified twice, stuck: none.
    pub fn green(&self) -> bool {
        self.lost == 0
            && self.two_links == 0
            && self.invalid_with_link == 0
            && self.created_twice == 0
            && self.stuck == 0
    }

    fn example(&mut self, what: &str, id: &str) {
        let list = self.examples.entry(what.to_owned()).or_default();
        if list.len() < 10 {
            list.push(id.to_owned());
        }
    }
}

/// Counts what came of every command.
pub fn settle(
    planned: &HashMap<String, Planned>,
    events: &[Event],
    dead_letters: &[DeadLetter],
    ledger: &HashMap<String, KeyLedger>,
    leftovers: &Leftovers,
) -> Account {
    let mut account = Account::default();
    let mut by_id: HashMap<&str, Vec<&Event>> = HashMap::new();
    let mut seen_event_ids = HashSet::new();
    for event in events {
        if !seen_event_ids.insert(event.event_id.as_str()) {
            account.duplicate_events += 1;
        }
        by_id
            .entry(event.command_id.as_str())
            .or_default()
            .push(event);
    }
    let mut letters: HashMap<&str, Vec<&str>> = HashMap::new();
    for letter in dead_letters {
        *account.dead_letters.entry(letter.kind.clone()).or_default() += 1;
        letters
            .entry(letter.command_id.as_str())
            .or_default()
            .push(letter.kind.as_str());
    }
    for (id, plan) in planned {
        if plan.confirmed == 0 {
            continue;
        }
        account.commands += 1;
        let events = by_id
            .get(id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let created: Vec<&&Event> = events
            .iter()
            .filter(|e| e.kind.ends_with("created"))
            .collect();
        let links: HashSet<&str> = created.iter().filter_map(|e| e.link.as_deref()).collect();
        let created_ids: HashSet<&str> = created.iter().map(|e| e.event_id.as_str()).collect();
        let failed_event = events.iter().any(|e| e.kind.ends_with("failed"));
        let kinds = letters
            .get(id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        if links.len() > 1 {
            account.two_links += 1;
            account.example("two links", id);
        }
        if created_ids.len() > 1 {
            account.created_twice += 1;
            account.example("created twice", id);
        }
        match plan.class {
            Class::Invalid if !links.is_empty() => {
                account.invalid_with_link += 1;
                account.example("invalid with a link", id);
            }
            Class::Invalid if kinds.is_empty() => {
                account.lost += 1;
                account.example("lost", id);
            }
            Class::Invalid => account.failed += 1,
            _ if !links.is_empty() => account.created += 1,
            // A conflicting copy's dead letter is not the command's outcome: one of the two
            // bodies must have its link.
            Class::Valid if plan.conflict => {
                account.lost += 1;
                account.example("lost", id);
            }
            _ if failed_event || !kinds.is_empty() => account.failed += 1,
            _ => {
                account.lost += 1;
                account.example("lost", id);
            }
        }
        if plan.conflict && !kinds.iter().any(|k| k.contains("conflict")) {
            account.lost += 1;
            account.example("conflicting copy lost", id);
        }
    }
    for key in ledger.values() {
        let repeats = key.applied.saturating_sub(1);
        account.repeated_calls += repeats;
        account.repeated_after_lost_answer += repeats.min(key.lost + key.hung);
    }
    account.stuck = leftovers.total();
    for id in &leftovers.processing_ids {
        account.example("stuck processing", id);
    }
    account
}

/// The negative control: drops every event of one created command, copies one event, and adds
/// an event with another link for a third command. A checker that misses any of them is broken.
/// Each planted command has exactly one event: a command whose event came twice (at-least-once
/// delivery) would take a duplicate away with it when dropped, and the copy's duplicate would
/// then not show in the totals (seed 10's hour: 25,084 duplicates with the plants and without).
pub fn plant(events: &mut Vec<Event>, planned: &HashMap<String, Planned>) -> Result<(), String> {
    let mut per_command: HashMap<&str, usize> = HashMap::new();
    for e in events.iter() {
        *per_command.entry(e.command_id.as_str()).or_default() += 1;
    }
    let mut created: Vec<String> = Vec::new();
    for e in events.iter() {
        let plain = planned
            .get(&e.command_id)
            .is_some_and(|p| p.class == Class::Valid && !p.conflict)
            && per_command[e.command_id.as_str()] == 1;
        if plain && e.kind.ends_with("created") && !created.contains(&e.command_id) {
            created.push(e.command_id.clone());
            if created.len() == 3 {
                break;
            }
        }
    }
    let [dropped, copied, forged] = <[String; 3]>::try_from(created)
        .map_err(|_| "the run made fewer than 3 links: nothing to plant on".to_owned())?;
    events.retain(|e| e.command_id != dropped);
    let copy = events
        .iter()
        .find(|e| e.command_id == copied)
        .cloned()
        .expect("found above");
    events.push(copy);
    let mut forgery = events
        .iter()
        .find(|e| e.command_id == forged)
        .cloned()
        .expect("found above");
    forgery.link = Some("https://instantpaymentlink/planted-second-link".into());
    events.push(forgery);
    Ok(())
}
