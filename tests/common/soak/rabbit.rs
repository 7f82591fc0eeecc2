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

/// The cluster: its nodes' AMQP URLs, in node order.
pub struct Cluster {
    pub urls: Vec<String>,
    dir: String,
}

impl Cluster {
    /// Destroys whatever an earlier run left in `dir`, then starts 3 fresh nodes.
    pub async fn start(dir: &str) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster {
            urls: Vec::new(),
            dir: dir.to_owned(),
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

    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("bash")
            .arg(script())
            .args(args)
            .env("RMQ_CLUSTER_DIR", &self.dir)
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

    /// Stops every node and removes its data.
    pub async fn destroy(&self) {
        let _ = self.run(&["destroy"]).await;
    }
}
