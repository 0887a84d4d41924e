//! Failover-storm simulation: what happens at a node when N moved users
//! log in again at once, with and without the proxy's re-login hints and
//! login pacer.
//!
//! Everything runs on a simulated clock (a 5 ms tick loop in f64 seconds,
//! with a time wheel of pending client events; no sockets, no sleeping),
//! driving the proxy's real pure pacing core ([`NodePacer`]) and planner
//! ([`plan::window`], [`plan::stratified`]). Three modes per N:
//!
//! - **unpaced**: every client comes back within the first second and goes
//!   straight to the node (a plain TCP proxy, no hints);
//! - **fixed**: stratified hints over the fixed window [120 s, 537 s];
//! - **adaptive**: stratified hints over the adaptive window (N / the
//!   pacer's initial rate, at most 537 s).
//!
//! In the paced modes 70 % of the clients honour their hint (come back at
//! its time) and 30 % ignore it: half come back at once (within 1 s,
//! retrying 1 s after a refusal), half after an RFC 6120 random delay
//! (0–60 s). The pacer mirrors `Pacer::admit`: a login before its slot is
//! held until the slot if that is within `max_hold`, then waits in FIFO
//! order for a token (handed out every 5 ms); a login whose slot wait plus
//! estimated token wait passes `max_hold` is refused with a fresh time to
//! come back. The node has `concurrent` = 10 login slots, each busy
//! 10 / C s per login (C = 200 logins/s by default, unknown to the pacer);
//! a login that waits over 8 s for a slot fails as overloaded and its
//! client retries after an RFC 6120 random delay (immediate clients after
//! 1 s). Login latency (queue wait + work) and overloads feed the pacer.
//!
//! Reported per (N, mode): peak logins/s reaching the node in any second
//! against the planned rate, login failures at the node, time until 99 %
//! and 100 % are logged in (and as a multiple of N / C), logins held and
//! refused by the pacer, and its final rate. Eviction is not modelled.
//!
//! Run: `cargo run --release --bin stormsim -- [--users 50000] [--capacity 200]`
//! (`--users` takes a comma-separated list; default 9000,50000,1000000;
//! `--json` adds one JSON object per result).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use clap::Parser;
use prg_proxy::config::{FailoverConfig, WindowMode};
use prg_proxy::failover::pacer::{NodePacer, PacerParams, TICK};
use prg_proxy::failover::plan;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// The fixed window's limits (the source's defaults).
const LOWER: Duration = Duration::from_secs(120);
const UPPER: Duration = Duration::from_secs(537);
/// Login slots at the node.
const CONCURRENT: usize = 10;
/// A login waiting longer than this for a node slot fails.
const QUEUE_TIMEOUT: f64 = 8.0;
/// RFC 6120 clients retry after a uniform delay up to this.
const RFC_MAX: f64 = 60.0;
/// Immediate clients retry after this.
const IMMEDIATE_RETRY: f64 = 1.0;
/// Honouring share of the clients; the rest split evenly.
const HONOUR_SHARE: f64 = 0.70;
const IMMEDIATE_SHARE: f64 = 0.15;
/// Time wheel length in ticks (about 164 s); later events overflow.
const WHEEL: u64 = 1 << 15;

#[derive(Parser)]
#[command(about = "prg-proxy failover-storm simulation (simulated clock)")]
struct Cli {
    /// Moved users per run (comma-separated for several runs).
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = vec![9_000usize, 50_000, 1_000_000]
    )]
    users: Vec<usize>,
    /// The node's login capacity C, logins per second.
    #[arg(long, default_value_t = 200.0)]
    capacity: f64,
    /// Also print one JSON object per result.
    #[arg(long)]
    json: bool,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unpaced,
    Fixed,
    Adaptive,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Unpaced => "unpaced",
            Mode::Fixed => "fixed",
            Mode::Adaptive => "adaptive",
        }
    }
}

