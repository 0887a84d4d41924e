//! The `prg-proxy` binary: config errors exit 64 naming the key; SIGTERM
//! drains connections with `<system-shutdown/>`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use prg_proxy::sim::{ClientError, SimClient, SimNodeConfig, SimPair};

const BIN: &str = env!("CARGO_BIN_EXE_prg-proxy");

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("proxy.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn good_config(certs: &Certs) -> String {
    config_text(
        &[
            "127.0.0.1:15222".parse().unwrap(),
            "127.0.0.1:15223".parse().unwrap(),
        ],
        "balanced",
        certs,
        "",
    )
}

fn check(text: &str, certs: &Certs) -> (i32, String) {
    let p = write_config(certs.dir.path(), text);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_good_config_checks() {
    let certs = Certs::new();
    let (code, err) = check(&good_config(&certs), &certs);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_bad_group_name_exits_64_naming_the_key() {
    let certs = Certs::new();
    let text = good_config(&certs).replace("name = \"test-group\"", "name = \"bad name!\"");
    let (code, err) = check(&text, &certs);
    assert_eq!(code, 64);
    assert!(err.contains("`group.name`"), "{err}");
    // `run` refuses the same way, before binding anything.
    let p = write_config(certs.dir.path(), &text);
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`group.name`"));
}

#[test]
fn other_config_errors_exit_64_naming_the_key() {
    let certs = Certs::new();
    let base = good_config(&certs);
    let cases = [
        (
            base.replace("description = \"simulated pair\"", "description = \"a<b\""),
            "group.description",
        ),
        (
            base.replace("high_availability", "high_availabilty"),
            "high_availabilty",
        ),
        (
            base.replace(&certs.cert(), "/nonexistent/cert.pem"),
            "tls.cert",
        ),
        (
            format!("{base}\n[[nodes]]\nname = \"imp3\"\naddress = \"127.0.0.1:1\"\n"),
            "nodes",
        ),
        (
            base.replace("name = \"imp2\"", "name = \"imp1\""),
            "nodes[1].name",
        ),
    ];
    for (text, key) in cases {
        let p = write_config(certs.dir.path(), &text);
        let out = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {err}");
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
    }
}

/// Never leaves a proxy running when a test fails.

// Multi-threaded: the test blocks a thread reading the proxy's log while
// the simulated nodes must keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_system_shutdown() {
    let pair = SimPair::start(
        SimNodeConfig::new("imp1", DOMAIN, users()),
        SimNodeConfig::new("imp2", DOMAIN, users()),
    )
    .await
    .unwrap();
    let certs = Certs::new();
    let (mut proxy, addr, _) =
        ProxyProcess::in_front_of(&pair, &certs, "[limits]\nshutdown_grace = \"5s\"\n");
    let child = &mut proxy.child;
    let rx = &proxy.lines;
    let tls = prg_proxy::sim::ClientTls::StartTls {
        config: certs.client.clone(),
        server_name: DOMAIN.into(),
    };
    let mut alice = SimClient::connect(addr, DOMAIN, tls.clone()).await.unwrap();
    alice.login("alice", "pw", "PLAIN").await.unwrap();
    alice.bind("a").await.unwrap();
    let mut dave = SimClient::connect(addr, DOMAIN, tls).await.unwrap();
    dave.login("dave", "pw", "PLAIN").await.unwrap();
    dave.bind("d").await.unwrap();

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for c in [&mut alice, &mut dave] {
        match c.recv(T).await {
            Err(ClientError::StreamError { condition, .. }) => {
                assert_eq!(condition, "system-shutdown")
            }
            other => panic!("expected system-shutdown, got {other:?}"),
        }
    }
    // The process exits by itself, well within the grace period, with 0.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(std::time::Instant::now() < deadline, "proxy did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0));
    let log: Vec<String> = rx.try_iter().collect();
    assert!(
        log.iter().any(|l| l.contains("all connections closed")),
        "{log:?}"
    );
}

/// Runs the binary with `args` and returns (exit code, stdout, stderr).
async fn prg(args: &[&str], token_env: Option<&str>) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).env_remove("PRG_PROXY_TOKEN");
    if let Some(t) = token_env {
        cmd.env("PRG_PROXY_TOKEN", t);
    }
    let out = tokio::time::timeout(T, cmd.output())
        .await
        .expect("the CLI ends in time")
        .expect("the CLI runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_drive_a_running_proxy() {
    use prg_proxy::group::NodeState;
    let mut g = TestGroup::start_with(
        "balanced",
        "[srm]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"60s\"\n\
         initial_heartbeat_timeout = \"120s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"cli-token\"\n",
        |_| {},
    )
    .await;
    let url = format!("http://{}", g.admin.expect("admin API"));
    let mut rx = g.view.group_status();
    let normal = |s: &prg_proxy::group::GroupStatus| {
        NodeId::ALL
            .iter()
            .all(|n| s.state(*n).0 == NodeState::Normal && s.move_in_progress.is_none())
    };
    tokio::time::timeout(T, rx.wait_for(normal))
        .await
        .expect("Normal")
        .expect("monitor");
    let _alice = g.login("alice", "PLAIN", "desk").await;

    let (code, out, err) = prg(&["status", "--admin", &url], None).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("group test-group"), "{out}");
    assert!(out.contains("imp1") && out.contains("imp2"), "{out}");
    assert!(out.contains("Normal"), "{out}");
    assert!(out.contains("Table 2 row 1"), "{out}");
    let (code, out, err) = prg(&["status", "--json", "--admin", &url], None).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["nodes"][0]["state"], "normal");

    let (code, out, err) = prg(&["user", "alice@example.com", "--admin", &url], None).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("home imp1") && out.contains("desk"), "{out}");

    // Refusals exit 2: no token, a wrong one, an unknown node, a fallback
    // from Normal.
    let (code, _, err) = prg(&["failover", "imp1", "--admin", &url], None).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = prg(
        &["failover", "imp1", "--admin", &url, "--token", "nope"],
        None,
    )
    .await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = prg(&["failover", "imp9", "--admin", &url], Some("cli-token")).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = prg(&["fallback", "1", "--admin", &url], Some("cli-token")).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("409"), "{err}");

    // The token from the environment; failover then fallback.
    let (code, out, err) = prg(&["failover", "imp1", "--admin", &url], Some("cli-token")).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("failover of imp1 accepted"), "{out}");
    tokio::time::timeout(
        T,
        rx.wait_for(|s| {
            s.state(N1).0 == NodeState::Idle && s.state(N2).0 == NodeState::RunningInBackupMode
        }),
    )
    .await
    .expect("failed over")
    .expect("monitor");
    let (code, _, err) = prg(
        &["add-user", "frank@example.com", "imp2", "--admin", &url],
        Some("cli-token"),
    )
    .await;
    assert_eq!(code, 2, "refused while failed over: {err}");
    let (code, _, err) = prg(
        &["fallback", "imp1", "--admin", &url, "--token", "cli-token"],
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    tokio::time::timeout(T, rx.wait_for(normal))
        .await
        .expect("Normal again")
        .expect("monitor");
    let (code, out, err) = prg(
        &["add-user", "frank@example.com", "2", "--admin", &url],
        Some("cli-token"),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("home imp2"), "{out}");
    assert_eq!(g.view.home("frank@example.com"), Ok(N2));
    let (code, out, err) = prg(
        &["move-user", "bob@example.com", "imp2", "--admin", &url],
        Some("cli-token"),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bob@example.com moved"), "{out}");
    assert_eq!(g.view.home("bob@example.com"), Ok(N2));
    let (code, _, err) = prg(&["recover", "--admin", &url], Some("cli-token")).await;
    assert_eq!(code, 2, "nothing to recover: {err}");

    // Unreachable: exit 3.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let (code, _, err) = prg(&["status", "--admin", &format!("http://{closed}")], None).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    g.stop().await;
}

/// Finding 4: `check` loads the certificates and keys and checks the
/// listeners as `run` does: each case is refused by both, naming the key.
#[test]
fn check_refuses_everything_run_refuses() {
    let certs = Certs::new();
    let other = Certs::new();
    let base = good_config(&certs);
    let not_pem = certs.dir.path().join("not.pem");
    std::fs::write(&not_pem, "this is no certificate\n").unwrap();
    let listen = "starttls = \"127.0.0.1:0\"\ndirect_tls = \"127.0.0.1:0\"";
    let cases = [
        (
            base.replace(&certs.cert(), "/nonexistent/cert.pem"),
            "tls.cert",
        ),
        (base.replace(&certs.key(), &other.key()), "tls.key"),
        (
            base.replace(&certs.cert(), &not_pem.display().to_string()),
            "tls.cert",
        ),
        (
            base.replace(&certs.cert(), &certs.dir.path().display().to_string()),
            "tls.cert",
        ),
        (
            base.replace(
                listen,
                "starttls = \"127.0.0.1:45999\"\ndirect_tls = \"127.0.0.1:45999\"",
            ),
            "listen.direct_tls",
        ),
        (
            base.replace(
                "[listen]",
                "[limits]\nmax_connections = \"lots\"\n\n[listen]",
            ),
            "limits.max_connections",
        ),
    ];
    for (text, key) in cases {
        assert_ne!(text, base, "{key}: the case changes the config");
        let (code, err) = check(&text, &certs);
        assert_eq!(code, 64, "check, {key}: {err}");
        assert!(err.contains(&format!("`{key}`")), "check, {key}: {err}");
        let p = write_config(certs.dir.path(), &text);
        let out = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "run, {key}: {err}");
        assert!(err.contains(&format!("`{key}`")), "run, {key}: {err}");
    }
}

