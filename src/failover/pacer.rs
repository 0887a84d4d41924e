//! The login pacer: how fast each node takes logins back after a move.
//!
//! The core, [`NodePacer`], is pure (the time is passed in): a token
//! bucket per node whose rate adapts to the node's login latency (auth
//! forwarded → bind result). The rate grows while logins wait for tokens
//! and the latency stays within `latency_tolerance` × the node's unloaded
//! latency, multiplicatively at first and additively after the first sign
//! of overload; it shrinks when the latency passes that bound or the node
//! refuses logins as overloaded — at most halved per interval, and after a
//! slowdown (not after refusals) back up multiplicatively to near the rate
//! it began at. Always within `[min_rate, max_rate]`.
//!
//! [`Pacer`] puts it to work for every node:
//!
//! - a moved user's login (the user has a slot) waits for its slot, then
//!   for a token, in arrival order; a login whose wait would pass the
//!   allowed hold is **refused** at once with the time it should come back,
//!   which becomes its new slot;
//! - a login of a user who was not moved takes a token if one is there and
//!   never waits, so the users of a node that was not hit are never delayed
//!   behind a storm;
//! - a driver task hands out the tokens as they accrue, so a rate change
//!   applies to the logins already waiting.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::FailoverConfig;
use crate::node::NodeId;

/// The pacer's parameters (from `[failover]`).
#[derive(Debug, Clone, Copy)]
pub struct PacerParams {
    /// Start rate, logins per second.
    pub initial_rate: f64,
    /// Lowest rate.
    pub min_rate: f64,
    /// Highest rate.
    pub max_rate: f64,
    /// Latency above this multiple of the unloaded latency means overload.
    pub latency_tolerance: f64,
    /// How often the rate is revised.
    pub adjust_interval: Duration,
    /// The furthest estimated turn a refused login is given.
    pub max_turn: Duration,
}

impl From<&FailoverConfig> for PacerParams {
    fn from(c: &FailoverConfig) -> Self {
        PacerParams {
            initial_rate: c.initial_rate,
            min_rate: c.min_rate,
            max_rate: c.max_rate,
            latency_tolerance: c.latency_tolerance,
            adjust_interval: c.adjust_interval,
            max_turn: c.max_turn,
        }
    }
}

/// Samples needed in an interval before its latency counts.
const MIN_SAMPLES: u32 = 3;
/// Rate factor on overload.
const DECREASE: f64 = 0.85;
/// Rate factor per interval before the first overload of a storm.
const SLOW_START: f64 = 1.5;
/// On overload, the rate drops at least to this share of what the node
/// delivered in the interval.
const DELIVERED_SHARE: f64 = 0.95;
/// One interval's cut never takes the rate below this share of it.
const MAX_CUT: f64 = 0.5;
/// Rate growth per interval after it, as a share of the rate.
const ADDITIVE: f64 = 0.04;
/// Tokens never pile up beyond this many seconds' worth...
const BURST: f64 = 0.05;
/// ... or two tokens, so that two stratified slots that happen to fall
/// close together (the end of one stratum, the start of the next) are
/// both let in at once.
const MIN_BURST: f64 = 2.0;

/// One node's pacing state. Pure: every method takes the time.
#[derive(Debug, Clone)]
pub struct NodePacer {
    p: PacerParams,
    rate: f64,
    tokens: f64,
    last_refill: Instant,
    /// Below this rate the rate grows multiplicatively; at or above it,
    /// additively. After a cut, near the rate the overload began at.
    threshold: f64,
    /// The rate when the current run of cuts began.
    overload_began: Option<f64>,
    /// After a cut, overload signals of logins admitted before it are
    /// ignored until this time.
    calm_until: Instant,
    /// Lowest mean login latency of an interval, in seconds.
    base: Option<f64>,
    interval_start: Instant,
    sum: f64,
    samples: u32,
    overloads: u32,
    /// A login waited for a token in this interval.
    limited: bool,
    /// The proxy's own worst scheduling delay in this interval (how late
    /// the token driver ran): a login latency read while the proxy itself
    /// lags includes that lag, which is not the node's.
    lag: Duration,
    /// A fixed re-login window's planned rate and how long it is in force
    /// (the window's end plus the time its slots are remembered): tokens
    /// accrue at exactly that rate, so the node sees the plan, and the
    /// stragglers after the window come back no faster either.
    plan: Option<(f64, Instant)>,
    /// The node refused logins as overloaded while the plan was in force:
    /// from then on the adaptive rate caps the plan too.
    plan_overloaded: bool,
    /// The turn after the last one given to a refused login: refused
    /// logins get successive turns, not all the same one.
    next_turn: Instant,
}

