//! Temporary presence bench, over real sockets: a failover of node 1 with
//! `--watchers` × `--per-watcher` temporary presence pairs, in one run.
//!
//! A simulated pair (balanced assignment, nobody on anyone's roster) behind
//! the proxy; `--targets` targets and `--watchers` watchers spread over
//! both nodes by their balanced homes; each watcher searches
//! `--per-watcher` targets (directed presence with Cisco Jabber's caps,
//! disco#info answered). `--chatters` users homed on node 2 chat
//! throughout. Node 1 is killed: its users get their re-login hints,
//! honour them and log in again on node 2 (targets set their presence
//! again; watchers do nothing but answer the node's and the proxy's iq
//! gets). Every subscription node 1 held is gone; the proxy replays them.
//!
//! Reported: time from the kill until node 2 holds every pair again; the
//! replay rate (peak 1-second bucket) against `--rate`; the registry's
//! memory per pair (a registry of the same pairs filled alone, measured by
//! a counting allocator); the chatters' round trip p50 / p99 before the
//! kill and during the replay.
//!
//! Four descriptors per session (client, proxy's two sides, node): mind
//! `ulimit -n` for the defaults (10,000 watchers, 2,000 targets).
//!
//! ```sh
//! cargo run --release --bin presencebench -- [--watchers 10000] [--per-watcher 5]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use prg_proxy::config::TempPresenceConfig;
use prg_proxy::control::ConnHandle;
use prg_proxy::node::NodeId;
use prg_proxy::presence::Registry;
use prg_proxy::sim::bench::{chat, percentile, users_by_home, BenchProxy};
use prg_proxy::sim::{
    ClientError, ClientTls, Roster, SimClient, SimNodeConfig, SimPair, TEMP_PRESENCE_NOTIFY,
};
use tokio::sync::Semaphore;

/// Counts the bytes allocated and not freed, to measure the registry.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with the same layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const DOMAIN: &str = "example.com";
const CAPS: &str = "http://cisco.com/jabber";
const VER: &str = "bench-ver-1";

#[derive(Parser, Clone)]
#[command(about = "prg-proxy temporary presence bench (real sockets)")]
struct Cli {
    /// Watchers, spread over both nodes.
    #[arg(long, default_value_t = 10_000)]
    watchers: usize,
    /// Targets each watcher searches.
    #[arg(long, default_value_t = 5)]
    per_watcher: usize,
    /// Distinct targets, spread over both nodes.
    #[arg(long, default_value_t = 2_000)]
    targets: usize,
    /// Users on node 2 who chat throughout.
    #[arg(long, default_value_t = 50)]
    chatters: usize,
    /// The proxy's replay rate bound (temp_presence.replay_rate).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// The 30-second rule (temp_presence.min_interval).
    #[arg(long, default_value = "30s")]
    min_interval: String,
    /// Node 2's re-login window.
    #[arg(long, default_value = "2s")]
    lower: String,
    #[arg(long, default_value = "10s")]
    upper: String,
    /// Give up after this long.
    #[arg(long, default_value = "600s")]
    bound: String,
}

type Res<T> = Result<T, String>;

fn dur(s: &str) -> Res<Duration> {
    humantime::parse_duration(s).map_err(|e| format!("{s}: {e}"))
}

/// Bytes per pair of a registry holding `watchers` × `per` pairs with
/// directed presences the size Cisco Jabber sends.
fn registry_bytes_per_pair(watchers: usize, per: usize) -> f64 {
    let before = LIVE.load(Ordering::Relaxed);
    let reg = Registry::new(TempPresenceConfig {
        max_pairs: usize::MAX / 2,
        ..TempPresenceConfig::default()
    });
    let (h, _rx) = ConnHandle::new(1024);
    let query = Bytes::from(format!(
        "<query xmlns='http://jabber.org/protocol/disco#info' node='{CAPS}#{VER}'><feature var='{TEMP_PRESENCE_NOTIFY}'/></query>"
    ));
    for w in 0..watchers {
        let wj: Arc<str> = Arc::from(format!("w{w}@{DOMAIN}"));
        reg.bound(&wj, NodeId::Node1, w as u64, h.clone());
        reg.disco_answer(&wj, VER.as_bytes(), &query);
        for t in 0..per {
            let tj = format!("t{}@{DOMAIN}", (w * per + t) % (watchers.max(1)));
            let p = format!(
                "<presence to='{tj}' id='tp{w}-{t}'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='{CAPS}' ver='{VER}'/></presence>"
            );
            reg.directed(&wj, &tj, p.as_bytes(), VER.as_bytes());
        }
    }
    let pairs = reg.pairs().max(1);
    let after = LIVE.load(Ordering::Relaxed);
    drop(reg);
    (after - before) as f64 / pairs as f64
}

