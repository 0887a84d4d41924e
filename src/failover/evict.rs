//! Closing the streams a move affects, and knowing when that is done.
//!
//! For each [`MoveOrder`], every session of the moved home's users still
//! bound on the node they leave gets an [`Eviction`] (a
//! `<system-shutdown/>` stream error naming the nodes and the reason)
//! carrying one shared [`DoneToken`]. The order is answered when every
//! token is dropped, that is when every affected connection has closed its
//! client stream (or given up on a client that does not read, within its
//! write deadline), and at the latest after `eviction_timeout`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

use super::hints::{Hints, Why};
use crate::control::{DoneToken, Eviction};
use crate::group::monitor::MoveOrder;
use crate::group::Move;
use crate::metrics::Metrics;
use crate::tracker::Tracker;
use crate::upstream::Nodes;

/// What the failover module needs, built once at start.
pub struct FailoverContext {
    /// Who is bound where.
    pub tracker: Arc<Tracker>,
    /// Node names for the texts.
    pub nodes: Arc<Nodes>,
    /// Evictions.
    pub metrics: Arc<Metrics>,
    /// Plans each evicted user's re-login slot.
    pub hints: Arc<Hints>,
    /// Longest wait for the streams of one move to close; connections
    /// bound their own close by the write deadline, so this is a backstop.
    pub eviction_timeout: Duration,
}

/// Starts the task that carries out move orders and drives the login
/// pacer.
pub fn spawn(ctx: FailoverContext, orders: mpsc::UnboundedReceiver<MoveOrder>) -> JoinHandle<()> {
    let ctx = Arc::new(ctx);
    let pacer = ctx.hints.pacer().clone();
    tokio::spawn(
        async move {
            tokio::join!(run(ctx, orders), pacer.drive());
        }
        .instrument(info_span!("failover")),
    )
}

async fn run(ctx: Arc<FailoverContext>, mut orders: mpsc::UnboundedReceiver<MoveOrder>) {
    let mut sweep = tokio::time::interval(Duration::from_secs(30));
    loop {
        let order = tokio::select! {
            o = orders.recv() => match o {
                Some(o) => o,
                None => return,
            },
            _ = sweep.tick() => {
                ctx.hints.pacer().expire(Instant::now());
                continue;
            }
        };
        let ctx = ctx.clone();
        // Moves run side by side: a slow one never delays the next.
        tokio::spawn(
            async move {
                let ok = carry_out(&ctx, &order.mv).await;
                let _ = order.done.send(ok);
            }
            .in_current_span(),
        );
    }
}

/// Evicts the sessions `m` affects and waits until their streams are
/// closed. Returns `false` if that took longer than the backstop.
async fn carry_out(ctx: &FailoverContext, m: &Move) -> bool {
    let start = Instant::now();
    let (token, all_done) = DoneToken::pair();
    let evicted = evict(ctx, m, &token);
    drop(token);
    ctx.metrics
        .group_evictions
        .fetch_add(evicted as u64, Ordering::Relaxed);
    if evicted == 0 {
        return true;
    }
    let done = tokio::time::timeout(ctx.eviction_timeout, all_done.wait())
        .await
        .is_ok();
    let took = start.elapsed();
    if done {
        info!(
            users_of = %ctx.nodes.name(m.users_of),
            evicted,
            ?took,
            "move done: every affected stream is closed"
        );
    } else {
        warn!(
            users_of = %ctx.nodes.name(m.users_of),
            evicted,
            ?took,
            "move not done: streams still open after the eviction timeout"
        );
    }
    done
}

/// Asks every affected connection to close, each user with its own
/// re-login slot. Returns how many connections were asked.
fn evict(ctx: &FailoverContext, m: &Move, token: &DoneToken) -> usize {
    let Some(from) = m.from else {
        return 0;
    };
    let tracker = &ctx.tracker;
    // The affected sessions, grouped by user: one slot per user.
    let mut users: Vec<String> = Vec::new();
    let mut conns: Vec<(usize, crate::control::ConnHandle)> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let sessions = tracker.sessions_on(from);
    let jids: Vec<&str> = sessions.iter().map(|(_, j)| &**j).collect();
    // One batch read: the users' slots are fetched together.
    let mut summaries = vec![None; jids.len()];
    tracker.summaries(&jids, &mut summaries);
    for ((conn, jid), user) in sessions.iter().zip(summaries) {
        let (conn, jid): (_, &str) = (*conn, jid);
        let Some(user) = user else {
            continue;
        };
        if user.home != m.users_of {
            continue;
        }
        let Some(h) = tracker.handle_of(conn) else {
            continue;
        };
        let bare = jid.split_once('/').map_or(jid, |(b, _)| b).to_owned();
        let next = users.len();
        let i = *index.entry(bare.clone()).or_insert(next);
        if i == next {
            users.push(bare);
        }
        conns.push((i, h));
    }
    if conns.is_empty() {
        return 0;
    }
    let name = |n| ctx.nodes.name(n);
    let why = Why::of_move(m.why, m.to == Some(m.users_of));
    let text = match m.to {
        Some(to) => format!(
            "the users of node {} move from {} to {} ({})",
            name(m.users_of),
            name(from),
            name(to),
            m.why
        ),
        None => format!(
            "no node can serve the users of node {} now ({})",
            name(m.users_of),
            m.why
        ),
    };
    let hints = ctx.hints.plan_move(&users, m.to, m.users_of, why);
    let xml: Vec<String> = hints
        .iter()
        .map(|h| ctx.hints.eviction(h, "system-shutdown", &text))
        .collect();
    let mut n = 0;
    for (i, h) in conns {
        let asked = h.evict(Eviction {
            xml: xml[i].clone(),
            done: Some(token.clone()),
        });
        if asked {
            n += 1;
        }
    }
    n
}
