//! `TestGroup::start()`: a simulated node pair behind a proxy, in one call.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prg_proxy::proxy::ProxyView;
use prg_proxy::sim::{ClientTls, SimClient, SimNodeConfig, SimPair};
use prg_proxy::{Config, Proxy};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;

pub use prg_proxy::node::NodeId;
pub const N1: NodeId = NodeId::Node1;
pub const N2: NodeId = NodeId::Node2;

pub const DOMAIN: &str = "example.com";
pub const T: Duration = Duration::from_secs(10);
pub const USERS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];

pub fn users() -> Vec<(String, String)> {
    USERS
        .iter()
        .map(|u| (u.to_string(), "pw".to_string()))
        .collect()
}

/// Development certificates written to a temporary folder.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub client: Arc<rustls::ClientConfig>,
}

impl Certs {
    pub fn new() -> Certs {
        let d = prg_proxy::tls::dev_certs(&[DOMAIN, "localhost"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), &d.chain_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &d.key_pem).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &d.ca_pem).unwrap();
        let client =
            prg_proxy::tls::client_config_from_der(prg_proxy::tls::certs_from_pem(&d.ca_pem))
                .unwrap();
        Certs { dir, client }
    }

    pub fn cert(&self) -> String {
        self.dir.path().join("cert.pem").display().to_string()
    }
    pub fn key(&self) -> String {
        self.dir.path().join("key.pem").display().to_string()
    }
}

pub struct TestGroup {
    pub pair: SimPair,
    pub certs: Certs,
    pub view: ProxyView,
    pub starttls: SocketAddr,
    pub direct: SocketAddr,
    /// The admin API's address, if enabled.
    pub admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Builds the TOML for a proxy in front of `nodes`.
pub fn config_text(nodes: &[SocketAddr], mode: &str, certs: &Certs, extra: &str) -> String {
    let mut s = format!(
        "[group]\nname = \"test-group\"\ndescription = \"simulated pair\"\nhigh_availability = true\n\
         assignment = \"{mode}\"\ndomains = [\"{DOMAIN}\"]\n\n"
    );
    for (i, a) in nodes.iter().enumerate() {
        s.push_str(&format!(
            "[[nodes]]\nname = \"imp{}\"\naddress = \"{a}\"\n\n",
            i + 1
        ));
    }
    s.push_str(&format!(
        "[listen]\nstarttls = \"127.0.0.1:0\"\ndirect_tls = \"127.0.0.1:0\"\n\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\n\n{extra}",
        certs.cert(),
        certs.key()
    ));
    // The admin API on a port the kernel picks, unless the test sets it.
    if !extra.contains("[admin]") {
        s.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    }
    s
}

impl TestGroup {
    pub async fn start() -> TestGroup {
        Self::start_with("balanced", "", |_| {}).await
    }

    pub async fn start_with(
        mode: &str,
        extra: &str,
        tweak: impl Fn(&mut SimNodeConfig),
    ) -> TestGroup {
        let mut c1 = SimNodeConfig::new("imp1", DOMAIN, users());
        let mut c2 = SimNodeConfig::new("imp2", DOMAIN, users());
        tweak(&mut c1);
        tweak(&mut c2);
        let pair = SimPair::start(c1, c2).await.unwrap();
        let certs = Certs::new();
        let text = config_text(
            &[pair.nodes[0].addr(), pair.nodes[1].addr()],
            mode,
            &certs,
            extra,
        );
        Self::launch(pair, certs, &text).await
    }

    /// Binds a proxy with the config `text` in front of `pair` and runs it.
    pub async fn launch(pair: SimPair, certs: Certs, text: &str) -> TestGroup {
        Self::launch_with_path(pair, certs, text, None).await
    }

