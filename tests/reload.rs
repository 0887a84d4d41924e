//! Live reload: new certificates for new handshakes, a broken file refused
//! naming the key with the old configuration kept, SIGHUP on the binary.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use prg_proxy::sim::{SimClient, SimNodeConfig, SimPair};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{rustls, TlsConnector};

/// The leaf certificate the proxy presents on a direct-TLS handshake.
async fn presented(addr: SocketAddr, client: Arc<rustls::ClientConfig>) -> CertificateDer<'static> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(DOMAIN.to_string()).unwrap();
    let tls = tokio::time::timeout(T, TlsConnector::from(client).connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn leaf(chain_pem: &str) -> CertificateDer<'static> {
    prg_proxy::tls::certs_from_pem(chain_pem).remove(0)
}

/// A client trusting both development CAs.
fn trusting(cas: &[&str]) -> Arc<rustls::ClientConfig> {
    let ders = cas
        .iter()
        .flat_map(|c| prg_proxy::tls::certs_from_pem(c))
        .collect();
    prg_proxy::tls::client_config_from_der(ders).unwrap()
}

async fn group_with_file(extra: &str) -> (TestGroup, std::path::PathBuf) {
    let pair = SimPair::start(
        SimNodeConfig::new("imp1", DOMAIN, users()),
        SimNodeConfig::new("imp2", DOMAIN, users()),
    )
    .await
    .unwrap();
    let certs = Certs::new();
    let text = config_text(
        &[pair.nodes[0].addr(), pair.nodes[1].addr()],
        "balanced",
        &certs,
        extra,
    );
    let path = certs.dir.path().join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    let g = TestGroup::launch_with_path(pair, certs, &text, Some(path.clone())).await;
    (g, path)
}

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[tokio::test]
async fn a_reload_with_a_new_certificate_serves_it_to_new_handshakes() {
    let (mut g, path) = group_with_file("").await;
    let dir = g.certs.dir.path().to_path_buf();
    let old_chain = read(&dir.join("cert.pem"));
    let old_ca = read(&dir.join("ca.pem"));
    let fresh = prg_proxy::tls::dev_certs(&[DOMAIN, "localhost"]).unwrap();
    let client = trusting(&[&old_ca, &fresh.ca_pem]);
    assert_eq!(presented(g.direct, client.clone()).await, leaf(&old_chain));
    // A user logged in before the reload stays connected through it.
    let mut alice = g.login("alice", "PLAIN", "a").await;

    std::fs::write(dir.join("cert.pem"), &fresh.chain_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &fresh.key_pem).unwrap();
    let text = read(&path).replace("[tls]", "[limits]\nmax_auth_attempts = 3\n\n[tls]");
    std::fs::write(&path, text).unwrap();
    let report = g.view.reload().expect("reload");
    assert!(
        report.applied.iter().any(|a| a.starts_with("tls")),
        "{report}"
    );
    assert!(report.applied.iter().any(|a| a == "limits"), "{report}");
    assert!(report.needs_restart.is_empty(), "{report}");
    assert_eq!(g.view.current_config().limits.max_auth_attempts, 3);

    assert_eq!(
        presented(g.direct, client.clone()).await,
        leaf(&fresh.chain_pem)
    );
    alice.ping().await.unwrap();
    // New logins go through with the new certificate.
    let tls = prg_proxy::sim::ClientTls::StartTls {
        config: client,
        server_name: DOMAIN.into(),
    };
    let mut bob = SimClient::connect(g.starttls, DOMAIN, tls).await.unwrap();
    bob.login("bob", "pw", "PLAIN").await.unwrap();
    bob.bind("b").await.unwrap();
    g.stop().await;
}

