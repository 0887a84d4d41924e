//! End-to-end load bench: relay throughput, memory per idle connection and
//! logins per second, through the proxy and through its baselines, in one
//! run. Started by `scripts/loadbench.sh`; the method is in
//! `benches/README.md`.
//!
//! The driver (this process) runs the simulated nodes and the clients; each
//! relay under test (the proxy, a plain `copy_bidirectional` relay, HAProxy)
//! runs as its own process, so that the script can pin it to a core of its
//! own and its memory can be read from `/proc`. Every loop is bounded in
//! count and in time; everything listens on 127.0.0.1 only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use clap::{Args, Parser, Subcommand};
use memchr::memmem;
use prg_proxy::sim::{Roster, SimNodeConfig, SimPair};
use prg_proxy::xmpp::framer::{FrameKind, Framer};
use prg_proxy::xmpp::peek;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::rustls;

const DOMAIN: &str = "example.com";
/// Longest wait for any one protocol step, so a stuck peer ends the run.
const STEP: Duration = Duration::from_secs(20);

#[derive(Parser)]
#[command(about = "prg-proxy end-to-end load bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A plain tokio `copy_bidirectional` relay (the baseline relay).
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
    },
    /// Relay throughput: direct, through the proxy, the plain relay, HAProxy.
    Throughput(Common),
    /// RSS per idle TLS client connection through the proxy.
    Memory(Common),
    /// Full logins per second (TLS + SASL + bind), direct and through the proxy.
    Logins(Common),
    /// All three.
    All(Common),
    /// Idle TLS connections plus steady chat through the proxy for a while:
    /// RSS, descriptors and round trips at the start and the end, pass/fail
    /// on growth. Started by `scripts/soak.sh`.
    Soak(Soak),
}

#[derive(Args, Clone)]
struct Soak {
    #[command(flatten)]
    c: Common,
    /// Seconds the soak runs (after the connections are set up).
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Messages per second each chatter (`--clients`) sends to itself.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Seconds at the start and at the end whose round trips are compared.
    #[arg(long, default_value_t = 10.0)]
    sample_window: f64,
    /// Logins per second that connect, log in and leave again (churn, so
    /// that a descriptor or memory leak per connection shows).
    #[arg(long, default_value_t = 5.0)]
    churn: f64,
    /// Largest RSS growth from the start to the end that passes, in % of the
    /// RSS at the start.
    #[arg(long, default_value_t = 5.0)]
    max_rss_growth_pct: f64,
    /// Largest growth of the proxy's open descriptors that passes.
    #[arg(long, default_value_t = 32)]
    max_fd_growth: i64,
}

#[derive(Args, Clone)]
struct Common {
    /// The prg-proxy binary.
    #[arg(long)]
    proxy_bin: PathBuf,
    /// HAProxy binary (skipped when absent).
    #[arg(long, default_value = "haproxy")]
    haproxy: String,
    /// Pin each relay under test to this CPU with `taskset` (-1: no pinning).
    #[arg(long, default_value_t = -1)]
    relay_cpu: i32,
    /// Concurrent clients in the throughput test.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Seconds per throughput or login measurement.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Messages in flight per client.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Stanza sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [250usize, 1024])]
    sizes: Vec<usize>,
    /// Idle connections for the memory test.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Concurrent login workers.
    #[arg(long, default_value_t = 16)]
    login_workers: usize,
    /// Throughput targets to measure (e.g. `prg-proxy/tls,haproxy/tls`);
    /// all when not given.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(match cli.command {
            Cmd::Relay { .. } => 1,
            _ => 2,
        })
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadbench: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        match cli.command {
            Cmd::Relay { listen, to } => relay(listen, to).await,
            Cmd::Throughput(c) => Bench::new(c).await?.throughput().await,
            Cmd::Memory(c) => Bench::new(c).await?.memory().await,
            Cmd::Logins(c) => Bench::new(c).await?.logins().await,
            Cmd::All(c) => {
                let b = Bench::new(c).await?;
                b.throughput().await?;
                b.logins().await?;
                b.memory().await
            }
            Cmd::Soak(s) => Bench::new(s.c.clone()).await?.soak(&s).await,
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadbench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, String>;

fn err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The baseline relay: accept, connect, `copy_bidirectional`. Nothing else.
async fn relay(listen: SocketAddr, to: SocketAddr) -> Res<()> {
    let l = TcpListener::bind(listen).await.map_err(err("relay bind"))?;
    loop {
        let (mut c, _) = l.accept().await.map_err(err("relay accept"))?;
        tokio::spawn(async move {
            let _ = c.set_nodelay(true);
            if let Ok(mut n) = TcpStream::connect(to).await {
                let _ = n.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut n).await;
            }
        });
    }
}

