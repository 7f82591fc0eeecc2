//! The subcommands of the `payment-link-worker` binary.

use crate::config::Settings;
use crate::dead_letters::command_line::DeadLetterCommands;
use crate::ops::send::{self, SendArgs};
use crate::ops::shutdown_signal;
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

/// The environment `run` reads, as its --help lists it.
const RUN_ENV: &str = "Environment:\n  PROVIDER_TOKEN     the provider's bearer token (required)\n  \
    PROVIDER_BASE_URL  the provider API (default http://127.0.0.1:8080)\n  \
    AMQP_URL           RabbitMQ (default amqp://guest:guest@127.0.0.1:5672/%2f)\n  \
    DATABASE_URL       PostgreSQL (default postgres://postgres@127.0.0.1:5432/payment_links)\n  \
    PAYMENT_LINK_WORKER__SECTION__KEY  any other setting (config/default.toml lists them)";

/// The environment `console` reads, as its --help lists it.
const CONSOLE_ENV: &str = "Environment:\n  CONSOLE_OPERATOR_TOKEN  one operator's token, 24 characters at least (or \
    [[console.operators]] in a config file; see `console hash-token`)\n  \
    CONSOLE_OPERATOR_NAME   that operator's name (default operator)\n  \
    DATABASE_URL            PostgreSQL\n  AMQP_URL                RabbitMQ, for replays\n  \
    PAYMENT_LINK_WORKER__SECTION__KEY  any other setting";

/// The environment `send` and `events` read, as their --help lists it.
const BROKER_ENV: &str = "Environment:\n  AMQP_URL  RabbitMQ (default amqp://guest:guest@127.0.0.1:5672/%2f)\n  \
    PAYMENT_LINK_WORKER__SECTION__KEY  any other setting (config/default.toml lists them)";

/// The environment `status` reads, as its --help lists it.
const STATUS_ENV: &str = "Environment:\n  DATABASE_URL  PostgreSQL (the workers' heartbeats, commands \
    and dead letters)\n  AMQP_URL      RabbitMQ (queue depths)\n  \
    PAYMENT_LINK_WORKER__SECTION__KEY  any other setting";

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the worker until SIGTERM or ctrl-c (migrations run first unless disabled).
    #[command(after_help = RUN_ENV)]
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run a local simulator of the payment provider API.
    ProviderSim(ProviderSimArgs),
    /// Publish one command (publisher-confirmed) and print its command id; with --wait, also
    /// what became of it; with --count N or --json -, many on one connection.
    #[command(after_help = BROKER_ENV)]
    Send(SendArgs),
    /// Print the events the worker publishes as they come (short lines at a terminal, JSON lines
    /// when piped), from a temporary queue of its own bound to the event exchange.
    #[command(after_help = BROKER_ENV)]
    Events(crate::ops::events::EventsArgs),
    /// One screen on the whole fleet: queue depths, the last minute's outcomes and latency,
    /// each provider's rate, load and breaker, the replicas alive, open dead letters.
    #[command(after_help = STATUS_ENV)]
    Status(crate::ops::status::StatusArgs),
    /// Inspect, replay and archive dead-lettered commands (in the dead-letter store).
    #[command(subcommand)]
    DeadLetters(DeadLetterCommands),
    /// Serve the operators' web console and its JSON API on console.listen (needs PostgreSQL,
    /// and RabbitMQ for replays; not the provider).
    #[command(after_help = CONSOLE_ENV)]
    Console(ConsoleArgs),
    /// About the settings themselves.
    #[command(subcommand)]
    Config(ConfigCommands),
}

