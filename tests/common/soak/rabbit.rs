//! The throwaway 3-node RabbitMQ cluster (`tests/scripts/rabbitmq-cluster`, ports
//! 5681-5683, beside the normal broker), driven from async code so the run goes on meanwhile.

use anyhow::{Context as _, bail};
use std::path::PathBuf;
use tokio::process::Command;

/// The script, from `RABBITMQ_CLUSTER_SCRIPT` or the repository's own.
pub fn script() -> PathBuf {
    std::env::var_os("RABBITMQ_CLUSTER_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/rabbitmq-cluster")
        })
}

/// The cluster: its nodes' AMQP URLs, in node order; and the script's directory when the
/// harness started it (none: a broker it was given, whose nodes it cannot stop).
pub struct Cluster {
    pub urls: Vec<String>,
    dir: Option<String>,
}

impl Cluster {
    /// Destroys whatever an earlier run left in `dir`, then starts 3 fresh nodes.
    pub async fn start(dir: &str) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster {
            urls: Vec::new(),
            dir: Some(dir.to_owned()),
        };
        cluster.run(&["destroy"]).await?;
        cluster.urls = cluster
            .run(&["start", "3"])
            .await?
            .lines()
            .filter(|l| l.starts_with("amqp://"))
            .map(str::to_owned)
            .collect();
        if cluster.urls.len() != 3 {
            bail!("the cluster script printed {:?}", cluster.urls);
        }
        Ok(cluster)
    }

    /// A broker the harness was given: used as it is, never stopped nor removed.
    pub fn given(urls: Vec<String>) -> Cluster {
        Cluster { urls, dir: None }
    }

    /// Whether the harness started it (and may stop its nodes and remove it).
    pub fn controlled(&self) -> bool {
        self.dir.is_some()
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let Some(dir) = &self.dir else {
            bail!(
                "the broker was given, not started by the soak: it cannot {}",
                args.join(" ")
            );
        };
        let out = Command::new("bash")
            .arg(script())
            .args(args)
            .env("RMQ_CLUSTER_DIR", dir)
            .output()
            .await
            .with_context(|| format!("cannot run {}", script().display()))?;
        if !out.status.success() {
            bail!(
                "rabbitmq-cluster {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Node `i` (0-based): stop, start, kill or revive (the script's verbs without `-node`).
    pub async fn node(&self, verb: &str, i: usize) -> anyhow::Result<()> {
        self.run(&[&format!("{verb}-node"), &(i + 1).to_string()])
            .await
            .map(drop)
    }

    /// The node (0-based) leading quorum queue `queue`.
    pub async fn leader(&self, queue: &str) -> anyhow::Result<usize> {
        let out = self.run(&["leader", queue]).await?;
        out.trim()
            .strip_prefix('c')
            .and_then(|n| n.split('@').next())
            .and_then(|n| n.parse::<usize>().ok())
            .map(|n| n - 1)
            .with_context(|| format!("the leader of {queue}: {out:?}"))
    }

    /// Stops every node and removes its data (a given broker is left as it is).
    pub async fn destroy(&self) {
        if self.dir.is_some() {
            let _ = self.run(&["destroy"]).await;
        }
    }
}
