//! The [`Context`] every command's processing shares: the settings, the pool, the publisher,
//! the provider client and its lanes, the batching writers. Start-up builds it
//! ([`crate::startup`]); the consumer, the pipeline and the gauges only read it, so it sits below
//! all of them.

use crate::broker::messages::EventTarget;
use crate::broker::publisher::Publisher;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::provider::client::ProviderClient;
use crate::provider::lanes::Lanes;
use crate::relay::{SentMarker, SentWriter};
use crate::store::PgPool;
use crate::store::claims::{ClaimWriter, Claims};
use crate::store::outcomes::{OutcomeWriter, Outcomes};
use anyhow::Context as _;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio_util::sync::CancellationToken;

/// Everything a command's processing needs, shared by the tasks of one worker.
pub struct Context {
    /// The settings it runs with.
    pub settings: Settings,
    /// Database connections.
    pub pool: PgPool,
    /// The confirm-mode publisher.
    pub publisher: Publisher,
    /// The provider API client.
    pub provider: ProviderClient,
    /// Each provider's circuit breaker and concurrency limit (also read by readiness).
    pub lanes: Arc<Lanes>,
    /// The figures it records.
    pub metrics: Arc<Metrics>,
    /// Claims commands in batches.
    pub claims: Claims,
    /// Records outcomes in batches.
    pub outcomes: Outcomes,
    /// Marks published outbox rows sent, in batches.
    pub sent: SentMarker,
    /// True while a consumer on the command queue is live (read by readiness).
    pub consuming: Arc<AtomicBool>,
    /// Where events go.
    pub events: EventTarget,
    /// This worker's name in command leases, unique per process.
    pub instance_id: String,
    /// Fires when the shutdown grace period is over: work in flight gives itself back.
    pub abandon: CancellationToken,
    /// What the worker's copies carry and the marks it signs them with.
    pub copies: crate::intake::Copies,
}

impl Context {
    /// Builds the context: opens the publishing connection (one of its own, named after the
    /// instance) and starts the batching writers. Tests build one this way to drive the
    /// pipeline directly.
    pub async fn new(
        settings: Settings,
        pool: PgPool,
        metrics: Arc<Metrics>,
        instance_id: String,
    ) -> anyhow::Result<Self> {
        let publisher = Publisher::open(&settings.broker, &format!("{instance_id} publisher"))
            .await
            .context("cannot open the publishing connection")?;
        let lanes = Lanes::new(&settings, metrics.lanes.clone());
        let provider = ProviderClient::new(&settings.provider, &settings.retry, lanes.clone())?;
        let marks = crate::store::with_conn(&pool, async |conn| {
            crate::marks::Marks::load(&settings, conn).await
        })
        .await
        .context("cannot read the signing key")?;
        Ok(Self {
            copies: crate::intake::Copies {
                carried: settings.broker.carried_headers.clone(),
                marks,
            },
            events: EventTarget::new(&settings),
            sent: SentWriter::start(pool.clone()),
            claims: ClaimWriter::start(pool.clone(), instance_id.clone(), settings.lease()),
            outcomes: OutcomeWriter::start(pool.clone(), instance_id.clone()),
            pool,
            publisher,
            provider,
            lanes,
            metrics,
            consuming: Arc::new(AtomicBool::new(true)),
            instance_id,
            abandon: CancellationToken::new(),
            settings,
        })
    }
}
