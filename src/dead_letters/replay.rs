//! Replaying dead letters, shared by the CLI and the console. A replay run selects the open dead
//! letters a [`Filter`] matches, leaves those that are not replayable (see [`super::targets`]),
//! reserves the rest (state `replaying`), then publishes each stored original to its target
//! (confirmed; see [`super::publish`]) and records the outcomes, a batch at a time; a run
//! stopped midway is resumed from its reserved rows. Every run is recorded in the audit log.

use super::actions::stored_filter;
use super::replay_rows;
use super::store::{self, Filter, State};
use super::targets::ReplayTargets;

use super::guard::GuardRequest;
use crate::config::Settings;
use crate::store::replay_runs::RunState;
use crate::store::{self as db, PgConn, audit, replay_runs};
use serde::Serialize;
use std::time::Duration;

/// How a replay is asked for.
#[derive(Clone, Debug)]
pub struct ReplayRequest {
    /// Which dead letters (only open ones are replayed).
    pub filter: Filter,
    /// At most this many (the oldest first).
    pub limit: Option<usize>,
    /// Only say what would be replayed.
    pub dry_run: bool,
    /// Replays per second at most.
    pub rate: Option<f64>,
    /// Go ahead even where a replay may create a second link (see [`ReplayError::DuplicateRisk`]).
    pub accept_duplicate_risk: bool,
    /// Replay dead letters that fail again as they are (validation, an idempotency conflict)
    /// too; without it they are skipped, with the reason.
    pub include_failing: bool,
    /// Refuse to start (see [`ReplayError::FailsAgain`]) rather than skip them unasked: the
    /// console asks its operator.
    pub ask_if_failing: bool,
    /// Who asked, for the audit log.
    pub requested_by: String,
    /// `cli` or `console`.
    pub source: String,
    /// The console's client address, for the audit log (none from the CLI).
    pub client_address: Option<String>,
    /// The canary, the automatic stop and the ramp.
    pub guard: GuardRequest,
}

/// Why a replay did not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "{count} of the selected dead letters first called the provider more than \
         {window_hours} h ago (provider.idempotency_window_hours): the provider may have \
         forgotten their idempotency keys, so replaying them may create a second payment link. \
         Check with the provider, then confirm with --accept-duplicate-risk \
         (in the console: \"I accept the risk\"), or narrow the selection. First ids: {first:?}"
    )]
    /// Some selected dead letters are older than the provider's idempotency window.
    DuplicateRisk {
        /// How many.
        count: usize,
        /// The window.
        window_hours: u64,
        /// The first few of their ids.
        first: Vec<i64>,
    },
    #[error(
        "{count} of the selected dead letters fail again as they are (their body or id is what \
         was wrong): include them, or skip them and send corrected commands"
    )]
    /// Some selected dead letters fail again, and the caller asked to be asked.
    FailsAgain {
        /// How many.
        count: usize,
    },
    #[error("{0}")]
    /// The request cannot be worked as asked (a guard setting out of range): what is wrong.
    Invalid(String),
    #[error(transparent)]
    /// The database or the broker failed.
    Other(#[from] anyhow::Error),
}

impl From<db::StoreError> for ReplayError {
    fn from(error: db::StoreError) -> Self {
        Self::Other(error.into())
    }
}

/// A replay run as it starts.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    /// The run (and the console's job) id.
    pub run_id: i64,
    /// The dead letters selected (reserved unless a dry run).
    pub ids: Vec<i64>,
    /// Of those, the ones whose kind fails again as they are (validation, idempotency conflict).
    pub fail_again: Vec<i64>,
    /// Of those, the ones at risk of a second link (accepted, or the run would not start).
    pub at_risk: Vec<i64>,
    /// Matching dead letters left alone because they are not replayable, with the reason.
    pub skipped: Vec<(i64, String)>,
}