/// Client kinds.
const HONOUR: u8 = 0;
const IMMEDIATE: u8 = 1;
const RFC: u8 = 2;

/// Client states.
const AWAY: u8 = 0;
const HELD: u8 = 1;
const WAITING: u8 = 2;
const AT_NODE: u8 = 3;
const DONE: u8 = 4;

/// Event kinds (low two bits of a wheel entry; the user is the rest).
const EV_ARRIVE: u32 = 0;
const EV_SLOT: u32 = 1;
const EV_TIMEOUT: u32 = 2;

struct Outcome {
    users: usize,
    mode: Mode,
    peak: u32,
    planned: f64,
    /// The hint window (none when unpaced).
    window: Option<(f64, f64)>,
    node_failures: u64,
    t99: Option<f64>,
    t100: Option<f64>,
    ideal: f64,
    admitted: u64,
    held: u64,
    refused: u64,
    attempts: u64,
    final_rate: Option<f64>,
    simulated: f64,
    wall: f64,
}

/// One moved user (16 bytes; one cache line access per event).
#[derive(Debug, Clone, Copy)]
struct User {
    /// The user's slot at the pacer, in ticks.
    slot: u32,
    /// When the user's current hold ends, in ticks.
    deadline: u32,
    /// When the user's current login reached the pacer, in ticks.
    start: u32,
    kind: u8,
    status: u8,
    /// The slot is a turn the pacer gave at a refusal (let in early when
    /// the node has room), not the planned one.
    turn: bool,
}

struct Sim {
    mode: Mode,
    n: usize,
    dt: f64,
    /// Ticks per second (a multiplication is cheaper than a division).
    hz: f64,
    t0: Instant,
    rng: StdRng,
    users: Vec<User>,
    wheel: Vec<Vec<u32>>,
    overflow: BinaryHeap<Reverse<u64>>,
    /// Logins waiting for a token: (user, its deadline); stale entries are
    /// skipped.
    waiting: VecDeque<(u32, u32)>,
    n_waiting: usize,
    pacer: NodePacer,
    max_hold: f64,
    /// `failover.refuse_delay`, in ticks.
    refuse_delay_ticks: u64,
    hold_ticks: u32,
    grace_ticks: u32,
    /// When each node slot is free, in seconds.
    node_free: [f64; CONCURRENT],
    work: f64,
    /// Logins queued at the node: (user, arrival time).
    node_queue: VecDeque<(u32, f64)>,
    /// Logins being worked on: (done time, user, latency).
    in_flight: VecDeque<(f64, u32, f64)>,
    per_sec: Vec<u32>,
    node_failures: u64,
    admitted: u64,
    held: u64,
    refused: u64,
    attempts: u64,
    done: usize,
    target99: usize,
    t99: Option<f64>,
    t100: Option<f64>,
}

impl Sim {
    /// Whole ticks covering `s` seconds (rounded up; `f64::ceil` is a
    /// libm call on the baseline target and showed in profiles).
    fn secs_to_ticks(&self, s: f64) -> u64 {
        let x = (s * self.hz).max(0.0);
        let i = x as u64;
        if (i as f64) < x {
            i + 1
        } else {
            i
        }
    }

    fn instant(&self, t: u64) -> Instant {
        self.t0 + Duration::from_secs_f64(t as f64 * self.dt)
    }

    /// Schedules an event at tick `at` (never earlier than the next tick).
    fn schedule(&mut self, now: u64, at: u64, user: u32, ev: u32) {
        let at = at.max(now + 1);
        let e = (user << 2) | ev;
        if at < now + WHEEL {
            self.wheel[(at % WHEEL) as usize].push(e);
        } else {
            self.overflow.push(Reverse((at << 32) | u64::from(e)));
        }
    }

    /// The client's delay before it tries again after a failure without a
    /// hint.
    fn retry_delay(&mut self, u: u32) -> f64 {
        match self.users[u as usize].kind {
            IMMEDIATE => IMMEDIATE_RETRY,
            _ => self.rng.gen::<f64>() * RFC_MAX,
        }
    }

