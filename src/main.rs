//! The `payment-link-worker` binary: parses the command line and hands over to the library.

use clap::Parser;
use std::process::ExitCode;

/// glibc's allocator took about a fifth of the worker's CPU time under load (profiled with the
/// benchmark); mimalloc does the same work for much less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = payment_link_worker::cli::Cli::parse();
    match payment_link_worker::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            payment_link_worker::telemetry::fatal(&error);
            ExitCode::FAILURE
        }
    }
}
