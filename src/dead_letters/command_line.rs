//! The `dead-letters` subcommand: list, replay and archive the dead-letter store from a shell.

use super::listing;
use crate::config::Settings;
use crate::dead_letters;
use crate::dead_letters::store::Filter;
use crate::store::PgConn;
use clap::{Args, Subcommand};

/// The dead-letter operations, on the dead-letter store in PostgreSQL (the worker moves every
/// dead letter there from the dead-letter queue).
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommands {
    /// One line per matching dead letter (newest first), then the count per kind.
    List {
        #[command(flatten)]
        /// Which dead letters.
        select: SelectArgs,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one dead letter (what the console's detail page shows): why it failed,
    /// its ids, its original message and its replays.
    Show {
        /// The dead letter's id (the ID column of `list`).
        id: i64,
        /// One JSON document (the console API's shape) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send the matching open dead letters back to their original exchange and routing key (each
    /// confirmed by the broker) as one recorded run; exits non-zero if any could not be replayed.
    Replay(ReplayArgs),
    /// Fix a dead letter's command and send it again as a new command (its own id, so the
    /// provider sees a new Idempotency-Key); the letter becomes `edited`. Only the body fields
    /// may change; the edited command passes the worker's intake check before anything is sent.
    Edit {
        /// The dead letter's id.
        id: i64,
        /// A field and its new value, as JSON where it is JSON (`invoiceId=10`,
        /// `emailAddress=null` removes it), else as text (`emailAddress=a@example.com`).
        #[arg(long = "set", value_name = "FIELD=VALUE", required = true,
            value_parser = super::edit::parse_setting)]
        set: Vec<(String, Box<serde_json::value::RawValue>)>,
        /// Why: kept in the audit log.
        #[arg(long)]
        reason: String,
        /// Who is editing, for the audit log (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
    /// One replay run: its state, its guard, why it stopped, and what became of each letter it
    /// replayed (succeeded, failed again and why, or pending).
    Run {
        /// The run's id (`replay` prints it).
        id: i64,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put the matching open dead letters aside (state archived); recorded in the audit log.
    Archive {
        #[command(flatten)]
        /// Which dead letters.
        select: SelectArgs,
        /// Who is archiving, for the audit log (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
}

/// Which dead letters a dead-letter operation applies to.
#[derive(Debug, Args)]
pub struct SelectArgs {
    /// Only this kind (delivery-limit, expired, rejected, maxlen: the broker dead-lettered it).
    #[arg(long, value_enum)]
    pub kind: Option<dead_letters::Kind>,
    /// Only this state.
    #[arg(long, value_enum)]
    pub state: Option<dead_letters::State>,
    /// Only this command id.
    #[arg(long)]
    pub command_id: Option<String>,
    /// Only those that failed at or after this time (RFC 3339, e.g. 2026-12-01T00:00:00Z).
    #[arg(long, value_name = "TIME")]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only those that failed before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only this paymentProviderId.
    #[arg(long)]
    pub provider_id: Option<i64>,
    /// Only this invoiceId.
    #[arg(long)]
    pub invoice_id: Option<i64>,
    /// Only this customerId.
    #[arg(long)]
    pub customer_id: Option<i64>,
    /// Only those whose command id, description or e-mail address contains this text (any case).
    #[arg(long, value_name = "TEXT")]
    pub search: Option<String>,
    /// At most this many (list: the newest; replay and archive: the oldest).
    #[arg(long)]
    pub limit: Option<usize>,
}

impl SelectArgs {
    fn filter(&self) -> Filter {
        Filter {
            kind: self.kind,
            state: self.state,
            command_id: self.command_id.clone(),
            since: self.since,
            until: self.until,
            provider_id: self.provider_id,
            invoice_id: self.invoice_id,
            customer_id: self.customer_id,
            search: self.search.clone(),
            ids: None,
        }
    }
}

/// A replay rate: at least 0.1 a second, so a job never looks stalled to the console.
fn replay_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.1 => Ok(rate),
        _ => Err(format!("{text:?} is not a rate of at least 0.1 a second")),
    }
}

/// Who runs an operator's command: the flag, else $USER.
fn operator_name(flag: Option<String>) -> String {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    flag.or_else(|| env("USER"))
        .or_else(|| env("LOGNAME"))
        .or_else(os_user)
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| format!("someone on {}", h.trim()))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The name of the user this process runs as, from /etc/passwd (when $USER is not set, as in a
/// container or under cron).
fn os_user() -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    user_named(&std::fs::read_to_string("/etc/passwd").ok()?, uid)
}

/// The user with `uid` in a passwd file's text.
fn user_named(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_user_is_read_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nops:x:1000:1000::/home/ops:/bin/sh\n";
        assert_eq!(user_named(passwd, 1000).as_deref(), Some("ops"));
        assert_eq!(user_named(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_named(passwd, 42), None);
        assert_eq!(operator_name(Some("flag".into())), "flag");
    }
}

/// Runs a `dead-letters` subcommand.
pub async fn run(settings: &Settings, command: DeadLetterCommands) -> anyhow::Result<()> {
    let (_pool, mut conn) = dead_letters::connect(settings, "read the dead-letter store").await?;
    match command {
        DeadLetterCommands::List { select, json } => {
            let limit = select.limit.map_or(1000, |l| l as i64);
            let targets = crate::dead_letters::targets::ReplayTargets::new(settings);
            let listing = dead_letters::list(&mut conn, &select.filter(), limit, &targets).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", listing::format_listing(&listing));
            }
            Ok(())
        }
        DeadLetterCommands::Show { id, json } => {
            let letter = super::view::DeadLetterView::load(settings, &mut conn, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no dead letter has id {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letter)?);
            } else {
                print!("{}", listing::format_detail(&letter));
            }
            Ok(())
        }
        DeadLetterCommands::Archive { select, operator } => {
            let ids = dead_letters::archive(
                &mut conn,
                &select.filter(),
                select.limit,
                &operator_name(operator),
                "cli",
                None,
            )
            .await?;
            println!("archived {} dead letter(s)", ids.len());
            Ok(())
        }
        DeadLetterCommands::Replay(replay) => replay_command(settings, &mut conn, replay).await,
        DeadLetterCommands::Edit {
            id,
            set,
            reason,
            operator,
        } => {
            let request = super::edit::EditRequest {
                id,
                changes: set.into_iter().collect(),
                reason,
                requested_by: operator_name(operator),
                source: "cli".into(),
                client_address: None,
            };
            let edited = super::edit::edit(settings, &mut conn, &request).await?;
            println!(
                "dead letter {id} edited: sent as command {} (replay run {}); it is now edited",
                crate::text::visible(&edited.command_id),
                edited.job_id
            );
            println!("  before: {}", edited.before);
            println!("  after:  {}", edited.after);
            Ok(())
        }
        DeadLetterCommands::Run { id, json } => {
            let run = super::run_view::ReplayRunView::load(&mut conn, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no replay run has id {id}"))?;
            let letters = super::replay_rows::outcomes(&mut conn, id).await?;
            if json {
                let document = serde_json::json!({ "run": run, "letters": letters });
                println!("{}", serde_json::to_string_pretty(&document)?);
            } else {
                print!("{}", listing::format_run(&run, &letters));
            }
            Ok(())
        }
    }
}

/// What `dead-letters replay` is asked.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    /// Which dead letters.
    pub select: SelectArgs,
    /// Show what would be replayed; change nothing (the run is still recorded).
    #[arg(long)]
    pub dry_run: bool,
    /// At most this many replays per second (at least 0.1).
    #[arg(long, value_parser = replay_rate)]
    pub rate: Option<f64>,
    /// Replay even dead letters whose first provider call is older than
    /// provider.idempotency_window_hours (the provider may create a second link).
    #[arg(long)]
    pub accept_duplicate_risk: bool,
    /// Replay dead letters that fail again as they are (validation, an idempotency conflict)
    /// too; by default they are skipped, and the summary counts them.
    #[arg(long)]
    pub include_failing: bool,
    /// Finish a run that stopped (by itself, or midway), instead of a new one; it keeps the
    /// guard it was started with.
    #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["dry_run", "accept_duplicate_risk",
        "canary", "canary_wait", "stop_after_failures", "max_failure_ratio", "failure_window",
        "start_rate"])]
    pub resume: Option<i64>,
    #[command(flatten)]
    /// The canary, the automatic stop and the ramp.
    pub guard: GuardArgs,
    /// Who is replaying, for the audit log (default: $USER).
    #[arg(long)]
    pub operator: Option<String>,
}

