//! The registry of temporary presence subscriptions and their replay.
//!
//! Per watcher (bare JID): per target, the latest subscribing directed
//! presence (its bytes), the caps `ver` it carried, when the client last
//! subscribed or unsubscribed (the 30-second rule) and last subscribed
//! (the TTL); the watcher's disco#info answers for the `ver`s it used; its
//! live sessions. A reverse index gives a target's watchers. One mutex
//! guards it all: it is taken on directed presence, disco#info answers,
//! binds and session ends, never on the relay's other stanzas.
//!
//! Replays are queued by due time and sent by one task at the configured
//! global rate: a replay puts the stored bytes in the watcher session's
//! outbox and hands them to the session's relay, which writes them to the
//! node between two stanzas; if the relay's queue is full, the session's
//! hook writes the outbox with the client's next stanza.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::TempPresenceConfig;
use crate::control::{ConnHandle, ConnId};
use crate::node::NodeId;

/// The caps feature that makes directed presence a subscription.
pub const NOTIFY_FEATURE: &[u8] = b"http://webex.com/connect/temp-presence+notify";

/// Caps `ver`s whose meaning is remembered (beyond it, new ones are not).
const MAX_VERS: usize = 4096;
/// disco#info answers kept per watcher.
const MAX_ANSWERS_PER_WATCHER: usize = 8;
/// How often expired pairs and lingering watchers are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Counters, readable at any time (from the proxy's view and the metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Pairs held now (gauge).
    pub pairs: AtomicU64,
    /// Directed presences replayed to a node.
    pub replays_sent: AtomicU64,
    /// Replays put off by the 30-second rule.
    pub replays_deferred: AtomicU64,
    /// disco#info queries answered by the proxy from its cache.
    pub disco_from_cache: AtomicU64,
    /// Pairs refused by a bound.
    pub refused: AtomicU64,
    /// Pairs dropped by the TTL.
    pub expired: AtomicU64,
}

/// One live session of a user, as the registry sees it.
#[derive(Debug)]
pub struct Slot {
    conn: ConnId,
    handle: ConnHandle,
    outbox: Mutex<Vec<Bytes>>,
    has_out: AtomicBool,
    nudged: AtomicBool,
}

impl Slot {
    /// Takes what is waiting for the node (cheap when nothing is).
    pub fn take_outbox(&self) -> Vec<Bytes> {
        // Looked at for every relayed stanza: a plain load first, the
        // read-modify-write only when there is something to take.
        if !self.has_out.load(Ordering::Acquire) || !self.has_out.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        self.nudged.store(false, Ordering::Release);
        std::mem::take(&mut *lock(&self.outbox))
    }

