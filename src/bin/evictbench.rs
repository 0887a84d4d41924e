//! Eviction bench: how long a mass move takes when some of the moved
//! clients never read, and what it costs the users who stay.
//!
//! In one process (so that the failover can be asked for directly): a
//! simulated node pair, the proxy in front of it (balanced assignment),
//! `--evicted` sessions homed on node 1 of which `--stalled` never read
//! their socket (each is first sent `--flood-kib` of messages so that the
//! proxy's writes to it are stuck behind full socket buffers), and
//! `--chatters` users homed on node 2 who send messages to themselves and
//! time each round trip through the proxy and the node.
//!
//! Phase A measures the chatters' latency with no eviction; then the
//! stalled clients are flooded; phase B asks for a manual failover of node
//! 1 and measures, until the eviction is surely over, the chatters' latency and the time until every eviction is done
//! (the move confirmed by the group, every node-1 session gone from the
//! tracker). Each session costs this process four descriptors (client,
//! proxy client side, proxy node side, node side): 4,000 sessions fit in
//! the 20,000 open-file limit. Everything is on 127.0.0.1; every loop is
//! bounded in count and time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use prg_proxy::node::NodeId;
use prg_proxy::sim::bench::{chat, percentile, users_by_home, BenchProxy};
use prg_proxy::sim::{ClientTls, Roster, SimClient, SimNodeConfig, SimPair};
use tokio::sync::Semaphore;

const DOMAIN: &str = "example.com";
const STEP: Duration = Duration::from_secs(30);

#[derive(Parser, Clone)]
#[command(about = "prg-proxy eviction bench")]
struct Cli {
    /// Sessions homed on node 1, all evicted by the failover.
    #[arg(long, default_value_t = 3500)]
    evicted: usize,
    /// Of those, sessions that never read their socket.
    #[arg(long, default_value_t = 350)]
    stalled: usize,
    /// Users on node 2 who chat throughout.
    #[arg(long, default_value_t = 500)]
    chatters: usize,
    /// Messages sent to each stalled client before the failover (KiB).
    #[arg(long, default_value_t = 512)]
    flood_kib: usize,
    /// The proxy's `limits.write_timeout` (its default).
    #[arg(long, default_value = "15s")]
    write_timeout: String,
    /// Seconds of chat per phase.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Concurrent logins while setting up.
    #[arg(long, default_value_t = 64)]
    login_workers: usize,
}

