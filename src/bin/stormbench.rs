//! Failover storm bench, over real sockets: what a crash of node 1 does to
//! the backup node, unpaced and paced, in one run.
//!
//! For each mode, in one process: a simulated node pair whose node 2 takes
//! at most `--capacity` logins per second (ten login slots of 50 ms; a
//! login queued longer than 8 s fails with `<temporary-auth-failure/>`, as
//! a real node under a storm does), the proxy in front of it (balanced
//! assignment), `--users` sessions homed on node 1 and `--chatters` users
//! homed on node 2 who chat throughout. Node 1 is killed. The relay sees
//! every session die and ends each with a re-login hint; the clients come
//! back:
//!
//! - **unpaced** (`failover.pacing = false`): every client at once, as
//!   through a TCP proxy; a failed login is tried again after 1 s;
//! - **fixed** (window `[--lower, --upper]` on node 2) and **adaptive**
//!   (the default window): `--naive` percent of the clients (30 by
//!   default) ignore their hint, in four equal groups: back at once, after
//!   RFC 6120's random 0–60 s, after a fixed 10 s, after a fixed 25 s; the
//!   rest honour it. A refused or failed login comes back at its fresh hint
//!   (honouring), after 1 s (at once) or after the client's own back-off.
//!
//! Reported per mode: time until every stream was closed, logins per
//! second completed at node 2 (peak 1-second bucket against the planned
//! rate), logins node 2 failed for overload, time until 99 % / 100 % were
//! back (against N / C), held and refused logins, and the chatters' round
//! trip p50 / p99 during the storm against before it.
//!
//! In one process each session costs four descriptors (client, proxy client
//! side, proxy node side, node side): 4,000 sessions and 200 chatters fit
//! a 20,000 open-file limit. With `--separate-proxy` the proxy is the real
//! `prg-proxy` binary (next to this one) in a process of its own, its
//! counters read from the admin API's `/metrics`: two descriptors per
//! session on each side, so 9,000 sessions fit. Raise the soft limit to
//! the hard one first (`ulimit -n $(ulimit -Hn)`). Everything is on
//! 127.0.0.1; every loop is bounded in count and time.
//!
//! ```sh
//! cargo run --release --bin stormbench -- [--users 4000] [--capacity 200]
//! cargo build --release && ulimit -n $(ulimit -Hn) && \
//!   target/release/stormbench --separate-proxy --users 9000 --upper 50s
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use prg_proxy::config::{FailoverConfig, WindowMode};
use prg_proxy::failover::plan::{window, Window};
use prg_proxy::node::NodeId;
use prg_proxy::sim::bench::{chat, percentile, users_by_home, BenchProxy, BenchProxyProcess};
use prg_proxy::sim::{
    ClientError, ClientTls, LoginCapacity, ReconnectPolicy, Roster, SimClient, SimNodeConfig,
    SimPair,
};
use rand::Rng;
use tokio::sync::Semaphore;

const DOMAIN: &str = "example.com";
const STEP: Duration = Duration::from_secs(30);

#[derive(Parser, Clone)]
#[command(about = "prg-proxy failover storm bench (real sockets)")]
struct Cli {
    /// Sessions homed on node 1, all moved by its crash.
    #[arg(long, default_value_t = 4000)]
    users: usize,
    /// Users on node 2 who chat throughout.
    #[arg(long, default_value_t = 200)]
    chatters: usize,
    /// Node 2's login capacity, logins per second.
    #[arg(long, default_value_t = 200.0)]
    capacity: f64,
    /// Node 2's re-login window in the fixed mode.
    #[arg(long, default_value = "5s")]
    lower: String,
    #[arg(long, default_value = "35s")]
    upper: String,
    /// Modes to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "unpaced,fixed,adaptive")]
    modes: Vec<String>,
    /// Give up on a mode after this long.
    #[arg(long, default_value = "240s")]
    bound: String,
    /// Percent of the clients that ignore their hint in the paced modes,
    /// split evenly: back at once, after RFC 6120's random 0–60 s, after a
    /// fixed 10 s (as Dino), after a fixed 25 s (as Conversations' first
    /// try).
    #[arg(long, default_value_t = 30)]
    naive: u32,
    /// Run the proxy as the `prg-proxy` binary in a process of its own.
    #[arg(long)]
    separate_proxy: bool,
}

/// The proxy under test: in this process, or the real binary beside it.
enum UnderTest {
    InProcess(BenchProxy),
    Process(BenchProxyProcess),
}