    /// [`TestGroup::launch`] remembering `path` as the proxy's config file
    /// (what a reload reads again).
    pub async fn launch_with_path(
        pair: SimPair,
        certs: Certs,
        text: &str,
        path: Option<std::path::PathBuf>,
    ) -> TestGroup {
        let config = Config::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let proxy = Proxy::bind_with_path(config, path).await.unwrap();
        let starttls = proxy.starttls_addr().unwrap();
        let direct = proxy.direct_tls_addr().unwrap();
        let admin = proxy.admin_addr();
        let view = proxy.view();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(proxy.run(async move {
            let _ = rx.await;
        }));
        TestGroup {
            pair,
            certs,
            view,
            starttls,
            direct,
            admin,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn starttls_tls(&self) -> ClientTls {
        ClientTls::StartTls {
            config: self.certs.client.clone(),
            server_name: DOMAIN.into(),
        }
    }

    pub fn direct_tls(&self) -> ClientTls {
        ClientTls::Direct {
            config: self.certs.client.clone(),
            server_name: DOMAIN.into(),
        }
    }

    /// Connects over STARTTLS (stream open, SASL features read).
    pub async fn client(&self) -> SimClient {
        SimClient::connect(self.starttls, DOMAIN, self.starttls_tls())
            .await
            .unwrap()
    }

    /// Connects over STARTTLS, logs in and binds.
    pub async fn login(&self, user: &str, mech: &str, resource: &str) -> SimClient {
        let mut c = SimClient::connect(self.starttls, DOMAIN, self.starttls_tls())
            .await
            .unwrap();
        c.login(user, "pw", mech).await.unwrap();
        c.bind(resource).await.unwrap();
        c
    }

    /// Shuts the proxy down and waits for it to finish.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
    }
}

/// A simulated node pair serving [`users`] in [`DOMAIN`].
pub async fn sim_pair() -> SimPair {
    SimPair::start(
        SimNodeConfig::new("imp1", DOMAIN, users()),
        SimNodeConfig::new("imp2", DOMAIN, users()),
    )
    .await
    .unwrap()
}

/// The stream error condition of `r`, checked against `want`; its raw XML.
pub fn stream_error<T: std::fmt::Debug>(
    r: Result<T, prg_proxy::sim::ClientError>,
    want: &str,
) -> String {
    match r {
        Err(prg_proxy::sim::ClientError::StreamError { condition, raw, .. }) => {
            assert_eq!(condition, want, "{raw}");
            raw
        }
        other => panic!("expected <{want}/>, got {other:?}"),
    }
}

/// Waits until `cond` holds, checking every few milliseconds, at most `within`.
/// Returns whether it held.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The real `prg-proxy` binary running `prg-proxy [global…] run --config
/// CONFIG`, killed when dropped, its log lines (standard error) on a
/// channel read by a thread of its own.
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
    /// The lines [`ProxyProcess::wait_line`] has read so far.
    seen: std::cell::RefCell<Vec<String>>,
}

impl ProxyProcess {
    pub fn spawn(global: &[&str], config: &std::path::Path, rust_log: &str) -> ProxyProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_prg-proxy"))
            .args(global)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        ProxyProcess {
            child,
            lines,
            seen: Default::default(),
        }
    }
}

impl ProxyProcess {
    /// The binary in front of `pair` (balanced, STARTTLS listener only,
    /// `extra` appended to the configuration), started once it listens:
    /// the process, its STARTTLS address and its configuration file.
    pub fn in_front_of(
        pair: &SimPair,
        certs: &Certs,
        extra: &str,
    ) -> (ProxyProcess, SocketAddr, std::path::PathBuf) {
        let text = config_text(
            &[pair.nodes[0].addr(), pair.nodes[1].addr()],
            "balanced",
            certs,
            extra,
        )
        .replace("direct_tls = \"127.0.0.1:0\"\n", "");
        let path = certs.dir.path().join("proxy.toml");
        std::fs::write(&path, &text).unwrap();
        let proxy = ProxyProcess::spawn(&[], &path, "info");
        let addr = proxy.wait_addr("listening");
        (proxy, addr, path)
    }

    /// The next log line containing `needle`, waiting 20 s at most.
    pub fn wait_line(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.borrow_mut().push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(e) => panic!("no log line with {needle:?}: {e}"),
            }
        }
    }

    /// The address (`addr=`) in the first log line containing `needle`,
    /// read already or waited for.
    pub fn wait_addr(&self, needle: &str) -> SocketAddr {
        let earlier = self
            .seen
            .borrow()
            .iter()
            .find(|l| l.contains(needle))
            .cloned();
        let line = earlier.unwrap_or_else(|| self.wait_line(needle));
        line.split("addr=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Sends `sig` (`TERM`, `HUP`, …) to the process.
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig}");
    }

    /// Waits up to `within` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the proxy did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