type Res<T> = Result<T, String>;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("evictbench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evictbench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Res<()> {
    let (on1, on2) = users_by_home(DOMAIN, cli.evicted, cli.chatters + 1);
    let accounts: Vec<(String, String)> = on1
        .iter()
        .chain(on2.iter())
        .map(|u| (u.clone(), "pw".to_string()))
        .collect();
    let node = |name: &str| {
        let mut n = SimNodeConfig::new(name, DOMAIN, accounts.clone());
        n.roster = Roster::Custom(Default::default());
        n.scram_iterations = 4096;
        n
    };
    let pair = SimPair::start(node("imp1"), node("imp2"))
        .await
        .map_err(|e| format!("node pair: {e}"))?;
    let bench = BenchProxy::start(
        "evictbench",
        DOMAIN,
        &pair,
        "",
        &format!(
            "[limits]\nwrite_timeout = \"{}\"\n\n             [srm]\nheartbeat_interval = \"1s\"\nheartbeat_timeout = \"60s\"\n",
            cli.write_timeout
        ),
    )
    .await?;
    let (addr, view, tls) = (bench.addr, bench.view.clone(), bench.tls.clone());
    let login = move |user: String, tls: ClientTls| async move {
        let mut c = SimClient::connect(addr, DOMAIN, tls)
            .await
            .map_err(|e| format!("{user}: {e}"))?;
        c.login(&user, "pw", "PLAIN")
            .await
            .map_err(|e| format!("{user}: {e}"))?;
        c.bind("bench").await.map_err(|e| format!("{user}: {e}"))?;
        Ok::<_, String>(c)
    };
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(cli.login_workers));
    let mut joins = Vec::new();
    for u in on1.iter().chain(on2.iter()) {
        let (gate, tls, u) = (gate.clone(), tls.clone(), u.clone());
        joins.push(tokio::spawn(async move {
            let _p = gate.acquire().await;
            login(u, tls).await
        }));
    }
    let mut clients = Vec::new();
    for j in joins {
        clients.push(j.await.map_err(|e| e.to_string())??);
    }
    let mut chatters = clients.split_off(on1.len());
    let flooder = chatters.pop().ok_or("no flooder")?;
    let evicted = clients;
    println!(
        "set up {} sessions on imp1 ({} stalled), {} chatters on imp2 in {:.1} s",
        evicted.len(),
        cli.stalled,
        chatters.len(),
        started.elapsed().as_secs_f64()
    );

    // Stalled clients never read; the others read until their stream ends.
    let mut stalled = Vec::new();
    let mut readers = Vec::new();
    for (i, c) in evicted.into_iter().enumerate() {
        if i < cli.stalled {
            stalled.push(c);
        } else {
            readers.push(tokio::spawn(async move {
                let mut c = c;
                loop {
                    match c.recv(Duration::from_secs(120)).await {
                        Ok(_) => continue,
                        Err(_) => return,
                    }
                }
            }));
        }
    }
    let phase = Duration::from_secs_f64(cli.secs);
    let quiet = chat(&mut chatters, phase, Duration::ZERO).await?;
    let before = view.metrics.write_timeouts.load(Ordering::Relaxed);
    // Fill the path to each stalled client.
    let targets: Vec<String> = stalled
        .iter()
        .filter_map(|c| c.jid().map(str::to_owned))
        .collect();
    let body = "x".repeat(60 * 1024);
    let per = cli.flood_kib.div_ceil(60);
    let flood_started = Instant::now();
    let mut flooder = flooder;
    for _ in 0..per {
        for t in &targets {
            tokio::time::timeout(STEP, flooder.send_message(t, &body))
                .await
                .map_err(|_| "flood stalled")?
                .map_err(|e| e.to_string())?;
        }
    }
    println!(
        "flooded {} stalled clients with {} KiB each in {:.1} s",
        targets.len(),
        per * 60,
        flood_started.elapsed().as_secs_f64()
    );

    println!(
        "relayed to clients before the failover: {} MiB; closed by the write deadline while flooding: {}",
        view.metrics.bytes_down.load(Ordering::Relaxed) >> 20,
        view.metrics.write_timeouts.load(Ordering::Relaxed) - before
    );
    let before = view.metrics.write_timeouts.load(Ordering::Relaxed);

    // Phase B: the failover, with the chat going on.
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    view.group
        .failover(NodeId::Node1)
        .await
        .map_err(|e| format!("failover: {e}"))?;
    let watcher = {
        let view = view.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut status = view.group_status();
            let moved = tokio::time::timeout(
                STEP * 4,
                status.wait_for(|s| {
                    s.move_in_progress.is_none() && s.serving[0] == Some(NodeId::Node2)
                }),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            let confirmed = t0.elapsed();
            while view.tracker.count_on(NodeId::Node1) > 0 && t0.elapsed() < STEP * 4 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            done.store(true, Ordering::Relaxed);
            (moved, confirmed, t0.elapsed())
        })
    };
    // Chat through the whole eviction: at most one write deadline, plus margin.
    let wt = humantime::parse_duration(&cli.write_timeout).map_err(|e| e.to_string())?;
    let storm = chat(
        &mut chatters,
        phase.max(wt + Duration::from_secs(1)),
        Duration::ZERO,
    )
    .await?;
    let (moved, confirmed, all_gone) = watcher.await.map_err(|e| e.to_string())?;
    let s = view.group.current();
    let timeouts = view.metrics.write_timeouts.load(Ordering::Relaxed) - before;
    println!(
        "\neviction of {} sessions ({} never reading), write_timeout {}:",
        cli.evicted, cli.stalled, cli.write_timeout
    );
    println!(
        "  move confirmed after {:.3} s (completed: {moved}); last node-1 session gone after {:.3} s",
        confirmed.as_secs_f64(),
        all_gone.as_secs_f64()
    );
    println!(
        "  closed by the write deadline: {timeouts}; node states now: {} / {}",
        s.nodes[0].state, s.nodes[1].state
    );
    println!(
        "\nchatters' message round trip (ms), {} users:",
        chatters.len()
    );
    println!(
        "  {:<22} {:>8} {:>8} {:>8} {:>9}",
        "phase", "msgs", "p50", "p99", "max"
    );
    for (name, l) in [("without eviction", &quiet), ("during eviction", &storm)] {
        println!(
            "  {:<22} {:>8} {:>8.3} {:>8.3} {:>9.3}",
            name,
            l.len(),
            percentile(l, 0.5),
            percentile(l, 0.99),
            l.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!(
        "  ratio during/without: p50 {:.2}x, p99 {:.2}x",
        percentile(&storm, 0.5) / percentile(&quiet, 0.5),
        percentile(&storm, 0.99) / percentile(&quiet, 0.99)
    );
    drop(stalled);
    for r in readers {
        r.abort();
    }
    bench.stop().await;
    if !done.load(Ordering::Relaxed) {
        return Err("the eviction did not finish".into());
    }
    Ok(())
}