/// A process under test, killed (by its own pid) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    /// CPU time (user + system) the process has used, in seconds (from
    /// `/proc`, clock ticks of 10 ms).
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised name; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        ticks as f64 / 100.0
    }

    fn open_fds(&self) -> i64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map_or(-1, |d| d.count() as i64)
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("loadbench: stopped {}", self.name);
    }
}

/// Everything a run shares: certificates, the node pairs, the client TLS.
struct Bench {
    c: Common,
    dir: PathBuf,
    client_tls: Arc<rustls::ClientConfig>,
    /// Nodes that require STARTTLS: for direct clients and the TCP relays
    /// (which pass the client's TLS through to the node).
    tls_pair: SimPair,
    /// Plain-TCP nodes behind the proxy (the proxy terminates TLS).
    plain_pair: SimPair,
}

/// A port that was free a moment ago (only for processes that cannot
/// report the port they bound).
fn free_port() -> Res<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(err("probe port"))?;
    l.local_addr().map_err(err("probe port"))
}

async fn wait_listening(addr: SocketAddr) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("nothing listens on {addr}"))
}

fn user(i: usize) -> String {
    format!("u{i}")
}

impl Bench {
    async fn new(c: Common) -> Res<Bench> {
        let dir = std::env::temp_dir().join(format!("prg-loadbench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(err("temp dir"))?;
        let d = prg_proxy::tls::dev_certs(&[DOMAIN, "localhost"]).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("cert.pem"), &d.chain_pem).map_err(err("cert"))?;
        std::fs::write(dir.join("key.pem"), &d.key_pem).map_err(err("key"))?;
        // HAProxy takes the chain and the key in one file.
        std::fs::write(
            dir.join("haproxy.pem"),
            format!("{}{}", d.chain_pem, d.key_pem),
        )
        .map_err(err("haproxy pem"))?;
        let client_tls =
            prg_proxy::tls::client_config_from_der(prg_proxy::tls::certs_from_pem(&d.ca_pem))
                .map_err(|e| e.to_string())?;
        let server = prg_proxy::tls::server_tls(&prg_proxy::config::TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            sni: Vec::new(),
        })
        .map_err(|e| e.to_string())?;
        let accounts = c.clients.max(c.idle).max(c.login_workers) + 1;
        let users: Vec<(String, String)> = (0..accounts).map(|i| (user(i), "pw".into())).collect();
        let node = |name: &str, tls: bool| {
            let mut n = SimNodeConfig::new(name, DOMAIN, users.clone());
            // Nobody's presence fans out: the bench measures the relay.
            n.roster = Roster::Custom(HashMap::new());
            if tls {
                n.tls = Some(server.starttls.clone());
                n.require_tls = true;
            }
            n
        };
        let tls_pair = SimPair::start(node("imp1", true), node("imp2", true))
            .await
            .map_err(err("tls node pair"))?;
        let plain_pair = SimPair::start(node("imp1", false), node("imp2", false))
            .await
            .map_err(err("plain node pair"))?;
        Ok(Bench {
            c,
            dir,
            client_tls,
            tls_pair,
            plain_pair,
        })
    }

