//! The dead-letter vocabulary, one enum each: why a dead letter failed ([`Kind`]) and where it
//! stands ([`State`]). The store reads and writes them as text, the CLI offers them as values,
//! the API and the pages name them by [`Kind::as_str`] / [`State::as_str`].

use crate::errors::ErrorKind;
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Text;
use serde::{Deserialize, Serialize};

/// Why a dead letter failed: one of the worker's error kinds, or the broker's own reason for a
/// message it dead-lettered itself (from `x-death`). Stored, shown and accepted by its name
/// ([`Kind::as_str`]); the worker's kinds are [`ErrorKind`]'s, said once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
pub enum Kind {
    /// The worker dead-lettered it, for this reason.
    Worker(ErrorKind),
    /// The broker: the queue's delivery limit was reached.
    DeliveryLimit,
    /// The broker: its time to live ran out in the queue.
    Expired,
    /// The broker: a consumer rejected it without requeue.
    Rejected,
    /// The broker: the queue was at its length limit.
    Maxlen,
    /// Signed by the worker with a kind this version does not know.
    Unknown,
    /// Not made by this worker nor by the broker from the command queue: written into the
    /// dead-letter exchange by someone else, or signed with another key. What it claims is kept
    /// in its message; it is replayed only when asked for.
    Foreign,
}

impl Kind {
    /// Every kind, in the order lists show them.
    pub const ALL: [Kind; 13] = [
        Kind::Worker(ErrorKind::Validation),
        Kind::Worker(ErrorKind::IdempotencyConflict),
        Kind::Worker(ErrorKind::ProviderRejected),
        Kind::Worker(ErrorKind::ProviderAuth),
        Kind::Worker(ErrorKind::RetriesExhausted),
        Kind::Worker(ErrorKind::Unstorable),
        Kind::Worker(ErrorKind::InternalError),
        Kind::DeliveryLimit,
        Kind::Expired,
        Kind::Rejected,
        Kind::Maxlen,
        Kind::Unknown,
        Kind::Foreign,
    ];

    /// The name stored, shown and accepted.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Worker(error) => error.as_str(),
            Kind::DeliveryLimit => "delivery-limit",
            Kind::Expired => "expired",
            Kind::Rejected => "rejected",
            Kind::Maxlen => "maxlen",
            Kind::Unknown => "unknown",
            Kind::Foreign => "foreign",
        }
    }

    /// The kind named `text`, if there is one.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// The kind of a message the broker dead-lettered for `reason` (an `x-death` reason).
    pub fn from_broker_reason(reason: &str) -> Self {
        match reason {
            "delivery_limit" => Kind::DeliveryLimit,
            "expired" => Kind::Expired,
            "rejected" => Kind::Rejected,
            "maxlen" => Kind::Maxlen,
            _ => Kind::Unknown,
        }
    }

    /// Whether replaying a dead letter of this kind, unchanged, fails the same way again, or may
    /// not be replayed without being asked for (a foreign letter: nobody knows what it is).
    pub fn fails_again(self) -> bool {
        matches!(
            self,
            Kind::Worker(ErrorKind::Validation | ErrorKind::IdempotencyConflict) | Kind::Foreign
        )
    }
}

impl Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Kind::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown dead-letter kind {text:?}; one of {}",
                Kind::ALL.map(Kind::as_str).join(", ")
            ))
        })
    }
}

impl clap::ValueEnum for Kind {
    fn value_variants<'a>() -> &'a [Self] {
        &Kind::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a dead letter stands.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    AsExpression,
    FromSqlRow,
    clap::ValueEnum,
)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for an operator.
    Open,
    /// Taken by a replay run that has not finished with it yet.
    Replaying,
    /// Sent back to its target and confirmed by the broker.
    Replayed,
    /// Put aside by an operator.
    Archived,
    /// Fixed by an operator and sent again as a new command (its successor, `edited_into`).
    Edited,
}

impl State {
    /// Every state, in the order a dead letter goes through them.
    pub const ALL: [State; 5] = [
        State::Open,
        State::Replaying,
        State::Replayed,
        State::Archived,
        State::Edited,
    ];

    /// The name stored, shown and accepted.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Open => "open",
            State::Replaying => "replaying",
            State::Replayed => "replayed",
            State::Archived => "archived",
            State::Edited => "edited",
        }
    }

    /// The state named `text`, if there is one.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// So a kind can be compared with the name people write.
impl PartialEq<&str> for Kind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// So a state can be compared with the name people write.
impl PartialEq<&str> for State {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl ToSql<Text, Pg> for Kind {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <str as ToSql<Text, Pg>>::to_sql(self.as_str(), out)
    }
}

impl FromSql<Text, Pg> for Kind {
    /// A kind this version does not know (written by a newer one) reads as `unknown`.
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let text = <String as FromSql<Text, Pg>>::from_sql(value)?;
        Ok(Kind::parse(&text).unwrap_or(Kind::Unknown))
    }
}

impl ToSql<Text, Pg> for State {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <str as ToSql<Text, Pg>>::to_sql(self.as_str(), out)
    }
}

impl FromSql<Text, Pg> for State {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let text = <String as FromSql<Text, Pg>>::from_sql(value)?;
        State::parse(&text).ok_or_else(|| format!("unknown dead-letter state {text:?}").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_and_agree_with_serde_and_the_command_line() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
            let value = clap::ValueEnum::to_possible_value(&kind).unwrap();
            assert_eq!(value.get_name(), kind.as_str());
        }
        for state in State::ALL {
            assert_eq!(State::parse(state.as_str()), Some(state));
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        for error in ErrorKind::ALL {
            assert!(Kind::parse(error.as_str()).is_some(), "{error:?}");
        }
        assert_eq!(Kind::parse("bad\0kind"), None);
        assert_eq!(Kind::from_broker_reason("expired"), Kind::Expired);
    }
}