    fn send_to_node(&mut self, u: u32, t: u64) {
        let now = t as f64 * self.dt;
        self.users[u as usize].status = AT_NODE;
        if let Some(c) = self.per_sec.get_mut(now as usize) {
            *c += 1;
        }
        self.node_queue.push_back((u, now));
    }

    fn node_failure(&mut self, u: u32, t: u64) {
        self.node_failures += 1;
        if self.mode != Mode::Unpaced {
            let i = self.instant(t);
            self.pacer.observe_overload(i);
        }
        self.users[u as usize].status = AWAY;
        let d = self.retry_delay(u);
        let at = t + self.secs_to_ticks(d);
        self.schedule(t, at, u, EV_ARRIVE);
    }

    fn refuse(&mut self, u: u32, t: u64, after: f64, turn: bool) {
        self.refused += 1;
        self.users[u as usize].turn = turn;
        let after_ticks = self.secs_to_ticks(after).max(1);
        self.users[u as usize].slot = (t + after_ticks).min(u64::from(u32::MAX)) as u32;
        self.users[u as usize].status = AWAY;
        // The refusal is told after `refuse_delay`; an honouring client
        // comes back at its turn, a naive one some time after being told.
        let told = self.refuse_delay_ticks;
        let back = match self.users[u as usize].kind {
            HONOUR => after_ticks.max(told),
            _ => {
                let d = self.retry_delay(u);
                told + self.secs_to_ticks(d)
            }
        };
        self.schedule(t, t + back, u, EV_ARRIVE);
    }

    fn join(&mut self, u: u32, t: u64) {
        self.users[u as usize].status = WAITING;
        let d = self.users[u as usize].deadline;
        self.waiting.push_back((u, d));
        self.n_waiting += 1;
        self.schedule(t, u64::from(d), u, EV_TIMEOUT);
    }

    fn arrive(&mut self, u: u32, t: u64) {
        self.attempts += 1;
        if self.mode == Mode::Unpaced {
            self.send_to_node(u, t);
            return;
        }
        let slot = u64::from(self.users[u as usize].slot);
        if t > slot + u64::from(self.grace_ticks) {
            // The slot is forgotten: an ordinary login, never held.
            let i = self.instant(t);
            self.pacer.charge(i);
            self.admitted += 1;
            self.send_to_node(u, t);
            return;
        }
        let early = slot.saturating_sub(t) as f64 * self.dt;
        let turn = self.users[u as usize].turn;
        if turn && early > 0.0 && self.n_waiting == 0 {
            let i = self.instant(t);
            if self.pacer.take(i, 1) == 1 {
                self.admitted += 1;
                self.send_to_node(u, t);
                return;
            }
        }
        if early > self.max_hold {
            self.refuse(u, t, early, turn);
            return;
        }
        let queue = self.pacer.estimate(self.n_waiting).as_secs_f64();
        if early + queue > self.max_hold {
            let i = self.instant(t);
            let turn = self.pacer.turn(i, self.n_waiting).as_secs_f64();
            self.refuse(
                u,
                t,
                turn.max(early),
                turn > early || self.users[u as usize].turn,
            );
            return;
        }
        self.users[u as usize].start = t as u32;
        self.users[u as usize].deadline = (t + u64::from(self.hold_ticks)) as u32;
        if slot > t {
            self.users[u as usize].status = HELD;
            self.schedule(t, slot, u, EV_SLOT);
        } else {
            self.join(u, t);
        }
    }

    fn event(&mut self, e: u32, t: u64) {
        let u = e >> 2;
        let ui = u as usize;
        match e & 3 {
            EV_ARRIVE => self.arrive(u, t),
            EV_SLOT if self.users[ui].status == HELD => self.join(u, t),
            EV_TIMEOUT
                if self.users[ui].status == WAITING && u64::from(self.users[ui].deadline) == t =>
            {
                // The hold ran out before a token came.
                self.n_waiting -= 1;
                self.users[ui].status = AWAY;
                let i = self.instant(t);
                let again = self.pacer.turn(i, self.n_waiting).max(TICK).as_secs_f64();
                self.refuse(u, t, again, true);
            }
            _ => {}
        }
    }

