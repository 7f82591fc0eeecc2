//! When each call's turn comes under a rate: turns handed out `gap` apart, re-spaced when the
//! rate changes, never saved up while the lane is idle.

use std::time::Duration;
// The runtime's clock, so tests can pause and advance it.
use tokio::time::Instant;

/// The turns handed out to calls, spaced `gap` apart from the anchor: a turn's time is computed
/// when it comes, from the spacing then. A cut re-spaces the turns already handed out (the calls
/// waiting on them would otherwise go out at the old rate, for as long as a concurrency limit's
/// worth of turns lasts, and be refused again); a turn is kept, not reset, so the calls waiting
/// do not all go at once.
pub(super) struct Schedule {
    pub(super) anchor_at: Instant,
    pub(super) anchor_turn: u64,
    pub(super) gap: Duration,
    pub(super) next_turn: u64,
}

impl Schedule {
    /// From the last turn that has come (by `now`), turns come `gap` apart; those already due
    /// stay due. Returns whether the turns came nearer (the calls waiting on them must look
    /// again, or they would go at their old times beside the new turns handed out meanwhile).
    pub(super) fn space(&mut self, now: Instant, gap: Duration) -> bool {
        if gap == self.gap {
            return false;
        }
        let nearer = gap < self.gap;
        if self.next_turn > 0 && !self.gap.is_zero() {
            let old = self.gap.as_secs_f64();
            let came = if now >= self.anchor_at {
                let after = (now - self.anchor_at).as_secs_f64() / old + 1e-9;
                (self.anchor_turn + after.floor() as u64).min(self.next_turn - 1)
            } else {
                let before = (self.anchor_at - now).as_secs_f64() / old - 1e-9;
                self.anchor_turn.saturating_sub(before.ceil() as u64)
            };
            self.anchor_at = self.time_of(came);
            self.anchor_turn = came;
        }
        self.gap = gap;
        nearer
    }

    pub(super) fn time_of(&self, turn: u64) -> Instant {
        let gaps = |n: u64| Duration::from_secs_f64(self.gap.as_secs_f64() * n as f64);
        if turn >= self.anchor_turn {
            self.anchor_at + gaps(turn - self.anchor_turn)
        } else {
            let before = gaps(self.anchor_turn - turn);
            self.anchor_at.checked_sub(before).unwrap_or(self.anchor_at)
        }
    }

    /// The next turn and its time; never in the past (an idle lane does not save up a burst).
    /// The schedule is anchored at it, so the turns' times stay exact however long it runs.
    pub(super) fn hand_out(&mut self, now: Instant) -> (u64, Instant) {
        let turn = self.next_turn;
        self.next_turn += 1;
        let at = self.time_of(turn).max(now);
        self.anchor_at = at;
        self.anchor_turn = turn;
        (turn, at)
    }
}