/// What `config` tells.
#[derive(Debug, Subcommand)]
pub enum ConfigCommands {
    /// Print every setting (type, default, environment variables, what it is for) as Markdown,
    /// from the defaults compiled in; docs/configuration.md is this output.
    Reference,
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
    /// Answer 429 with `Retry-After: 1` above this many requests per second (changed while it
    /// runs by `PUT /_sim/rate-limit` with the new number, 0 for none).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit: Option<u32>,
    /// Answer 429 without a `Retry-After` header, as some providers do.
    #[arg(long)]
    pub no_retry_after: bool,
    /// Answer 503 to every call for this paymentProviderId (repeatable).
    #[arg(long, value_name = "ID")]
    pub fail_provider_id: Vec<i64>,
    /// Answer 503 to 30 % of the calls for this paymentProviderId (repeatable): a provider that
    /// fails transiently.
    #[arg(long, value_name = "ID")]
    pub flaky_provider_id: Vec<i64>,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Needs no settings: it describes them, valid or not.
    if let Commands::Config(ConfigCommands::Reference) = cli.command {
        print!("{}", crate::config::reference::markdown());
        return Ok(());
    }
    let settings = Settings::load(cli.config.as_deref())?;
    let _telemetry = telemetry::init(&settings.log)?;
    let service = matches!(
        cli.command,
        Commands::Run | Commands::Console(ConsoleArgs { action: None })
    );
    if !service {
        telemetry::fatal_as_text();
    }
    match cli.command {
        Commands::Run => {
            settings.check_for_worker()?;
            let stop = CancellationToken::new();
            // Listening before start-up begins: a stop asked for while it goes is honoured.
            let signal = shutdown_signal();
            tokio::spawn({
                let stop = stop.clone();
                async move {
                    signal.await;
                    tracing::info!("shutdown requested");
                    stop.cancel();
                }
            });
            match startup::start(settings, stop.clone()).await {
                Ok(running) => running.wait().await,
                // Stopped before it took a command: nothing to drain, a clean exit.
                Err(error) if stop.is_cancelled() => {
                    tracing::info!(reason = %error, "stopped before starting");
                    Ok(())
                }
                Err(error) => Err(error),
            }
        }
        Commands::Migrate => {
            let pool = store::pool(&settings.database)?;
            match startup::apply_migrations(&settings, &pool).await? {
                0 => println!("the database schema is up to date"),
                applied => println!("applied {applied} migration(s)"),
            }
            Ok(())
        }
        Commands::ProviderSim(args) => provider_sim(args).await,
        Commands::Events(args) => crate::ops::events::run(&settings, &args).await,
        Commands::Status(args) => crate::ops::status::run(&settings, &args).await,
        Commands::Send(args) => send::run(&settings, &args).await,
        Commands::DeadLetters(command) => {
            crate::dead_letters::command_line::run(&settings, command).await
        }
        Commands::Console(ConsoleArgs {
            action: Some(ConsoleCommands::HashToken { name, role }),
        }) => {
            let token = read_token().context("cannot read the token from standard input")?;
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
        Commands::Config(_) => unreachable!("answered before the settings are loaded"),
    }
}

/// The token `console hash-token` hashes: all of standard input, or at a terminal one line typed
/// without echo (the token never shows on the screen or in its scrollback).
fn read_token() -> std::io::Result<String> {
    use std::io::{IsTerminal, Read};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut token = String::new();
        stdin.lock().read_to_string(&mut token)?;
        return Ok(token);
    }
    /// Turns the terminal's echo back on, however the read ends.
    struct Echo;
    impl Drop for Echo {
        fn drop(&mut self) {
            let _ = std::process::Command::new("stty")
                .arg("echo")
                .stdin(std::process::Stdio::inherit())
                .status();
            eprintln!();
        }
    }
    // Silenced before the prompt shows: what is typed (or pasted) as soon as it does is never
    // echoed.
    let silenced = std::process::Command::new("stty")
        .arg("-echo")
        .stdin(std::process::Stdio::inherit())
        .status()
        .is_ok_and(|s| s.success());
    let _echo = silenced.then_some(Echo);
    eprint!("token (not shown): ");
    let mut token = String::new();
    stdin.read_line(&mut token)?;
    Ok(token)
}

/// Runs the provider simulator until it is stopped.
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
        no_retry_after: args.no_retry_after,
        fail_provider_ids: args.fail_provider_id,
        flaky_provider_ids: args.flaky_provider_id,
    };
    Ok(sim::serve(listener, options, stop).await?)
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