    fn tokens(&mut self, t: u64) {
        let i = self.instant(t);
        let mut k = self.pacer.take(i, self.n_waiting);
        while k > 0 {
            let Some((u, d)) = self.waiting.pop_front() else {
                break;
            };
            let ui = u as usize;
            if self.users[ui].status != WAITING || self.users[ui].deadline != d {
                continue;
            }
            k -= 1;
            self.n_waiting -= 1;
            if u64::from(self.users[ui].start) == t {
                self.admitted += 1;
            } else {
                self.held += 1;
            }
            self.send_to_node(u, t);
        }
    }

    fn node(&mut self, t: u64) {
        let now = t as f64 * self.dt;
        // Completions.
        while self.in_flight.front().is_some_and(|c| c.0 <= now) {
            let Some((at, u, lat)) = self.in_flight.pop_front() else {
                break;
            };
            if self.mode != Mode::Unpaced {
                let i = self.instant(t);
                self.pacer.observe_latency(i, Duration::from_secs_f64(lat));
            }
            self.users[u as usize].status = DONE;
            self.done += 1;
            if self.done == self.target99 {
                self.t99 = Some(at);
            }
            if self.done == self.n {
                self.t100 = Some(at);
            }
        }
        // Logins that waited too long for a slot.
        while let Some(&(u, a)) = self.node_queue.front() {
            if a + QUEUE_TIMEOUT >= now {
                break;
            }
            self.node_queue.pop_front();
            self.node_failure(u, t);
        }
    }

    /// Starts logins on the node's free slots (within this tick, at the
    /// moment each slot freed or the login arrived).
    fn node_start(&mut self, t: u64) {
        let now = t as f64 * self.dt;
        loop {
            let (i, free) =
                self.node_free
                    .iter()
                    .copied()
                    .enumerate()
                    .fold(
                        (0, f64::INFINITY),
                        |b, (i, f)| if f < b.1 { (i, f) } else { b },
                    );
            if free > now {
                break;
            }
            let Some((u, a)) = self.node_queue.pop_front() else {
                break;
            };
            let s = free.max(a);
            if s > a + QUEUE_TIMEOUT {
                self.node_failure(u, t);
                continue;
            }
            let end = s + self.work;
            self.node_free[i] = end;
            self.in_flight.push_back((end, u, end - a));
        }
    }

    fn step(&mut self, t: u64) {
        while let Some(&Reverse(e)) = self.overflow.peek() {
            let at = e >> 32;
            if at >= t + WHEEL {
                break;
            }
            self.overflow.pop();
            self.wheel[(at % WHEEL) as usize].push(e as u32);
        }
        self.node(t);
        let idx = (t % WHEEL) as usize;
        let mut bucket = std::mem::take(&mut self.wheel[idx]);
        // Touch the users first: independent loads overlap their cache
        // misses, which otherwise dominate at a million users.
        let mut touch = 0u32;
        for &e in &bucket {
            if let Some(u) = self.users.get((e >> 2) as usize) {
                touch ^= u.slot;
            }
        }
        std::hint::black_box(touch);
        for &e in &bucket {
            self.event(e, t);
        }
        bucket.clear();
        self.wheel[idx] = bucket;
        if self.mode != Mode::Unpaced {
            self.tokens(t);
        }
        self.node_start(t);
    }
}

