//! What an idle relayed session holds besides its task and its tracker
//! entry: the client-facing rustls state (after the handshake and one
//! record each way, as in an idle logged-in session) and the two framers.
//! Measured with a counting allocator (requested bytes, not allocator
//! overhead); printed for `benches/README.md`'s memory split, with a loose
//! bound so that a large regression shows.

// Shared with the benches; only the live-bytes counter is used here.
#[allow(dead_code)]
#[path = "../benches/common/alloc.rs"]
mod alloc;

use std::io::{Read, Write};
use std::sync::Arc;

use prg_proxy::xmpp::framer::Framer;
use tokio_rustls::rustls::{self, ClientConnection, ServerConnection};

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

/// Moves every TLS byte `from` has to send into `to`.
fn pump(
    from: &mut rustls::ConnectionCommon<impl Sized>,
    to: &mut rustls::ConnectionCommon<impl Sized>,
) -> usize {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).expect("write_tls into a Vec");
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls from a slice");
        to.process_new_packets().expect("valid TLS");
    }
    wire.len()
}

fn session(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> ServerConnection {
    let name = rustls_pki_types::ServerName::try_from("example.com").expect("a DNS name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        pump(&mut *c, &mut *s);
        pump(&mut *s, &mut *c);
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    // One stanza each way, read out as the relay does.
    c.writer().write_all(b"<presence/>").expect("client write");
    pump(&mut *c, &mut *s);
    let mut got = [0u8; 64];
    let n = s.reader().read(&mut got).expect("plaintext");
    assert_eq!(&got[..n], b"<presence/>");
    s.writer().write_all(b"<presence/>").expect("server write");
    pump(&mut *s, &mut *c);
    s
}

#[test]
fn idle_session_state_bytes() {
    let d = prg_proxy::tls::dev_certs(&["example.com"]).expect("dev certs");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("c.pem"), &d.chain_pem).expect("cert");
    std::fs::write(dir.path().join("k.pem"), &d.key_pem).expect("key");
    let server = prg_proxy::tls::server_tls(&prg_proxy::config::TlsConfig {
        cert: dir.path().join("c.pem"),
        key: dir.path().join("k.pem"),
        sni: Vec::new(),
    })
    .expect("server config")
    .starttls;
    let client = prg_proxy::tls::client_config_from_der(prg_proxy::tls::certs_from_pem(&d.ca_pem))
        .expect("client config");
    // Fill the server's session cache first (bounded, shared by all
    // sessions): what is left is per session.
    for _ in 0..300 {
        drop(session(&client, &server));
    }
    const N: usize = 64;
    let before = alloc::live_bytes();
    let held: Vec<Box<ServerConnection>> = (0..N)
        .map(|_| Box::new(session(&client, &server)))
        .collect();
    let tls = (alloc::live_bytes() - before) / N;
    let before = alloc::live_bytes();
    let framers: Vec<Box<(Framer, Framer)>> = (0..N)
        .map(|_| {
            let mut f = (
                Framer::in_open_stream(262_144),
                Framer::in_open_stream(262_144),
            );
            for x in [&mut f.0, &mut f.1] {
                let stanza = b"<message to='a@b/c'><body>x</body><thread>t</thread></message>";
                assert!(matches!(x.next(stanza), Ok(Some(_))));
            }
            Box::new(f)
        })
        .collect();
    let framer = (alloc::live_bytes() - before) / N;
    println!(
        "SUMMARY memory split: client TLS state {tls} B per idle session (rustls ServerConnection {} B inline), two framers {framer} B",
        std::mem::size_of::<ServerConnection>()
    );
    drop((held, framers));
    assert!(tls < 16 * 1024, "idle TLS state {tls} B");
    assert!(framer < 1024, "idle framers {framer} B");
}