    fn pinned(&self, program: &Path) -> Command {
        if self.c.relay_cpu >= 0 {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(self.c.relay_cpu.to_string()).arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }

    /// The proxy, its STARTTLS and its direct-TLS listener.
    async fn start_proxy(&self) -> Res<(Proc, SocketAddr, SocketAddr)> {
        let addr = free_port()?;
        let direct = free_port()?;
        let nodes = [
            self.plain_pair.nodes[0].addr(),
            self.plain_pair.nodes[1].addr(),
        ];
        // active-standby: every user on node 1, like the other targets.
        let text = format!(
            "[group]\nname = \"bench\"\nassignment = \"active-standby\"\ndomains = [\"{DOMAIN}\"]\n\n\
             [[nodes]]\nname = \"imp1\"\naddress = \"{}\"\n\n[[nodes]]\nname = \"imp2\"\naddress = \"{}\"\n\n\
             [admin]\nenabled = false\n\n[listen]\nstarttls = \"{addr}\"\ndirect_tls = \"{direct}\"\n\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n\
             [limits]\nmax_connections = 60000\n",
            nodes[0], nodes[1]
        );
        let cfg = self.dir.join("proxy.toml");
        std::fs::write(&cfg, text).map_err(err("proxy config"))?;
        let child = self
            .pinned(&self.c.proxy_bin)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .map_err(err("start prg-proxy"))?;
        let p = Proc {
            name: "prg-proxy",
            child,
        };
        wait_listening(addr).await?;
        wait_listening(direct).await?;
        // The proxy learns the nodes' mechanisms from its first probes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok((p, addr, direct))
    }

    async fn start_relay(&self, to: SocketAddr) -> Res<(Proc, SocketAddr)> {
        let addr = free_port()?;
        let me = std::env::current_exe().map_err(err("current exe"))?;
        let child = self
            .pinned(&me)
            .arg("relay")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--to")
            .arg(to.to_string())
            .stdin(Stdio::null())
            .spawn()
            .map_err(err("start relay"))?;
        let p = Proc {
            name: "copy_bidirectional relay",
            child,
        };
        wait_listening(addr).await?;
        Ok((p, addr))
    }

    /// HAProxy in TCP mode towards `to`; with `tls`, it terminates the
    /// clients' TLS itself (`bind … ssl crt`), as the proxy does.
    async fn start_haproxy(&self, to: SocketAddr, tls: bool) -> Res<Option<(Proc, SocketAddr)>> {
        let found = Command::new(&self.c.haproxy)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            eprintln!(
                "loadbench: {} not found: HAProxy comparison skipped",
                self.c.haproxy
            );
            return Ok(None);
        }
        let addr = free_port()?;
        let ssl = if tls {
            format!(" ssl crt {}", self.dir.join("haproxy.pem").display())
        } else {
            String::new()
        };
        let cfg = self
            .dir
            .join(format!("haproxy-{}.cfg", if tls { "tls" } else { "tcp" }));
        let text = format!(
            "global\n  nbthread 1\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 120s\n  timeout server 120s\n\nfrontend xmpp\n  bind {addr}{ssl}\n  \
             default_backend node\n\nbackend node\n  server imp1 {to}\n"
        );
        std::fs::write(&cfg, text).map_err(err("haproxy config"))?;
        let child = self
            .pinned(Path::new(&self.c.haproxy))
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .spawn()
            .map_err(err("start haproxy"))?;
        let p = Proc {
            name: "haproxy",
            child,
        };
        wait_listening(addr).await?;
        Ok(Some((p, addr)))
    }