impl NodePacer {
    /// A pacer at the initial rate, with a full burst of tokens.
    pub fn new(p: PacerParams, now: Instant) -> NodePacer {
        let mut n = NodePacer {
            p,
            rate: p.initial_rate,
            tokens: 0.0,
            last_refill: now,
            threshold: f64::INFINITY,
            overload_began: None,
            calm_until: now,
            base: None,
            interval_start: now,
            sum: 0.0,
            samples: 0,
            overloads: 0,
            limited: false,
            lag: Duration::ZERO,
            plan: None,
            plan_overloaded: false,
            next_turn: now,
        };
        n.tokens = n.burst();
        n
    }

    /// Logins per second admitted now.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes new parameters (a configuration reload); the current rate is
    /// kept within the new bounds.
    pub fn set_params(&mut self, p: PacerParams) {
        self.p = p;
        self.rate = self.rate.clamp(p.min_rate, p.max_rate);
    }

    /// The node's unloaded login latency, once measured.
    pub fn base_latency(&self) -> Option<Duration> {
        self.base.map(Duration::from_secs_f64)
    }

    fn burst(&self) -> f64 {
        (self.rate * BURST).max(MIN_BURST)
    }

    /// The rate tokens accrue at now: a fixed window's plan while it is in
    /// force (the operator sized the window to what the node takes; the
    /// login latency alone does not overrule it, a node refusing logins as
    /// overloaded does: then the lower of the two), else the adaptive rate.
    fn effective_rate(&self, now: Instant) -> f64 {
        match self.plan {
            Some((r, until)) if now < until && self.plan_overloaded => self.rate.min(r),
            Some((r, until)) if now < until => r,
            _ => self.rate,
        }
    }

    fn planned(&self, now: Instant) -> Option<f64> {
        self.plan.filter(|(_, until)| now < *until).map(|(r, _)| r)
    }

    /// Admits at `rate` until `until` (a fixed window's plan; a later plan
    /// replaces an earlier one, the higher rate wins while both last).
    pub fn plan(&mut self, now: Instant, rate: f64, until: Instant) {
        let (rate, until) = match self.plan {
            Some((r, u)) if now < u => (r.max(rate), u.max(until)),
            _ => {
                self.plan_overloaded = false;
                (rate, until)
            }
        };
        self.plan = Some((rate.clamp(self.p.min_rate, self.p.max_rate), until));
    }

    /// Adds the tokens accrued since the last call.
    pub fn refill(&mut self, now: Instant) {
        self.adjust(now);
        let dt = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        self.last_refill = self.last_refill.max(now);
        let rate = self.effective_rate(now);
        self.tokens = (self.tokens + dt * rate).min((rate * BURST).max(MIN_BURST));
    }

    /// Takes up to `want` whole tokens for waiting logins; returns how many.
    /// Fewer than wanted means those logins wait for the rate.
    pub fn take(&mut self, now: Instant, want: usize) -> usize {
        self.refill(now);
        let n = (self.tokens.floor().max(0.0) as usize).min(want);
        self.tokens -= n as f64;
        // Logins waiting for a plan's cap say nothing about the node.
        if n < want && self.effective_rate(now) >= self.rate {
            self.limited = true;
        }
        n
    }

