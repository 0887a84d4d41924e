//! Node addresses from DNS SRV, answered by a DNS server the test runs on
//! loopback (no Internet needed).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

use common::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use prg_proxy::config::DnsConfig;
use prg_proxy::sim::{SimClient, SimNodeConfig, SimPair};
use prg_proxy::upstream::Dns;
use tokio::net::UdpSocket;

/// A one-zone DNS server: SRV records for `_xmpp-client._tcp.<domain>`
/// and A records for their targets (all 127.0.0.1).
async fn dns_server(srv: Vec<(&'static str, u16, u16, u16, &'static str)>) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new();
            r.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_op_code(q.op_code())
                .set_recursion_desired(q.recursion_desired())
                .set_recursion_available(true)
                .set_authoritative(true);
            let mut found = false;
            for query in q.queries() {
                r.add_query(query.clone());
                let qname = query.name().to_ascii();
                for (owner, prio, weight, port, target) in &srv {
                    if query.query_type() == RecordType::SRV && qname == *owner {
                        found = true;
                        r.add_answer(Record::from_rdata(
                            query.name().clone(),
                            60,
                            RData::SRV(SRV::new(
                                *prio,
                                *weight,
                                *port,
                                Name::from_str(target).unwrap(),
                            )),
                        ));
                    }
                    if query.query_type() == RecordType::A && qname == *target {
                        found = true;
                        r.add_answer(Record::from_rdata(
                            query.name().clone(),
                            60,
                            RData::A(A(Ipv4Addr::LOCALHOST)),
                        ));
                    }
                }
            }
            if !found {
                r.set_response_code(ResponseCode::NXDomain);
            }
            if let Ok(bytes) = r.to_vec() {
                let _ = sock.send_to(&bytes, peer).await;
            }
        }
    });
    addr
}

#[tokio::test]
async fn srv_records_resolve_in_priority_order() {
    let dns = dns_server(vec![
        (
            "_xmpp-client._tcp.example.com.",
            20,
            0,
            6000,
            "backup.example.com.",
        ),
        (
            "_xmpp-client._tcp.example.com.",
            10,
            5,
            5000,
            "primary.example.com.",
        ),
    ])
    .await;
    let d = Dns::new(&DnsConfig { servers: vec![dns] }).unwrap();
    let addrs = d.srv("example.com").await.unwrap();
    assert_eq!(
        addrs,
        [
            SocketAddr::from(([127, 0, 0, 1], 5000)),
            SocketAddr::from(([127, 0, 0, 1], 6000))
        ]
    );
    let e = d.srv("nowhere.example").await.unwrap_err();
    assert!(!e.is_empty());
}

#[tokio::test]
async fn a_node_given_by_srv_serves_logins() {
    let pair = SimPair::start(
        SimNodeConfig::new("imp1", DOMAIN, users()),
        SimNodeConfig::new("imp2", DOMAIN, users()),
    )
    .await
    .unwrap();
    let p1 = pair.nodes[0].addr().port();
    let p2 = pair.nodes[1].addr().port();
    let dns = dns_server(vec![
        (
            "_xmpp-client._tcp.node1.example.net.",
            0,
            0,
            p1,
            "imp1.example.net.",
        ),
        (
            "_xmpp-client._tcp.node2.example.net.",
            0,
            0,
            p2,
            "imp2.example.net.",
        ),
    ])
    .await;
    let certs = Certs::new();
    let text = format!(
        "[group]\nname = \"srv\"\nassignment = \"balanced\"\ndomains = [\"{DOMAIN}\"]\n\n\
         [[nodes]]\nname = \"imp1\"\nsrv = \"node1.example.net\"\n\n\
         [[nodes]]\nname = \"imp2\"\nsrv = \"node2.example.net\"\n\n\
         [listen]\nstarttls = \"127.0.0.1:0\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [dns]\nservers = [\"{dns}\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        certs.cert(),
        certs.key()
    );
    let proxy = prg_proxy::Proxy::bind(prg_proxy::Config::parse(&text).unwrap())
        .await
        .unwrap();
    let addr = proxy.starttls_addr().unwrap();
    tokio::spawn(proxy.run(std::future::pending()));
    let tls = prg_proxy::sim::ClientTls::StartTls {
        config: certs.client.clone(),
        server_name: DOMAIN.into(),
    };
    for (user, node) in [("alice", 0), ("dave", 1)] {
        let mut c = SimClient::connect(addr, DOMAIN, tls.clone()).await.unwrap();
        c.login(user, "pw", "SCRAM-SHA-1").await.unwrap();
        c.bind("r").await.unwrap();
        assert_eq!(pair.nodes[node].session_count(), 1, "{user} on node {node}");
    }
}