/// How a replay run guards itself (see `dead_letters::guard`).
#[derive(Debug, Args)]
pub struct GuardArgs {
    /// Send this many letters first and go on only once each one succeeded (default: 1 for runs
    /// of more than 10 letters, else 0).
    #[arg(long, value_name = "N")]
    pub canary: Option<u32>,
    /// How long the canaries may take to succeed, in seconds (default 120).
    #[arg(long, value_name = "SECONDS")]
    pub canary_wait: Option<u64>,
    /// Stop once this many replayed letters failed again (default: no count).
    #[arg(long, value_name = "F")]
    pub stop_after_failures: Option<u32>,
    /// Stop once this share of the last --failure-window settled letters failed again
    /// (default 0.5; 1 turns it off).
    #[arg(long, value_name = "RATIO")]
    pub max_failure_ratio: Option<f64>,
    /// How many settled letters the failure ratio is judged over (default 20).
    #[arg(long, value_name = "W")]
    pub failure_window: Option<u32>,
    /// Start at this many replays per second and double every 10 s up to --rate.
    #[arg(long, value_parser = replay_rate, requires = "rate")]
    pub start_rate: Option<f64>,
}

impl GuardArgs {
    fn request(&self) -> dead_letters::guard::GuardRequest {
        dead_letters::guard::GuardRequest {
            canary: self.canary,
            canary_wait: self.canary_wait.map(std::time::Duration::from_secs),
            stop_after_failures: self.stop_after_failures,
            max_failure_ratio: self.max_failure_ratio,
            failure_window: self.failure_window,
            start_rate: self.start_rate,
        }
    }
}

