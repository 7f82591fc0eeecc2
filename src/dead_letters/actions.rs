//! Listing and archiving dead letters, shared by the CLI and the console, and what both need to
//! reach the store. Every action is recorded in the audit log.

use super::store::{self, Filter, Summary};
use super::targets::ReplayTargets;
use crate::config::Settings;
use crate::store::{self as db, PgConn, PgPool, audit};
use anyhow::Context as _;
use serde::Serialize;
use std::collections::BTreeMap;

/// A dead letter as lists show it, with whether a replay may publish it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    /// What the store holds.
    #[serde(flatten)]
    pub summary: Summary,
    /// Whether its target is one replay may publish to.
    pub replayable: bool,
    /// Why not, when it is not.
    pub not_replayable_because: Option<String>,
    /// Whether it would fail the same way again as it is, so that a replay skips it unless
    /// asked to include it.
    pub fails_again: bool,
    /// How many times a replay run published it (`replayCount` is how many times its command
    /// had been replayed before it failed).
    pub times_replayed: i64,
}

impl std::ops::Deref for Listed {
    type Target = Summary;
    fn deref(&self) -> &Summary {
        &self.summary
    }
}

impl Listed {
    /// `summary`, checked against `targets`, replayed `times_replayed` times.
    pub fn new(summary: Summary, targets: &ReplayTargets, times_replayed: i64) -> Self {
        let why = targets
            .check(&summary.original_exchange, &summary.original_routing_key)
            .err();
        Self {
            fails_again: summary.kind.fails_again(),
            summary,
            replayable: why.is_none(),
            not_replayable_because: why,
            times_replayed,
        }
    }

    /// A page of summaries as lists show them, with how often each was replayed.
    pub async fn all(
        conn: &mut PgConn,
        summaries: Vec<Summary>,
        targets: &ReplayTargets,
    ) -> Result<Vec<Listed>, db::StoreError> {
        let ids: Vec<i64> = summaries.iter().map(|s| s.id).collect();
        let replayed = store::times_replayed(conn, &ids).await?;
        Ok(summaries
            .into_iter()
            .map(|s| {
                let times = replayed.get(&s.id).copied().unwrap_or(0);
                Listed::new(s, targets, times)
            })
            .collect())
    }
}

/// What `list` found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    /// The matching dead letters, newest first (at most the limit).
    pub letters: Vec<Listed>,
    /// Of all matching dead letters, how many per kind.
    pub by_kind: BTreeMap<String, i64>,
    /// How many match in all.
    pub matching: i64,
}

/// Opens the store for an operator's command, saying why when the database cannot be reached.
pub async fn connect(settings: &Settings, what: &str) -> anyhow::Result<(PgPool, PgConn)> {
    let pool = db::pool(&settings.database)?;
    match pool.get().await {
        Ok(conn) => Ok((pool, conn)),
        Err(error) => Err(crate::diagnose::database(settings, what, error).await),
    }
}

/// Lists the newest `limit` dead letters that match, with the count per kind of all that match.
pub async fn list(
    conn: &mut PgConn,
    filter: &Filter,
    limit: i64,
    targets: &ReplayTargets,
) -> anyhow::Result<Listing> {
    let (letters, _) = store::page(conn, filter, limit, None).await?;
    let by_kind = store::count_by_kind(conn, filter).await?;
    Ok(Listing {
        letters: Listed::all(conn, letters, targets).await?,
        matching: by_kind.values().sum(),
        by_kind,
    })
}

/// Most ids a stored filter keeps (in a replay run and in the audit log): the full selection is
/// in the run's reserved rows and the audit entry's ids, so a request naming 10,000 ids does not
/// store them twice more as text.
const STORED_FILTER_IDS: usize = 100;

/// The filter as the run and the audit log keep it: bounded, with how many ids it named.
pub(super) fn stored_filter(filter: &Filter) -> anyhow::Result<serde_json::Value> {
    let mut kept = filter.clone();
    let named = kept.ids.as_ref().map(Vec::len);
    if let Some(ids) = kept.ids.as_mut() {
        ids.truncate(STORED_FILTER_IDS);
    }
    let mut value = serde_json::to_value(&kept).context("filter to JSON")?;
    if let Some(named) = named.filter(|n| *n > STORED_FILTER_IDS) {
        value["idsNamed"] = serde_json::json!(named);
    }
    Ok(value)
}

/// Archives the open dead letters that match (at most `limit`); records it in the audit log.
pub async fn archive(
    conn: &mut PgConn,
    filter: &Filter,
    limit: Option<usize>,
    actor: &str,
    source: &str,
    client_address: Option<&str>,
) -> anyhow::Result<Vec<i64>> {
    let mut ids = store::open_ids(conn, filter).await?;
    if let Some(limit) = limit {
        ids.truncate(limit);
    }
    let archived = store::archive(conn, &ids).await?;
    audit::record(
        conn,
        &audit::NewEntry {
            actor: actor.to_owned(),
            source: source.to_owned(),
            action: "archive".into(),
            filter: Some(stored_filter(filter)?),
            count: archived.len() as i32,
            ids: archived.clone(),
            run_id: None,
            client_address: client_address.map(str::to_owned),
            detail: None,
        },
    )
    .await?;
    Ok(archived)
}
