//! The soak: the whole system on this machine under a steady mix of commands and faults drawn
//! from a seed, with an exact account at the end (lost, two links and stuck must each be 0).
//! Run with `cargo bench --bench soak -- --minutes 60 --seed 7`; `-- --help` lists the flags;
//! see the README's Soak section. The harness is `tests/common/soak/`, shared with the CI soak.

// A test or a benchmark fails loudly, and should, on what it did not expect.
#![allow(clippy::unwrap_used)]

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[path = "../tests/common/soak/mod.rs"]
mod soak;

use soak::schedule::Kind;

/// Runs the soak and prints its report; exits 1 when the verdict is red.
#[derive(Parser)]
#[command(name = "soak", bin_name = "cargo bench --bench soak --")]
struct Args {
    /// Minutes of load and faults (the drain comes after).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// The seed the fault schedule and the command mix are drawn from (default: from the clock,
    /// printed first).
    #[arg(long)]
    seed: Option<u64>,
    /// Commands offered per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Worker replicas (worker 0 is never killed: its resources show what hours do).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Seconds between one fault's end and the next one's start, drawn in LO-HI.
    #[arg(long, default_value = "20-40", value_parser = gap)]
    gap: (u64, u64),
    /// The factor the worker's leases, timeouts, delay tiers and intervals are shortened by.
    #[arg(long, default_value_t = 10.0)]
    compress: f64,
    /// Only these kinds of fault (comma-separated names as the schedule prints them).
    #[arg(long, value_delimiter = ',', value_parser = kind)]
    faults: Vec<Kind>,
    /// Also run the negative control: the run's events with one command's dropped, one copied
    /// and one second link forged must be reported as a loss, a duplicate and two links.
    #[arg(long)]
    plant: bool,
    /// Longest wait, after the load stops, for every command's outcome (seconds; default: every
    /// compressed delay tier and retry round, and a minute).
    #[arg(long)]
    drain_s: Option<u64>,
    /// Run against this broker instead of starting a cluster: its nodes' AMQP URLs,
    /// comma-separated, with the user, password and virtual host to use. Needs --database-url;
    /// node, leader, rolling-restart, failover and read-only faults are then not drawn.
    #[arg(long, value_delimiter = ',', requires = "database_url")]
    amqp_url: Vec<String>,
    /// Run against this PostgreSQL server instead of starting a pair: a postgres:// URL whose
    /// user may create and drop the database `soak` (made afresh, left at the end). Needs
    /// --amqp-url.
    #[arg(long, requires = "amqp_url")]
    database_url: Option<String>,
    /// Where the workers' logs and the report go.
    #[arg(long, default_value = "target/soak")]
    dir: PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn gap(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = s.split_once('-').ok_or("LO-HI, e.g. 20-40")?;
    let (lo, hi) = (
        lo.parse().map_err(|_| "LO is not a number")?,
        hi.parse().map_err(|_| "HI is not a number")?,
    );
    if lo > hi || hi == 0 {
        return Err("LO must be at most HI, HI above 0".into());
    }
    Ok((lo, hi))
}

fn kind(s: &str) -> Result<Kind, String> {
    Kind::ALL
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
            format!("not a fault kind; one of {}", names.join(", "))
        })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let dir = args.dir.join(format!("seed-{seed}"));
    let options = soak::Options {
        minutes: args.minutes,
        seed,
        rate: args.rate,
        workers: args.workers.max(1),
        gap: args.gap,
        compress: args.compress.max(1.0),
        kinds: if args.faults.is_empty() {
            Kind::ALL.to_vec()
        } else {
            args.faults
        },
        plant: args.plant,
        dir: dir.clone(),
        binary: PathBuf::from(env!("CARGO_BIN_EXE_payment-link-worker")),
        drain: args.drain_s.map_or_else(
            || soak::longest_wait(args.compress.max(1.0)),
            Duration::from_secs,
        ),
        given: args.database_url.map(|database_url| soak::Given {
            amqp_urls: args.amqp_url,
            database_url,
        }),
    };
    let report = soak::run(&options).await?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("report and logs in {}", dir.display());
    if !report.green() {
        std::process::exit(1);
    }
    Ok(())
}
