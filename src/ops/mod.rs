//! The operators' tools outside the command path and the dead-letter feature: `send`, which
//! publishes through the same confirmed publish as the worker.

pub mod send;
