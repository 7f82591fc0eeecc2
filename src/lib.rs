//! payment-link-worker: consumes "create payment link" commands from RabbitMQ, records each one
//! idempotently in PostgreSQL, asks the payment provider for the link, and publishes a
//! "payment link created" event, or dead-letters the command with the reason it failed.
//!
//! The data flow reads top-down: [`startup`] builds the context, [`consumer`] takes a delivery,
//! [`pipeline`] decides its fate ([`command`] validates, [`store`] claims and records,
//! [`provider`] calls the provider), [`pipeline::fate`] carries the fate out through
//! [`broker::publisher`] (with [`relay`] as the safety net), and [`consumer`] acks or requeues.

pub mod amount;
pub mod broker;
pub mod cli;
pub mod command;
pub mod config;
pub mod console;
pub mod consumer;
pub mod context;
pub mod dead_letters;
pub mod diagnose;
pub mod errors;
pub mod fleet;
pub mod headers;
pub mod health;
pub mod http_server;
pub mod intake;
pub mod levels;
pub mod marks;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod progress;
pub mod provider;
pub mod relay;
pub mod repeats;
pub mod retention;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod text;
