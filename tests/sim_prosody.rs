//! Optional cross-check of the test client (and of the simulated node's
//! behaviour) against a real Prosody. Runs only when `PRG_PROSODY_ADDR`
//! (e.g. `127.0.0.1:5222`) is set; the server must serve `example.com` with
//! users `alice` and `bob`, password `pw`, plain c2s allowed.

use std::net::SocketAddr;
use std::time::Duration;

use prg_proxy::sim::{ClientError, ClientTls, SimClient};

const D: &str = "example.com";
const T: Duration = Duration::from_secs(5);

fn addr() -> Option<SocketAddr> {
    std::env::var("PRG_PROSODY_ADDR").ok()?.parse().ok()
}

#[tokio::test]
async fn client_against_prosody() {
    let Some(addr) = addr() else {
        eprintln!("PRG_PROSODY_ADDR not set; skipped");
        return;
    };
    let mut bad = SimClient::connect(addr, D, ClientTls::None)
        .await
        .expect("connect");
    match bad.login("alice", "wrong", "SCRAM-SHA-1").await {
        Err(ClientError::SaslFailure { condition, .. }) => assert_eq!(condition, "not-authorized"),
        other => panic!("expected failure, got {other:?}"),
    }
    let mut a = SimClient::connect(addr, D, ClientTls::None)
        .await
        .expect("connect");
    eprintln!("features: {}", a.features_raw());
    a.login("alice", "pw", "SCRAM-SHA-1").await.expect("scram");
    eprintln!("features: {}", a.features_raw());
    let ja = a.bind("desk").await.expect("bind");
    assert_eq!(ja, "alice@example.com/desk");
    let mut b = SimClient::connect(addr, D, ClientTls::None)
        .await
        .expect("connect");
    b.login("bob", "pw", "PLAIN").await.expect("plain");
    let jb = b.bind("").await.expect("bind generated");
    eprintln!("bob bound {jb}");
    let _ = a.roster().await.expect("roster");
    a.ping().await.expect("ping");
    a.send_presence(Some("dnd"), Some("busy"))
        .await
        .expect("presence");
    let echo = a.wait_for(T, |s| s.name == "presence").await.expect("echo");
    eprintln!("echo: {}", echo.raw);
    b.send_presence(None, None).await.expect("presence");
    a.send_message(&jb, "hi bob 😀 <&>").await.expect("message");
    let m = b
        .wait_for(T, |s| s.name == "message")
        .await
        .expect("message");
    eprintln!("message: {}", m.raw);
    assert_eq!(m.body().as_deref(), Some("hi bob 😀 <&>"));
    assert_eq!(m.attr("from"), Some("alice@example.com/desk"));
    a.send_raw("<iq type='get' id='u1'><query xmlns='urn:example:unknown'/></iq>")
        .await
        .expect("send");
    let r = a
        .wait_for(T, |s| s.attr("id") == Some("u1"))
        .await
        .expect("error");
    eprintln!("unknown iq: {}", r.raw);
    assert!(r.has_child("service-unavailable"));
    a.send_message("nobody@example.com", "x")
        .await
        .expect("send");
    let e = a.wait_for(T, |s| s.name == "message").await.expect("error");
    eprintln!("to unknown user: {}", e.raw);
    b.close().await.expect("close");
    let p = a
        .wait_for(T, |s| {
            s.name == "presence" && s.attr("type") == Some("unavailable")
        })
        .await;
    eprintln!("after bob closed: {p:?}");
    a.send_raw("<!DOCTYPE x>").await.expect("send");
    match a.recv(T).await {
        Err(ClientError::StreamError { condition, raw, .. }) => {
            eprintln!("doctype: {condition}: {raw}")
        }
        other => eprintln!("doctype: {other:?}"),
    }
    let mut c = SimClient::connect(addr, D, ClientTls::None)
        .await
        .expect("connect");
    c.login("alice", "pw", "PLAIN").await.expect("plain");
    c.bind("x").await.expect("bind");
    let big = format!(
        "<message to='bob@example.com'><body>{}</body></message>",
        "x".repeat(300_000)
    );
    let _ = c.send_raw(&big).await;
    match c.recv(T).await {
        Err(ClientError::StreamError { condition, raw, .. }) => {
            eprintln!("oversize: {condition}: {raw}")
        }
        other => eprintln!("oversize: {other:?}"),
    }
    let mut d = SimClient::connect(addr, D, ClientTls::None)
        .await
        .expect("connect");
    d.login("alice", "pw", "PLAIN").await.expect("plain");
    d.bind("y").await.expect("bind");
    let mut d2 = SimClient::connect(addr, D, ClientTls::None)
        .await
        .expect("connect");
    d2.login("alice", "pw", "PLAIN").await.expect("plain");
    d2.bind("y").await.expect("bind");
    match d.recv(T).await {
        Err(ClientError::StreamError { condition, raw, .. }) => {
            eprintln!("conflict: {condition}: {raw}")
        }
        other => eprintln!("conflict: {other:?}"),
    }

    for bad in [
        "<!-- c -->",
        "<?pi x?>",
        "<message to='bob@example.com'><body>&foo;</body></message>",
        "<message><body></message>",
        "<foo xmlns='urn:x'/>",
    ] {
        let mut e = SimClient::connect(addr, D, ClientTls::None)
            .await
            .expect("connect");
        e.login("alice", "pw", "PLAIN").await.expect("plain");
        e.bind("").await.expect("bind");
        e.send_raw(bad).await.expect("send");
        match e.recv(T).await {
            Err(ClientError::StreamError { condition, raw, .. }) => {
                eprintln!("{bad}: {condition}: {raw}")
            }
            other => eprintln!("{bad}: {other:?}"),
        }
    }
    match SimClient::connect(addr, "other.org", ClientTls::None).await {
        Err(e) => eprintln!("wrong host: {e:?}"),
        Ok(_) => eprintln!("wrong host: accepted"),
    }
    let mut f = SimClient::connect(addr, D, ClientTls::None)
        .await
        .expect("connect");
    f.send_raw("<message to='bob@example.com'><body>x</body></message>")
        .await
        .expect("send");
    eprintln!("pre-auth stanza: {:?}", f.recv(T).await);

    let mut g = SimClient::connect(addr, D, ClientTls::None)
        .await
        .expect("connect");
    g.send_raw(
        "<iq type='get' id='p1' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq><presence/>",
    )
    .await
    .expect("send");
    eprintln!("pre-auth iq: {:?}", g.recv(T).await);
    eprintln!(
        "pre-auth presence: {:?}",
        g.recv(Duration::from_millis(500)).await
    );
    g.login("alice", "pw", "PLAIN").await.expect("plain");
    g.send_raw("<message to='bob@example.com'><body>x</body></message>")
        .await
        .expect("send");
    eprintln!("pre-bind message: {:?}", g.recv(T).await);
    g.send_raw("<iq type='get' id='p2' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .expect("send");
    eprintln!("pre-bind iq: {:?}", g.recv(T).await);
    let jid = g.bind("").await;
    eprintln!("bind after: {jid:?}");
}
