//! Re-login hints: the stream errors that end moved users' streams, each
//! with the user's own turn to come back.
//!
//! ```xml
//! <stream:error>
//!   <system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>
//!   <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>…; reconnect in 317 s</text>
//!   <relogin xmlns='urn:x-prg-proxy:relogin:0' after='317' min='120' max='537' reason='failover'/>
//! </stream:error>
//! ```
//!
//! [`Hints`] plans a move's slots ([`plan`](super::plan)) over the window of
//! the node the users will log in to, and hands out slots one by one where
//! the number of users is only known roughly: the relay noticing that its
//! node died, and a proxy shutdown ([`Spread`]). Every slot handed out is
//! remembered by the [`Pacer`], which holds or refuses a login that comes
//! back before it.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::seq::SliceRandom;
use tokio::time::Instant;

use super::pacer::Pacer;
use super::plan::{self, Window};
use crate::config::{Config, FailoverConfig, WindowMode};
use crate::group::Reason;
use crate::node::{NodeId, PAIR};
use crate::xmpp::stream;

/// The namespace of the hint element.
pub const NS_RELOGIN: &str = "urn:x-prg-proxy:relogin:0";

/// Why a stream ends with a hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The user's node failed over (automatically or by the administrator).
    Failover,
    /// The user's home node is back and takes its users back.
    Fallback,
    /// The group recovered from both nodes failing.
    Recovery,
    /// The user was moved to another node.
    Move,
    /// The connection to the user's node was lost.
    NodeLost,
    /// The proxy is shutting down.
    Shutdown,
    /// The login pacer refused an early or over-rate login.
    Paced,
}

impl Why {
    /// The `reason` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Failover => "failover",
            Why::Fallback => "fallback",
            Why::Recovery => "recovery",
            Why::Move => "move",
            Why::NodeLost => "node-lost",
            Why::Shutdown => "shutdown",
            Why::Paced => "paced",
        }
    }

    /// What the recovery manager's reason for a move means for the users.
    pub fn of_move(r: Reason, back_home: bool) -> Why {
        match r {
            Reason::AutomaticFallback => Why::Fallback,
            Reason::AutoRecoverCriticalServiceDown | Reason::AutoRecoverDatabaseFailure => {
                Why::Recovery
            }
            _ if back_home => Why::Fallback,
            _ => Why::Failover,
        }
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One user's re-login hint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Relogin {
    /// The user's turn, from now.
    pub after: Duration,
    /// The window's start, from now.
    pub min: Duration,
    /// The window's end, from now.
    pub max: Duration,
    /// Why.
    pub why: Why,
}

impl Relogin {
    /// The `<relogin/>` element. Times are in seconds: whole seconds
    /// (`after` and `max` rounded up, so that a client honouring the hint
    /// is never early) when the window reaches [`WHOLE_SECONDS`], with
    /// milliseconds below it, where whole seconds would bunch the slots.
    pub fn element(&self) -> String {
        let (after, min, max) = if self.max >= WHOLE_SECONDS {
            (
                ceil_secs(self.after).to_string(),
                self.min.as_secs().to_string(),
                ceil_secs(self.max).to_string(),
            )
        } else {
            let ms = |d: Duration| format!("{:.3}", d.as_millis() as f64 / 1000.0);
            (
                ms(self.after + Duration::from_nanos(999_999)),
                ms(self.min),
                ms(self.max),
            )
        };
        format!(
            "<relogin xmlns='{NS_RELOGIN}' after='{after}' min='{min}' max='{max}' reason='{}'/>",
            self.why
        )
    }

    /// A stream error with `condition`, `text` (to which "; reconnect in N
    /// s" is added) and the hint.
    pub fn stream_error(&self, condition: &str, text: &str) -> String {
        let text = format!("{text}; reconnect in {} s", ceil_secs(self.after));
        stream::stream_error(condition, Some(&text), Some(&self.element()))
    }