fn run(n: usize, mode: Mode, capacity: f64, seed: u64) -> Outcome {
    let wall = std::time::Instant::now();
    assert!(n < (1 << 30), "at most 2^30 users");
    let cfg = FailoverConfig::default();
    let params = PacerParams::from(&cfg);
    let t0 = Instant::now();
    let dt = TICK.as_secs_f64();
    let mut rng = StdRng::seed_from_u64(seed ^ (n as u64).rotate_left(17));
    let users: Vec<User> = (0..n)
        .map(|_| {
            let x = rng.gen::<f64>();
            let kind = if x < HONOUR_SHARE {
                HONOUR
            } else if x < HONOUR_SHARE + IMMEDIATE_SHARE {
                IMMEDIATE
            } else {
                RFC
            };
            User {
                slot: 0,
                deadline: 0,
                start: 0,
                kind,
                status: AWAY,
                turn: false,
            }
        })
        .collect();
    let w = match mode {
        Mode::Unpaced | Mode::Fixed => plan::window(
            WindowMode::Fixed,
            n,
            params.initial_rate,
            params.max_rate,
            LOWER,
            UPPER,
        ),
        Mode::Adaptive => plan::window(
            WindowMode::Adaptive,
            n,
            params.initial_rate,
            params.max_rate,
            LOWER,
            UPPER,
        ),
    };
    let ideal = n as f64 / capacity;
    let limit = 3.0 * UPPER.as_secs_f64().max(ideal) + 600.0;
    let mut sim = Sim {
        mode,
        n,
        dt,
        hz: 1.0 / dt,
        t0,
        rng,
        users,
        wheel: (0..WHEEL).map(|_| Vec::new()).collect(),
        overflow: BinaryHeap::new(),
        waiting: VecDeque::new(),
        n_waiting: 0,
        pacer: {
            let mut p = NodePacer::new(params, t0);
            if mode == Mode::Fixed {
                // As the proxy does for a fixed window: the plan is the rate.
                p.plan(t0, w.planned_rate(n), t0 + w.upper + cfg.slot_grace);
            }
            p
        },
        max_hold: cfg.max_hold.as_secs_f64(),
        refuse_delay_ticks: (cfg.refuse_delay.as_secs_f64() / dt).ceil() as u64,
        hold_ticks: (cfg.max_hold.as_secs_f64() / dt).ceil() as u32,
        grace_ticks: (cfg.slot_grace.as_secs_f64() / dt).ceil() as u32,
        node_free: [0.0; CONCURRENT],
        work: CONCURRENT as f64 / capacity,
        node_queue: VecDeque::new(),
        in_flight: VecDeque::new(),
        per_sec: vec![0; limit as usize + 2],
        node_failures: 0,
        admitted: 0,
        held: 0,
        refused: 0,
        attempts: 0,
        done: 0,
        target99: ((n as f64) * 0.99).ceil() as usize,
        t99: None,
        t100: None,
    };
    // First arrivals.
    let slots = if mode == Mode::Unpaced {
        Vec::new()
    } else {
        plan::stratified(n, w, &mut sim.rng)
    };
    for u in 0..n {
        let first = if mode == Mode::Unpaced {
            sim.rng.gen::<f64>()
        } else {
            let s = slots.get(u).map_or(0.0, Duration::as_secs_f64);
            sim.users[u].slot = sim.secs_to_ticks(s) as u32;
            match sim.users[u].kind {
                HONOUR => s,
                IMMEDIATE => sim.rng.gen::<f64>(),
                _ => sim.rng.gen::<f64>() * RFC_MAX,
            }
        };
        let at = sim.secs_to_ticks(first);
        // Tick 0 is never processed for events: start at tick 1.
        sim.schedule(0, at, u as u32, EV_ARRIVE);
    }
    drop(slots);
    let limit_ticks = (limit / dt) as u64;
    let mut t = 1;
    while sim.done < n && t < limit_ticks {
        sim.step(t);
        t += 1;
    }
    let peak = sim.per_sec.iter().copied().max().unwrap_or(0);
    let planned = match mode {
        Mode::Unpaced => capacity,
        Mode::Fixed => w.planned_rate(n),
        Mode::Adaptive => capacity.min(w.planned_rate(n)),
    };
    Outcome {
        users: n,
        mode,
        peak,
        planned,
        window: (mode != Mode::Unpaced).then_some((w.lower.as_secs_f64(), w.upper.as_secs_f64())),
        node_failures: sim.node_failures,
        t99: sim.t99,
        t100: sim.t100,
        ideal,
        admitted: sim.admitted,
        held: sim.held,
        refused: sim.refused,
        attempts: sim.attempts,
        final_rate: (mode != Mode::Unpaced).then(|| sim.pacer.rate()),
        simulated: t as f64 * dt,
        wall: wall.elapsed().as_secs_f64(),
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.prec$}"))
}