/// `dead-letters replay`: starts a run (or resumes one), says what it takes and skips, works it
/// to its end, and says how it ended.
async fn replay_command(
    settings: &Settings,
    conn: &mut PgConn,
    replay: ReplayArgs,
) -> anyhow::Result<()> {
    let ReplayArgs {
        select,
        dry_run,
        rate,
        accept_duplicate_risk,
        include_failing,
        resume,
        operator,
        guard,
    } = replay;
    let run_id = match resume {
        Some(run_id) => {
            let taken = dead_letters::resume(conn, run_id, &operator_name(operator), "cli").await?;
            if taken > 0 {
                println!("replay run {run_id} resumed: {taken} dead letter(s) it left open");
            }
            run_id
        }
        None => {
            let request = dead_letters::ReplayRequest {
                filter: select.filter(),
                limit: select.limit,
                dry_run,
                rate,
                accept_duplicate_risk,
                include_failing,
                ask_if_failing: false,
                requested_by: operator_name(operator),
                source: "cli".into(),
                client_address: None,
                guard: guard.request(),
            };
            let started = dead_letters::start(settings, conn, &request).await?;
            let selected = crate::dead_letters::store::summaries(conn, &started.ids).await?;
            let verb = if dry_run { "would replay" } else { "replaying" };
            for letter in &selected {
                let note = if started.fail_again.contains(&letter.id) {
                    "  (fails again: its body or id is what was wrong; send a corrected \
                         command instead)"
                } else if started.at_risk.contains(&letter.id) {
                    "  (older than the provider's idempotency window: may create a second link)"
                } else {
                    ""
                };
                println!(
                    "{verb} {} (dead letter {}){note}",
                    crate::text::visible(&letter.command_id),
                    letter.id
                );
            }
            for (id, why) in &started.skipped {
                println!("skipping dead letter {id}: {why}");
            }
            let canary = crate::store::replay_runs::find(conn, started.run_id)
                .await?
                .map_or(0, |run| run.guard().canary as usize);
            if canary > 0 && !dry_run && !started.ids.is_empty() {
                let first: Vec<String> = started
                    .ids
                    .iter()
                    .take(canary)
                    .map(i64::to_string)
                    .collect();
                println!(
                    "canary: dead letter {} goes first; the rest only once it got its link",
                    first.join(", ")
                );
            }
            if dry_run {
                println!(
                    "replay run {}: {} selected (dry run), {} skipped (see above), \
                         nothing replayed",
                    started.run_id,
                    started.ids.len(),
                    started.skipped.len()
                );
                return Ok(());
            }
            started.run_id
        }
    };
    let worked = dead_letters::work(settings, conn, run_id, rate).await?;
    for (id, why) in &worked.skipped {
        println!("skipped dead letter {id}: {why}");
    }
    let run = crate::store::replay_runs::find(conn, run_id).await?;
    println!(
        "replay run {run_id}: {} replayed, {} failed, {} skipped (see above); {} open \
         dead letter(s) left",
        worked.replayed.len(),
        worked.failed.len(),
        run.map_or(worked.skipped.len() as i32, |r| r.skipped),
        worked.left
    );
    if !worked.replayed.is_empty() {
        let tally = worked.tally;
        println!(
            "so far {} succeeded, {} failed again, {} pending: `dead-letters run {run_id}` \
             shows each",
            tally.succeeded, tally.failed_again, tally.pending
        );
    }
    if let Some(reason) = &worked.stopped {
        anyhow::bail!(
            "replay run {run_id} stopped: {reason}; `dead-letters replay --resume {run_id}` \
             sends the rest"
        );
    }
    if !worked.failed.is_empty() {
        anyhow::bail!(
            "{} dead letter(s) could not be replayed; they are open again",
            worked.failed.len()
        );
    }
    Ok(())
}
