//! payment-link-worker: consumes "create payment link" commands from RabbitMQ, records each one
//! idempotently in PostgreSQL, asks the payment provider for the link, and publishes a
//! "payment link created" event, or dead-letters the command with the reason it failed.
//!
//! The data flow reads top-down: [`worker`] takes a delivery, [`command`] validates it, [`store`]
//! records it, [`provider`] calls the provider, [`broker::publisher`] publishes the outcome, and
//! [`worker`] acks, requeues or dead-letters it.

pub mod amount;
pub mod broker;
pub mod cli;
pub mod command;
pub mod config;
pub mod dead_letters;
pub mod errors;
pub mod health;
pub mod metrics;
pub mod provider;
pub mod store;
pub mod telemetry;
pub mod worker;