    /// A `<see-other-host>` stream error naming `host` (`host:port`), with
    /// `text` and the hint.
    pub fn redirect(&self, host: &str, text: &str) -> String {
        let text = format!("{text}; reconnect in {} s", ceil_secs(self.after));
        format!(
            "<stream:error><see-other-host xmlns='{ns}'>{host}</see-other-host>\
             <text xmlns='{ns}' xml:lang='en'>{text}</text>{hint}</stream:error></stream:stream>",
            ns = stream::NS_STREAMS,
            host = quick_xml::escape::escape(host),
            text = quick_xml::escape::escape(text.as_str()),
            hint = self.element()
        )
    }
}

/// Windows at least this long are given in whole seconds.
pub const WHOLE_SECONDS: Duration = Duration::from_secs(60);

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Slots handed out one at a time over a window, stratified for an
/// expected number of users; beyond it, uniformly over the window.
#[derive(Debug)]
pub struct Spread {
    start: Instant,
    window: Window,
    order: Vec<u32>,
    next: AtomicUsize,
}

impl Spread {
    /// A spread for about `n` users from `start` over `window`.
    pub fn new(start: Instant, window: Window, n: usize) -> Spread {
        let mut order: Vec<u32> = (0..n.min(u32::MAX as usize) as u32).collect();
        order.shuffle(&mut rand::thread_rng());
        Spread {
            start,
            window,
            order,
            next: AtomicUsize::new(0),
        }
    }

    /// The next user's slot, as an offset from `now` (never negative),
    /// and the window from `now`.
    pub fn next(&self, now: Instant) -> (Duration, Window) {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let mut rng = rand::thread_rng();
        let n = self.order.len();
        let at = match self.order.get(k) {
            Some(&s) => plan::slot_in_stratum(s as usize, n, self.window, &mut rng),
            None => plan::slot_in_stratum(0, 1, self.window, &mut rng),
        };
        let since = now.saturating_duration_since(self.start);
        let from_now = |d: Duration| d.saturating_sub(since);
        (
            from_now(at),
            Window::flat(from_now(self.window.lower), from_now(self.window.upper)),
        )
    }

    /// Whether the spread began less than `fresh` before `now`.
    fn fresh(&self, now: Instant, fresh: Duration) -> bool {
        now.saturating_duration_since(self.start) < fresh
    }
}

/// Counters of the hints.
#[derive(Debug, Default)]
pub struct HintStats {
    /// Hints issued (every kind).
    pub issued: AtomicU64,
}

/// Plans and issues re-login hints.
#[derive(Debug)]
pub struct Hints {
    cfg: ArcSwap<FailoverConfig>,
    /// Per node: its configured re-login limits.
    limits: ArcSwap<Vec<(Duration, Duration)>>,
    node_names: Vec<String>,
    pacer: Arc<Pacer>,
    /// Per node: the spread of the connections that lost it.
    lost: Vec<Mutex<Option<Arc<Spread>>>>,
    shutdown: Mutex<Option<Arc<Spread>>>,
    /// Counters.
    pub stats: HintStats,
}

/// Per node: its `[relogin_lower, relogin_upper]`.
fn relogin_limits(config: &Config) -> Vec<(Duration, Duration)> {
    config
        .nodes
        .iter()
        .map(|n| (n.relogin_lower, n.relogin_upper))
        .collect()
}

/// A node-lost spread is reused for connections lost within this time.
const INCIDENT: Duration = Duration::from_secs(30);

impl Hints {
    /// Hints for the configured nodes, recording slots in `pacer`.
    pub fn new(config: &Config, pacer: Arc<Pacer>) -> Hints {
        Hints {
            cfg: ArcSwap::from_pointee(config.failover.clone()),
            limits: ArcSwap::from_pointee(relogin_limits(config)),
            node_names: config.nodes.iter().map(|n| n.name.clone()).collect(),
            pacer,
            lost: (0..PAIR).map(|_| Mutex::new(None)).collect(),
            shutdown: Mutex::new(None),
            stats: HintStats::default(),
        }
    }