/// `--log-format json`: every line the proxy logs is one JSON object, and a
/// login's lines carry the connection span's fields (client address, user,
/// node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_connection_fields() {
    let pair = SimPair::start(
        SimNodeConfig::new("imp1", DOMAIN, users()),
        SimNodeConfig::new("imp2", DOMAIN, users()),
    )
    .await
    .unwrap();
    let certs = Certs::new();
    let text = config_text(
        &[pair.nodes[0].addr(), pair.nodes[1].addr()],
        "active-standby",
        &certs,
        "",
    )
    .replace("direct_tls = \"127.0.0.1:0\"\n", "");
    let p = write_config(certs.dir.path(), &text);
    let proxy = ProxyProcess::spawn(
        &["--log-format", "json"],
        &p,
        "info,prg_proxy::connection=debug",
    );
    let rx = &proxy.lines;
    let next = || -> serde_json::Value {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("no log line ({e})"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    // Where the STARTTLS listener is.
    let addr: std::net::SocketAddr = loop {
        let v = next();
        let f = &v["fields"];
        if f["message"] == "listening" && f["tls"] == "starttls" {
            break f["addr"].as_str().unwrap_or_default().parse().unwrap();
        }
    };
    let tls = prg_proxy::sim::ClientTls::StartTls {
        config: certs.client.clone(),
        server_name: DOMAIN.into(),
    };
    let mut c = SimClient::connect(addr, DOMAIN, tls).await.unwrap();
    c.login("alice", "pw", "PLAIN").await.unwrap();
    c.bind("desk").await.unwrap();
    c.close().await.unwrap();
    // The connection's close (at debug) is logged inside its span, all
    // fields set.
    loop {
        let v = next();
        if v["fields"]["message"] == "connection closed" {
            let span = &v["span"];
            assert_eq!(span["user"], "alice@example.com", "{v}");
            assert_eq!(span["node"], "imp1", "{v}");
            assert!(span["client.addr"].as_str().is_some(), "{v}");
            break;
        }
    }
}
