//! The operators' tools, outside the command path: dead-letter listing and replay, and `send`.
//! They publish through the same confirmed publish as the worker.

pub mod dead_letters;
pub mod listing;
pub mod send;
pub mod targets;
