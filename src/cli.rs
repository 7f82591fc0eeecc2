//! The subcommands of the `payment-link-worker` binary.

use crate::config::Settings;
use crate::dead_letters::store::Filter;
use crate::dead_letters::{self, listing};
use crate::ops::send::{self, SendArgs};
use crate::provider::sim::{self, SimOptions};
use crate::{startup, store, telemetry};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Turns "create payment link" commands from RabbitMQ into payment links.
#[derive(Debug, Parser)]
#[command(name = "payment-link-worker", version, about)]
pub struct Cli {
    /// A TOML file layered over config/default.toml (environment variables still win).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    /// The subcommand.
    pub command: Commands,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the worker until SIGTERM or ctrl-c (migrations run first unless disabled).
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run a local simulator of the payment provider API.
    ProviderSim(ProviderSimArgs),
    /// Publish one command (publisher-confirmed) and print its command id; with --wait, also
    /// what became of it.
    Send(SendArgs),
    /// Inspect, replay and archive dead-lettered commands (in the dead-letter store).
    #[command(subcommand)]
    DeadLetters(DeadLetterCommands),
    /// Serve the operators' web console and its JSON API on console.listen (needs PostgreSQL,
    /// and RabbitMQ for replays; not the provider).
    Console(ConsoleArgs),
}

/// `console` alone serves the console; its subcommand helps set it up.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    #[command(subcommand)]
    /// What to do instead of serving.
    pub action: Option<ConsoleCommands>,
}

/// Set-up helpers of the console.
#[derive(Debug, Subcommand)]
pub enum ConsoleCommands {
    /// Read an operator's token on standard input (at least 24 characters, e.g. from
    /// `openssl rand -hex 24`) and print the [[console.operators]] lines that hold its SHA-256.
    HashToken {
        /// The operator's name, as the audit log shows it.
        #[arg(long, default_value = "operator")]
        name: String,
        /// What they may do.
        #[arg(long, value_enum, default_value = "operator")]
        role: crate::console::Role,
    },
}

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
    /// Send the matching open dead letters back to their original exchange and routing key (each
    /// confirmed by the broker) as one recorded run; exits non-zero if any could not be replayed.
    Replay {
        #[command(flatten)]
        /// Which dead letters.
        select: SelectArgs,
        /// Show what would be replayed; change nothing (the run is still recorded).
        #[arg(long)]
        dry_run: bool,
        /// At most this many replays per second (at least 0.1).
        #[arg(long, value_parser = replay_rate)]
        rate: Option<f64>,
        /// Replay even dead letters whose first provider call is older than
        /// provider.idempotency_window_hours (the provider may create a second link).
        #[arg(long)]
        accept_duplicate_risk: bool,
        /// Finish a run that stopped midway (its reserved dead letters), instead of a new one.
        #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["dry_run", "accept_duplicate_risk"])]
        resume: Option<i64>,
        /// Who is replaying, for the audit log (default: $USER).
        #[arg(long)]
        operator: Option<String>,
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
    flag.or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Flags of `provider-sim`.
#[derive(Debug, Args)]
pub struct ProviderSimArgs {
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Bearer token to accept (default: PROVIDER_TOKEN, as the worker uses).
    #[arg(long, env = "PROVIDER_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Latency added to every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Fraction of calls (0 to 1) answered 503.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Fraction of calls (0 to 1) that hang for a minute (to exercise callers' timeouts).
    #[arg(long, default_value_t = 0.0)]
    pub stall_rate: f64,
    /// Answer 429 with `Retry-After: 1` above this many requests per second.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit: Option<u32>,
    /// Answer 503 to every call for this paymentProviderId (repeatable).
    #[arg(long, value_name = "ID")]
    pub fail_provider_id: Vec<i64>,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    let _telemetry = telemetry::init(&settings.log)?;
    match cli.command {
        Commands::Run => {
            settings.check_for_worker()?;
            let stop = CancellationToken::new();
            let running = startup::start(settings, stop.clone()).await?;
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutdown requested");
                stop.cancel();
            });
            running.wait().await
        }
        Commands::Migrate => {
            let pool = store::pool(&settings.database)?;
            match startup::migrate(&settings, &pool).await? {
                0 => println!("the database schema is up to date"),
                applied => println!("applied {applied} migration(s)"),
            }
            Ok(())
        }
        Commands::ProviderSim(args) => provider_sim(args).await,
        Commands::Send(args) => {
            let wait = args.wait.then(|| Duration::from_secs(args.timeout));
            let (id, heard) = send::send(&settings, &args, wait).await?;
            println!("{id}");
            match heard {
                None => Ok(()),
                Some(send::Heard::Created(body)) => {
                    // As it came: re-formatting JSON through floats would change amounts.
                    println!("{}", String::from_utf8_lossy(&body));
                    Ok(())
                }
                Some(send::Heard::Failed(body)) => {
                    println!("{}", String::from_utf8_lossy(&body));
                    anyhow::bail!("command {id} failed (payment-link.failed event above)")
                }
                Some(send::Heard::DeadLettered { kind, message }) => {
                    anyhow::bail!("command {id} was dead-lettered as {kind}: {message}")
                }
            }
        }
        Commands::DeadLetters(command) => dead_letter_command(&settings, command).await,
        Commands::Console(ConsoleArgs {
            action: Some(ConsoleCommands::HashToken { name, role }),
        }) => {
            let mut token = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut token)
                .context("cannot read the token from standard input")?;
            let lines = crate::console::operator_config(&token, &name, role)
                .map_err(|why| anyhow::anyhow!("{why}"))?;
            print!("{lines}");
            Ok(())
        }
        Commands::Console(ConsoleArgs { action: None }) => {
            let listen = settings.console.listen.clone();
            let listener = tokio::net::TcpListener::bind(listen.as_str())
                .await
                .with_context(|| format!("cannot listen on {listen} (console.listen)"))?;
            let stop = CancellationToken::new();
            let on_signal = stop.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                on_signal.cancel();
            });
            crate::console::serve(settings, listener, stop).await
        }
    }
}

