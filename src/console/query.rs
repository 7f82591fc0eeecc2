//! What a request asks for, checked before it reaches the store: the list's query (the filters
//! the CLI has, as text so that an empty form field means "any"), and the bounds every filter
//! must keep (no NUL, bounded text, at most [`MAX_IDS`] ids).

use crate::dead_letters::store::{Cursor, Filter, Kind, State};
use chrono::{DateTime, Utc};
use serde::Deserialize;

/// The list's query: the filters the CLI has, a page size and the cursor of the next page. Kept
/// as text, so an empty form field means "any" rather than a refusal.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ListQuery {
    pub kind: Option<String>,
    pub state: Option<String>,
    pub q: Option<String>,
    pub command_id: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub provider_id: Option<String>,
    pub invoice_id: Option<String>,
    pub customer_id: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// Why `value` is not one of `names`.
fn one_of<const N: usize>(name: &str, value: &str, names: [&str; N]) -> String {
    format!("{name} must be one of {}, got {value:?}", names.join(", "))
}

/// A query value that is not empty.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// A query value parsed, naming the parameter when it does not parse.
fn parsed<T: std::str::FromStr>(
    value: &Option<String>,
    name: &str,
    what: &str,
) -> Result<Option<T>, String> {
    given(value)
        .map(|v| {
            v.parse()
                .map_err(|_| format!("{name} must be {what}, got {v:?}"))
        })
        .transpose()
}

impl ListQuery {
    /// The store's filter, or why a parameter is wrong.
    pub(super) fn filter(&self) -> Result<Filter, String> {
        let time = "an RFC 3339 time such as 2026-12-01T00:00:00Z";
        let filter = Filter {
            kind: given(&self.kind)
                .map(|k| {
                    Kind::parse(k).ok_or_else(|| one_of("kind", k, Kind::ALL.map(Kind::as_str)))
                })
                .transpose()?,
            state: given(&self.state)
                .map(|s| {
                    State::parse(s).ok_or_else(|| one_of("state", s, State::ALL.map(State::as_str)))
                })
                .transpose()?,
            command_id: given(&self.command_id).map(str::to_owned),
            since: parsed::<DateTime<Utc>>(&self.since, "since", time)?,
            until: parsed::<DateTime<Utc>>(&self.until, "until", time)?,
            provider_id: parsed(&self.provider_id, "providerId", "a whole number")?,
            invoice_id: parsed(&self.invoice_id, "invoiceId", "a whole number")?,
            customer_id: parsed(&self.customer_id, "customerId", "a whole number")?,
            search: given(&self.q).map(str::to_owned),
            ids: None,
        };
        checked(&filter)?;
        Ok(filter)
    }

    /// The page size asked for, within 1 to [`MAX_PAGE`] (default 50).
    pub(super) fn limit(&self) -> Result<i64, String> {
        Ok(parsed::<i64>(&self.limit, "limit", "a whole number")?
            .unwrap_or(50)
            .clamp(1, MAX_PAGE))
    }

    /// The filter, page size and cursor together, or why one of them is wrong.
    pub(super) fn parts(&self) -> Result<(Filter, i64, Option<Cursor>), String> {
        Ok((self.filter()?, self.limit()?, self.cursor()?))
    }

    /// The filters as query parameters (without the cursor), for the next page's link.
    pub(super) fn params(&self) -> Vec<(&'static str, String)> {
        [
            ("kind", &self.kind),
            ("state", &self.state),
            ("q", &self.q),
            ("commandId", &self.command_id),
            ("since", &self.since),
            ("until", &self.until),
            ("providerId", &self.provider_id),
            ("invoiceId", &self.invoice_id),
            ("customerId", &self.customer_id),
            ("limit", &self.limit),
        ]
        .into_iter()
        .filter_map(|(name, value)| {
            let value = value.as_deref().unwrap_or("").trim();
            (!value.is_empty()).then(|| (name, value.to_owned()))
        })
        .collect()
    }

    /// The cursor, or why it is not one this API gave.
    pub(super) fn cursor(&self) -> Result<Option<Cursor>, String> {
        given(&self.cursor)
            .map(|c| Cursor::decode(c).ok_or_else(|| "cursor is not one this API gave".to_owned()))
            .transpose()
    }
}

/// Most ids one request may name: beyond, a filter selects them.
pub(super) const MAX_IDS: usize = 10_000;
/// Most characters of a text filter (a command id, a search).
const MAX_FILTER_TEXT: usize = 1000;

/// Whether the store can take `filter` as it is; if not, what is wrong with it: a NUL character
/// (which PostgreSQL text cannot hold), an overlong text, too many ids.
pub(super) fn checked(filter: &Filter) -> Result<(), Unusable> {
    for (name, value) in [
        ("commandId", &filter.command_id),
        ("search", &filter.search),
    ] {
        let Some(value) = value else { continue };
        if value.contains('\0') {
            return Err(Unusable::Nul(format!(
                "{name} contains a NUL character (U+0000), which no dead letter can hold"
            )));
        }
        if value.chars().count() > MAX_FILTER_TEXT {
            return Err(Unusable::Limit(format!(
                "{name} is longer than {MAX_FILTER_TEXT} characters"
            )));
        }
    }
    if filter.ids.as_ref().is_some_and(|ids| ids.len() > MAX_IDS) {
        return Err(Unusable::Limit(format!(
            "at most {MAX_IDS} ids in one request: select more with a filter (kind, time, \
             provider, search) instead"
        )));
    }
    Ok(())
}

/// Why a filter cannot be run, which decides the API's answer.
#[derive(Debug)]
pub(super) enum Unusable {
    /// Text no dead letter can hold (a NUL): a malformed request, 400.
    Nul(String),
    /// Past a bound (too long, too many ids): a well-formed request refused, 422.
    Limit(String),
}

impl Unusable {
    /// The HTTP status the API answers it with.
    pub(super) fn status(&self) -> axum::http::StatusCode {
        match self {
            Unusable::Nul(_) => axum::http::StatusCode::BAD_REQUEST,
            Unusable::Limit(_) => axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Nul(why) | Unusable::Limit(why) => f.write_str(why),
        }
    }
}

impl From<Unusable> for String {
    fn from(unusable: Unusable) -> String {
        unusable.to_string()
    }
}

/// Most rows in one page.
pub(super) const MAX_PAGE: i64 = 500;
