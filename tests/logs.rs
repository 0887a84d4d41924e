//! What a connection logs at info (finding 8 and 11 of the hardening
//! issue): one `logged in` line with user and node, the `user` field once
//! per line, and nothing at info for a client that ends TLS without
//! close_notify.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use common::*;
use prg_proxy::sim::{ClientError, SimClient};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// The proxy runs on this test's thread (current-thread runtime), so a
/// thread-local subscriber sees all of it.
#[tokio::test]
async fn info_logs_one_login_line_the_user_once_and_no_close_notify_noise() {
    let out = Captured::default();
    let w = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let certs = Certs::new();
    let f = certs.dir.path().join("users.toml");
    std::fs::write(&f, "[users]\n\"alice@example.com\" = \"imp1\"\n").unwrap();
    let pair = prg_proxy::sim::SimPair::start(
        prg_proxy::sim::SimNodeConfig::new("imp1", DOMAIN, users()),
        prg_proxy::sim::SimNodeConfig::new("imp2", DOMAIN, users()),
    )
    .await
    .unwrap();
    let text = config_text(
        &[pair.nodes[0].addr(), pair.nodes[1].addr()],
        "none",
        &certs,
        "",
    )
    .replace(
        "domains = [\"example.com\"]",
        &format!(
            "domains = [\"example.com\"]\nassignment_file = \"{}\"",
            f.display()
        ),
    );
    let g = TestGroup::launch(pair, certs, &text).await;

    // A refused login: its line names the user once.
    let mut c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls())
        .await
        .unwrap();
    assert!(matches!(
        c.login("bob", "pw", "PLAIN").await,
        Err(ClientError::SaslFailure { .. })
    ));
    // A login: one info line with user and node.
    c.login("alice", "pw", "PLAIN").await.unwrap();
    c.bind("desk").await.unwrap();
    // Gone without close_notify (the TLS stream is dropped, not shut down).
    drop(c);
    assert!(
        eventually(T, || g.view.metrics.connections_active.load(Relaxed) == 0).await,
        "the connection ended"
    );

    let lines = out.lines();
    let all = lines.join("\n");
    let refused: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("login refused: not assigned"))
        .collect();
    assert_eq!(refused.len(), 1, "{all}");
    assert_eq!(refused[0].matches("user=").count(), 1, "{all}");
    let logged_in: Vec<_> = lines.iter().filter(|l| l.contains("logged in")).collect();
    assert_eq!(logged_in.len(), 1, "{all}");
    assert!(
        logged_in[0].contains("alice@example.com") && logged_in[0].contains("imp1"),
        "{all}"
    );
    assert_eq!(logged_in[0].matches("user=").count(), 1, "{all}");
    assert!(
        !all.contains("close_notify") && !all.contains("connection closed"),
        "{all}"
    );
}
