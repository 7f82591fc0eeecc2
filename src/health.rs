//! The operator's HTTP endpoint (`telemetry.http_listen`): `/healthz` says the process is alive,
//! `/readyz` whether it can do its job (consuming from the broker, database reachable, provider
//! circuit not open) and which part is not, `/metrics` the figures in Prometheus text format.

use crate::metrics::MetricsHandle;
use crate::provider::lanes::Lanes;
use crate::store::PgPool;
use axum::Router;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long `/readyz` waits for the database before calling it unreachable.
const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most open circuits `/readyz` names (the rest are counted).
const LISTED_CIRCUITS: usize = 20;
/// Longest a request may take, body included: above the database check's own bound.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint looks at.
#[derive(Clone)]
pub struct Probe {
    /// The figures for `/metrics`.
    pub metrics: Arc<MetricsHandle>,
    /// Checked by `/readyz`.
    pub pool: PgPool,
    /// Checked by `/readyz`.
    pub lanes: Arc<Lanes>,
    /// True while the worker holds a live consumer on the command queue.
    pub consuming: Arc<AtomicBool>,
    /// Checked by `/readyz`: a publishing connection the broker blocked (an alarm).
    pub publisher: crate::broker::publisher::Publisher,
    /// The worker's name, which starts the names of its broker connections (for `/readyz` to
    /// say which node each is on).
    pub instance_id: String,
}

/// The routes.
pub fn router(probe: Probe) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { json(StatusCode::OK, r#"{"status":"alive"}"#.into()) }),
        )
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(probe)
}

/// Serves the routes on `listener` until `stop` fires, bounded like every listener
/// ([`crate::http_server::Limits::HEALTH`]); a request not answered within
/// [`REQUEST_TIMEOUT`] gets 503.
pub async fn serve(listener: tokio::net::TcpListener, probe: Probe, stop: CancellationToken) {
    let app = router(probe).layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::SERVICE_UNAVAILABLE,
        REQUEST_TIMEOUT,
    ));
    crate::http_server::serve(listener, app, crate::http_server::Limits::HEALTH, stop).await;
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn ready(Extract(probe): Extract<Probe>) -> Response {
    let broker = if !probe.consuming.load(Ordering::SeqCst) {
        "not consuming (connecting to the broker)".to_owned()
    } else if probe.publisher.blocked().await {
        "blocked: the broker refuses publishes (memory or disk alarm)".to_owned()
    } else {
        "ok".to_owned()
    };
    let database = match tokio::time::timeout(DATABASE_CHECK_TIMEOUT, async {
        use diesel_async::RunQueryDsl;
        let mut conn = probe.pool.get().await.map_err(|e| e.to_string())?;
        diesel::sql_query("SELECT 1")
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())
    })
    .await
    {
        Ok(Ok(_)) => "ok".to_owned(),
        // The detail goes to the log, not to whoever can reach the port.
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: the database is unreachable");
            "unreachable (the worker's log says why)".to_owned()
        }
        Err(_) => "unreachable: no answer within 2 s".to_owned(),
    };
    // One provider down leaves the worker useful for the others: it is not ready only when every
    // provider it has called is down.
    let (open, all_open) = probe.lanes.open_circuits();
    let provider = if open.is_empty() {
        "ok".to_owned()
    } else {
        // Bounded: a stream of made-up provider ids must not make the answer grow.
        let ids: Vec<String> = open
            .iter()
            .take(LISTED_CIRCUITS)
            .map(i64::to_string)
            .collect();
        let more = match open.len().saturating_sub(LISTED_CIRCUITS) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        format!(
            "circuit open for paymentProviderId {}{more}: that provider looks down",
            ids.join(", ")
        )
    };
    // Shown, not counted against readiness: a stuck ingester must be seen, but taking every
    // replica out of rotation for it would block a rolling update that may be its fix.
    let ingest_failures = probe
        .metrics
        .metrics
        .levels
        .dead_letter_ingest_failures
        .load(Ordering::Relaxed);
    let ingestion = match ingest_failures {
        0 => "ok".to_owned(),
        n => format!("failing: {n} tries in a row (the worker's log says why)"),
    };
    let ready = broker == "ok" && database == "ok" && !all_open;
    let nodes: std::collections::BTreeMap<String, String> = crate::broker::nodes()
        .into_iter()
        .filter(|(connection, _)| connection.starts_with(&probe.instance_id))
        .collect();
    let body = serde_json::json!({
        "ready": ready,
        "broker": broker,
        "brokerNodes": nodes,
        "database": database,
        "provider": provider,
        "deadLetterIngestion": ingestion,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body.to_string())
}

/// OpenMetrics (with exemplars) to a scraper that asks for it, the Prometheus text otherwise.
async fn metrics(Extract(probe): Extract<Probe>, headers: axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    let (content_type, text) = if openmetrics {
        (
            crate::metrics::openmetrics::CONTENT_TYPE,
            probe.metrics.render_openmetrics(),
        )
    } else {
        ("text/plain; version=0.0.4", probe.metrics.render())
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], text).into_response()
}