    /// A login that does not wait (its user was not moved) uses a token
    /// if one is there.
    pub fn charge(&mut self, now: Instant) {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
        }
    }

    /// How long `queued` logins ahead plus this one wait at today's rate.
    pub fn estimate(&self, queued: usize) -> Duration {
        let ahead = (queued as f64 + 1.0 - self.tokens).max(0.0);
        Duration::from_secs_f64(ahead / self.effective_rate(self.last_refill))
    }

    /// The turn of a login refused because `queued` logins wait ahead of
    /// it: after them, and after every turn already given to a refused
    /// login, at today's rate.
    /// Never further off than `max_turn`: the estimate is at today's rate,
    /// and a login told to come back sooner is weighed again then.
    pub fn turn(&mut self, now: Instant, queued: usize) -> Duration {
        let at = (now + self.estimate(queued))
            .max(self.next_turn)
            .min(now + self.p.max_turn);
        let step = Duration::from_secs_f64(1.0 / self.effective_rate(now));
        self.next_turn = at + step;
        at - now
    }

    /// A login completed at the node in `latency`.
    pub fn observe_latency(&mut self, now: Instant, latency: Duration) {
        self.adjust(now);
        self.sum += latency.as_secs_f64();
        self.samples += 1;
    }

    /// The proxy's own scheduling ran `lag` late (the token driver's
    /// timer fired that long after its time).
    pub fn observe_lag(&mut self, now: Instant, lag: Duration) {
        self.adjust(now);
        self.lag = self.lag.max(lag);
    }

    /// The node refused a login as overloaded (or it timed out).
    pub fn observe_overload(&mut self, now: Instant) {
        self.adjust(now);
        self.overloads += 1;
    }

    /// Revises the rate once per interval.
    fn adjust(&mut self, now: Instant) {
        if now.saturating_duration_since(self.interval_start) < self.p.adjust_interval {
            return;
        }
        let mean = (self.samples >= MIN_SAMPLES).then(|| self.sum / f64::from(self.samples));
        if let Some(m) = mean {
            self.base = Some(self.base.map_or(m, |b| b.min(m)));
        }
        // A login's latency spans about two turns of the proxy's own
        // scheduling (the request forwarded, the answer read): what the
        // proxy lagged is taken off before the node is judged.
        let own = 2.0 * self.lag.as_secs_f64();
        let slow = match (mean, self.base) {
            (Some(m), Some(b)) => m - own > b * self.p.latency_tolerance,
            _ => false,
        };
        if self.overloads > 0 && !self.plan_overloaded {
            if let Some(r) = self.planned(now) {
                // The plan asked too much of the node: cut from the plan.
                self.plan_overloaded = true;
                self.rate = r;
                self.limited = true;
            }
        }
        if (self.overloads > 0 || slow) && now >= self.calm_until {
            // Back to what the node delivered (its completions in the
            // interval), which under overload is what it can take.
            let dt = now
                .saturating_duration_since(self.interval_start)
                .as_secs_f64()
                .max(1e-3);
            let delivered = f64::from(self.samples) / dt;
            let cut = self.rate * DECREASE;
            // What the node delivered says what it can take only when the
            // pacer was holding logins back; otherwise it is the demand.
            // On a slowdown alone, at most halved per interval: at a
            // storm's start the completions lag the admissions by a login
            // latency, and what the node delivered then understates what
            // it can take. Logins refused as overloaded are proof enough.
            let floor = if self.overloads == 0 {
                self.rate * MAX_CUT
            } else {
                0.0
            };
            let to = if self.limited && delivered > 0.0 {
                cut.min(delivered * DELIVERED_SHARE).max(floor)
            } else {
                cut
            };
            // Only a rate reached by additive growth (after the first
            // overload of a storm, so the node had taken it) is worth
            // coming back to; a slow start's overshoot is not.
            let additive = self.rate >= self.threshold;
            let began = *self
                .overload_began
                .get_or_insert(if additive { self.rate } else { 0.0 });
            self.rate = to.max(self.p.min_rate);
            // After a slowdown, back up multiplicatively to near where it
            // began (a passing one costs seconds, not a minute of additive
            // growth), additively from there; after logins refused as
            // overloaded (failures a user sees), additively from here.
            self.threshold = if self.overloads > 0 {
                self.rate
            } else {
                self.rate.max(began * DECREASE)
            };
            // Logins admitted before the cut still report the overload for
            // about one login latency.
            let lat = mean.unwrap_or(0.0).min(10.0);
            self.calm_until = now + Duration::from_secs_f64(lat) + self.p.adjust_interval;
        } else if self.overloads == 0 && !slow && self.limited {
            self.overload_began = None;
            self.rate = if self.rate < self.threshold {
                (self.rate * SLOW_START).min(self.threshold.max(self.rate + 1.0))
            } else {
                self.rate + (self.rate * ADDITIVE).max(1.0)
            }
            .min(self.p.max_rate);
        } else if mean.is_none() && !self.limited {
            // Idle: the next storm starts with a fresh probe upwards.
            self.threshold = f64::INFINITY;
            self.overload_began = None;
        }
        self.interval_start = now;
        self.sum = 0.0;
        self.samples = 0;
        self.overloads = 0;
        self.limited = false;
        self.lag = Duration::ZERO;
    }
}

/// A moved user's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Not before this.
    pub at: Instant,
    /// A turn the pacer gave a refused login (an estimate of when the node
    /// will have room), not the slot its hint planned: such a login is let
    /// in early when the node has room now.
    pub turn: bool,
}

/// What the pacer decided for one login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Admitted after waiting this long (zero: at once).
    Go(Duration),
    /// Refused; the user's turn is this far off (and is now its slot).
    Refuse(Duration),
}

/// Counters of the pacer, readable at any time.
#[derive(Debug, Default)]
pub struct PacerStats {
    /// Logins admitted without waiting.
    pub admitted: AtomicU64,
    /// Logins held before being admitted.
    pub held: AtomicU64,
    /// Total hold time of admitted logins, in milliseconds.
    pub held_ms: AtomicU64,
    /// Logins refused with a fresh hint.
    pub refused: AtomicU64,
    /// Held logins whose client left before its turn (nothing reached the
    /// node).
    pub abandoned: AtomicU64,
    /// Logins that completed (bind result), per node.
    pub completed: [AtomicU64; 2],
}

/// One node's pacer and its waiting room.
#[derive(Debug)]
struct NodeGate {
    state: Mutex<NodePacer>,
    /// Tokens handed to waiting logins, in arrival order (tokio's
    /// semaphore is fair).
    tokens: Semaphore,
    /// Logins waiting for a token now.
    waiting: AtomicUsize,
}

/// How often the driver hands out accrued tokens.
pub const TICK: Duration = Duration::from_millis(5);

/// Every node's pacer and every moved user's slot.
#[derive(Debug)]
pub struct Pacer {
    nodes: Vec<NodeGate>,
    slots: DashMap<String, Slot>,
    slot_grace: Duration,
    /// `failover.pacing`: off, every login is admitted at once.
    enabled: bool,
    /// Counters.
    pub stats: PacerStats,
}