/// The pacer's counters at one moment.
struct PacerCounts {
    held: u64,
    refused: u64,
    /// Node 2's rate.
    rate: f64,
}

impl UnderTest {
    /// The proxy's CPU seconds so far, when it runs in its own process.
    fn cpu_seconds(&self) -> Option<f64> {
        match self {
            UnderTest::InProcess(_) => None,
            UnderTest::Process(p) => p.cpu_seconds(),
        }
    }

    async fn counts(&self) -> PacerCounts {
        match self {
            UnderTest::InProcess(b) => {
                let p = b.view.hints.pacer();
                PacerCounts {
                    held: p.stats.held.load(Ordering::Relaxed),
                    refused: p.stats.refused.load(Ordering::Relaxed),
                    rate: p.rate(NodeId::Node2),
                }
            }
            UnderTest::Process(p) => PacerCounts {
                held: p.metric("prg_proxy_pacer_held_total").await as u64,
                refused: p.metric("prg_proxy_pacer_refused_total").await as u64,
                rate: p.metric("prg_proxy_pacer_rate{node=\"imp2\"}").await,
            },
        }
    }

    /// The re-login window of `n` users moved to node 2.
    fn window(&self, cli: &Cli, mode: &str, n: usize, rate: f64) -> Res<Window> {
        match self {
            UnderTest::InProcess(b) => Ok(b.view.hints.window(NodeId::Node2, n)),
            UnderTest::Process(_) => {
                let d = |s: &str| humantime::parse_duration(s).map_err(|e| e.to_string());
                let m = if mode == "adaptive" {
                    WindowMode::Adaptive
                } else {
                    WindowMode::Fixed
                };
                let max = FailoverConfig::default().max_rate;
                Ok(window(m, n, rate, max, d(&cli.lower)?, d(&cli.upper)?))
            }
        }
    }

    async fn stop(self) {
        match self {
            UnderTest::InProcess(b) => b.stop().await,
            UnderTest::Process(p) => p.stop(),
        }
    }
}

type Res<T> = Result<T, String>;