    /// Relay throughput for every target and stanza size.
    ///
    /// The TCP relays pass the client's TLS through to a node that ends it;
    /// the proxy ends TLS itself and talks plain TCP to its node. So that
    /// the relays are not charged for TLS the proxy would do anyway, they
    /// are also measured with plain-TCP clients to a plain node
    /// (`/plain`: the relay's own cost, less work than the proxy does).
    async fn throughput(&self) -> Res<()> {
        let tls_node = self.tls_pair.nodes[0].addr();
        let plain_node = self.plain_pair.nodes[0].addr();
        let (proxy_p, proxy, proxy_direct) = self.start_proxy().await?;
        let (relay_p, relay) = self.start_relay(tls_node).await?;
        let (relay_plain_p, relay_plain) = self.start_relay(plain_node).await?;
        let haproxy = self.start_haproxy(tls_node, false).await?;
        let haproxy_plain = self.start_haproxy(plain_node, false).await?;
        let haproxy_tls = self.start_haproxy(plain_node, true).await?;
        let starttls = Mode::StartTls(&self.client_tls);
        let direct_tls = Mode::DirectTls(&self.client_tls);
        let mut targets: Vec<(&str, SocketAddr, Mode<'_>, Option<&Proc>)> = vec![
            ("direct", tls_node, starttls, None),
            ("prg-proxy", proxy, starttls, Some(&proxy_p)),
            ("prg-proxy/tls", proxy_direct, direct_tls, Some(&proxy_p)),
            ("tokio-relay", relay, starttls, Some(&relay_p)),
            (
                "tokio-relay/plain",
                relay_plain,
                Mode::Plain,
                Some(&relay_plain_p),
            ),
        ];
        if let (Some((a_p, a)), Some((b_p, b)), Some((c_p, c))) =
            (&haproxy, &haproxy_plain, &haproxy_tls)
        {
            targets.push(("haproxy/tls", *c, direct_tls, Some(c_p)));
            targets.push(("haproxy", *a, starttls, Some(a_p)));
            targets.push(("haproxy/plain", *b, Mode::Plain, Some(b_p)));
        }
        if !self.c.only.is_empty() {
            targets.retain(|t| self.c.only.iter().any(|o| o == t.0));
        }
        for &size in &self.c.sizes {
            let mut rates: HashMap<&str, f64> = HashMap::new();
            let mut costs: HashMap<&str, f64> = HashMap::new();
            for &(name, addr, mode, proc_) in &targets {
                let cpu0 = proc_.map_or(0.0, Proc::cpu_secs);
                let (stanzas, secs) = self.pump(addr, mode, size).await?;
                let cpu = proc_.map_or(0.0, Proc::cpu_secs) - cpu0;
                let rate = stanzas as f64 / secs;
                rates.insert(name, rate);
                // The relay's CPU per stanza does not depend on whether the
                // driver (nodes + clients) saturates first.
                let cost = match proc_ {
                    Some(_) => {
                        let us = cpu * 1e6 / stanzas.max(1) as f64;
                        costs.insert(name, us);
                        format!(
                            "  relay CPU {us:>5.2} us/stanza ({:>3.0} % of a core)",
                            cpu * 100.0 / secs
                        )
                    }
                    None => String::new(),
                };
                println!(
                    "SUMMARY relay: {size:>5} B stanzas, {} clients, {name:<17} {:<10} {:>9.0} stanzas/s {:>7.1} MB/s{cost}",
                    self.c.clients,
                    mode.label(),
                    rate,
                    rate * size as f64 / 1e6
                );
            }
            // The fair peer for CPU: both end the clients' TLS (direct TLS)
            // and talk plain TCP to the node.
            if let (Some(p), Some(h)) = (costs.get("prg-proxy/tls"), costs.get("haproxy/tls")) {
                println!(
                    "SUMMARY relay: {size:>5} B CPU per stanza prg-proxy/tls {p:.2} us, haproxy/tls {h:.2} us: {:.2}x HAProxy terminating TLS  [goal <= 1.0x]",
                    p / h
                );
            }
            let Some(&p) = rates.get("prg-proxy") else {
                continue;
            };
            let ratio = |k: &str| {
                rates
                    .get(k)
                    .map_or("n/a".to_string(), |r| format!("{:.2}x", p / r))
            };
            println!(
                "SUMMARY relay: {size:>5} B ratio prg-proxy/tokio-relay {} (/plain {})  prg-proxy/haproxy {} (/plain {})  prg-proxy/direct {}  [goal >= 0.7x relay, >= 1.0x haproxy]",
                ratio("tokio-relay"),
                ratio("tokio-relay/plain"),
                ratio("haproxy"),
                ratio("haproxy/plain"),
                ratio("direct")
            );
        }
        Ok(())
    }