/// Decrements a gate's waiting count when a waiting login ends, however.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pacer {
    /// A pacer for `n_nodes` nodes (at least one).
    pub fn new(cfg: &FailoverConfig, n_nodes: usize) -> Pacer {
        let p = PacerParams::from(cfg);
        let now = Instant::now();
        Pacer {
            nodes: (0..n_nodes.max(1))
                .map(|_| NodeGate {
                    state: Mutex::new(NodePacer::new(p, now)),
                    tokens: Semaphore::new(0),
                    waiting: AtomicUsize::new(0),
                })
                .collect(),
            slots: DashMap::new(),
            slot_grace: cfg.slot_grace,
            enabled: cfg.pacing,
            stats: PacerStats::default(),
        }
    }

    fn gate(&self, n: NodeId) -> &NodeGate {
        &self.nodes[n.index().min(self.nodes.len() - 1)]
    }

    fn state(&self, n: NodeId) -> std::sync::MutexGuard<'_, NodePacer> {
        self.gate(n).state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the pacer settings of a reloaded `[failover]` for every node.
    pub fn set_params(&self, cfg: &FailoverConfig) {
        let p = PacerParams::from(cfg);
        for g in &self.nodes {
            g.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_params(p);
        }
    }

    /// The rate the pacer admits at `node` now.
    pub fn rate(&self, node: NodeId) -> f64 {
        self.state(node).rate()
    }

    /// A fixed window's plan for `node`: logins of moved users at `rate`
    /// until the window ends at `until`, and for as long after it as their
    /// slots are remembered, so that the stragglers (clients that ignored
    /// their hint, refused logins) come back at the plan's rate too.
    pub fn plan(&self, node: NodeId, rate: f64, until: Instant) {
        self.state(node)
            .plan(Instant::now(), rate, until + self.slot_grace);
    }

    /// Logins waiting for a token at `node` now.
    pub fn waiting(&self, node: NodeId) -> usize {
        self.gate(node).waiting.load(Ordering::Relaxed)
    }

    /// Remembers a moved user's turn (replacing an earlier one).
    pub fn remember(&self, user: &str, at: Instant) {
        self.slots.insert(user.to_owned(), Slot { at, turn: false });
    }

    /// Remembers a moved user's turn `at`, unless the user already has a
    /// turn still ahead: a client is told one turn per incident, and a
    /// second plan of the same incident (the relay saw the node die and
    /// told the user, then the group's move lists the user again) must not
    /// let it in before the turn it was told. Returns the turn in force.
    pub fn remember_first(&self, user: &str, at: Instant, now: Instant) -> Instant {
        match self.slots.entry(user.to_owned()) {
            dashmap::Entry::Occupied(e) if e.get().at > now => e.get().at,
            dashmap::Entry::Occupied(mut e) => {
                e.insert(Slot { at, turn: false });
                at
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(Slot { at, turn: false });
                at
            }
        }
    }

    /// The user's remembered turn, if any and not expired.
    pub fn slot(&self, user: &str, now: Instant) -> Option<Slot> {
        let s = *self.slots.get(user)?;
        if s.at + self.slot_grace < now {
            self.slots.remove(user);
            return None;
        }
        Some(s)
    }

    /// Slots remembered now.
    pub fn pending_slots(&self) -> usize {
        self.slots.len()
    }

    /// Forgets slots whose time passed more than the grace ago.
    pub fn expire(&self, now: Instant) {
        let grace = self.slot_grace;
        self.slots.retain(|_, s| s.at + grace >= now);
    }

    /// Hands the tokens accrued at every node to its waiting logins. The
    /// driver calls this every [`TICK`].
    pub fn tick(&self, now: Instant) {
        self.tick_late(now, Duration::ZERO);
    }

    /// [`Pacer::tick`], for a tick that ran `lag` after its time.
    fn tick_late(&self, now: Instant, lag: Duration) {
        for g in &self.nodes {
            if !lag.is_zero() {
                g.state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .observe_lag(now, lag);
            }
            let want = g
                .waiting
                .load(Ordering::Relaxed)
                .saturating_sub(g.tokens.available_permits());
            let mut st = g.state.lock().unwrap_or_else(|p| p.into_inner());
            let n = st.take(now, want);
            drop(st);
            if n > 0 {
                g.tokens.add_permits(n);
            }
        }
    }

    /// Runs the token driver until dropped.
    pub async fn drive(&self) {
        let mut t = tokio::time::interval(TICK);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = t.tick().await;
            let now = Instant::now();
            self.tick_late(now, now.saturating_duration_since(due));
        }
    }

    /// Admits a login of `user` to `node`: at once, after a wait of at most
    /// `max_wait`, or refused with the time its user should come back.
    pub async fn admit(&self, user: &str, node: NodeId, max_wait: Duration) -> Pace {
        let start = Instant::now();
        let slot = if self.enabled {
            self.slot(user, start)
        } else {
            None
        };
        let Some(slot) = slot else {
            self.state(node).charge(start);
            self.stats.admitted.fetch_add(1, Ordering::Relaxed);
            return Pace::Go(Duration::ZERO);
        };
        let g = self.gate(node);
        let early = slot.at.saturating_duration_since(start);
        // A refused login's turn was an estimate: if the node has room now
        // (nobody waiting, a token at hand), it goes in now.
        if slot.turn
            && !early.is_zero()
            && g.waiting.load(Ordering::Relaxed) == 0
            && self.state(node).take(start, 1) == 1
        {
            return self.admitted(start, false);
        }
        if early > max_wait {
            // Its own turn is far off.
            return self.refuse(user, start, early, slot.turn);
        }
        let queue = {
            let st = self.state(node);
            st.estimate(g.waiting.load(Ordering::Relaxed))
        };
        if early + queue > max_wait {
            let turn = self
                .state(node)
                .turn(start, g.waiting.load(Ordering::Relaxed));
            return self.refuse(user, start, turn.max(early), turn > early || slot.turn);
        }
        if !early.is_zero() {
            tokio::time::sleep_until(slot.at).await;
        }
        // Nobody waiting and a token at hand: in at once.
        if g.waiting.load(Ordering::Relaxed) == 0 && self.state(node).take(Instant::now(), 1) == 1 {
            return self.admitted(start, !early.is_zero());
        }
        g.waiting.fetch_add(1, Ordering::Relaxed);
        let _w = Waiting(&g.waiting);
        let left = max_wait.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, g.tokens.acquire()).await {
            Ok(Ok(permit)) => {
                permit.forget();
                self.admitted(start, true)
            }
            // Timed out (the rate fell meanwhile), or the semaphore closed.
            _ => {
                let now = Instant::now();
                let again = self
                    .state(node)
                    .turn(now, g.waiting.load(Ordering::Relaxed));
                self.refuse(user, now, again.max(TICK), true)
            }
        }
    }

    /// Counts an admitted login; `held`: it waited for its slot or a token.
    fn admitted(&self, start: Instant, held: bool) -> Pace {
        let waited = start.elapsed();
        if !held {
            self.stats.admitted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.held.fetch_add(1, Ordering::Relaxed);
            self.stats
                .held_ms
                .fetch_add(waited.as_millis() as u64, Ordering::Relaxed);
        }
        Pace::Go(waited)
    }

    /// Refuses a login: it should come back `after` from now, which is
    /// its planned slot, or (`turn`) the pacer's estimate of when the node
    /// has room.
    fn refuse(&self, user: &str, now: Instant, after: Duration, turn: bool) -> Pace {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        self.slots.insert(
            user.to_owned(),
            Slot {
                at: now + after,
                turn,
            },
        );
        Pace::Refuse(after)
    }

    /// `user` is logged in again on `node`, `latency` after its `<auth>`
    /// was forwarded: its slot is spent, and the latency feeds the rate.
    pub fn logged_in(&self, user: &str, node: NodeId, latency: Duration) {
        self.slots.remove(user);
        if let Some(c) = self.stats.completed.get(node.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.state(node).observe_latency(Instant::now(), latency);
    }

    /// `node` refused a login as overloaded.
    pub fn overloaded(&self, node: NodeId) {
        self.state(node).observe_overload(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Arc;

    fn params() -> PacerParams {
        PacerParams {
            initial_rate: 10.0,
            min_rate: 1.0,
            max_rate: 1000.0,
            latency_tolerance: 3.0,
            adjust_interval: Duration::from_millis(500),
            max_turn: Duration::from_secs(30),
        }
    }

    fn config() -> FailoverConfig {
        FailoverConfig {
            initial_rate: 10.0,
            min_rate: 1.0,
            ..FailoverConfig::default()
        }
    }

    const HOLD: Duration = Duration::from_secs(20);
    const U: &str = "alice@example.com";

    fn pacer() -> Arc<Pacer> {
        let p = Arc::new(Pacer::new(&config(), 2));
        let d = p.clone();
        tokio::spawn(async move { d.drive().await });
        p
    }

    #[tokio::test(start_paused = true)]
    async fn users_not_moved_are_never_held() {
        let p = pacer();
        for i in 0..1000 {
            let who = format!("user{i}@example.com");
            assert_eq!(
                p.admit(&who, NodeId::Node2, HOLD).await,
                Pace::Go(Duration::ZERO)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_login_is_held_until_its_slot_then_admitted() {
        let p = pacer();
        let t0 = Instant::now();
        p.remember(U, t0 + Duration::from_secs(5));
        let Pace::Go(waited) = p.admit(U, NodeId::Node2, HOLD).await else {
            panic!("a login 5 s early must be held, not refused");
        };
        assert!(waited >= Duration::from_secs(5), "{waited:?}");
        assert!(waited < Duration::from_secs(5) + 10 * TICK, "{waited:?}");
        assert_eq!(p.stats.held.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_far_off_login_is_refused_with_its_turn_and_admitted_at_it() {
        let p = pacer();
        let t0 = Instant::now();
        p.remember(U, t0 + Duration::from_secs(100));
        assert_eq!(
            p.admit(U, NodeId::Node2, HOLD).await,
            Pace::Refuse(Duration::from_secs(100))
        );
        // Coming back at once: refused again, with the time left.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            p.admit(U, NodeId::Node2, HOLD).await,
            Pace::Refuse(Duration::from_secs(70))
        );
        // At its turn it goes in.
        tokio::time::advance(Duration::from_secs(70)).await;
        assert!(matches!(p.admit(U, NodeId::Node2, HOLD).await, Pace::Go(_)));
        assert_eq!(p.stats.refused.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_turn_goes_in_early_when_the_node_has_room_a_planned_slot_does_not() {
        let p = pacer();
        let now = Instant::now();
        // The pacer told this login to come back in 30 s (its queue then).
        let _ = p.refuse(U, now, Duration::from_secs(30), true);
        // Back early, nobody waiting: in at once.
        assert_eq!(
            p.admit(U, NodeId::Node2, HOLD).await,
            Pace::Go(Duration::ZERO)
        );
        // A slot the hint planned 30 s away is kept.
        p.remember("bob@example.com", now + Duration::from_secs(30));
        assert_eq!(
            p.admit("bob@example.com", NodeId::Node2, HOLD).await,
            Pace::Refuse(Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_is_admitted_at_the_rate_in_arrival_order() {
        let p = pacer();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let who = format!("user{i}@example.com");
            p.remember(&who, t0);
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                let r = p.admit(&who, NodeId::Node2, Duration::from_secs(60)).await;
                (i, r, Instant::now())
            }));
            tokio::task::yield_now().await;
        }
        let mut admitted = Vec::new();
        for t in tasks {
            let (i, r, at) = t.await.unwrap();
            assert!(matches!(r, Pace::Go(_)), "login {i}: {r:?}");
            admitted.push(at - t0);
        }
        // Without a latency signal the rate only grows (slow start), so
        // 50 logins take no more than 50 / 10 s, and are never bunched
        // beyond the burst: at most one token per tick at 10/s.
        let last = admitted.iter().max().copied().unwrap_or_default();
        assert!(last <= Duration::from_secs(5), "{last:?}");
        assert!(last >= Duration::from_secs(1), "{last:?}: not paced at all");
        assert!(
            admitted.windows(2).all(|w| w[0] <= w[1]),
            "out of order: {admitted:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_longer_than_the_hold_is_refused_with_its_wait() {
        let p = pacer();
        let t0 = Instant::now();
        let mut refused = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..300 {
            let who = format!("user{i}@example.com");
            p.remember(&who, t0);
            let pc = p.clone();
            tasks.push(tokio::spawn(async move {
                pc.admit(&who, NodeId::Node2, Duration::from_secs(2)).await
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            if let Pace::Refuse(d) = t.await.unwrap() {
                refused.push(d);
            }
        }
        // About 2 s at 10/s get in; the rest learn when to come back.
        assert!(refused.len() > 250, "{} refused", refused.len());
        assert!(refused.iter().all(|d| *d > Duration::from_secs(2)));
    }

    /// A node of capacity `cap` logins/s: latency `base` below it, growing
    /// with the backlog above it.
    struct Node {
        cap: f64,
        base: f64,
        free_at: f64,
    }

    impl Node {
        fn login(&mut self, at: f64) -> f64 {
            let start = at.max(self.free_at);
            self.free_at = start + 1.0 / self.cap;
            (start - at) + self.base
        }
    }

    /// The rate converges near a capacity the pacer is never told, and
    /// everyone is in after about N / C.
    #[test]
    fn the_rate_converges_near_an_unknown_node_capacity() {
        let t0 = Instant::now();
        let mut p = NodePacer::new(params(), t0);
        let mut node = Node {
            cap: 200.0,
            base: 0.05,
            free_at: 0.0,
        };
        let n = 6_000usize;
        let mut admitted = 0;
        let mut done: VecDeque<(f64, f64)> = VecDeque::new();
        let mut slow = 0;
        let tick = TICK.as_secs_f64();
        let mut t = 0.0;
        while admitted < n && t < 600.0 {
            let now = t0 + Duration::from_secs_f64(t);
            while done.front().is_some_and(|(at, _)| *at <= t) {
                let (at, lat) = done.pop_front().unwrap_or_default();
                p.observe_latency(
                    t0 + Duration::from_secs_f64(at),
                    Duration::from_secs_f64(lat),
                );
            }
            let k = p.take(now, n - admitted);
            for _ in 0..k {
                let lat = node.login(t);
                if lat > 10.0 * node.base {
                    slow += 1;
                }
                done.push_back((t + lat, lat));
                admitted += 1;
            }
            t += tick;
        }
        let ideal = n as f64 / node.cap;
        assert_eq!(admitted, n);
        // Starting 20x below the capacity, the probe upwards and the first
        // overshoot cost a few seconds; then the rate saws around C.
        assert!(t < 1.2 * ideal, "took {t:.1} s, N / C is {ideal:.1} s");
        assert!(
            slow < n / 10,
            "{slow} logins took over 10x the unloaded latency"
        );
        assert!(p.rate() > 120.0 && p.rate() < 300.0, "rate {}", p.rate());
    }

    #[test]
    fn a_fixed_windows_plan_caps_the_rate_until_it_ends() {
        let t0 = Instant::now();
        let mut p = at_100(t0);
        p.plan(t0, 10.0, t0 + Duration::from_secs(10));
        // Everyone waiting, for 5 s: the plan's 10/s (plus the burst), not 100/s.
        let mut got = 0;
        for ms in (5..=5000).step_by(5) {
            got += p.take(t0 + Duration::from_millis(ms), 10_000);
        }
        assert!((50..=53).contains(&got), "{got} in 5 s");
        // After the window the pacer's own rate applies again.
        let mut after = 0;
        for ms in (10_005..=11_000).step_by(5) {
            after += p.take(t0 + Duration::from_millis(ms), 10_000);
        }
        assert!(after > 50, "{after} in the second after the window");
    }

    #[test]
    fn a_fixed_windows_plan_is_kept_when_only_the_latency_grows() {
        let t0 = Instant::now();
        let mut p = NodePacer::new(params(), t0);
        p.plan(t0, 100.0, t0 + Duration::from_secs(20));
        let mut got = 0;
        for ms in (5..=10_000).step_by(5) {
            let now = t0 + Duration::from_millis(ms);
            // Latency 4x the unloaded one (over the 3x tolerance) after 2 s.
            let lat = if ms < 2000 { 0.05 } else { 0.2 };
            p.observe_latency(now, Duration::from_secs_f64(lat));
            got += p.take(now, 10_000);
        }
        assert!(
            (995..=1005).contains(&got),
            "{got} in 10 s at a plan of 100/s"
        );
    }

    #[test]
    fn a_node_refusing_logins_overrules_the_plan() {
        let t0 = Instant::now();
        let mut p = NodePacer::new(params(), t0);
        p.plan(t0, 100.0, t0 + Duration::from_secs(60));
        let mut first = 0;
        for ms in (5..=2_000).step_by(5) {
            first += p.take(t0 + Duration::from_millis(ms), 10_000);
        }
        for ms in (2_005..=4_000).step_by(5) {
            let now = t0 + Duration::from_millis(ms);
            p.observe_overload(now);
            p.take(now, 10_000);
        }
        let mut later = 0;
        for ms in (4_005..=6_000).step_by(5) {
            later += p.take(t0 + Duration::from_millis(ms), 10_000);
        }
        assert!(first >= 199, "{first} in the first 2 s");
        assert!(
            later < first / 2,
            "{later} in 2 s after overloads, {first} before"
        );
    }

    /// A node pacer starting at 100 logins/s.
    fn at_100(t0: Instant) -> NodePacer {
        NodePacer::new(
            PacerParams {
                initial_rate: 100.0,
                ..params()
            },
            t0,
        )
    }

    /// Runs 6 s of a node at 100 logins/s wanted: 2 s at the unloaded
    /// 50 ms, then 4 s at 200 ms (4x, over the 3x tolerance) while the
    /// proxy's own driver ran `lag` late. Returns the rate at the end.
    fn rate_after_slow_logins_with_lag(lag: Duration) -> f64 {
        let t0 = Instant::now();
        let mut p = NodePacer::new(params(), t0);
        for ms in (5..=6_000).step_by(5) {
            let now = t0 + Duration::from_millis(ms);
            if ms >= 2_000 {
                p.observe_lag(now, lag);
            }
            if ms % 10 == 0 {
                let lat = if ms < 2_000 { 0.05 } else { 0.2 };
                p.observe_latency(now, Duration::from_secs_f64(lat));
            }
            p.take(now, 10_000);
        }
        p.rate()
    }

    #[test]
    fn latency_the_proxy_itself_lagged_is_not_blamed_on_the_node() {
        // The same slow logins: with the proxy lagging 80 ms (which
        // accounts for the extra 150 ms over two turns), the rate keeps
        // growing; with a punctual proxy, the node is slow and the rate falls.
        let lagging = rate_after_slow_logins_with_lag(Duration::from_millis(80));
        let punctual = rate_after_slow_logins_with_lag(Duration::ZERO);
        assert!(lagging > 100.0, "rate {lagging} while the proxy lagged");
        assert!(
            punctual < lagging / 2.0,
            "rate {punctual} with a punctual proxy, {lagging} with a lagging one"
        );
    }

    #[test]
    fn one_slow_interval_at_most_halves_the_rate() {
        // A storm's first interval: logins wait for tokens at 100/s, but
        // only 3 completions (slow ones) are in yet.
        let t0 = Instant::now();
        let mut p = at_100(t0);
        for ms in [100, 200, 300] {
            p.observe_latency(t0 + Duration::from_millis(ms), Duration::from_millis(50));
        }
        for ms in (505..=1000).step_by(5) {
            let now = t0 + Duration::from_millis(ms);
            p.take(now, 10_000);
            if ms % 150 == 0 {
                p.observe_latency(now, Duration::from_millis(500));
            }
        }
        p.refill(t0 + Duration::from_millis(1005));
        assert!(
            (50.0..100.0).contains(&p.rate()),
            "rate {} after one slow interval from 100/s",
            p.rate()
        );
    }

    #[test]
    fn after_a_passing_slowdown_the_rate_is_back_within_seconds() {
        let t0 = Instant::now();
        let mut p = at_100(t0);
        // Logins always waiting; 50 ms at the node, but 400 ms (over the
        // 3x tolerance, few completions, as a slowed node delivers) in
        // 0.5-1 s (the storm's first overload ends the slow start) and
        // again in 2.5-4.5 s, after additive growth.
        let slow = |ms: u64| (500..1000).contains(&ms) || (2500..4500).contains(&ms);
        let (mut before, mut lowest) = (0.0, f64::INFINITY);
        for ms in (5..=7_000).step_by(5) {
            let now = t0 + Duration::from_millis(ms);
            p.take(now, 10_000);
            if ms % if slow(ms) { 100 } else { 10 } == 0 {
                let lat = if slow(ms) { 0.4 } else { 0.05 };
                p.observe_latency(now, Duration::from_secs_f64(lat));
            }
            if ms == 2_495 {
                before = p.rate();
            }
            if ms > 2_500 {
                lowest = lowest.min(p.rate());
            }
        }
        assert!(
            lowest < before * 0.6,
            "the slowdown did not lower the rate ({before} -> {lowest})"
        );
        assert!(
            p.rate() >= before * 0.8,
            "rate {} 2.5 s after the slowdown ended ({before} before it, lowest {lowest})",
            p.rate()
        );
    }

    #[test]
    fn an_estimated_turn_is_never_further_than_max_turn() {
        let t0 = Instant::now();
        let mut p = NodePacer::new(
            PacerParams {
                initial_rate: 2.0,
                ..params()
            },
            t0,
        );
        // 1,000 logins ahead at 2/s would be 500 s; and each refusal's
        // turn stays within the bound, however many are refused.
        for i in 0..100 {
            let turn = p.turn(t0, 1_000);
            assert!(turn <= params().max_turn, "turn {turn:?} for refusal {i}");
        }
        // A short queue still gets its estimate.
        let mut q = NodePacer::new(params(), t0);
        let turn = q.turn(t0, 20);
        assert!(
            turn > Duration::from_secs(1) && turn < Duration::from_secs(3),
            "{turn:?}"
        );
    }

    #[test]
    fn overload_lowers_the_rate_but_not_below_the_floor() {
        let t0 = Instant::now();
        let mut p = NodePacer::new(params(), t0);
        for i in 1..100 {
            p.observe_overload(t0 + Duration::from_millis(500 * i));
        }
        p.refill(t0 + Duration::from_secs(60));
        assert_eq!(p.rate(), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_forgotten_after_their_grace() {
        let cfg = FailoverConfig {
            slot_grace: Duration::from_secs(10),
            ..FailoverConfig::default()
        };
        let pacer = Pacer::new(&cfg, 2);
        let now = Instant::now();
        pacer.remember(U, now + Duration::from_secs(5));
        assert!(pacer.slot(U, now).is_some());
        assert!(pacer.slot(U, now + Duration::from_secs(15)).is_some());
        assert!(pacer.slot(U, now + Duration::from_secs(16)).is_none());
        pacer.remember("bob@example.com", now);
        pacer.expire(now + Duration::from_secs(11));
        assert_eq!(pacer.pending_slots(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_plan_keeps_the_turn_the_client_was_told() {
        let pacer = Pacer::new(&FailoverConfig::default(), 2);
        let now = Instant::now();
        let told = now + Duration::from_secs(7);
        assert_eq!(pacer.remember_first(U, told, now), told);
        // The group's move plans the user again, earlier: the told turn holds.
        let again = pacer.remember_first(U, now + Duration::from_secs(1), now);
        assert_eq!(again, told);
        assert_eq!(pacer.slot(U, now).map(|s| s.at), Some(told));
        // Once that turn has passed, a new incident's turn replaces it.
        let later = now + Duration::from_secs(8);
        let next = later + Duration::from_secs(3);
        assert_eq!(pacer.remember_first(U, next, later), next);
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_spends_the_slot() {
        let pacer = Pacer::new(&FailoverConfig::default(), 2);
        pacer.remember(U, Instant::now());
        pacer.logged_in(U, NodeId::Node2, Duration::from_millis(40));
        assert_eq!(pacer.pending_slots(), 0);
    }
}
