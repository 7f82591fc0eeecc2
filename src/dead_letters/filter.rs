//! Which dead letters an operation applies to: one [`Filter`] for the CLI and the console, so
//! both offer the same filters and the database does the filtering, and the [`Cursor`] of the
//! list's keyset pagination.

use super::kind::{Kind, State};
use crate::store::schema::dead_letters::dsl as d;
use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

/// Which dead letters an operation applies to: every field given must match.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    /// Only letters of this kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// Only letters in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    /// Only the letters of this command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// Failed at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Failed before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// Only letters of this `paymentProviderId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<i64>,
    /// Only letters of this invoice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoice_id: Option<i64>,
    /// Only letters of this customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<i64>,
    /// Part of the command id, the description or the e-mail address (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<String>,
    /// Only these rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<i64>>,
}

pub(super) type Boxed<'a> = crate::store::schema::dead_letters::BoxedQuery<'a, Pg>;

impl Filter {
    /// The rows that match, as a query to refine.
    pub(super) fn apply<'a>(&'a self, mut query: Boxed<'a>) -> Boxed<'a> {
        if let Some(kind) = self.kind {
            query = query.filter(d::kind.eq(kind));
        }
        if let Some(state) = self.state {
            query = query.filter(d::state.eq(state));
        }
        if let Some(id) = &self.command_id {
            query = query.filter(d::command_id.eq(id));
        }
        if let Some(since) = self.since {
            query = query.filter(d::failed_at.ge(since));
        }
        if let Some(until) = self.until {
            query = query.filter(d::failed_at.lt(until));
        }
        if let Some(id) = self.provider_id {
            query = query.filter(d::payment_provider_id.eq(id));
        }
        if let Some(id) = self.invoice_id {
            query = query.filter(d::invoice_id.eq(id));
        }
        if let Some(id) = self.customer_id {
            query = query.filter(d::customer_id.eq(id));
        }
        if let Some(text) = self.search.as_deref().filter(|t| !t.is_empty()) {
            // Lower-cased by PostgreSQL on both sides, so case folds the same way.
            let pattern = format!("%{}%", like_escaped(text));
            query = query.filter(
                diesel::dsl::sql::<diesel::sql_types::Bool>("search_text LIKE lower(")
                    .bind::<diesel::sql_types::Text, _>(pattern)
                    .sql(")"),
            );
        }
        if let Some(ids) = &self.ids {
            query = query.filter(d::id.eq_any(ids));
        }
        query
    }
}

/// `text` with LIKE's wildcards taken literally.
fn like_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Where a page of the list ends: the next page starts after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The last letter of the previous page: its time…
    pub failed_at: DateTime<Utc>,
    /// …and its id (letters are listed newest first).
    pub id: i64,
}

impl Cursor {
    /// The opaque text form given to clients.
    pub fn encode(&self) -> String {
        format!("{}_{}", self.failed_at.timestamp_micros(), self.id)
    }

    /// Reads [`Cursor::encode`]'s form; `None` when it is not one.
    pub fn decode(text: &str) -> Option<Self> {
        let (micros, id) = text.split_once('_')?;
        Some(Self {
            failed_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: id.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_and_refuse_junk() {
        let cursor = Cursor {
            failed_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: 42,
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        for junk in ["", "x_1", "1_x", "12", "_"] {
            assert_eq!(Cursor::decode(junk), None, "{junk}");
        }
    }

    #[test]
    fn search_text_is_taken_literally() {
        assert_eq!(like_escaped("50%_a\\b"), "50\\%\\_a\\\\b");
    }
}
