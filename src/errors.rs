//! The reasons a command can end without a link. The kind decides the fate of the message and is
//! what operators filter dead letters by.

use std::fmt;

/// Why a command was dead-lettered; its text is the `x-error-kind` header and `errorKind` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The message is not a valid command; it never reached the provider.
    Validation,
    /// The command id was used before for a different request.
    IdempotencyConflict,
    /// The provider refused the request (400 and other 4xx but 401, 403, 408, 425, 429).
    ProviderRejected,
    /// The provider refused our credentials (401, 403).
    ProviderAuth,
    /// Transient failures outlasted the retry budget.
    RetriesExhausted,
    /// PostgreSQL refused the command's data although it was reachable (a value it cannot hold
    /// that the validation did not foresee): the database is not retried for it.
    Unstorable,
    /// Processing the command panicked on every delivery up to the delivery limit: a defect of
    /// the worker, reported rather than left to loop.
    InternalError,
}

impl ErrorKind {
    /// Every kind, for listings and tests.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Validation,
        ErrorKind::IdempotencyConflict,
        ErrorKind::ProviderRejected,
        ErrorKind::ProviderAuth,
        ErrorKind::RetriesExhausted,
        ErrorKind::Unstorable,
        ErrorKind::InternalError,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Validation => "validation",
            ErrorKind::IdempotencyConflict => "idempotency-conflict",
            ErrorKind::ProviderRejected => "provider-rejected",
            ErrorKind::ProviderAuth => "provider-auth",
            ErrorKind::RetriesExhausted => "retries-exhausted",
            ErrorKind::Unstorable => "unstorable",
            ErrorKind::InternalError => "internal-error",
        }
    }

    /// Whether a `payment-link.failed` event reports this failure (the invoicing system only
    /// hears of failures of well-formed commands it owns).
    pub fn publishes_failed_event(self) -> bool {
        matches!(
            self,
            ErrorKind::ProviderRejected | ErrorKind::ProviderAuth | ErrorKind::RetriesExhausted
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a command ended without a link: what its dead letter's headers, its failed event and its
/// row say. One type from the provider's answer to the dead letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The error kind, which decides the fate.
    pub kind: ErrorKind,
    /// What went wrong, in words (never with credentials).
    pub message: String,
    /// The provider's HTTP status, where there was one.
    pub http_status: Option<u16>,
    /// An excerpt of the provider's error body, where there was one.
    pub error_body: Option<String>,
    /// Every provider call made for the command so far, across deliveries and delay rounds.
    pub attempts: i32,
}

impl Failure {
    /// A failure found before any provider call (an invalid or conflicting command).
    pub fn before_any_call(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            http_status: None,
            error_body: None,
            attempts: 0,
        }
    }
}
