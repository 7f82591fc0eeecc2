//! Integration tests against the real RabbitMQ and PostgreSQL on this machine and a real HTTP
//! provider (wiremock for scripted faults, the simulator for its own contract). One test binary,
//! one module per behaviour.

// A test or a benchmark fails loudly, and should, on what it did not expect.
#![allow(clippy::unwrap_used)]

mod alerting;
mod binary;
mod browser;
mod cli_flows;
mod cluster;
mod conflicts;
mod console;
mod console_attacks;
mod console_sessions;
mod contract;
mod dead_letter_store;
mod duplicates;
mod edit;
mod first_hour;
mod flow;
mod happy_path;
mod helpers;
mod hostile;
mod hostile_edges;
mod hostile_generated;
mod kubernetes;
mod layering;
mod observability;
mod operations;
mod pipeline;
mod provider_failures;
mod providers;
mod quick_start;
mod recovery;
mod relay;
mod replay_guard;
mod replay_safety;
mod retention;
#[path = "../common/sandbox.rs"]
mod sandbox;
mod shutdown;
mod simulator;
mod soak;
mod store_invariant;
mod validation;
mod writers;