#[tokio::test]
async fn a_broken_config_is_refused_naming_the_key_and_the_old_one_stays() {
    let (mut g, path) = group_with_file("").await;
    let dir = g.certs.dir.path().to_path_buf();
    let old_chain = read(&dir.join("cert.pem"));
    let old_key = read(&dir.join("key.pem"));
    let good = read(&path);
    let client = g.certs.client.clone();

    // A certificate file that holds no certificate.
    std::fs::write(dir.join("cert.pem"), "not a certificate\n").unwrap();
    let e = g.view.reload().expect_err("broken certificate");
    assert_eq!(e.key, "tls.cert", "{e}");
    assert_eq!(presented(g.direct, client.clone()).await, leaf(&old_chain));

    // A certificate whose key is another one's.
    let other = prg_proxy::tls::dev_certs(&[DOMAIN]).unwrap();
    std::fs::write(dir.join("cert.pem"), &other.chain_pem).unwrap();
    let e = g.view.reload().expect_err("key mismatch");
    assert_eq!(e.key, "tls.key", "{e}");

    // Bad TOML and an unknown key.
    std::fs::write(dir.join("cert.pem"), &old_chain).unwrap();
    std::fs::write(&path, good.replace("[tls]", "[tls")).unwrap();
    assert!(g.view.reload().is_err());
    std::fs::write(
        &path,
        good.replace("[limits]", "")
            .replace("[tls]", "[limits]\nmax_auth_attemps = 3\n\n[tls]"),
    )
    .unwrap();
    let e = g.view.reload().expect_err("unknown key");
    assert!(e.key.contains("max_auth_attemps"), "{e}");

    // Still serving with the old certificate and settings.
    assert_eq!(read(&dir.join("key.pem")), old_key);
    assert_eq!(presented(g.direct, client).await, leaf(&old_chain));
    assert_eq!(g.view.current_config().limits.max_auth_attempts, 5);
    let c = g.login("carol", "PLAIN", "c").await;
    let _ = c.close().await;
    g.stop().await;
}

// Multi-threaded: the test blocks a thread reading the proxy's log while
// the simulated nodes must keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_binary_which_keeps_serving() {
    let pair = SimPair::start(
        SimNodeConfig::new("imp1", DOMAIN, users()),
        SimNodeConfig::new("imp2", DOMAIN, users()),
    )
    .await
    .unwrap();
    let certs = Certs::new();
    let (mut proxy, addr, p) = ProxyProcess::in_front_of(&pair, &certs, "");
    let text = std::fs::read_to_string(&p).unwrap();
    let tls = prg_proxy::sim::ClientTls::StartTls {
        config: certs.client.clone(),
        server_name: DOMAIN.into(),
    };
    let mut alice = SimClient::connect(addr, DOMAIN, tls.clone()).await.unwrap();
    alice.login("alice", "pw", "PLAIN").await.unwrap();
    alice.bind("a").await.unwrap();

    proxy.signal("HUP");
    proxy.wait_line("configuration reloaded");
    proxy.signal("USR1");
    proxy.wait_line("SIGUSR1 received: ignored");
    // A broken file is refused; the proxy goes on with the running one.
    std::fs::write(&p, text.replace("[tls]", "[tls")).unwrap();
    proxy.signal("HUP");
    proxy.wait_line("configuration reload refused");

    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the proxy exited"
    );
    alice.ping().await.unwrap();
    let mut bob = SimClient::connect(addr, DOMAIN, tls).await.unwrap();
    bob.login("bob", "pw", "PLAIN").await.unwrap();
    bob.bind("b").await.unwrap();
    proxy.signal("TERM");
    proxy.wait_exit(Duration::from_secs(15));
}

/// `POST /reload` on the admin API: a good file is applied (200 with what
/// changed), a broken one refused with 400 naming the key while the proxy
/// keeps its configuration, and a proxy not started from a file says so.
#[tokio::test]
async fn post_reload_applies_a_good_file_and_refuses_a_broken_one() {
    let (mut g, path) = group_with_file("").await;
    let url = format!("http://{}/reload", g.admin.expect("admin API on"));
    let post = |url: String| async move {
        let r = reqwest::Client::new().post(url).send().await.unwrap();
        let code = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        (code, v)
    };
    // A changed limit is applied.
    std::fs::write(
        &path,
        read(&path).replace("[tls]", "[limits]\nmax_auth_attempts = 3\n\n[tls]"),
    )
    .unwrap();
    let (code, v) = post(url.clone()).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(g.view.current_config().limits.max_auth_attempts, 3);
    // A certificate that is not there: refused, naming the key.
    std::fs::write(
        &path,
        read(&path).replace(g.certs.cert().as_str(), "/nonexistent/cert.pem"),
    )
    .unwrap();
    let (code, v) = post(url.clone()).await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").starts_with("tls.cert"),
        "{v}"
    );
    assert_eq!(g.view.current_config().limits.max_auth_attempts, 3);
    g.stop().await;

    // Started from a configuration in memory: nothing to re-read.
    let mut g = TestGroup::start().await;
    let url = format!("http://{}/reload", g.admin.expect("admin API on"));
    let (code, v) = post(url).await;
    assert_eq!(code, 409, "{v}");
    g.stop().await;
}
