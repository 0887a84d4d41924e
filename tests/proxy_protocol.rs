//! PROXY protocol v2 towards nodes: a node with `proxy_protocol = true`
//! learns each relayed client's real address; heartbeats say `LOCAL`.

mod common;

use common::*;

#[tokio::test]
async fn nodes_learn_the_real_client_address() {
    let pair = prg_proxy::sim::SimPair::start(
        {
            let mut c = prg_proxy::sim::SimNodeConfig::new("imp1", DOMAIN, users());
            c.proxy_protocol = true;
            c
        },
        {
            let mut c = prg_proxy::sim::SimNodeConfig::new("imp2", DOMAIN, users());
            c.proxy_protocol = true;
            c
        },
    )
    .await
    .unwrap();
    let certs = Certs::new();
    let text = config_text(
        &[pair.nodes[0].addr(), pair.nodes[1].addr()],
        "balanced",
        &certs,
        "",
    )
    .replace("\"\n\n[[nodes]]", "\"\nproxy_protocol = true\n\n[[nodes]]")
    .replace("\"\n\n[listen]", "\"\nproxy_protocol = true\n\n[listen]");
    assert_eq!(text.matches("proxy_protocol = true").count(), 2, "{text}");
    let mut g = TestGroup::launch(pair, certs, &text).await;

    let mut clients = Vec::new();
    for u in ["alice", "bob", "carol", "dave"] {
        let c = g.login(u, "PLAIN", "r").await;
        let home = g.view.home(&format!("{u}@{DOMAIN}")).unwrap();
        let me = c.local_addr().unwrap();
        let node = &g.pair.nodes[home.index()];
        assert!(
            node.client_addrs().contains(&me),
            "{} learned {:?}, the client is {me}",
            node.name(),
            node.client_addrs()
        );
        assert!(!g.pair.nodes[home.peer().index()]
            .client_addrs()
            .contains(&me));
        clients.push(c);
    }
    // The proxy's own heartbeats name the proxy's address (not LOCAL,
    // which ejabberd never answers), and the nodes answer them.
    let mine: Vec<std::net::SocketAddr> = clients.iter().filter_map(|c| c.local_addr()).collect();
    let ok = eventually(T, || {
        g.pair
            .nodes
            .iter()
            .all(|n| n.client_addrs().iter().any(|a| !mine.contains(a)))
    })
    .await;
    assert!(ok, "no header from the heartbeats");
    assert!(g.pair.nodes.iter().all(|n| n.local_headers() == 0));
    assert!(g
        .view
        .group
        .current()
        .nodes
        .iter()
        .all(|n| n.state == prg_proxy::group::NodeState::Normal));
    for mut c in clients {
        c.ping().await.unwrap();
    }
    g.stop().await;
}