    /// Takes the `[failover]` settings and the nodes' re-login limits of a
    /// reloaded configuration (plans made before keep theirs).
    pub fn update(&self, config: &Config) {
        self.cfg.store(Arc::new(config.failover.clone()));
        self.limits.store(Arc::new(relogin_limits(config)));
    }

    /// How a stream that a move ends is closed: `<see-other-host>` naming
    /// the proxy when `failover.redirect` is set, else `condition`.
    pub fn eviction(&self, h: &Relogin, condition: &str, text: &str) -> String {
        match &self.cfg.load().redirect {
            Some(host) => h.redirect(host, text),
            None => h.stream_error(condition, text),
        }
    }

    /// How long a refused login waits before it is told.
    pub fn refuse_delay(&self) -> Duration {
        self.cfg.load().refuse_delay
    }

    /// The pacer the slots go to.
    pub fn pacer(&self) -> &Arc<Pacer> {
        &self.pacer
    }

    fn name(&self, n: NodeId) -> &str {
        self.node_names.get(n.index()).map_or("?", |s| s.as_str())
    }

    fn limits_of(&self, n: NodeId) -> (Duration, Duration) {
        let limits = self.limits.load();
        let i = n.index().min(limits.len().saturating_sub(1));
        limits
            .get(i)
            .copied()
            .unwrap_or((Duration::from_secs(120), Duration::from_secs(537)))
    }

    /// In a fixed window the plan is the rate: the pacer admits the moved
    /// users no faster than planned until the window ends (the token burst
    /// absorbs the jitter inside the strata).
    fn hold_to_plan(&self, target: NodeId, now: Instant, w: Window, n: usize) {
        if self.cfg.load().window == WindowMode::Fixed && !w.is_empty() {
            let rate = w.planned_rate(n);
            self.pacer.plan(target, rate, now + w.upper);
        }
    }

    /// The window for `n` users logging in to `target`.
    pub fn window(&self, target: NodeId, n: usize) -> Window {
        let (lower, upper) = self.limits_of(target);
        let cfg = self.cfg.load();
        plan::window(
            cfg.window,
            n,
            self.pacer.rate(target),
            cfg.max_rate,
            lower,
            upper,
        )
    }

    /// One hint per user of a move of `users` to `target` (`None`: no node
    /// can serve them now; the window of their home `home` is used),
    /// remembered as their slots.
    pub fn plan_move(
        &self,
        users: &[String],
        target: Option<NodeId>,
        home: NodeId,
        why: Why,
    ) -> Vec<Relogin> {
        let now = Instant::now();
        let w = match target {
            Some(t) => self.window(t, users.len()),
            None => {
                let (lower, upper) = self.limits_of(home);
                Window::flat(lower, upper)
            }
        };
        if let Some(t) = target {
            self.hold_to_plan(t, now, w, users.len());
        }
        let slots = plan::stratified(users.len(), w, &mut rand::thread_rng());
        self.stats
            .issued
            .fetch_add(users.len() as u64, Ordering::Relaxed);
        users
            .iter()
            .zip(slots)
            .map(|(u, after)| {
                // A user the relay already told (its node died under it)
                // keeps that turn.
                let at = self.pacer.remember_first(u, now + after, now);
                let after = at.saturating_duration_since(now);
                Relogin {
                    after,
                    min: w.lower,
                    max: w.upper,
                    why,
                }
            })
            .collect()
    }

