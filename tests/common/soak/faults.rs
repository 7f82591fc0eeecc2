//! What the run is made of, and each fault of the schedule done to it and undone.

use super::fleet::Fleet;
use super::postgres::Pair;
use super::proxy::Proxy;
use super::rabbit::Cluster;
use super::schedule::{Fault, Kind};
use payment_link_worker::provider::sim::Sim;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The pieces a fault acts on.
pub struct World {
    pub cluster: Cluster,
    pub pg: Pair,
    pub fleet: Arc<Mutex<Fleet>>,
    /// One per broker node, in node order: the workers reach the broker only through them.
    pub broker_proxies: Vec<Proxy>,
    /// One per database host, in host order.
    pub db_proxies: Vec<Proxy>,
    pub sim: Sim,
    pub command_queue: String,
    /// Commands offered per second (the 429 fault sets a limit below it).
    pub rate: f64,
    /// How long a worker may take to stop after SIGTERM.
    pub stop_bound: Duration,
}

/// A fault as it was done.
#[derive(Clone, Debug)]
pub struct Done {
    pub fault: Fault,
    /// When it started, from the start of the load.
    pub started: Duration,
    /// From when progress is expected again at the latest (its start, a promotion's end, or a
    /// stall's end).
    pub progress_from: Duration,
    /// When it was undone.
    pub ended: Duration,
    /// What happened on the way (a node's name, a stop's time), or why it could not be done.
    pub note: String,
}

impl World {
    /// Does `fault`, holds it, undoes it.
    pub async fn apply(&mut self, fault: &Fault, start: Instant) -> Done {
        let started = start.elapsed();
        let mut progress_from = started;
        let note = match self.act(fault, start, &mut progress_from).await {
            Ok(note) => note,
            Err(error) => format!("FAILED: {error:#}"),
        };
        Done {
            fault: fault.clone(),
            started,
            progress_from,
            ended: start.elapsed(),
            note,
        }
    }

    async fn act(
        &mut self,
        fault: &Fault,
        start: Instant,
        progress_from: &mut Duration,
    ) -> anyhow::Result<String> {
        let hold = fault.hold;
        // The harness's cluster has 3 nodes; a broker it was given has as many as its URLs.
        let node = fault.target % self.broker_proxies.len().max(1);
        let faults = self.sim.faults();
        let provider =
            |knob: &std::sync::atomic::AtomicU32, value: u32| knob.store(value, Ordering::SeqCst);
        Ok(match fault.kind {
            Kind::NodeStop | Kind::NodeKill => {
                let (down, up) = if fault.kind == Kind::NodeStop {
                    ("stop", "start")
                } else {
                    ("kill", "revive")
                };
                self.cluster.node(down, node).await?;
                tokio::time::sleep(hold).await;
                self.cluster.node(up, node).await?;
                format!("node {}", node + 1)
            }
            Kind::LeaderKill => {
                let leader = self.cluster.leader(&self.command_queue).await?;
                self.cluster.node("kill", leader).await?;
                tokio::time::sleep(hold).await;
                self.cluster.node("revive", leader).await?;
                format!("leader was node {}", leader + 1)
            }
            Kind::RollingRestart => {
                for i in 0..3 {
                    self.cluster.node("stop", i).await?;
                    self.cluster.node("start", i).await?;
                }
                "nodes 1, 2, 3 in turn".into()
            }
            Kind::WorkerKill => {
                self.fleet.lock().await.kill(fault.target).await;
                tokio::time::sleep(hold).await;
                self.fleet.lock().await.restart(fault.target)?;
                format!("worker {}", fault.target)
            }
            Kind::WorkerTerm => {
                let took = self
                    .fleet
                    .lock()
                    .await
                    .terminate(fault.target, self.stop_bound)
                    .await;
                tokio::time::sleep(hold).await;
                self.fleet.lock().await.restart(fault.target)?;
                format!(
                    "worker {} stopped in {:.1} s",
                    fault.target,
                    took.as_secs_f64()
                )
            }
            Kind::DbFailover => {
                let old = self.pg.primary;
                self.pg.fail_over(hold).await?;
                *progress_from = start.elapsed();
                self.pg.rebuild_standby(old).await?;
                self.pg.synchronous_again().await?;
                format!(
                    "host {} promoted; host {} rebuilt as its standby",
                    1 - old,
                    old
                )
            }
            Kind::DbReadOnly => {
                self.pg.read_only(true).await?;
                tokio::time::sleep(hold).await;
                self.pg.read_only(false).await?;
                format!("host {}", self.pg.primary)
            }
            Kind::BrokerCut => {
                self.broker_proxies[node].cut();
                format!("node {}", node + 1)
            }
            Kind::DbCut => {
                self.db_proxies.iter().for_each(Proxy::cut);
                "both hosts".into()
            }
            Kind::BrokerStall | Kind::DbStall => {
                let proxies = if fault.kind == Kind::BrokerStall {
                    &self.broker_proxies
                } else {
                    &self.db_proxies
                };
                proxies.iter().for_each(|p| p.stall(true));
                tokio::time::sleep(hold).await;
                proxies.iter().for_each(|p| p.stall(false));
                // Nothing can move while every connection is held: what counts is how soon
                // progress comes back once they are let go.
                *progress_from = start.elapsed();
                "every connection".into()
            }
            Kind::ProviderSlow => {
                faults.latency_ms.store(2000, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                faults.latency_ms.store(0, Ordering::SeqCst);
                "2 s per answer".into()
            }
            Kind::ProviderFailing | Kind::ProviderHang | Kind::ProviderLoseAnswer => {
                let (knob, per_mille) = match fault.kind {
                    Kind::ProviderFailing => (&faults.fail_per_mille, 600),
                    Kind::ProviderHang => (&faults.hang_per_mille, 200),
                    _ => (&faults.lose_per_mille, 200),
                };
                provider(knob, per_mille);
                tokio::time::sleep(hold).await;
                provider(knob, 0);
                format!("{} of 1000 calls", per_mille)
            }
            Kind::Provider429 => {
                let limit = ((self.rate * 0.5) as u32).max(5);
                self.sim.set_rate_limit(limit);
                tokio::time::sleep(hold).await;
                self.sim.set_rate_limit(0);
                format!("limit {limit}/s")
            }
        })
    }
}
