//! Logins per second per node, and the timeline of the last moves.
//!
//! One task samples the pacer's completed-login counters once a second and
//! keeps the last [`HISTORY`] seconds per node; every routing change the
//! group publishes (and every single-user move the API makes) becomes a
//! [`MoveRecord`] in a ring of the last [`MOVES_KEPT`], which then collects
//! the target's logins per second for [`HISTORY`] seconds and notes when as
//! many logins as streams evicted reached the target ("everyone back").

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::failover::Why;
use crate::group::Move;
use crate::node::{NodeId, PAIR};
use crate::view::ProxyView;

/// Seconds of per-second login counts kept per node and per move.
pub const HISTORY: usize = 120;
/// Moves kept on the timeline.
pub const MOVES_KEPT: usize = 10;

/// One move on the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct MoveRecord {
    /// When (milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// Whose users: their home node (1 or 2).
    pub users_of: u8,
    /// The node they left (1 or 2), if one served them.
    pub from: Option<u8>,
    /// The node they go to (1 or 2), if any can serve them.
    pub to: Option<u8>,
    /// Why (`failover`, `fallback`, `recovery`, `move`).
    pub why: &'static str,
    /// Streams closed by the move.
    pub evicted: u64,
    /// The logins per second the re-login window planned (`null`: all at
    /// once, or nobody to plan for).
    pub planned_rate: Option<f64>,
    /// Logins completed at the target, per second since the move (at most
    /// [`HISTORY`] entries).
    pub logins_per_second: Vec<u32>,
    /// Seconds after the move when as many logins as evicted streams had
    /// reached the target.
    pub back_after_s: Option<u64>,
    #[serde(skip)]
    back_count: u64,
}

#[derive(Debug, Default)]
struct State {
    last_total: [u64; PAIR],
    /// Per node, the last seconds' completed logins, newest last.
    per_second: [VecDeque<u32>; PAIR],
    moves: VecDeque<MoveRecord>,
    evictions_seen: u64,
}

/// The sampler's shared state.
#[derive(Debug, Default)]
pub struct Sampler {
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn num(n: NodeId) -> u8 {
    n.index() as u8 + 1
}

impl Sampler {
    /// A sampler starting from the counters' current values.
    pub fn new(view: &ProxyView) -> Sampler {
        let s = Sampler::default();
        {
            let mut st = lock(&s.state);
            st.last_total = totals(view);
            st.evictions_seen = view.metrics.group_evictions.load(Ordering::Relaxed);
        }
        s
    }

    /// Logins completed on `node` in the last full second.
    pub fn logins_per_second(&self, node: NodeId) -> u32 {
        lock(&self.state).per_second[node.index()]
            .back()
            .copied()
            .unwrap_or(0)
    }

    /// The last seconds' completed logins on `node`, oldest first.
    pub fn history(&self, node: NodeId) -> Vec<u32> {
        lock(&self.state).per_second[node.index()]
            .iter()
            .copied()
            .collect()
    }

    /// The last moves, oldest first.
    pub fn moves(&self) -> Vec<MoveRecord> {
        lock(&self.state).moves.iter().cloned().collect()
    }

    /// Records a move of `evicted` streams to `to` (a group move or a
    /// single user's move).
    pub fn record(
        &self,
        view: &ProxyView,
        users_of: NodeId,
        from: Option<NodeId>,
        to: Option<NodeId>,
        why: Why,
        evicted: u64,
    ) {
        let planned_rate = to.and_then(|t| {
            let n = evicted as usize;
            if n == 0 {
                return None;
            }
            let r = view.hints.window(t, n).planned_rate(n);
            r.is_finite().then_some(r)
        });
        let rec = MoveRecord {
            at_ms: now_ms(),
            users_of: num(users_of),
            from: from.map(num),
            to: to.map(num),
            why: why.as_str(),
            evicted,
            planned_rate,
            logins_per_second: Vec::new(),
            back_after_s: (evicted == 0).then_some(0),
            back_count: 0,
        };
        let mut st = lock(&self.state);
        if st.moves.len() == MOVES_KEPT {
            st.moves.pop_front();
        }
        st.moves.push_back(rec);
    }

    fn on_group_move(&self, view: &ProxyView, m: &Move) {
        let total = view.metrics.group_evictions.load(Ordering::Relaxed);
        let evicted = {
            let mut st = lock(&self.state);
            let e = total.saturating_sub(st.evictions_seen);
            st.evictions_seen = total;
            e
        };
        let why = Why::of_move(m.why, m.to == Some(m.users_of));
        self.record(view, m.users_of, m.from, m.to, why, evicted);
    }

    /// One second passed: the counters' differences become the newest
    /// per-second counts.
    fn tick(&self, view: &ProxyView) {
        let now = totals(view);
        let mut st = lock(&self.state);
        let mut d = [0u32; PAIR];
        for i in 0..PAIR {
            d[i] = now[i]
                .saturating_sub(st.last_total[i])
                .min(u64::from(u32::MAX)) as u32;
            let ring = &mut st.per_second[i];
            if ring.len() == HISTORY {
                ring.pop_front();
            }
            ring.push_back(d[i]);
        }
        st.last_total = now;
        for m in st.moves.iter_mut() {
            let Some(to) = m.to else { continue };
            if m.logins_per_second.len() >= HISTORY {
                continue;
            }
            let got = d[usize::from(to - 1)];
            m.logins_per_second.push(got);
            m.back_count += u64::from(got);
            if m.back_after_s.is_none() && m.back_count >= m.evicted {
                m.back_after_s = Some(m.logins_per_second.len() as u64);
            }
        }
    }

    /// Samples every second and records the group's moves, until dropped.
    pub async fn run(&self, view: ProxyView) {
        let mut moves = Some(view.group.subscribe_moves());
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            let next_move = async {
                match moves.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = every.tick() => self.tick(&view),
                m = next_move => match m {
                    Ok(m) => self.on_group_move(&view, &m),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => moves = None,
                },
            }
        }
    }
}

fn totals(view: &ProxyView) -> [u64; PAIR] {
    let c = &view.hints.pacer().stats.completed;
    [c[0].load(Ordering::Relaxed), c[1].load(Ordering::Relaxed)]
}
