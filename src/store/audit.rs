//! The audit log: who did what to which dead letters, from the CLI or the console.

use super::schema::audit_log::dsl as a;
use super::{PgConn, StoreError};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::Serialize;

/// An entry as it is written.
#[derive(Clone, Debug, Insertable, Queryable, Selectable, Serialize)]
#[diesel(table_name = super::schema::audit_log)]
#[serde(rename_all = "camelCase")]
pub struct NewEntry {
    /// Who (an operator's name, or the CLI's --operator / $USER).
    pub actor: String,
    /// `cli`, `console` or `api`.
    pub source: String,
    /// `replay`, `dry-run`, `archive`, `sign-in`, `sign-in-refused`, `token-refused`.
    pub action: String,
    /// The filter the action was given.
    pub filter: Option<serde_json::Value>,
    /// Dead letters touched.
    pub count: i32,
    /// Their ids.
    pub ids: Vec<i64>,
    /// The replay run, for a replay.
    pub run_id: Option<i64>,
    /// The console's client address (none from the CLI).
    pub client_address: Option<String>,
    /// What an edit changed: its reason, the fields before and after, the new command id.
    pub detail: Option<serde_json::Value>,
}

/// A recorded entry: what was written (read through `Deref`), with its id and time.
#[derive(Clone, Debug, Queryable, Selectable, Serialize)]
#[diesel(table_name = super::schema::audit_log)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Its id in the audit log.
    pub id: i64,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// What was written.
    #[diesel(embed)]
    #[serde(flatten)]
    pub entry: NewEntry,
}

impl std::ops::Deref for Entry {
    type Target = NewEntry;
    fn deref(&self) -> &NewEntry {
        &self.entry
    }
}

impl std::ops::DerefMut for Entry {
    fn deref_mut(&mut self) -> &mut NewEntry {
        &mut self.entry
    }
}

/// Most ids an entry shows in a list of entries; the whole entry is one request away.
pub const LISTED_IDS: usize = 100;
/// Most bytes of an entry's filter (as JSON text) a list shows as it is; a longer one (written
/// before filters were bounded) is shown as its start.
pub const LISTED_FILTER_BYTES: usize = 2000;

impl Entry {
    /// The entry as a list shows it: at most [`LISTED_IDS`] ids and a bounded filter, with how
    /// many ids it has in all.
    pub fn shortened(mut self) -> (Self, usize) {
        let all = self.ids.len();
        self.ids.truncate(LISTED_IDS);
        if let Some(filter) = &self.filter {
            let text = filter.to_string();
            if text.len() > LISTED_FILTER_BYTES {
                self.filter = Some(serde_json::json!({
                    "shortened": crate::headers::excerpt(&text, LISTED_FILTER_BYTES / 4),
                    "bytes": text.len(),
                }));
            }
        }
        (self, all)
    }
}

/// Records an entry.
pub async fn record(conn: &mut PgConn, entry: &NewEntry) -> Result<(), StoreError> {
    diesel::insert_into(a::audit_log)
        .values(entry)
        .execute(conn)
        .await?;
    Ok(())
}

/// The newest `limit` entries older than entry `before` (all when none): a page of the log,
/// newest first.
pub async fn page(
    conn: &mut PgConn,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<Entry>, StoreError> {
    Ok(a::audit_log
        .filter(a::id.lt(before.unwrap_or(i64::MAX)))
        .order(a::id.desc())
        .limit(limit)
        .select(Entry::as_select())
        .load(conn)
        .await?)
}

/// One entry, whole.
pub async fn find(conn: &mut PgConn, id: i64) -> Result<Option<Entry>, StoreError> {
    Ok(a::audit_log
        .find(id)
        .select(Entry::as_select())
        .first(conn)
        .await
        .optional()?)
}