/// Selects, checks and records a run; reserves its dead letters unless it is a dry run (which
/// ends here). The publishing is [`work`].
pub async fn start(
    settings: &Settings,
    conn: &mut PgConn,
    request: &ReplayRequest,
) -> Result<Started, ReplayError> {
    request
        .guard
        .check(request.rate)
        .map_err(ReplayError::Invalid)?;
    let Chosen {
        mut ids,
        skipped,
        failing,
    } = choose(settings, conn, request).await?;
    if failing > 0 && request.ask_if_failing && !request.dry_run {
        return Err(ReplayError::FailsAgain { count: failing });
    }
    let window = Duration::from_secs(settings.provider.idempotency_window_hours * 3600);
    let mut at_risk = store::at_duplicate_risk(conn, &ids, window).await?;
    if !at_risk.is_empty() && !request.accept_duplicate_risk && !request.dry_run {
        return Err(ReplayError::DuplicateRisk {
            count: at_risk.len(),
            window_hours: settings.provider.idempotency_window_hours,
            first: at_risk.iter().take(5).copied().collect(),
        });
    }
    let filter = stored_filter(&request.filter)?;
    let run_id = replay_runs::start(conn, &new_run(request, &filter, ids.len())).await?;
    if !request.dry_run {
        // What another run took meanwhile is not this run's: it works on what it reserved.
        ids = replay_rows::reserve(conn, &ids, run_id).await?;
        ids.sort_unstable();
    }
    let selected = store::summaries(conn, &ids).await?;
    let fail_again = selected
        .iter()
        .filter(|s| s.kind.fails_again())
        .map(|s| s.id)
        .collect();
    let command_ids: Vec<String> = selected.iter().map(|s| s.command_id.clone()).collect();
    replay_runs::set_selection(conn, run_id, &command_ids).await?;
    if !request.dry_run {
        // A dry run changes nothing: its skipped count is in the run, not in each history.
        replay_rows::record_skipped(conn, run_id, &skipped).await?;
    }
    if request.dry_run {
        let counts = replay_runs::RunCounts {
            selected: ids.len() as i32,
            replayed: 0,
            skipped: skipped.len() as i32,
            failed: 0,
            left: store::count(conn, &open()).await? as i32,
        };
        replay_runs::finish(conn, run_id, counts).await?;
    }
    let entry = audit::NewEntry {
        actor: request.requested_by.clone(),
        source: request.source.clone(),
        action: if request.dry_run { "dry-run" } else { "replay" }.into(),
        filter: Some(filter),
        count: ids.len() as i32,
        ids: ids.clone(),
        run_id: Some(run_id),
        client_address: request.client_address.clone(),
        detail: None,
    };
    audit::record(conn, &entry).await?;
    at_risk.retain(|id| ids.binary_search(id).is_ok());
    Ok(Started {
        run_id,
        ids,
        fail_again,
        at_risk,
        skipped,
    })
}

/// The open letters a request selects, split into those to replay and those skipped (with why).
struct Chosen {
    ids: Vec<i64>,
    skipped: Vec<(i64, String)>,
    /// How many of the skipped would fail again (the rest go to a target not allowed).
    failing: usize,
}

/// The open letters `request` selects (up to its limit): those whose target the worker may
/// publish to, and unless asked for, not those that would fail again.
async fn choose(
    settings: &Settings,
    conn: &mut PgConn,
    request: &ReplayRequest,
) -> Result<Chosen, ReplayError> {
    let mut ids = store::open_ids(conn, &request.filter).await?;
    if let Some(limit) = request.limit {
        ids.truncate(limit);
    }
    let targets = ReplayTargets::new(settings);
    let selected = replay_rows::targets(conn, &ids).await?;
    let mut chosen = Chosen {
        ids: Vec::with_capacity(selected.len()),
        skipped: Vec::new(),
        failing: 0,
    };
    for (id, exchange, routing_key, kind) in selected {
        match targets.check(&exchange, &routing_key) {
            Err(why) => chosen.skipped.push((id, format!("not replayable: {why}"))),
            Ok(()) if kind.fails_again() && !request.include_failing => {
                chosen.failing += 1;
                chosen.skipped.push((id, fails_again_reason(kind)));
            }
            Ok(()) => chosen.ids.push(id),
        }
    }
    Ok(chosen)
}

/// The run a replay request starts: `total` letters, done at once when it is a dry run.
fn new_run(
    request: &ReplayRequest,
    filter: &serde_json::Value,
    total: usize,
) -> replay_runs::NewReplayRun {
    let guard = request.guard.resolve(total);
    let state = if request.dry_run {
        RunState::Done
    } else {
        RunState::Running
    };
    replay_runs::NewReplayRun {
        requested_by: request.requested_by.clone(),
        filter_kind: request.filter.kind.map(|k| k.as_str().to_owned()),
        filter_command_id: request.filter.command_id.clone(),
        max_count: request.limit.map(|l| l as i64),
        rate_per_second: request.rate,
        dry_run: request.dry_run,
        source: request.source.clone(),
        filter: Some(filter.clone()),
        state,
        total: total as i32,
        accept_duplicate_risk: request.accept_duplicate_risk,
        guard: (&guard).into(),
    }
}

/// Why a dead letter of `kind` is skipped unless failing ones are included.
fn fails_again_reason(kind: super::Kind) -> String {
    format!(
        "fails again as it is ({kind}): its body or id is what was wrong; send a corrected \
         command, or replay with --include-failing"
    )
}

pub(super) fn open() -> Filter {
    Filter {
        state: Some(State::Open),
        ..Filter::default()
    }
}
