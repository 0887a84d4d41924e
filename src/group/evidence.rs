//! Fast crash detection, as a pure piece: is what the relay saw strong
//! enough evidence that a node died to warrant one confirming connect?
//!
//! Waiting a whole heartbeat timeout for a node that crashed is a minute of
//! failed logins. The relay sees a crash first: every relayed connection of
//! the node fails at once. When failures of one node within `window` reach
//! `enough` (or every session the node had, if fewer, which includes a
//! login that finds a node with no sessions refusing the connect), the
//! evidence is strong. The driver then makes one immediate TCP connect, and
//! only a *refused* connect (the host answers, nothing listens) confirms: a
//! timeout may be the network and is left to the heartbeats.
//!
//! No clock is read here: every observation carries its time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Recent relay failures of one node.
#[derive(Debug)]
pub struct FailureWindow {
    window: Duration,
    enough: usize,
    /// (when, sessions the node had then), oldest first, within `window`
    /// of the newest.
    failures: VecDeque<(Instant, usize)>,
}

impl FailureWindow {
    /// Failures count within `window`; `enough` of them are strong evidence.
    pub fn new(window: Duration, enough: usize) -> FailureWindow {
        FailureWindow {
            window,
            enough: enough.max(1),
            failures: VecDeque::new(),
        }
    }

    /// Records a failure seen at `at` while the node had `sessions` bound
    /// sessions; returns whether the evidence is now strong.
    pub fn observe(&mut self, at: Instant, sessions: usize) -> bool {
        self.failures.push_back((at, sessions));
        while self
            .failures
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) > self.window)
        {
            self.failures.pop_front();
        }
        // Bounded by the threshold: older entries add nothing.
        while self.failures.len() > self.enough {
            self.failures.pop_front();
        }
        let had = self.failures.iter().map(|(_, s)| *s).max().unwrap_or(0);
        // "Every relayed connection failed" when the node had fewer
        // sessions than the threshold (a login to a node with none counts).
        self.failures.len() >= self.enough.min(had.max(1))
    }

    /// Forgets everything (after a confirmed failure).
    pub fn clear(&mut self) {
        self.failures.clear();
    }

    /// Failures remembered now.
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    /// Whether no failure is remembered.
    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn threshold_failures_within_the_window_are_strong() {
        let mut w = FailureWindow::new(2000 * MS, 3);
        let t0 = Instant::now();
        assert!(!w.observe(t0, 10));
        assert!(!w.observe(t0 + 500 * MS, 10));
        assert!(w.observe(t0 + 1999 * MS, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_spread_wider_than_the_window_are_not() {
        let mut w = FailureWindow::new(2000 * MS, 3);
        let t0 = Instant::now();
        assert!(!w.observe(t0, 10));
        assert!(!w.observe(t0 + 1500 * MS, 10));
        // The first one is 2.1 s old now: only two count.
        assert!(!w.observe(t0 + 2100 * MS, 10));
        assert_eq!(w.len(), 2);
        assert!(w.observe(t0 + 2200 * MS, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_with_fewer_sessions_than_the_threshold_needs_all_of_them() {
        let mut w = FailureWindow::new(2000 * MS, 3);
        let t0 = Instant::now();
        assert!(!w.observe(t0, 2));
        assert!(w.observe(t0 + MS, 2));
        // A node without sessions: one refused login is enough to confirm.
        let mut empty = FailureWindow::new(2000 * MS, 3);
        assert!(empty.observe(t0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_by_the_threshold() {
        let mut w = FailureWindow::new(Duration::from_secs(3600), 3);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            w.observe(t0 + i * MS, 1000);
        }
        assert_eq!(w.len(), 3);
        w.clear();
        assert!(w.is_empty());
    }
}