    fn push(&self, b: Bytes) {
        lock(&self.outbox).push(b);
        self.has_out.store(true, Ordering::Release);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PairState {
    /// The caps `ver` is not resolved yet.
    Pending,
    /// Subscribed.
    Active,
}

#[derive(Debug)]
struct Pair {
    presence: Bytes,
    ver: Box<[u8]>,
    state: PairState,
    /// Last subscribe or unsubscribe (by the client or a replay).
    changed: Instant,
    /// Last subscribe by the client: the TTL counts from here.
    since: Instant,
    /// The replay queued, if any (its queue key).
    replay: Option<(Instant, u64)>,
}

#[derive(Debug, Default)]
struct User {
    sessions: Vec<Arc<Slot>>,
    pairs: HashMap<Arc<str>, Pair>,
    /// disco#info answers: ver → the `<query>` element.
    answers: Vec<(Box<[u8]>, Bytes)>,
    /// Streams all ended without a logout: pairs kept until then.
    linger_until: Option<Instant>,
    /// The node the user was last bound on.
    node: Option<NodeId>,
    /// The user's last stream ended with a logout (its node is fine and
    /// kept what it held for the user).
    clean_exit: bool,
}

#[derive(Debug, Default)]
struct Inner {
    users: HashMap<Arc<str>, User>,
    by_target: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Caps ver → whether it has the notify feature.
    vers: HashMap<Box<[u8]>, bool>,
    pairs: usize,
    queue: BTreeMap<(Instant, u64), (Arc<str>, Arc<str>)>,
    seq: u64,
    next_sweep: Option<Instant>,
}

impl Inner {
    fn remove_pair(&mut self, w: &str, t: &str) -> bool {
        let Some(u) = self.users.get_mut(w) else {
            return false;
        };
        let Some(p) = u.pairs.remove(t) else {
            return false;
        };
        if let Some(k) = p.replay {
            self.queue.remove(&k);
        }
        self.pairs -= 1;
        if let Some(ws) = self.by_target.get_mut(t) {
            ws.remove(w);
            if ws.is_empty() {
                self.by_target.remove(t);
                self.forget_if_idle(t);
            }
        }
        self.forget_if_idle(w);
        true
    }

    /// Forgets a user with no stream and no pairs who is nobody's target.
    fn forget_if_idle(&mut self, w: &str) {
        if self
            .users
            .get(w)
            .is_some_and(|u| u.sessions.is_empty() && u.pairs.is_empty())
            && !self.by_target.contains_key(w)
        {
            self.users.remove(w);
        }
    }

    fn schedule(&mut self, w: &Arc<str>, t: &Arc<str>, at: Instant) {
        let Some(p) = self.users.get_mut(w).and_then(|u| u.pairs.get_mut(t)) else {
            return;
        };
        if let Some(k) = p.replay.take() {
            self.queue.remove(&k);
        }
        self.seq += 1;
        let key = (at, self.seq);
        p.replay = Some(key);
        self.queue.insert(key, (w.clone(), t.clone()));
    }
}

/// The temporary presence registry.
pub struct Registry {
    cfg: TempPresenceConfig,
    inner: Mutex<Inner>,
    wake: Notify,
    /// Counters.
    pub stats: Stats,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("pairs", &self.stats.pairs)
            .finish()
    }
}

/// What the replay task does next.
enum Next {
    Wait(Option<Instant>),
    Send(Arc<Slot>),
    Again,
}

impl Registry {
    /// An empty registry with these settings.
    pub fn new(cfg: TempPresenceConfig) -> Registry {
        Registry {
            cfg,
            inner: Mutex::default(),
            wake: Notify::new(),
            stats: Stats::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &TempPresenceConfig {
        &self.cfg
    }

    /// Pairs held now.
    pub fn pairs(&self) -> usize {
        lock(&self.inner).pairs
    }

    /// The targets `watcher` (a normalised bare JID) holds pairs for.
    pub fn targets_of(&self, watcher: &str) -> Vec<String> {
        let g = lock(&self.inner);
        let mut v: Vec<String> = g
            .users
            .get(watcher)
            .map(|u| u.pairs.keys().map(|t| t.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Replays queued and not sent yet.
    pub fn replays_queued(&self) -> usize {
        lock(&self.inner).queue.len()
    }

    fn set_pairs_gauge(&self, g: &Inner) {
        self.stats.pairs.store(g.pairs as u64, Ordering::Relaxed);
    }

    /// `w`'s client sent directed presence `bytes` to `t` with caps `ver`:
    /// a subscribe when `ver` has the notify feature (or is not known
    /// yet), an unsubscribe when it lacks it. A queued replay of the pair
    /// is dropped: the client did it itself.
    pub fn directed(&self, w: &Arc<str>, t: &str, bytes: &[u8], ver: &[u8]) {
        let now = Instant::now();
        let mut g = lock(&self.inner);
        let known = g.vers.get(ver).copied();
        if known == Some(false) {
            let removed = g.remove_pair(w, t);
            if removed {
                self.set_pairs_gauge(&g);
            }
            return;
        }
        let state = if known == Some(true) {
            PairState::Active
        } else {
            PairState::Pending
        };
        let g = &mut *g;
        let u = g.users.entry(w.clone()).or_default();
        if let Some(p) = u.pairs.get_mut(t) {
            p.presence = Bytes::copy_from_slice(bytes);
            p.ver = ver.into();
            p.state = state;
            p.changed = now;
            p.since = now;
            if let Some(k) = p.replay.take() {
                g.queue.remove(&k);
            }
            return;
        }
        if u.pairs.len() >= self.cfg.max_pairs_per_watcher {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(watcher = %w, target = %t, limit = self.cfg.max_pairs_per_watcher,
                  "temporary presence pair not kept: the watcher holds temp_presence.max_pairs_per_watcher pairs; it will not be replayed after a move");
            return;
        }
        if g.pairs >= self.cfg.max_pairs {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(watcher = %w, target = %t, limit = self.cfg.max_pairs,
                  "temporary presence pair not kept: the registry holds temp_presence.max_pairs pairs; it will not be replayed after a move");
            return;
        }
        let t: Arc<str> = Arc::from(t);
        u.pairs.insert(
            t.clone(),
            Pair {
                presence: Bytes::copy_from_slice(bytes),
                ver: ver.into(),
                state,
                changed: now,
                since: now,
                replay: None,
            },
        );
        g.pairs += 1;
        g.by_target.entry(t).or_default().insert(w.clone());
        self.set_pairs_gauge(g);
    }

    /// `w`'s client unsubscribed from `t` (directed unavailable presence,
    /// or directed presence without caps).
    pub fn unsubscribe(&self, w: &str, t: &str) {
        let mut g = lock(&self.inner);
        if g.remove_pair(w, t) {
            self.set_pairs_gauge(&g);
        }
    }

    /// `w`'s client answered disco#info for caps `ver` with `query` (the
    /// `<query>` element): remembered for answering later, and resolves
    /// the pairs waiting for `ver`.
    pub fn disco_answer(&self, w: &Arc<str>, ver: &[u8], query: &[u8]) {
        let has = memchr::memmem::find(query, NOTIFY_FEATURE).is_some();
        let mut g = lock(&self.inner);
        if g.vers.len() < MAX_VERS || g.vers.contains_key(ver) {
            g.vers.insert(ver.into(), has);
        }
        let Some(u) = g.users.get_mut(w) else {
            return;
        };
        u.answers.retain(|(v, _)| &**v != ver);
        if u.answers.len() >= MAX_ANSWERS_PER_WATCHER {
            u.answers.remove(0);
        }
        u.answers.push((ver.into(), Bytes::copy_from_slice(query)));
        let mut drop = Vec::new();
        for (t, p) in u.pairs.iter_mut() {
            if p.state == PairState::Pending && &*p.ver == ver {
                if has {
                    p.state = PairState::Active;
                } else {
                    drop.push(t.clone());
                }
            }
        }
        for t in drop {
            g.remove_pair(w, &t);
        }
        self.set_pairs_gauge(&g);
    }

    /// `w`'s cached disco#info answer (the `<query>` element) for `ver`.
    pub fn cached_answer(&self, w: &str, ver: &[u8]) -> Option<Bytes> {
        let g = lock(&self.inner);
        g.users
            .get(w)?
            .answers
            .iter()
            .find(|(v, _)| &**v == ver)
            .map(|(_, q)| q.clone())
    }

    /// A session of `user` was bound on `node`. When the user changed
    /// node, or had no live stream and its last one did not end with a
    /// logout (a failure, an eviction: the node that held its pairs may
    /// have lost them), replays its own pairs through its streams and the
    /// pairs that target it through its watchers' streams.
    pub fn bound(
        &self,
        user: &Arc<str>,
        node: NodeId,
        conn: ConnId,
        handle: ConnHandle,
    ) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            conn,
            handle,
            outbox: Mutex::new(Vec::new()),
            has_out: AtomicBool::new(false),
            nudged: AtomicBool::new(false),
        });
        let now = Instant::now();
        let mut g = lock(&self.inner);
        let g = &mut *g;
        let u = g.users.entry(user.clone()).or_default();
        // Moved, or back after a failure or an eviction: what the node
        // held for the user may be lost. Back on the same node after a
        // logout: the node kept it.
        let was_away = u.node != Some(node) || (u.sessions.is_empty() && !u.clean_exit);
        u.node = Some(node);
        u.clean_exit = false;
        u.sessions.push(slot.clone());
        u.linger_until = None;
        let mut due = Vec::new();
        if was_away {
            // As a watcher: its own pairs, after the client's grace.
            let earliest = now + self.cfg.watcher_grace;
            for (t, p) in &u.pairs {
                if p.state == PairState::Active {
                    due.push((
                        user.clone(),
                        t.clone(),
                        earliest.max(p.changed + self.cfg.min_interval),
                        p.changed,
                    ));
                }
            }
            // As a target: the pairs of its watchers that are online.
            if let Some(ws) = g.by_target.get(&**user) {
                for w in ws {
                    let Some(wu) = g.users.get(&**w) else {
                        continue;
                    };
                    if wu.sessions.is_empty() {
                        continue;
                    }
                    if let Some(p) = wu.pairs.get(&**user) {
                        if p.state == PairState::Active && p.replay.is_none() {
                            due.push((
                                w.clone(),
                                user.clone(),
                                now.max(p.changed + self.cfg.min_interval),
                                p.changed,
                            ));
                        }
                    }
                }
            }
        }
        let n = due.len();
        for (w, t, at, changed) in due {
            if changed + self.cfg.min_interval > now {
                self.stats.replays_deferred.fetch_add(1, Ordering::Relaxed);
                debug!(watcher = %w, target = %t, wait = ?(at - now), "temporary presence replay deferred by the 30-second rule");
            }
            g.schedule(&w, &t, at);
        }
        if n > 0 {
            debug!(user = %user, replays = n, "temporary presence replays queued");
            self.wake.notify_one();
        }
        slot
    }

    /// A session of `user` ended; `logged_out`: its client sent
    /// unavailable presence first. When the user's last session ends, its
    /// pairs are dropped after a logout, kept for `watcher_linger`
    /// otherwise (a failover or move: it comes back).
    pub fn ended(&self, user: &str, conn: ConnId, logged_out: bool) {
        let mut g = lock(&self.inner);
        let Some(u) = g.users.get_mut(user) else {
            return;
        };
        u.sessions.retain(|s| s.conn != conn);
        if !u.sessions.is_empty() {
            return;
        }
        u.clean_exit = logged_out;
        if logged_out {
            let targets: Vec<Arc<str>> = u.pairs.keys().cloned().collect();
            for t in targets {
                g.remove_pair(user, &t);
            }
            g.forget_if_idle(user);
            self.set_pairs_gauge(&g);
        } else {
            u.linger_until = Some(Instant::now() + self.cfg.watcher_linger);
            g.forget_if_idle(user);
        }
    }

    /// Drops expired pairs and the pairs of watchers that lingered too long.
    fn sweep(&self, g: &mut Inner, now: Instant) {
        let mut gone = Vec::new();
        for (w, u) in &g.users {
            let lingered = u.sessions.is_empty() && u.linger_until.is_some_and(|l| l <= now);
            for (t, p) in &u.pairs {
                let expired = p.since + self.cfg.ttl <= now;
                if expired || lingered {
                    gone.push((w.clone(), t.clone(), expired));
                }
            }
        }
        for (w, t, expired) in gone {
            if expired {
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
                debug!(watcher = %w, target = %t, "temporary presence pair expired");
            }
            g.remove_pair(&w, &t);
        }
        self.set_pairs_gauge(g);
    }

    fn next(&self, now: Instant) -> Next {
        let mut g = lock(&self.inner);
        let g = &mut *g;
        if g.next_sweep.map_or(true, |s| s <= now) {
            self.sweep(g, now);
            g.next_sweep = Some(now + SWEEP_EVERY);
        }
        let Some((&key, _)) = g.queue.first_key_value() else {
            return Next::Wait(g.next_sweep);
        };
        if key.0 > now {
            return Next::Wait(Some(key.0.min(g.next_sweep.unwrap_or(key.0))));
        }
        let Some((_, (w, t))) = g.queue.pop_first() else {
            return Next::Again;
        };
        let Some(u) = g.users.get_mut(&w) else {
            return Next::Again;
        };
        // The newest stream still open (an old one may not have ended yet).
        let slot = u
            .sessions
            .iter()
            .rev()
            .find(|s| !s.handle.is_closed())
            .cloned();
        let Some(p) = u.pairs.get_mut(&t) else {
            return Next::Again;
        };
        if p.replay != Some(key) || p.state != PairState::Active {
            return Next::Again;
        }
        p.replay = None;
        // A watcher with no stream now: its own return replays.
        let Some(slot) = slot else {
            return Next::Again;
        };
        if p.since + self.cfg.ttl <= now {
            return Next::Again;
        }
        p.changed = now;
        slot.push(p.presence.clone());
        debug!(watcher = %w, target = %t, "temporary presence replayed");
        Next::Send(slot)
    }

    /// Sends due replays at the configured rate until aborted.
    pub async fn run(self: Arc<Self>) {
        let interval = Duration::from_secs_f64(1.0 / self.cfg.replay_rate);
        let mut next_allowed = Instant::now();
        loop {
            let now = Instant::now();
            if next_allowed > now {
                tokio::time::sleep_until(next_allowed).await;
                continue;
            }
            match self.next(now) {
                Next::Again => {}
                Next::Wait(at) => {
                    let at = at.unwrap_or(now + SWEEP_EVERY);
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                Next::Send(slot) => {
                    self.stats.replays_sent.fetch_add(1, Ordering::Relaxed);
                    self.nudge(&slot);
                    next_allowed = next_allowed.max(now) + interval;
                }
            }
        }
    }

    /// Hands what waits in the session's outbox to its relay, for the
    /// node; what does not fit stays for the hook to write with the
    /// client's next stanza.
    fn nudge(&self, slot: &Slot) {
        if slot.nudged.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut left = Vec::new();
        for b in slot.take_outbox() {
            if !left.is_empty() || slot.handle.send_to_node(b.clone()).is_err() {
                left.push(b);
            }
        }
        for b in left {
            slot.push(b);
        }
        slot.nudged.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TempPresenceConfig {
        TempPresenceConfig {
            max_pairs_per_watcher: 2,
            max_pairs: 3,
            ..TempPresenceConfig::default()
        }
    }

    fn handle() -> (ConnHandle, crate::control::ControlReceiver) {
        ConnHandle::new(1 << 16)
    }

    const TP_QUERY: &[u8] = b"<query xmlns='http://jabber.org/protocol/disco#info' node='n#v1'><feature var='http://webex.com/connect/temp-presence+notify'/></query>";
    const PLAIN_QUERY: &[u8] =
        b"<query xmlns='http://jabber.org/protocol/disco#info' node='n#v2'><feature var='x'/></query>";

    #[test]
    fn pairs_are_bounded_resolved_and_unsubscribed() {
        let r = Registry::new(cfg());
        let a: Arc<str> = Arc::from("a@x");
        let b: Arc<str> = Arc::from("b@x");
        let (h, _rx) = handle();
        r.bound(&a, NodeId::Node1, 1, h.clone());
        r.directed(&a, "t1@x", b"<presence to='t1@x'/>", b"v1");
        r.directed(&a, "t2@x", b"<presence to='t2@x'/>", b"v1");
        r.directed(&a, "t3@x", b"<presence to='t3@x'/>", b"v1");
        assert_eq!(r.pairs(), 2, "per-watcher bound");
        r.bound(&b, NodeId::Node1, 2, h.clone());
        r.directed(&b, "t1@x", b"<presence/>", b"v2");
        r.directed(&b, "t2@x", b"<presence/>", b"v2");
        assert_eq!(r.pairs(), 3, "global bound");
        assert_eq!(r.stats.refused.load(Ordering::Relaxed), 2);
        // b's ver lacks the feature: its pending pair goes.
        r.disco_answer(&b, b"v2", PLAIN_QUERY);
        assert_eq!(r.targets_of("b@x"), Vec::<String>::new());
        r.disco_answer(&a, b"v1", TP_QUERY);
        assert_eq!(r.targets_of("a@x"), ["t1@x", "t2@x"]);
        assert_eq!(r.cached_answer("a@x", b"v1").as_deref(), Some(TP_QUERY));
        // Known ver without the feature unsubscribes.
        r.directed(&a, "t1@x", b"<presence/>", b"v2");
        r.unsubscribe("a@x", "t2@x");
        assert_eq!(r.pairs(), 0);
        assert_eq!(r.stats.pairs.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_back_replays_after_the_30_second_rule_at_the_rate() {
        let r = Arc::new(Registry::new(TempPresenceConfig {
            replay_rate: 10.0,
            ..TempPresenceConfig::default()
        }));
        let t: Arc<str> = Arc::from("t@x");
        let (h, mut rx) = handle();
        let mut watchers = Vec::new();
        for i in 0..5 {
            let w: Arc<str> = Arc::from(format!("w{i}@x"));
            let slot = r.bound(&w, NodeId::Node2, i, h.clone());
            r.disco_answer(&w, b"v1", TP_QUERY);
            r.directed(&w, "t@x", b"<presence to='t@x'/>", b"v1");
            watchers.push(slot);
        }
        let task = tokio::spawn(r.clone().run());
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        // T comes back 5 s after the subscribes.
        let (th, _trx) = handle();
        r.bound(&t, NodeId::Node2, 99, th);
        assert_eq!(r.stats.replays_deferred.load(Ordering::Relaxed), 5);
        let mut sent_at = Vec::new();
        while sent_at.len() < 5 {
            match rx.recv().await {
                crate::control::Control::ToNode(_) => sent_at.push(start.elapsed()),
                other => unreachable!("{other:?}"),
            }
            for s in &watchers {
                s.take_outbox();
            }
        }
        assert!(sent_at[0] >= Duration::from_secs(30), "{sent_at:?}");
        for w in sent_at.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(99), "{sent_at:?}");
        }
        assert_eq!(r.stats.replays_sent.load(Ordering::Relaxed), 5);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn expired_and_logged_out_pairs_are_not_replayed() {
        let r = Arc::new(Registry::new(TempPresenceConfig {
            ttl: Duration::from_secs(60),
            ..TempPresenceConfig::default()
        }));
        let task = tokio::spawn(r.clone().run());
        let w: Arc<str> = Arc::from("w@x");
        let (h, _rx) = handle();
        r.bound(&w, NodeId::Node1, 1, h.clone());
        r.disco_answer(&w, b"v1", TP_QUERY);
        r.directed(&w, "t@x", b"<presence/>", b"v1");
        r.directed(&w, "u@x", b"<presence/>", b"v1");
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(r.pairs(), 0);
        assert_eq!(r.stats.expired.load(Ordering::Relaxed), 2);
        // A logout drops the pairs; a lost stream keeps them to linger.
        r.directed(&w, "t@x", b"<presence/>", b"v1");
        r.ended("w@x", 1, false);
        assert_eq!(r.pairs(), 1);
        r.bound(&w, NodeId::Node1, 2, h.clone());
        r.ended("w@x", 2, true);
        assert_eq!(r.pairs(), 0);
        task.abort();
    }

    #[test]
    fn only_a_move_or_a_lost_stream_replays() {
        let r = Registry::new(TempPresenceConfig::default());
        let w: Arc<str> = Arc::from("w@x");
        let t: Arc<str> = Arc::from("t@x");
        let (h, _rx) = handle();
        r.bound(&w, NodeId::Node2, 1, h.clone());
        r.disco_answer(&w, b"v1", TP_QUERY);
        r.bound(&t, NodeId::Node1, 2, h.clone());
        r.directed(&w, "t@x", b"<presence/>", b"v1");
        // T logs out and in again on the same node: nothing to repair.
        r.ended("t@x", 2, true);
        r.bound(&t, NodeId::Node1, 3, h.clone());
        assert_eq!(r.replays_queued(), 0);
        // T's stream is lost (no logout): replayed.
        r.ended("t@x", 3, false);
        r.bound(&t, NodeId::Node1, 4, h.clone());
        assert_eq!(r.replays_queued(), 1);
        // T moves while still bound elsewhere: replayed (once).
        r.bound(&t, NodeId::Node2, 5, h.clone());
        assert_eq!(r.replays_queued(), 1);
    }
}
