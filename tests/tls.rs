//! TLS details: SNI certificate choice, TLS towards the nodes, the
//! connection cap.

mod common;

use std::time::Duration;

use common::*;
use prg_proxy::config::TlsConfig;
use prg_proxy::sim::{ClientTls, SimClient, SimNodeConfig, SimPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn sni_picks_the_domain_certificate() {
    let other = prg_proxy::tls::dev_certs(&["other.example"]).unwrap();
    let certs = Certs::new();
    let (oc, ok) = (
        certs.dir.path().join("o.pem"),
        certs.dir.path().join("ok.pem"),
    );
    std::fs::write(&oc, &other.chain_pem).unwrap();
    std::fs::write(&ok, &other.key_pem).unwrap();
    let extra = format!(
        "[[tls.sni]]\ndomain = \"other.example\"\ncert = \"{}\"\nkey = \"{}\"\n",
        oc.display(),
        ok.display()
    );
    let pair = SimPair::start(
        SimNodeConfig::new("imp1", "other.example", users()),
        SimNodeConfig::new("imp2", "other.example", users()),
    )
    .await
    .unwrap();
    let text = config_text(
        &[pair.nodes[0].addr(), pair.nodes[1].addr()],
        "balanced",
        &certs,
        "",
    )
    .replace(
        "domains = [\"example.com\"]",
        "domains = [\"example.com\", \"other.example\"]",
    ) + &extra; // `[[tls.sni]]` follows `[tls]`, the last table of the text.
    let cfg = prg_proxy::Config::parse(&text).unwrap();
    let proxy = prg_proxy::Proxy::bind(cfg).await.unwrap();
    let addr = proxy.direct_tls_addr().unwrap();
    tokio::spawn(proxy.run(std::future::pending()));
    // Trusting only the other CA: the handshake succeeds only if the proxy
    // serves the other.example certificate for that SNI name.
    let other_client =
        prg_proxy::tls::client_config_from_der(prg_proxy::tls::certs_from_pem(&other.ca_pem))
            .unwrap();
    let tls = ClientTls::Direct {
        config: other_client.clone(),
        server_name: "other.example".into(),
    };
    let mut c = SimClient::connect(addr, "other.example", tls)
        .await
        .unwrap();
    c.login("alice", "pw", "PLAIN").await.unwrap();
    // The default name still gets the default certificate.
    let tls = ClientTls::Direct {
        config: certs.client.clone(),
        server_name: DOMAIN.into(),
    };
    SimClient::connect(addr, DOMAIN, tls).await.unwrap();
    let tls = ClientTls::Direct {
        config: other_client,
        server_name: DOMAIN.into(),
    };
    assert!(SimClient::connect(addr, DOMAIN, tls).await.is_err());
}

#[tokio::test]
async fn tls_towards_the_nodes() {
    let certs = Certs::new();
    let node_tls = prg_proxy::tls::server_tls(&TlsConfig {
        cert: certs.dir.path().join("cert.pem"),
        key: certs.dir.path().join("key.pem"),
        sni: vec![],
    })
    .unwrap();
    let mut c1 = SimNodeConfig::new("imp1", DOMAIN, users());
    c1.tls = Some(node_tls.starttls.clone());
    c1.require_tls = true;
    let mut c2 = SimNodeConfig::new("imp2", DOMAIN, users());
    c2.tls = Some(node_tls.direct.clone());
    c2.direct_tls = true;
    let pair = SimPair::start(c1, c2).await.unwrap();
    let ca = certs.dir.path().join("ca.pem").display().to_string();
    let text = config_text(&[pair.nodes[0].addr(), pair.nodes[1].addr()], "balanced", &certs, "")
        .replace(
            "name = \"imp1\"\n",
            &format!("name = \"imp1\"\ntls = \"starttls\"\ntls_roots = \"{ca}\"\ntls_server_name = \"example.com\"\n"),
        )
        .replace(
            "name = \"imp2\"\n",
            &format!("name = \"imp2\"\ntls = \"direct\"\ntls_roots = \"{ca}\"\ntls_server_name = \"example.com\"\n"),
        );
    let proxy = prg_proxy::Proxy::bind(prg_proxy::Config::parse(&text).unwrap())
        .await
        .unwrap();
    let addr = proxy.starttls_addr().unwrap();
    tokio::spawn(proxy.run(std::future::pending()));
    let tls = ClientTls::StartTls {
        config: certs.client.clone(),
        server_name: DOMAIN.into(),
    };
    for (user, node) in [("alice", 0), ("dave", 1)] {
        let mut c = SimClient::connect(addr, DOMAIN, tls.clone()).await.unwrap();
        c.login(user, "pw", "SCRAM-SHA-1").await.unwrap();
        c.bind("r").await.unwrap();
        c.ping().await.unwrap();
        assert_eq!(
            pair.nodes[node].session_count(),
            1,
            "{user} via TLS to node {node}"
        );
    }
}

/// A client over `max_connections` is told so at once (not left waiting in
/// the backlog), and once a slot is free the next client is served.
#[tokio::test]
async fn connection_cap_refuses_extra_clients_at_once_until_a_slot_frees() {
    let g = TestGroup::start_with("balanced", "[limits]\nmax_connections = 1\n", |_| {}).await;
    let first = g.login("alice", "PLAIN", "a").await;
    let mut second = tokio::net::TcpStream::connect(g.starttls).await.unwrap();
    second
        .write_all(b"<stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, second.read_to_end(&mut got))
        .await
        .expect("closed at once")
        .unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("<resource-constraint"), "{got}");
    first.close().await.unwrap();
    let mut served = false;
    for _ in 0..200 {
        if SimClient::connect(g.starttls, DOMAIN, g.starttls_tls())
            .await
            .is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "served once the slot is free");
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_after_its_timeout() {
    let g = TestGroup::start_with(
        "balanced",
        "[limits]\ntls_handshake_timeout = \"300ms\"\n",
        |_| {},
    )
    .await;
    // Connect to the direct-TLS port and never send a ClientHello.
    let mut raw = tokio::net::TcpStream::connect(g.direct).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(T, raw.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the proxy closed the stalled connection");
    assert!(buf.is_empty(), "nothing is sent before a handshake");
    // The listener still serves.
    let tls = ClientTls::Direct {
        config: g.certs.client.clone(),
        server_name: DOMAIN.into(),
    };
    SimClient::connect(g.direct, DOMAIN, tls).await.unwrap();
}