struct Outcome {
    mode: String,
    evict: f64,
    /// The proxy's CPU seconds from the crash until every stream was
    /// closed (a proxy in its own process only).
    evict_cpu: Option<f64>,
    peak: u64,
    planned: f64,
    node_failures: u64,
    t99: Option<f64>,
    t100: Option<f64>,
    back: usize,
    held: u64,
    refused: u64,
    rate: f64,
    quiet_p99: f64,
    storm_p50: f64,
    storm_p99: f64,
    quiet_p50: f64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stormbench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut outs = Vec::new();
    for mode in cli.modes.clone() {
        match rt.block_on(run_mode(&cli, &mode)) {
            Ok(o) => outs.push(o),
            Err(e) => {
                eprintln!("stormbench: {mode}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let ideal = cli.users as f64 / cli.capacity;
    println!(
        "\nfailover storm over real sockets: {} users on node 1 killed, node 2 takes {:.0} logins/s (N / C = {:.1} s); \
         paced modes: {} % ignore the hint (at once, RFC 6120 0-60 s, 10 s, 25 s), the rest honour it",
        cli.users, cli.capacity, ideal, cli.naive
    );
    println!(
        "{:>9} {:>8} {:>7} {:>7} {:>7} {:>6} {:>9} {:>7} {:>6} {:>7} {:>6} {:>6} {:>7} {:>6}  {:>22}",
        "mode",
        "evict s",
        "cpu s",
        "peak/s",
        "plan/s",
        "pk/pl",
        "node-fail",
        "t99 s",
        "xN/C",
        "t100 s",
        "back",
        "held",
        "refused",
        "rate",
        "chat p50/p99 ms (quiet)"
    );
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    for o in &outs {
        println!(
            "{:>9} {:>8.3} {:>7} {:>7} {:>7.1} {:>6.2} {:>9} {:>7} {:>6} {:>7} {:>6} {:>6} {:>7} {:>6.0}  {:>6.1}/{:<6.1} ({:.1}/{:.1})",
            o.mode,
            o.evict,
            o.evict_cpu.map_or("-".into(), |c| format!("{c:.2}")),
            o.peak,
            o.planned,
            o.peak as f64 / o.planned,
            o.node_failures,
            f(o.t99),
            o.t99.map_or("-".into(), |t| format!("{:.2}", t / ideal)),
            f(o.t100),
            o.back,
            o.held,
            o.refused,
            o.rate,
            o.storm_p50,
            o.storm_p99,
            o.quiet_p50,
            o.quiet_p99,
        );
    }
    std::process::ExitCode::SUCCESS
}

async fn run_mode(cli: &Cli, mode: &str) -> Res<Outcome> {
    let bound = humantime::parse_duration(&cli.bound).map_err(|e| e.to_string())?;
    let (on1, on2) = users_by_home(DOMAIN, cli.users, cli.chatters);
    let accounts: Vec<(String, String)> = on1
        .iter()
        .chain(on2.iter())
        .map(|u| (u.clone(), "pw".to_string()))
        .collect();
    let node = |name: &str| {
        let mut n = SimNodeConfig::new(name, DOMAIN, accounts.clone());
        n.roster = Roster::Custom(Default::default());
        n
    };
    let mut c2 = node("imp2");
    c2.login_capacity = Some(LoginCapacity::per_second(cli.capacity));
    let pair = SimPair::start(node("imp1"), c2)
        .await
        .map_err(|e| format!("node pair: {e}"))?;
    // `max_hold` stays well below the simulated clients' 10 s step timeout,
    // as it must below real clients' 30 s: a login held to the client's
    // timeout is given up just as the node would take it.
    let failover = match mode {
        "unpaced" => "pacing = false\nwindow = \"fixed\"\n",
        "fixed" => "window = \"fixed\"\nmax_hold = \"5s\"\n",
        "adaptive" => "window = \"adaptive\"\nmax_hold = \"5s\"\n",
        m => return Err(format!("unknown mode {m}")),
    };
    let node2 = format!(
        "relogin_lower = \"{}\"\nrelogin_upper = \"{}\"",
        cli.lower, cli.upper
    );
    let tail = format!(
        "[srm]\nheartbeat_interval = \"1s\"\nheartbeat_timeout = \"60s\"\n\n[failover]\n{failover}"
    );
    let bench = if cli.separate_proxy {
        let bin = std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("prg-proxy");
        UnderTest::Process(
            BenchProxyProcess::spawn(&bin, "stormbench", DOMAIN, &pair, &node2, &tail).await?,
        )
    } else {
        UnderTest::InProcess(BenchProxy::start("stormbench", DOMAIN, &pair, &node2, &tail).await?)
    };
    let (addr, tls) = match &bench {
        UnderTest::InProcess(b) => (b.addr, b.tls.clone()),
        UnderTest::Process(p) => (p.addr, p.tls.clone()),
    };
    let login = move |user: String, tls: ClientTls| async move {
        let mut c = SimClient::connect(addr, DOMAIN, tls).await?;
        c.login(&user, "pw", "PLAIN").await?;
        c.bind("bench").await?;
        Ok::<_, ClientError>(c)
    };
    // Log everyone in (node 2's own users go through its capacity too).
    let gate = Arc::new(Semaphore::new(64));
    let mut joins = Vec::new();
    for u in on1.iter().chain(on2.iter()) {
        let (gate, tls, u) = (gate.clone(), tls.clone(), u.clone());
        joins.push(tokio::spawn(async move {
            let _p = gate.acquire().await;
            for _ in 0..50 {
                match login(u.clone(), tls.clone()).await {
                    Ok(c) => return Ok(c),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            Err(format!("{u} cannot log in"))
        }));
    }
    let mut clients = Vec::new();
    for j in joins {
        clients.push(j.await.map_err(|e| e.to_string())??);
    }
    let mut chatters = clients.split_off(on1.len());
    eprintln!(
        "{mode}: {} sessions on imp1, {} chatters on imp2",
        clients.len(),
        chatters.len()
    );
    let quiet = chat(
        &mut chatters,
        Duration::from_secs(3),
        Duration::from_millis(100),
    )
    .await?;

    // The crash.
    let completed0 = pair.nodes[1].logins_completed();
    let failed0 = pair.nodes[1].logins_overloaded();
    let before = bench.counts().await;
    let cpu0 = bench.cpu_seconds();
    let t0 = Instant::now();
    pair.nodes[0].kill();
    let closed = Arc::new(AtomicUsize::new(0));
    let last_closed = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let mut tasks = Vec::new();
    let paced = mode != "unpaced";
    for (i, mut c) in clients.into_iter().enumerate() {
        let (closed, last_closed, tls) = (closed.clone(), last_closed.clone(), tls.clone());
        let user = on1[i].clone();
        let policy = if !paced {
            ReconnectPolicy::Immediate
        } else if (i % 100) as u32 >= cli.naive {
            ReconnectPolicy::Honour
        } else {
            match i % 4 {
                0 => ReconnectPolicy::Immediate,
                1 => ReconnectPolicy::Rfc6120Random,
                2 => ReconnectPolicy::Fixed(Duration::from_secs(10)),
                _ => ReconnectPolicy::Fixed(Duration::from_secs(25)),
            }
        };
        tasks.push(tokio::spawn(async move {
            let hint = loop {
                match c.recv(STEP).await {
                    Ok(_) => continue,
                    Err(e) => break e.relogin(),
                }
            };
            drop(c);
            closed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut l) = last_closed.lock() {
                *l = (*l).max(t0.elapsed());
            }
            let mut wait = policy.delay(hint.as_ref(), &mut rand::thread_rng());
            let deadline = t0 + bound;
            while Instant::now() + wait < deadline {
                tokio::time::sleep(wait).await;
                match login(user.clone(), tls.clone()).await {
                    Ok(c) => return Some((t0.elapsed(), c)),
                    Err(e) => {
                        let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..500));
                        // A naive client tries again on its own back-off.
                        wait = match (&policy, e.relogin()) {
                            (ReconnectPolicy::Honour, Some(h)) => h.after,
                            (ReconnectPolicy::Honour | ReconnectPolicy::Immediate, _) => {
                                Duration::from_secs(1) + jitter
                            }
                            (p, _) => p.delay(None, &mut rand::thread_rng()).max(jitter),
                        };
                    }
                }
            }
            None
        }));
    }
    // Logins per second completed at node 2, while the storm lasts.
    let n = cli.users;
    let sampler = {
        let node2 = pair.nodes[1].clone();
        tokio::spawn(async move {
            let mut per_second = Vec::new();
            let mut last = completed0;
            let mut last_at = Instant::now();
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            // A sample taken late (a busy machine) covers more than a
            // second: each bucket is the count over the time it really
            // spans, so a late tick shows no false peak.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while t0.elapsed() < bound && (last - completed0) < n as u64 {
                tick.tick().await;
                let now = node2.logins_completed();
                let at = Instant::now();
                let span = at.duration_since(last_at).as_secs_f64().max(1e-3);
                per_second.push(((now - last) as f64 / span).round() as u64);
                last = now;
                last_at = at;
            }
            per_second
        })
    };
    // The proxy's CPU until every stream is closed.
    let evicted = async {
        while closed.load(Ordering::Relaxed) < n && t0.elapsed() < bound {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bench.cpu_seconds()
    };
    let (storm, cpu1) = tokio::join!(
        chat(
            &mut chatters,
            Duration::from_secs(10),
            Duration::from_millis(100),
        ),
        evicted
    );
    let storm = storm?;
    let mut back = Vec::new();
    let mut sessions = Vec::new();
    for t in tasks {
        if let Ok(Some((at, c))) = t.await {
            back.push(at.as_secs_f64());
            sessions.push(c);
        }
    }
    let per_second = sampler.await.map_err(|e| e.to_string())?;
    back.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| -> Option<f64> {
        let k = ((n as f64) * p).ceil() as usize;
        (back.len() >= k && k > 0).then(|| back[k - 1])
    };
    let after = bench.counts().await;
    let window = bench.window(cli, mode, n, after.rate)?;
    let planned = if paced {
        window.planned_rate(n).min(cli.capacity)
    } else {
        cli.capacity
    };
    let out = Outcome {
        mode: mode.to_string(),
        evict_cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
        evict: last_closed
            .lock()
            .map(|l| l.as_secs_f64())
            .unwrap_or(f64::NAN),
        peak: per_second.iter().copied().max().unwrap_or(0),
        planned,
        node_failures: pair.nodes[1].logins_overloaded() - failed0,
        t99: at(0.99),
        t100: at(1.0),
        back: back.len(),
        held: after.held - before.held,
        refused: after.refused - before.refused,
        rate: after.rate,
        quiet_p50: percentile(&quiet, 0.5),
        quiet_p99: percentile(&quiet, 0.99),
        storm_p50: percentile(&storm, 0.5),
        storm_p99: percentile(&storm, 0.99),
    };
    eprintln!("{mode}: node 2 logins per second: {:?}", per_second);
    drop(sessions);
    drop(chatters);
    bench.stop().await;
    Ok(out)
}
