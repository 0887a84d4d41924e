//! Pieces the load benches share: users split by their balanced home,
//! percentiles, and chatters timing their messages' round trips.

use std::time::{Duration, Instant};

use crate::config::AssignmentMode;
use crate::node::NodeId;
use crate::route::Assignment;

use super::SimClient;

/// Users named `u{i}` whose balanced homes (nodes `imp1`, `imp2`) give
/// `on1` users on node 1 and `on2` on node 2.
pub fn users_by_home(domain: &str, on1: usize, on2: usize) -> (Vec<String>, Vec<String>) {
    let a = Assignment::new(
        AssignmentMode::Balanced,
        &["imp1".into(), "imp2".into()],
        Default::default(),
    );
    let (mut n1, mut n2) = (Vec::new(), Vec::new());
    let mut i = 0;
    while n1.len() < on1 || n2.len() < on2 {
        let u = format!("u{i}");
        match a.home(&format!("{u}@{domain}")) {
            Ok(NodeId::Node1) if n1.len() < on1 => n1.push(u),
            Ok(NodeId::Node2) if n2.len() < on2 => n2.push(u),
            _ => {}
        }
        i += 1;
    }
    (n1, n2)
}

/// The `p` percentile (0–1) of sorted values; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Every chatter sends messages to itself, one at a time with `pause`
/// between them, for `phase`; returns the sorted round-trip times in
/// milliseconds. A chatter whose message does not come back within 30 s
/// stops.
pub async fn chat(
    chatters: &mut Vec<SimClient>,
    phase: Duration,
    pause: Duration,
) -> Result<Vec<f64>, String> {
    let deadline = Instant::now() + phase;
    let mut tasks = Vec::new();
    for mut c in chatters.drain(..) {
        tasks.push(tokio::spawn(async move {
            let me = c.jid().unwrap_or_default().to_string();
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let body = format!("ping {n}");
                let t = Instant::now();
                if c.send_message(&me, &body).await.is_err() {
                    break;
                }
                match c
                    .wait_for(Duration::from_secs(30), |s| {
                        s.name == "message" && s.body().as_deref() == Some(&body)
                    })
                    .await
                {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => break,
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            (c, lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let (c, lat) = t.await.map_err(|e| e.to_string())?;
        chatters.push(c);
        all.extend(lat);
    }
    all.sort_by(|a, b| a.total_cmp(b));
    Ok(all)
}

/// A proxy in front of a simulated pair, for the benches: balanced
/// assignment, STARTTLS on a free loopback port with a development
/// certificate, no admin API.
pub struct BenchProxy {
    /// The STARTTLS listener.
    pub addr: std::net::SocketAddr,
    /// The running proxy's view.
    pub view: crate::view::ProxyView,
    /// How the bench's clients reach it (trusting the development CA).
    pub tls: super::ClientTls,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    dir: std::path::PathBuf,
}

/// A bench proxy's configuration file, certificate and key in a
/// directory of their own, and how clients reach it.
struct BenchConfig {
    text: String,
    dir: std::path::PathBuf,
    tls: super::ClientTls,
}

impl BenchConfig {
    /// Balanced assignment in front of `pair`, `node2` added to node 2's
    /// `[[nodes]]` entry, `admin` and `starttls` as the admin and STARTTLS
    /// listen addresses (`admin` empty: no admin API) and `tail` (whole
    /// sections) at the end.
    fn new(
        bench: &str,
        domain: &str,
        pair: &super::SimPair,
        node2: &str,
        listen: (&str, &str),
        tail: &str,
    ) -> Result<BenchConfig, String> {
        let dir = std::env::temp_dir().join(format!("prg-{bench}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let d = crate::tls::dev_certs(&[domain, "localhost"]).map_err(|e| e.to_string())?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &d.chain_pem).map_err(|e| e.to_string())?;
        std::fs::write(&key, &d.key_pem).map_err(|e| e.to_string())?;
        let client = crate::tls::client_config_from_der(crate::tls::certs_from_pem(&d.ca_pem))?;
        let (admin, starttls) = listen;
        let admin = if admin.is_empty() {
            "enabled = false".to_string()
        } else {
            format!("listen = \"{admin}\"")
        };
        let text = format!(
            "[group]\nname = \"{bench}\"\nhigh_availability = true\nassignment = \"balanced\"\n\
             domains = [\"{domain}\"]\n\n[[nodes]]\nname = \"imp1\"\naddress = \"{}\"\n\n\
             [[nodes]]\nname = \"imp2\"\naddress = \"{}\"\n{node2}\n\n\
             [admin]\n{admin}\n\n[listen]\nstarttls = \"{starttls}\"\n\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n\n{tail}",
            pair.nodes[0].addr(),
            pair.nodes[1].addr(),
            cert.display(),
            key.display(),
        );
        Ok(BenchConfig {
            text,
            dir,
            tls: super::ClientTls::StartTls {
                config: client,
                server_name: domain.into(),
            },
        })
    }
}

impl BenchProxy {
    /// Starts a proxy named `bench` in front of `pair`, with `node2` added
    /// to node 2's `[[nodes]]` entry and `tail` (whole sections) at the end
    /// of the configuration; returns once the group is Normal.
    pub async fn start(
        bench: &str,
        domain: &str,
        pair: &super::SimPair,
        node2: &str,
        tail: &str,
    ) -> Result<BenchProxy, String> {
        let c = BenchConfig::new(bench, domain, pair, node2, ("", "127.0.0.1:0"), tail)?;
        let config = crate::Config::parse(&c.text).map_err(|e| format!("{e}\n{}", c.text))?;
        let proxy = crate::Proxy::bind(config)
            .await
            .map_err(|e| e.to_string())?;
        let addr = proxy.starttls_addr().ok_or("no listener")?;
        let view = proxy.view();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async move {
            let _ = stopped.await;
        }));
        let mut status = view.group_status();
        tokio::time::timeout(
            Duration::from_secs(30),
            status.wait_for(|s| {
                s.serving == [Some(NodeId::Node1), Some(NodeId::Node2)] && s.monitoring
            }),
        )
        .await
        .map_err(|_| "group not Normal")?
        .map_err(|_| "monitor gone")?;
        Ok(BenchProxy {
            addr,
            view,
            tls: c.tls,
            stop: Some(stop),
            task,
            dir: c.dir,
        })
    }

    /// Shuts the proxy down (bounded) and removes its files.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port free now (for a child process's configuration; the
/// benches only, where a rare collision just fails the run).
fn free_port() -> Result<std::net::SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

/// The same proxy as [`BenchProxy`], run as the real `prg-proxy` binary in
/// a process of its own, so that the bench process keeps its descriptors
/// for clients and nodes (each proxied session costs the proxy two). Its
/// counters come from the admin API's `/metrics`.
pub struct BenchProxyProcess {
    /// The STARTTLS listener.
    pub addr: std::net::SocketAddr,
    /// The admin API.
    pub admin: std::net::SocketAddr,
    /// How the bench's clients reach it.
    pub tls: super::ClientTls,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl BenchProxyProcess {
    /// Runs `bin run --config …` with the configuration of
    /// [`BenchProxy::start`]; returns once the group is Normal.
    pub async fn spawn(
        bin: &std::path::Path,
        bench: &str,
        domain: &str,
        pair: &super::SimPair,
        node2: &str,
        tail: &str,
    ) -> Result<BenchProxyProcess, String> {
        let (addr, admin) = (free_port()?, free_port()?);
        let c = BenchConfig::new(
            bench,
            domain,
            pair,
            node2,
            (&admin.to_string(), &addr.to_string()),
            tail,
        )?;
        let file = c.dir.join("prg-proxy.toml");
        std::fs::write(&file, &c.text).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(bin)
            .args(["run", "--config"])
            .arg(&file)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let p = BenchProxyProcess {
            addr,
            admin,
            tls: c.tls,
            child,
            dir: c.dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(m) = p.metrics().await {
                let serving = |n: &str| {
                    m.iter().any(|(k, v)| {
                        k.starts_with("prg_proxy_node_state{")
                            && k.contains(&format!("node=\"{n}\""))
                            && k.contains("state=\"Normal\"")
                            && *v == 1.0
                    })
                };
                if serving("imp1") && serving("imp2") {
                    return Ok(p);
                }
            }
            if Instant::now() > deadline {
                return Err("proxy process: group not Normal within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every sample of the admin API's `/metrics`, as (name with labels,
    /// value).
    pub async fn metrics(&self) -> Result<Vec<(String, f64)>, String> {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    /// The proxy process's CPU time so far (user + system, all threads),
    /// in seconds; `None` once it is gone.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the command name (which may hold spaces): state is
        // the first, utime the 12th, stime the 13th, in USER_HZ (100/s in
        // the /proc ABI).
        let rest = stat.rsplit_once(')')?.1;
        let mut f = rest.split_whitespace().skip(11);
        let utime: f64 = f.next()?.parse().ok()?;
        let stime: f64 = f.next()?.parse().ok()?;
        Some((utime + stime) / 100.0)
    }

    /// One sample's value (exact name with labels), 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .ok()
            .and_then(|m| m.into_iter().find(|(k, _)| k == name).map(|(_, v)| v))
            .unwrap_or(0.0)
    }

    /// Stops the proxy (SIGTERM's drain is not waited for) and removes its
    /// files.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
