//! The fault schedule, drawn from the seed alone: the same seed gives the same schedule on any
//! machine and any version, so a failing run can be run again exactly (what the run does with
//! each fault depends on timing; which faults come, when and on what does not).

use std::fmt;
use std::time::Duration;

/// SplitMix64: a small generator whose sequence is fixed by its definition, not by a crate's
/// version (a schedule printed today must come out the same next year).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for one purpose of a run: each `stream` gets its own sequence from the seed.
    pub fn new(seed: u64, stream: u64) -> Self {
        Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A whole number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// One kind of fault the soak can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A broker node's broker stopped (its VM stays), started again after the hold.
    NodeStop,
    /// A broker node's VM killed, revived after the hold.
    NodeKill,
    /// The node leading the command queue killed, revived after the hold.
    LeaderKill,
    /// Every broker node stopped and started in turn.
    RollingRestart,
    /// A worker SIGKILLed, started again after the hold.
    WorkerKill,
    /// A worker sent SIGTERM, started again once it has stopped.
    WorkerTerm,
    /// The database primary killed (`-m immediate`), the standby promoted after the hold, the
    /// old primary rebuilt as the new standby.
    DbFailover,
    /// The primary made read-only (as a demoted primary is) for the hold.
    DbReadOnly,
    /// Every worker connection to one broker node cut at once.
    BrokerCut,
    /// Every worker connection to every broker node stalled (no byte either way) for the hold.
    BrokerStall,
    /// Every worker connection to the database cut at once.
    DbCut,
    /// Every worker connection to the database stalled for the hold.
    DbStall,
    /// The provider answers 2 s late for the hold.
    ProviderSlow,
    /// The provider answers 503 to 60 % of calls for the hold.
    ProviderFailing,
    /// The provider's rate limit drops to a fraction of the offered rate for the hold.
    Provider429,
    /// 20 % of the provider's calls hang for the hold.
    ProviderHang,
    /// 20 % of the provider's calls are applied and their answer lost, for the hold.
    ProviderLoseAnswer,
}

impl Kind {
    /// Every kind, in the order a seed shuffles.
    pub const ALL: [Kind; 17] = [
        Kind::NodeStop,
        Kind::NodeKill,
        Kind::LeaderKill,
        Kind::RollingRestart,
        Kind::WorkerKill,
        Kind::WorkerTerm,
        Kind::DbFailover,
        Kind::DbReadOnly,
        Kind::BrokerCut,
        Kind::BrokerStall,
        Kind::DbCut,
        Kind::DbStall,
        Kind::ProviderSlow,
        Kind::ProviderFailing,
        Kind::Provider429,
        Kind::ProviderHang,
        Kind::ProviderLoseAnswer,
    ];

    /// Its name in the schedule and the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::NodeStop => "broker-node-stop",
            Kind::NodeKill => "broker-node-kill",
            Kind::LeaderKill => "queue-leader-kill",
            Kind::RollingRestart => "broker-rolling-restart",
            Kind::WorkerKill => "worker-sigkill",
            Kind::WorkerTerm => "worker-sigterm",
            Kind::DbFailover => "db-failover",
            Kind::DbReadOnly => "db-read-only",
            Kind::BrokerCut => "broker-connections-cut",
            Kind::BrokerStall => "broker-connections-stalled",
            Kind::DbCut => "db-connections-cut",
            Kind::DbStall => "db-connections-stalled",
            Kind::ProviderSlow => "provider-slow",
            Kind::ProviderFailing => "provider-failing",
            Kind::Provider429 => "provider-429",
            Kind::ProviderHang => "provider-hanging",
            Kind::ProviderLoseAnswer => "provider-answer-lost",
        }
    }

    /// Whether the harness needs to run the broker or the database itself to cause it (a node
    /// stopped or killed, a failover, read-only): not drawn against a broker and a database the
    /// harness was given (`--amqp-url`, `--database-url`).
    pub fn needs_control(self) -> bool {
        matches!(
            self,
            Kind::NodeStop
                | Kind::NodeKill
                | Kind::LeaderKill
                | Kind::RollingRestart
                | Kind::DbFailover
                | Kind::DbReadOnly
        )
    }

    /// Whether progress must resume within 5 s of the fault (the target): the broker's
    /// faults, and a failover counted from the promotion.
    pub fn has_target(self) -> bool {
        matches!(
            self,
            Kind::DbFailover
                | Kind::NodeStop
                | Kind::NodeKill
                | Kind::LeaderKill
                | Kind::RollingRestart
                | Kind::BrokerCut
                | Kind::BrokerStall
        )
    }

    /// How long the fault holds, drawn in `lo..=hi` seconds.
    fn hold_range(self) -> (u64, u64) {
        match self {
            Kind::BrokerCut | Kind::DbCut | Kind::RollingRestart => (0, 0),
            Kind::LeaderKill => (3, 10),
            Kind::DbFailover => (2, 2),
            Kind::WorkerKill | Kind::WorkerTerm => (1, 5),
            Kind::NodeStop | Kind::NodeKill => (5, 15),
            Kind::BrokerStall | Kind::DbStall => (3, 10),
            _ => (5, 20),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fault of the schedule.
#[derive(Clone, Debug)]
pub struct Fault {
    /// When it starts, from the start of the load.
    pub at: Duration,
    pub kind: Kind,
    /// Which node (0-based) or worker it hits, where it hits one.
    pub target: usize,
    /// How long it holds before it is undone.
    pub hold: Duration,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>7.1}s  {:<27} target {}  hold {:.0}s",
            self.at.as_secs_f64(),
            self.kind.name(),
            self.target,
            self.hold.as_secs_f64()
        )
    }
}

/// The faults of a run of `length`: the first after one gap, each next one a gap (drawn in
/// `gap`, seconds) after the previous one ends, until `length`. Kinds come in rounds: each round
/// is every kind of `kinds` once, in an order the seed shuffles, so even a short run meets many
/// kinds and a long one meets each about equally. Worker faults hit workers 1.. only: worker 0
/// runs the whole time, so its memory and file descriptors show what hours do.
pub fn draw(
    seed: u64,
    length: Duration,
    gap: (u64, u64),
    kinds: &[Kind],
    workers: usize,
) -> Vec<Fault> {
    let mut rng = Rng::new(seed, 1);
    let mut faults = Vec::new();
    let mut round: Vec<Kind> = Vec::new();
    let mut at = Duration::from_secs(rng.between(gap.0, gap.1));
    while at < length && !kinds.is_empty() {
        if round.is_empty() {
            round = kinds.to_vec();
            for i in (1..round.len()).rev() {
                round.swap(i, rng.between(0, i as u64) as usize);
            }
        }
        let kind = round.pop().expect("refilled above");
        let (lo, hi) = kind.hold_range();
        let hold = Duration::from_secs(rng.between(lo, hi));
        let target = match kind {
            Kind::WorkerKill | Kind::WorkerTerm if workers > 1 => {
                rng.between(1, workers as u64 - 1) as usize
            }
            Kind::WorkerKill | Kind::WorkerTerm => 0,
            _ => rng.between(0, 2) as usize,
        };
        faults.push(Fault {
            at,
            kind,
            target,
            hold,
        });
        at += hold + Duration::from_secs(rng.between(gap.0, gap.1));
    }
    faults
}