    /// Logs `clients` users in through `addr`, then each keeps `window`
    /// messages to itself in flight for `secs`. Returns (stanzas, seconds).
    async fn pump(&self, addr: SocketAddr, mode: Mode<'_>, size: usize) -> Res<(u64, f64)> {
        let mut conns = Vec::with_capacity(self.c.clients);
        for i in 0..self.c.clients {
            conns.push(login(addr, mode, &user(i), &format!("t{size}")).await?);
        }
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(self.c.secs);
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|c| {
                let done = done.clone();
                let window = self.c.window;
                tokio::spawn(async move { c.echo(size, window, deadline, &done).await })
            })
            .collect();
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok((done.load(Ordering::Relaxed), secs))
    }

    /// Full logins per second, direct and through the proxy.
    async fn logins(&self) -> Res<()> {
        let (_proxy, proxy, _) = self.start_proxy().await?;
        let mut rates = Vec::new();
        for (name, addr) in [
            ("direct", self.tls_pair.nodes[0].addr()),
            ("prg-proxy", proxy),
        ] {
            let n = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let deadline = start + Duration::from_secs_f64(self.c.secs);
            let workers: Vec<_> = (0..self.c.login_workers)
                .map(|w| {
                    let n = n.clone();
                    let tls = self.client_tls.clone();
                    tokio::spawn(async move {
                        let mut k = 0u64;
                        // Bounded in time and in count.
                        while Instant::now() < deadline && k < 100_000 {
                            let c = login(addr, Mode::StartTls(&tls), &user(w), &format!("l{k}"))
                                .await?;
                            c.close().await;
                            k += 1;
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok::<(), String>(())
                    })
                })
                .collect();
            for w in workers {
                w.await.map_err(|e| e.to_string())??;
            }
            let rate = n.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
            println!(
                "SUMMARY logins: {name:<10} {rate:>7.0} logins/s ({} workers, STARTTLS + SASL PLAIN + bind)",
                self.c.login_workers
            );
            rates.push(rate);
        }
        println!(
            "SUMMARY logins: ratio prg-proxy/direct {:.2}x  [goal >= 500 logins/s and >= 0.8x direct]",
            rates[1] / rates[0]
        );
        Ok(())
    }

    /// `n` STARTTLS clients logged in and bound through `addr`, 64 logins
    /// in flight.
    async fn idle_logins(&self, addr: SocketAddr, n: usize) -> Res<Vec<Lean>> {
        let gate = Arc::new(Semaphore::new(64));
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let gate = gate.clone();
                let tls = self.client_tls.clone();
                tokio::spawn(async move {
                    let _p = gate.acquire().await.map_err(|e| e.to_string())?;
                    login(addr, Mode::StartTls(&tls), &user(i), "idle").await
                })
            })
            .collect();
        let mut idle = Vec::with_capacity(n);
        for t in tasks {
            idle.push(t.await.map_err(|e| e.to_string())??);
        }
        Ok(idle)
    }

    /// Idle connections plus steady chat and login churn for
    /// `s.duration`; compares the first and the last `s.sample_window` seconds.
    async fn soak(&self, s: &Soak) -> Res<()> {
        let (proxy, addr, _) = self.start_proxy().await?;
        let n = self.c.idle;
        let setup = Instant::now();
        let idle = self.idle_logins(addr, n).await?;
        let mut chatters = Vec::with_capacity(self.c.clients);
        for i in 0..self.c.clients {
            chatters.push(login(addr, Mode::StartTls(&self.client_tls), &user(i), "chat").await?);
        }
        eprintln!(
            "loadbench: soak: {n} idle + {} chatters set up in {:.1?}; running {:.0} s",
            self.c.clients,
            setup.elapsed(),
            s.duration
        );
        let start = Instant::now();
        let window = Duration::from_secs_f64(s.sample_window.min(s.duration / 2.0));
        let end = start + Duration::from_secs_f64(s.duration);
        let early_until = start + window;
        let late_from = end - window;
        let interval = Duration::from_secs_f64(1.0 / s.rate.max(0.01));
        let tasks: Vec<_> = chatters
            .into_iter()
            .map(|c| {
                tokio::spawn(async move { c.chat(interval, end, early_until, late_from).await })
            })
            .collect();
        // Login churn: connect, log in, leave; bounded in count and time.
        let churn = {
            let tls = self.client_tls.clone();
            let every = Duration::from_secs_f64(1.0 / s.churn.max(0.01));
            let users = n.max(1);
            let on = s.churn > 0.0;
            tokio::spawn(async move {
                let mut done = 0u64;
                let mut tick = tokio::time::interval(every);
                while on && Instant::now() < end && done < 10_000_000 {
                    tick.tick().await;
                    let u = user(done as usize % users);
                    let c = login(addr, Mode::StartTls(&tls), &u, &format!("c{done}")).await?;
                    c.close().await;
                    done += 1;
                }
                Ok::<u64, String>(done)
            })
        };
        // The start's figures once the first window is over (the chatters'
        // first messages and the setup's garbage are behind).
        tokio::time::sleep_until(early_until.into()).await;
        let (rss0, fds0) = (proxy.rss_kib(), proxy.open_fds());
        tokio::time::sleep_until(end.into()).await;
        let (rss1, fds1) = (proxy.rss_kib(), proxy.open_fds());
        let mut early = Vec::new();
        let mut late = Vec::new();
        for t in tasks {
            let (e, l) = t.await.map_err(|e| e.to_string())??;
            early.extend(e);
            late.extend(l);
        }
        let churned = churn.await.map_err(|e| e.to_string())??;
        let pct = |v: &mut Vec<u32>, q: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            v.sort_unstable();
            let i = ((v.len() - 1) as f64 * q).round() as usize;
            f64::from(v[i]) / 1000.0
        };
        let (e50, e99) = (pct(&mut early, 0.5), pct(&mut early, 0.99));
        let (l50, l99) = (pct(&mut late, 0.5), pct(&mut late, 0.99));
        let rss_growth = rss1 as f64 - rss0 as f64;
        let rss_pct = rss_growth * 100.0 / (rss0.max(1) as f64);
        let fd_growth = fds1 - fds0;
        let pass = rss_pct <= s.max_rss_growth_pct && fd_growth <= s.max_fd_growth;
        println!(
            "SUMMARY soak: {n} idle TLS connections, {} chatters at {}/s, {churned} churned logins, {:.0} s",
            self.c.clients, s.rate, s.duration
        );
        println!(
            "SUMMARY soak: start  RSS {rss0} KiB, {fds0} fds, round trip p50 {e50:.2} ms p99 {e99:.2} ms ({} messages)",
            early.len()
        );
        println!(
            "SUMMARY soak: end    RSS {rss1} KiB, {fds1} fds, round trip p50 {l50:.2} ms p99 {l99:.2} ms ({} messages)",
            late.len()
        );
        println!(
            "SUMMARY soak: growth RSS {rss_growth:+.0} KiB ({rss_pct:+.1} %, bound {} %), fds {fd_growth:+} (bound {}): {}",
            s.max_rss_growth_pct,
            s.max_fd_growth,
            if pass { "PASS" } else { "FAIL" }
        );
        drop(idle);
        if pass {
            Ok(())
        } else {
            Err("soak: growth over the bounds".into())
        }
    }

    /// RSS growth of the proxy process per idle logged-in TLS connection.
    async fn memory(&self) -> Res<()> {
        let (proxy, addr, _) = self.start_proxy().await?;
        // Warm up: first connections size the runtime's and allocator's pools.
        let mut warm = Vec::new();
        for i in 0..8 {
            warm.push(login(addr, Mode::StartTls(&self.client_tls), &user(i), "warm").await?);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = proxy.rss_kib();
        let n = self.c.idle;
        let start = Instant::now();
        let idle = self.idle_logins(addr, n).await?;
        let took = start.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = proxy.rss_kib();
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
        println!(
            "SUMMARY memory: {n} idle TLS connections through the proxy (logged in and bound, set up in {took:.1?}): proxy RSS {before} KiB -> {after} KiB, {:.1} KiB per connection  [goal <= 16 KiB]",
            per / 1024.0
        );
        drop(idle);
        drop(warm);
        Ok(())
    }
}