    /// The stream error for a user whose node connection to `node` was lost:
    /// the user will log in to its peer once the group moves, so the slot
    /// lies in the peer's window, spread over the node's users.
    pub fn node_lost(&self, user: &str, node: NodeId, users_on_node: usize) -> String {
        let target = node.peer();
        let now = Instant::now();
        let spread = {
            let mut slot = self.lost[node.index()]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some(s) if s.fresh(now, INCIDENT) => s.clone(),
                _ => {
                    let n = users_on_node.max(1);
                    let w = self.window(target, n);
                    self.hold_to_plan(target, now, w, n);
                    let s = Arc::new(Spread::new(now, w, n));
                    *slot = Some(s.clone());
                    s
                }
            }
        };
        let (after, w) = spread.next(now);
        // Every session of the user is told the same turn.
        let after = self
            .pacer
            .remember_first(user, now + after, now)
            .saturating_duration_since(now);
        self.stats.issued.fetch_add(1, Ordering::Relaxed);
        let hint = Relogin {
            after,
            min: w.lower,
            max: w.upper,
            why: Why::NodeLost,
        };
        self.eviction(
            &hint,
            "remote-connection-failed",
            &format!("the connection to node {} was lost", self.name(node)),
        )
    }

    /// The stream error for a connection closed by a proxy shutdown, spread
    /// over `failover.shutdown_spread` for the `active` connections.
    pub fn shutdown(&self, active: usize) -> String {
        let now = Instant::now();
        let spread = {
            let mut slot = self.shutdown.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| {
                let w = Window::flat(Duration::ZERO, self.cfg.load().shutdown_spread);
                Arc::new(Spread::new(now, w, active.max(1)))
            })
            .clone()
        };
        let (after, w) = spread.next(now);
        self.stats.issued.fetch_add(1, Ordering::Relaxed);
        let hint = Relogin {
            after,
            min: w.lower,
            max: w.upper,
            why: Why::Shutdown,
        };
        self.eviction(&hint, "system-shutdown", "the proxy is shutting down")
    }

    /// A fresh hint for a login the pacer refused: come back `after` from
    /// now, within the target's window.
    pub fn paced(&self, target: NodeId, after: Duration) -> Relogin {
        self.stats.issued.fetch_add(1, Ordering::Relaxed);
        let (_, upper) = self.limits_of(target);
        Relogin {
            after,
            min: after,
            max: upper.max(after),
            why: Why::Paced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_element_is_the_designed_one() {
        let h = Relogin {
            after: Duration::from_millis(316_200),
            min: Duration::from_secs(120),
            max: Duration::from_secs(537),
            why: Why::Failover,
        };
        assert_eq!(
            h.element(),
            "<relogin xmlns='urn:x-prg-proxy:relogin:0' after='317' min='120' max='537' reason='failover'/>"
        );
        let e = h.stream_error("system-shutdown", "node imp1 failed over");
        assert!(e.starts_with("<stream:error><system-shutdown "), "{e}");
        assert!(
            e.contains(">node imp1 failed over; reconnect in 317 s</text>"),
            "{e}"
        );
        assert!(e.ends_with("</stream:error></stream:stream>"), "{e}");
        let r = h.redirect("xmpp.example.com:5222", "node imp1 failed over");
        assert!(
            r.starts_with("<stream:error><see-other-host xmlns='urn:ietf:params:xml:ns:xmpp-streams'>xmpp.example.com:5222</see-other-host>"),
            "{r}"
        );
        assert!(r.contains(&h.element()), "{r}");
        // A short window keeps its milliseconds.
        let short = Relogin {
            after: Duration::from_micros(1_234_500),
            min: Duration::ZERO,
            max: Duration::from_secs(3),
            why: Why::NodeLost,
        };
        assert_eq!(
            short.element(),
            "<relogin xmlns='urn:x-prg-proxy:relogin:0' after='1.235' min='0.000' max='3.000' reason='node-lost'/>"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_spread_hands_out_one_stratum_per_user() {
        let w = Window::flat(Duration::ZERO, Duration::from_secs(10));
        let now = Instant::now();
        let s = Spread::new(now, w, 10);
        let mut seconds: Vec<u64> = (0..10).map(|_| s.next(now).0.as_secs()).collect();
        seconds.sort_unstable();
        assert_eq!(seconds, (0..10).collect::<Vec<_>>());
        // Beyond the expected count: still inside the window.
        assert!(s.next(now).0 <= Duration::from_secs(10));
        // Later calls count from their own now.
        let later = now + Duration::from_secs(4);
        let (after, w2) = s.next(later);
        assert!(after <= Duration::from_secs(6));
        assert_eq!(w2.upper, Duration::from_secs(6));
    }
}