fn json_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "null".to_owned(), |x| format!("{x:.3}"))
}

fn main() {
    let cli = Cli::parse();
    let c = cli.capacity;
    if !(c.is_finite() && c > 0.0) {
        eprintln!("stormsim: --capacity must be a positive number");
        std::process::exit(2);
    }
    println!(
        "failover storm, simulated: node C = {c} logins/s ({CONCURRENT} slots x {:.0} ms), \
         queue timeout {QUEUE_TIMEOUT} s; paced modes: 70 % honour, 15 % immediate, 15 % RFC 6120",
        CONCURRENT as f64 / c * 1000.0
    );
    println!(
        "{:>9} {:>8} {:>8} {:>8} {:>6} {:>9} {:>8} {:>6} {:>8} {:>6} {:>9} {:>9} {:>7}",
        "users",
        "mode",
        "peak/s",
        "plan/s",
        "pk/pl",
        "node-fail",
        "t99 s",
        "x N/C",
        "t100 s",
        "x N/C",
        "held",
        "refused",
        "rate"
    );
    let mut all = Vec::new();
    for &n in &cli.users {
        for mode in [Mode::Unpaced, Mode::Fixed, Mode::Adaptive] {
            let o = run(n, mode, c, cli.seed);
            println!(
                "{:>9} {:>8} {:>8} {:>8.1} {:>6.2} {:>9} {:>8} {:>6} {:>8} {:>6} {:>9} {:>9} {:>7}",
                o.users,
                o.mode.name(),
                o.peak,
                o.planned,
                f64::from(o.peak) / o.planned,
                o.node_failures,
                opt(o.t99, 1),
                opt(o.t99.map(|t| t / o.ideal), 2),
                opt(o.t100, 1),
                opt(o.t100.map(|t| t / o.ideal), 2),
                o.held,
                o.refused,
                opt(o.final_rate, 1),
            );
            eprintln!(
                "  ({} {}: window {}, {} attempts, {:.0} s simulated in {:.1} s)",
                o.users,
                o.mode.name(),
                o.window
                    .map_or_else(|| "none".to_owned(), |(l, u)| format!("{l:.0}-{u:.0} s")),
                o.attempts,
                o.simulated,
                o.wall
            );
            all.push(o);
        }
    }
    println!(
        "plan/s: fixed N / 417 s; adaptive min(C, N / window); unpaced C. \
         t99/t100: '-' = not all in before the simulation bound."
    );
    if cli.json {
        for o in &all {
            println!(
                "{{\"users\":{},\"mode\":\"{}\",\"peak_per_s\":{},\"planned_per_s\":{:.3},\
                 \"window_s\":{},\"node_failures\":{},\"t99_s\":{},\"t100_s\":{},\
                 \"n_over_c_s\":{:.3},\"admitted\":{},\"held\":{},\"refused\":{},\
                 \"attempts\":{},\"final_rate\":{}}}",
                o.users,
                o.mode.name(),
                o.peak,
                o.planned,
                o.window
                    .map_or_else(|| "null".to_owned(), |(l, u)| format!("[{l:.3},{u:.3}]")),
                o.node_failures,
                json_opt(o.t99),
                json_opt(o.t100),
                o.ideal,
                o.admitted,
                o.held,
                o.refused,
                o.attempts,
                json_opt(o.final_rate),
            );
        }
    }
}