async fn dead_letter_command(
    settings: &Settings,
    command: DeadLetterCommands,
) -> anyhow::Result<()> {
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
        DeadLetterCommands::Replay {
            select,
            dry_run,
            rate,
            accept_duplicate_risk,
            resume,
            operator,
        } => {
            let run_id = match resume {
                Some(run_id) => run_id,
                None => {
                    let request = dead_letters::ReplayRequest {
                        filter: select.filter(),
                        limit: select.limit,
                        dry_run,
                        rate,
                        accept_duplicate_risk,
                        requested_by: operator_name(operator),
                        source: "cli".into(),
                        client_address: None,
                    };
                    let started = dead_letters::start(settings, &mut conn, &request).await?;
                    let selected =
                        crate::dead_letters::store::summaries(&mut conn, &started.ids).await?;
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
                        println!("skipping dead letter {id}: not replayable: {why}");
                    }
                    if dry_run {
                        println!(
                            "replay run {}: {} selected (dry run), {} skipped (not replayable), \
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
            let worked = dead_letters::work(settings, &mut conn, run_id, rate).await?;
            for (id, why) in &worked.skipped {
                println!("skipped dead letter {id}: not replayable: {why}");
            }
            let run = crate::store::replay_runs::find(&mut conn, run_id).await?;
            println!(
                "replay run {run_id}: {} replayed, {} failed, {} skipped (not replayable); {} open \
                 dead letter(s) left",
                worked.replayed.len(),
                worked.failed.len(),
                run.map_or(worked.skipped.len() as i32, |r| r.skipped),
                worked.left
            );
            if !worked.failed.is_empty() {
                anyhow::bail!(
                    "{} dead letter(s) could not be replayed; they are open again",
                    worked.failed.len()
                );
            }
            Ok(())
        }
    }
}

async fn provider_sim(args: ProviderSimArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.fail_rate) || !(0.0..=1.0).contains(&args.stall_rate) {
        anyhow::bail!("--fail-rate and --stall-rate must be between 0 and 1");
    }
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    tracing::info!(address = %listener.local_addr()?, latency_ms = args.latency_ms,
        fail_rate = args.fail_rate, "provider simulator listening");
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    let options = SimOptions {
        token: args.token,
        latency: Duration::from_millis(args.latency_ms),
        fail_rate: args.fail_rate,
        stall_rate: args.stall_rate,
        rate_limit: args.rate_limit,
        fail_provider_ids: args.fail_provider_id,
    };
    Ok(sim::serve(listener, options, stop).await?)
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can install a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_is_accepted_before_or_after_the_subcommand() {
        let before = Cli::try_parse_from(["plw", "--config", "a.toml", "migrate"]).unwrap();
        let after = Cli::try_parse_from(["plw", "migrate", "--config", "a.toml"]).unwrap();
        assert_eq!(before.config, after.config);
        assert_eq!(after.config.unwrap(), PathBuf::from("a.toml"));
    }

    #[test]
    fn send_flags_keep_the_amount_text() {
        let cli = Cli::try_parse_from([
            "plw",
            "send",
            "--provider-id",
            "3",
            "--amount",
            "9999999999999999.99",
            "--description",
            "d",
        ])
        .unwrap();
        let Commands::Send(args) = cli.command else {
            panic!("not send")
        };
        let body = String::from_utf8(send::body_from_flags(&args).unwrap()).unwrap();
        assert!(
            body.contains("\"amountInMajorCurrency\":9999999999999999.99"),
            "{body}"
        );
        assert!(crate::command::Command::parse(body.as_bytes()).is_ok());
    }
}