/// A member's life: answers iq gets (disco#info with the notify feature),
/// counts temporary presence pushes, and logs in again at its hint when
/// its stream ends (a target sets its presence again; a watcher does not
/// search again).
async fn member(
    mut c: SimClient,
    user: String,
    addr: std::net::SocketAddr,
    tls: ClientTls,
    pushes: Arc<AtomicU64>,
) {
    loop {
        match c.recv(Duration::from_secs(3600)).await {
            Ok(s) => {
                if s.disco_info_node().is_some() {
                    let _ = c.answer_disco(&s, &[TEMP_PRESENCE_NOTIFY]).await;
                } else if s.temp_presence().is_some() {
                    pushes.fetch_add(1, Ordering::Relaxed);
                } else {
                    let _ = c.answer_iq(&s).await;
                }
            }
            Err(e) => {
                if let Some(h) = e.relogin() {
                    tokio::time::sleep(h.after).await;
                }
                let mut tries = 0;
                c = loop {
                    match login(addr, &user, tls.clone()).await {
                        Ok(c) => break c,
                        Err(_) if tries < 100 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(_) => return,
                    }
                };
            }
        }
    }
}

async fn login(
    addr: std::net::SocketAddr,
    user: &str,
    tls: ClientTls,
) -> Result<SimClient, ClientError> {
    let mut c = SimClient::connect(addr, DOMAIN, tls).await?;
    c.login(user, "pw", "PLAIN").await?;
    c.bind("bench").await?;
    c.send_presence(None, None).await?;
    Ok(c)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("presencebench: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Res<()> {
    let pairs_wanted = cli.watchers * cli.per_watcher;
    let per_pair = registry_bytes_per_pair(cli.watchers, cli.per_watcher);
    println!(
        "registry memory: {per_pair:.0} bytes per pair ({} pairs, {:.1} MiB)",
        pairs_wanted,
        per_pair * pairs_wanted as f64 / 1048576.0
    );

    let targets: Vec<String> = (0..cli.targets).map(|i| format!("t{i}")).collect();
    let watchers: Vec<String> = (0..cli.watchers).map(|i| format!("w{i}")).collect();
    let (_, chatters) = users_by_home(DOMAIN, 0, cli.chatters);
    let chatters: Vec<String> = chatters.into_iter().map(|u| format!("c{u}")).collect();
    let accounts: Vec<(String, String)> = targets
        .iter()
        .chain(&watchers)
        .chain(&chatters)
        .map(|u| (u.clone(), "pw".to_string()))
        .collect();
    let node = |name: &str| {
        let mut n = SimNodeConfig::new(name, DOMAIN, accounts.clone());
        n.roster = Roster::Empty;
        n.temp_presence_max = usize::MAX / 2;
        n
    };
    let pair = SimPair::start(node("imp1"), node("imp2"))
        .await
        .map_err(|e| format!("node pair: {e}"))?;
    let bench = BenchProxy::start(
        "presencebench",
        DOMAIN,
        &pair,
        &format!(
            "relogin_lower = \"{}\"\nrelogin_upper = \"{}\"",
            cli.lower, cli.upper
        ),
        &format!(
            "[srm]\nheartbeat_interval = \"1s\"\nheartbeat_timeout = \"60s\"\n\n\
             [failover]\nmax_rate = 5000.0\ninitial_rate = 1000.0\n\n\
             [temp_presence]\nreplay_rate = {}\nmin_interval = \"{}\"\nmax_pairs = {}\nmax_pairs_per_watcher = {}\n",
            cli.rate,
            cli.min_interval,
            pairs_wanted.max(1),
            cli.per_watcher.max(1),
        ),
    )
    .await?;
    let (addr, view, tls) = (bench.addr, bench.view.clone(), bench.tls.clone());

    // Everyone logs in.
    let t = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let mut joins = Vec::new();
    for u in targets.iter().chain(&watchers).chain(&chatters) {
        let (gate, tls, u) = (gate.clone(), tls.clone(), u.clone());
        joins.push(tokio::spawn(async move {
            let _p = gate.acquire().await;
            for _ in 0..50 {
                match login(addr, &u, tls.clone()).await {
                    Ok(c) => return Ok((u, c)),
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
    let mut chat_clients: Vec<SimClient> = clients
        .drain(cli.targets + cli.watchers..)
        .map(|(_, c)| c)
        .collect();
    println!(
        "{} sessions logged in in {:.1} s (node 1: {}, node 2: {})",
        clients.len() + chat_clients.len(),
        t.elapsed().as_secs_f64(),
        pair.nodes[0].session_count(),
        pair.nodes[1].session_count()
    );

    // Watchers search their targets, then every member runs on its own.
    let pushes = Arc::new(AtomicU64::new(0));
    let mut members = Vec::new();
    for (i, (u, mut c)) in clients.into_iter().enumerate() {
        if i >= cli.targets {
            let w = i - cli.targets;
            for k in 0..cli.per_watcher {
                let t = (w * cli.per_watcher + k) % cli.targets.max(1);
                c.send_caps_presence(&format!("t{t}@{DOMAIN}"), CAPS, VER)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        members.push(tokio::spawn(member(
            c,
            u,
            addr,
            tls.clone(),
            pushes.clone(),
        )));
    }
    let bound = dur(&cli.bound)?;
    let held = |n: &SimPair| n.nodes[0].temp_subscriptions() + n.nodes[1].temp_subscriptions();
    let t = Instant::now();
    while held(&pair) < pairs_wanted || view.presence.pairs() < pairs_wanted {
        if t.elapsed() > bound {
            return Err(format!(
                "only {} of {pairs_wanted} subscriptions made ({} kept by the proxy)",
                held(&pair),
                view.presence.pairs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let subscribed = Instant::now();
    println!(
        "{pairs_wanted} pairs subscribed in {:.1} s (node 1 holds {}, node 2 {})",
        t.elapsed().as_secs_f64(),
        pair.nodes[0].temp_subscriptions(),
        pair.nodes[1].temp_subscriptions()
    );
    let phase = Duration::from_secs(3);
    let before = chat(&mut chat_clients, phase, Duration::from_millis(20)).await?;

    // Node 1 crashes.
    let on1 = pair.nodes[0].temp_subscriptions();
    let kill = Instant::now();
    pair.nodes[0].kill();
    println!(
        "node 1 killed: the {on1} subscriptions it held are lost, and those of its watchers on node 2"
    );
    let chat_task = {
        let mut cc = std::mem::take(&mut chat_clients);
        let dur = bound.min(dur(&cli.min_interval)? + Duration::from_secs(15));
        tokio::spawn(async move {
            let r = chat(&mut cc, dur, Duration::from_millis(20)).await;
            (cc, r)
        })
    };
    let mut buckets = Vec::new();
    let mut last = view.presence.stats.replays_sent.load(Ordering::Relaxed);
    let mut tick = Instant::now();
    let restored = loop {
        if pair.nodes[1].temp_subscriptions() >= pairs_wanted {
            break kill.elapsed();
        }
        if kill.elapsed() > bound {
            return Err(format!(
                "not restored within {bound:?}: node 2 holds {} of {pairs_wanted}, {} replays sent, {} queued",
                pair.nodes[1].temp_subscriptions(),
                view.presence.stats.replays_sent.load(Ordering::Relaxed),
                view.presence.replays_queued()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if tick.elapsed() >= Duration::from_secs(1) {
            let now = view.presence.stats.replays_sent.load(Ordering::Relaxed);
            buckets.push((now - last) as f64 / tick.elapsed().as_secs_f64());
            last = now;
            tick = Instant::now();
        }
    };
    let (_cc, during) = chat_task.await.map_err(|e| e.to_string())?;
    let during = during?;
    let s = &view.presence.stats;
    let sent = s.replays_sent.load(Ordering::Relaxed);
    let peak = buckets.iter().copied().fold(0.0, f64::max);
    println!(
        "restored: every pair held by node 2 again {:.1} s after the kill ({:.1} s after the subscribes; 30-second rule {})",
        restored.as_secs_f64(),
        (kill + restored - subscribed).as_secs_f64(),
        cli.min_interval
    );
    println!(
        "replays: {sent} sent, {} deferred by the 30-second rule, {} disco#info answered from the cache; peak {peak:.0}/s against the bound {}/s ({:.2})",
        s.replays_deferred.load(Ordering::Relaxed),
        s.disco_from_cache.load(Ordering::Relaxed),
        cli.rate,
        peak / cli.rate
    );
    println!(
        "chatters' round trip (ms): before p50 {:.2} p99 {:.2}; during the replay p50 {:.2} p99 {:.2}",
        percentile(&before, 0.5),
        percentile(&before, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99)
    );
    println!(
        "temporary presence pushes received: {}",
        pushes.load(Ordering::Relaxed)
    );
    for m in members {
        m.abort();
    }
    bench.stop().await;
    Ok(())
}