/// A minimal XMPP client for load: STARTTLS, SASL PLAIN, bind; then raw
/// bytes, so that the client costs little next to the relay it measures.
struct Lean {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    jid: String,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

const HEADER: &str = "<?xml version='1.0'?><stream:stream to='example.com' version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

/// Reads until one complete element (or stream header) is framed; returns
/// its bytes. `framer` keeps its state across calls within one stream.
async fn next_element(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    framer: &mut Framer,
) -> Res<(FrameKind, Vec<u8>)> {
    let deadline = Instant::now() + STEP;
    loop {
        match framer.next(buf) {
            Ok(Some(f)) => {
                let bytes: Vec<u8> = buf.drain(..f.len).collect();
                if f.kind == FrameKind::Whitespace {
                    continue;
                }
                return Ok((f.kind, bytes));
            }
            Ok(None) => {}
            Err(e) => return Err(format!("bad XML from the server: {e}")),
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, io.read(&mut chunk))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(err("read"))?;
        if n == 0 {
            return Err("server closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Opens a stream and reads up to the features; returns them.
async fn open(io: &mut (impl AsyncRead + AsyncWrite + Unpin), buf: &mut Vec<u8>) -> Res<Vec<u8>> {
    io.write_all(HEADER.as_bytes())
        .await
        .map_err(err("write"))?;
    let mut f = Framer::new(1 << 20);
    let (k, _) = next_element(io, buf, &mut f).await?;
    if k != FrameKind::Header {
        return Err("expected a stream header".into());
    }
    let (_, features) = next_element(io, buf, &mut f).await?;
    if peek::element_name(&features) != b"stream:features" {
        return Err(format!(
            "expected features, got {}",
            String::from_utf8_lossy(&features)
        ));
    }
    Ok(features)
}

/// How a client reaches its server.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Plain TCP, no TLS anywhere.
    Plain,
    /// A plain stream upgraded with STARTTLS.
    StartTls(&'a Arc<rustls::ClientConfig>),
    /// TLS from the first byte (XEP-0368; what HAProxy can terminate).
    DirectTls(&'a Arc<rustls::ClientConfig>),
}

impl Mode<'_> {
    fn label(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::StartTls(_) => "starttls",
            Mode::DirectTls(_) => "direct-tls",
        }
    }
}

async fn tls_connect(
    tls: &Arc<rustls::ClientConfig>,
    tcp: TcpStream,
) -> Res<tokio_rustls::client::TlsStream<TcpStream>> {
    let name =
        rustls_pki_types::ServerName::try_from(DOMAIN.to_string()).map_err(|e| e.to_string())?;
    let connect = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp);
    tokio::time::timeout(STEP, connect)
        .await
        .map_err(|_| "TLS timeout".to_string())?
        .map_err(err("TLS"))
}

async fn login(addr: SocketAddr, mode: Mode<'_>, user: &str, resource: &str) -> Res<Lean> {
    let mut tcp = TcpStream::connect(addr).await.map_err(err("connect"))?;
    let _ = tcp.set_nodelay(true);
    let mut buf = Vec::new();
    if let Mode::DirectTls(tls) = mode {
        let mut io: Box<dyn Io> = Box::new(tls_connect(tls, tcp).await?);
        open(&mut io, &mut buf).await?;
        return authenticate(io, buf, user, resource).await;
    }
    let features = open(&mut tcp, &mut buf).await?;
    let io: Box<dyn Io> = match mode {
        Mode::Plain | Mode::DirectTls(_) => Box::new(tcp),
        Mode::StartTls(tls) => {
            if !peek::contains(&features, b"urn:ietf:params:xml:ns:xmpp-tls") {
                return Err("no STARTTLS offered".into());
            }
            tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                .await
                .map_err(err("write"))?;
            let mut f = Framer::in_open_stream(1 << 20);
            let (_, proceed) = next_element(&mut tcp, &mut buf, &mut f).await?;
            if peek::element_name(&proceed) != b"proceed" {
                return Err("STARTTLS refused".into());
            }
            let mut io: Box<dyn Io> = Box::new(tls_connect(tls, tcp).await?);
            buf.clear();
            open(&mut io, &mut buf).await?;
            io
        }
    };
    authenticate(io, buf, user, resource).await
}

/// SASL PLAIN, a new stream, bind (and a session where it is required).
async fn authenticate(
    mut io: Box<dyn Io>,
    mut buf: Vec<u8>,
    user: &str,
    resource: &str,
) -> Res<Lean> {
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0pw"));
    io.write_all(
        format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>")
            .as_bytes(),
    )
    .await
    .map_err(err("write"))?;
    let mut f = Framer::in_open_stream(1 << 20);
    let (_, ok) = next_element(&mut io, &mut buf, &mut f).await?;
    if peek::element_name(&ok) != b"success" {
        return Err(format!("auth failed: {}", String::from_utf8_lossy(&ok)));
    }
    let features = open(&mut io, &mut buf).await?;
    io.write_all(format!("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>").as_bytes())
        .await
        .map_err(err("write"))?;
    let mut f = Framer::in_open_stream(1 << 20);
    let (_, res) = next_element(&mut io, &mut buf, &mut f).await?;
    let jid = peek::child_text(&res, b"jid")
        .map(|j| String::from_utf8_lossy(j).into_owned())
        .ok_or_else(|| format!("bind failed: {}", String::from_utf8_lossy(&res)))?;
    let session = peek::contains(&features, b"urn:ietf:params:xml:ns:xmpp-session");
    if session && !peek::contains(&features, b"<optional/>") {
        io.write_all(
            b"<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
        )
        .await
        .map_err(err("write"))?;
        next_element(&mut io, &mut buf, &mut f).await?;
    }
    Ok(Lean { io, buf, jid })
}

impl Lean {
    /// Sends `window` messages of about `size` bytes to itself, waits for
    /// them to come back, repeats until `deadline`; adds to `done`.
    async fn echo(
        mut self,
        size: usize,
        window: usize,
        deadline: Instant,
        done: &AtomicU64,
    ) -> Res<()> {
        let head = format!("<message type='chat' to='{}' id='x'><body>", self.jid);
        let tail = "</body></message>";
        let body = "x".repeat(size.saturating_sub(head.len() + tail.len()).max(1));
        let one = format!("{head}{body}{tail}");
        let batch = one.repeat(window);
        let finder = memmem::Finder::new(b"</message>");
        let mut chunk = vec![0u8; 64 * 1024];
        let mut carry: Vec<u8> = std::mem::take(&mut self.buf);
        let mut rounds = 0u64;
        // Bounded in time and in rounds.
        while Instant::now() < deadline && rounds < 10_000_000 {
            rounds += 1;
            self.io
                .write_all(batch.as_bytes())
                .await
                .map_err(err("write"))?;
            let mut got = 0;
            while got < window {
                let n = tokio::time::timeout(STEP, self.io.read(&mut chunk))
                    .await
                    .map_err(|_| "echo timeout".to_string())?
                    .map_err(err("read"))?;
                if n == 0 {
                    return Err("closed during echo".into());
                }
                carry.extend_from_slice(&chunk[..n]);
                let mut last = 0;
                for at in finder.find_iter(&carry) {
                    got += 1;
                    last = at + b"</message>".len();
                }
                carry.drain(..last.max(carry.len().saturating_sub(16)).min(carry.len()));
            }
            done.fetch_add(window as u64, Ordering::Relaxed);
        }
        self.close().await;
        Ok(())
    }

    /// One message to itself every `interval` until `end`; returns the
    /// round trips (µs) of those sent before `early_until` and after
    /// `late_from`.
    async fn chat(
        mut self,
        interval: Duration,
        end: Instant,
        early_until: Instant,
        late_from: Instant,
    ) -> Res<(Vec<u32>, Vec<u32>)> {
        let one = format!(
            "<message type='chat' to='{}' id='s'><body>soak</body></message>",
            self.jid
        );
        let finder = memmem::Finder::new(b"</message>");
        let mut chunk = vec![0u8; 4096];
        let mut carry: Vec<u8> = std::mem::take(&mut self.buf);
        let (mut early, mut late) = (Vec::new(), Vec::new());
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0u64;
        // Bounded in time and in count.
        while Instant::now() < end && sent < 10_000_000 {
            tick.tick().await;
            sent += 1;
            let t0 = Instant::now();
            self.io
                .write_all(one.as_bytes())
                .await
                .map_err(err("write"))?;
            loop {
                if let Some(at) = finder.find(&carry) {
                    carry.drain(..at + b"</message>".len());
                    break;
                }
                let n = tokio::time::timeout(STEP, self.io.read(&mut chunk))
                    .await
                    .map_err(|_| "chat timeout".to_string())?
                    .map_err(err("read"))?;
                if n == 0 {
                    return Err("closed during chat".into());
                }
                carry.extend_from_slice(&chunk[..n]);
            }
            let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            if t0 < early_until {
                early.push(us);
            } else if t0 >= late_from {
                late.push(us);
            }
        }
        self.close().await;
        Ok((early, late))
    }

    async fn close(mut self) {
        let _ = self.io.write_all(b"</stream:stream>").await;
        let _ = self.io.shutdown().await;
    }
}
