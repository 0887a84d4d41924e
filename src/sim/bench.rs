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
        let dir = std::env::temp_dir().join(format!("prg-{bench}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let d = crate::tls::dev_certs(&[domain, "localhost"]).map_err(|e| e.to_string())?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &d.chain_pem).map_err(|e| e.to_string())?;
        std::fs::write(&key, &d.key_pem).map_err(|e| e.to_string())?;
        let client = crate::tls::client_config_from_der(crate::tls::certs_from_pem(&d.ca_pem))?;
        let text = format!(
            "[group]\nname = \"{bench}\"\nhigh_availability = true\nassignment = \"balanced\"\n\
             domains = [\"{domain}\"]\n\n[[nodes]]\nname = \"imp1\"\naddress = \"{}\"\n\n\
             [[nodes]]\nname = \"imp2\"\naddress = \"{}\"\n{node2}\n\n\
             [admin]\nenabled = false\n\n[listen]\nstarttls = \"127.0.0.1:0\"\n\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n\n{tail}",
            pair.nodes[0].addr(),
            pair.nodes[1].addr(),
            cert.display(),
            key.display(),
        );
        let config = crate::Config::parse(&text).map_err(|e| format!("{e}\n{text}"))?;
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
            tls: super::ClientTls::StartTls {
                config: client,
                server_name: domain.into(),
            },
            stop: Some(stop),
            task,
            dir,
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
