//! The worker replicas: processes of the built binary, killed, stopped and started again as the
//! schedule says, their memory, file descriptors and sockets sampled every second, their logs
//! kept one file per process for the report's line counts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// One sample of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Seconds since the process started.
    pub age_s: f64,
    pub rss_kb: u64,
    pub fds: u64,
    pub sockets: u64,
}

/// One process's life: which replica, which start of it, its samples and its log.
pub struct Life {
    pub slot: usize,
    pub generation: u32,
    pub samples: Vec<Sample>,
    pub log: PathBuf,
}

struct Slot {
    child: Option<Child>,
    started: Instant,
    life: usize,
}

/// The replicas.
pub struct Fleet {
    binary: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    slots: Vec<Slot>,
    /// Every process that ran, in start order.
    pub lives: Vec<Life>,
}

impl Fleet {
    /// Starts `n` replicas of `binary` with `env`, logging under `dir`.
    pub fn start(
        binary: &Path,
        env: Vec<(String, String)>,
        dir: &Path,
        n: usize,
    ) -> anyhow::Result<Fleet> {
        let mut fleet = Fleet {
            binary: binary.to_owned(),
            env,
            dir: dir.to_owned(),
            slots: Vec::new(),
            lives: Vec::new(),
        };
        for slot in 0..n {
            let (child, life) = fleet.spawn(slot, 0)?;
            fleet.slots.push(Slot {
                child: Some(child),
                started: Instant::now(),
                life,
            });
        }
        Ok(fleet)
    }

    fn spawn(&mut self, slot: usize, generation: u32) -> anyhow::Result<(Child, usize)> {
        let log = self.dir.join(format!("worker-{slot}-{generation}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&self.binary)
            .arg("run")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_LOG")
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()?;
        self.lives.push(Life {
            slot,
            generation,
            samples: Vec::new(),
            log,
        });
        Ok((child, self.lives.len() - 1))
    }

    /// SIGKILLs replica `i` (a crash: nothing is released).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.slots[i].child.take() {
            let _ = child.kill().await;
        }
    }

    /// Sends SIGTERM to replica `i` and waits for it to stop (at most `bound`); how long it took.
    pub async fn terminate(&mut self, i: usize, bound: Duration) -> Duration {
        let started = Instant::now();
        if let Some(mut child) = self.slots[i].child.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(bound, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        started.elapsed()
    }

    /// Starts replica `i` again (after a kill or a stop).
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let generation = self.lives[self.slots[i].life].generation + 1;
        let (child, life) = self.spawn(i, generation)?;
        self.slots[i] = Slot {
            child: Some(child),
            started: Instant::now(),
            life,
        };
        Ok(())
    }

    /// Whether every replica that should run is running (one that exited by itself is not).
    pub fn exited(&mut self) -> Vec<(usize, String)> {
        let mut exited = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(child) = &mut slot.child
                && let Ok(Some(status)) = child.try_wait()
            {
                exited.push((i, status.to_string()));
                slot.child = None;
            }
        }
        exited
    }

    /// Samples every running replica.
    pub fn sample(&mut self) {
        for slot in &self.slots {
            let Some(pid) = slot.child.as_ref().and_then(Child::id) else {
                continue;
            };
            if let Some(mut sample) = sample(pid) {
                sample.age_s = slot.started.elapsed().as_secs_f64();
                self.lives[slot.life].samples.push(sample);
            }
        }
    }

    /// Stops every replica (SIGTERM, each within `bound`).
    pub async fn stop(&mut self, bound: Duration) {
        for i in 0..self.slots.len() {
            self.terminate(i, bound).await;
        }
    }
}

/// Resident memory, open file descriptors and sockets of process `pid`, from `/proc`.
fn sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mut fds = 0;
    let mut sockets = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        fds += 1;
        if std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        {
            sockets += 1;
        }
    }
    Some(Sample {
        age_s: 0.0,
        rss_kb,
        fds,
        sockets,
    })
}
