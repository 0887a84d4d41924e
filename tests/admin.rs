//! The admin HTTP API against a simulated pair: every route and its error
//! cases, the token, and the status page being served.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const FAST: &str = "[srm]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"60s\"\n\
                    initial_heartbeat_timeout = \"120s\"\n";

async fn start(mode: &str, extra: &str) -> TestGroup {
    TestGroup::start_with(mode, &format!("{FAST}{extra}"), |_| {}).await
}

fn base(g: &TestGroup) -> String {
    format!("http://{}", g.admin.expect("the admin API is on"))
}

async fn call(
    g: &TestGroup,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let c = reqwest::Client::new();
    let url = format!("{}{path}", base(g));
    let mut rb = match method {
        "GET" => c.get(&url),
        _ => c.post(&url),
    };
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = tokio::time::timeout(T, rb.send())
        .await
        .expect("answer in time")
        .expect("request sent");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

async fn get(g: &TestGroup, path: &str) -> (u16, Value) {
    call(g, "GET", path, None, None).await
}

async fn post(g: &TestGroup, path: &str, body: Option<&str>) -> (u16, Value) {
    call(g, "POST", path, None, body).await
}

/// Polls `/status` until `f` holds (at most `T`).
async fn status_until(g: &TestGroup, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (code, s) = get(g, "/status").await;
        assert_eq!(code, 200, "{s}");
        if f(&s) {
            return s;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("status never showed {what}: {s:#}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state(s: &Value, i: usize) -> &str {
    s["nodes"][i]["state"].as_str().unwrap_or("")
}

async fn both_normal(g: &TestGroup) -> Value {
    status_until(g, "both nodes Normal", |s| {
        state(s, 0) == "normal" && state(s, 1) == "normal"
    })
    .await
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not a JSON error: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_group_the_nodes_and_the_counters() {
    let mut g = start("balanced", "").await;
    let s = both_normal(&g).await;
    let grp = &s["group"];
    assert_eq!(grp["name"], "test-group");
    assert_eq!(grp["description"], "simulated pair");
    assert_eq!(grp["high_availability"], true);
    assert_eq!(grp["assignment"], "balanced");
    assert_eq!(grp["table_row"], 1);
    assert_eq!(grp["recommended_action"], "Normal. Nothing to do.");
    assert_eq!(grp["can_recover"], false);
    for (i, name) in ["imp1", "imp2"].iter().enumerate() {
        let n = &s["nodes"][i];
        assert_eq!(n["id"], i + 1);
        assert_eq!(n["name"], *name);
        assert_eq!(n["state_text"], "Normal");
        assert_eq!(n["reason_text"], "Normal");
        assert_eq!(n["recommended_action"], "Normal. Nothing to do.");
        assert_eq!(n["can_failover"], true);
        assert_eq!(n["can_fallback"], false);
        assert!(n["pacer_rate"].as_f64().is_some_and(|r| r > 0.0), "{n}");
        assert!(n["logins_per_second"].is_u64(), "{n}");
    }
    assert!(s["pacer"]["pending_relogin_slots"].is_u64());
    assert!(s["hints_issued"].is_u64());
    assert_eq!(s["moves"], json!([]));

    // Sessions per node come from the tracker; logins per second from the
    // sampler, within a couple of seconds.
    let _alice = g.login("alice", "PLAIN", "desk").await;
    let s = status_until(&g, "alice's session and login", |s| {
        s["nodes"][0]["sessions"] == 1 && s["users_online"] == 1
    })
    .await;
    assert_eq!(s["nodes"][1]["sessions"], 0);
    status_until(&g, "a login per second on node 1", |s| {
        s["nodes"][0]["logins_per_second"] == 1
    })
    .await;

    // The page is served, self-contained.
    let r = reqwest::get(format!("{}/", base(&g))).await.expect("page");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html")));
    let html = r.text().await.expect("html");
    assert!(html.contains("fetch(\"/status\""), "polls /status");
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no external resources"
    );

    // Unknown routes and wrong methods are JSON errors.
    let (code, v) = get(&g, "/nope").await;
    assert_eq!(code, 404);
    error_of(&v);
    let (code, v) = post(&g, "/status", None).await;
    assert_eq!(code, 405);
    error_of(&v);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_fallback_and_their_refusals() {
    let mut g = start("balanced", "").await;
    both_normal(&g).await;
    let mut alice = g.login("alice", "PLAIN", "desk").await;
    assert_eq!(g.view.home("alice@example.com"), Ok(N1));

    // Unknown nodes: 404, by name or number.
    for path in [
        "/failover/imp9",
        "/failover/3",
        "/fallback/imp9",
        "/fallback/0",
    ] {
        let (code, v) = post(&g, path, None).await;
        assert_eq!(code, 404, "{path}: {v}");
        assert!(error_of(&v).contains("imp1, imp2"), "{v}");
    }
    // Fallback from Normal: refused by the state machine.
    let (code, v) = post(&g, "/fallback/imp1", None).await;
    assert_eq!(code, 409, "{v}");
    assert!(error_of(&v).contains("Idle or Failed Over"), "{v}");
    // Recovery needs both nodes failed.
    let (code, v) = post(&g, "/recover", None).await;
    assert_eq!(code, 409, "{v}");
    error_of(&v);

    let (code, v) = post(&g, "/failover/imp1", None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["ok"], true);
    let s = status_until(&g, "node 1 Idle, node 2 in backup mode", |s| {
        state(s, 0) == "idle" && state(s, 1) == "running_in_backup_mode"
    })
    .await;
    assert_eq!(s["group"]["table_row"], 3);
    assert_eq!(s["nodes"][0]["can_fallback"], true);
    assert_eq!(s["nodes"][0]["can_failover"], false);
    assert_eq!(s["nodes"][1]["can_failover"], false);
    assert_eq!(s["nodes"][1]["serves_users_of"], json!([1, 2]));
    // alice was evicted with a hint.
    let e = alice
        .recv(T)
        .await
        .expect_err("alice's stream is closed by the failover");
    assert!(e.relogin().is_some(), "{e}");
    // The move is on the timeline.
    let s = status_until(&g, "the failover on the timeline", |s| {
        s["moves"].as_array().is_some_and(|m| !m.is_empty())
    })
    .await;
    let m = &s["moves"][0];
    assert_eq!(m["users_of"], 1);
    assert_eq!(m["from"], 1);
    assert_eq!(m["to"], 2);
    assert_eq!(m["why"], "failover");
    assert_eq!(m["evicted"], 1);
    assert!(m["planned_rate"].as_f64().is_some_and(|r| r > 0.0), "{m}");
    assert!(s["hints_issued"].as_u64().is_some_and(|n| n >= 1));

    // Failover of a node that is not Normal: 409.
    let (code, v) = post(&g, "/failover/1", None).await;
    assert_eq!(code, 409, "{v}");
    assert!(error_of(&v).contains("Normal"), "{v}");
    // Users cannot be added while failed over.
    let (code, v) = post(
        &g,
        "/users",
        Some(r#"{"jid":"frank@example.com","node":"imp1"}"#),
    )
    .await;
    assert_eq!(code, 409, "{v}");
    assert!(error_of(&v).contains("failed over"), "{v}");
    let (code, v) = post(&g, "/users/frank@example.com/move", Some(r#"{"node":2}"#)).await;
    assert_eq!(code, 409, "{v}");

    let (code, v) = post(&g, "/fallback/imp1", None).await;
    assert_eq!(code, 200, "{v}");
    both_normal(&g).await;
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_can_be_looked_up_added_and_moved() {
    let mut g = start("balanced", "").await;
    both_normal(&g).await;
    let mut alice = g.login("alice", "PLAIN", "phone").await;

    let (code, v) = get(&g, "/users/Alice@Example.com").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["jid"], "alice@example.com");
    assert_eq!(v["home"], 1);
    assert_eq!(v["home_name"], "imp1");
    let sessions = v["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 1, "{v}");
    assert_eq!(sessions[0]["resource"], "phone");
    assert_eq!(sessions[0]["node"], 1);
    assert_eq!(sessions[0]["node_name"], "imp1");
    assert!(sessions[0]["presence"]["available"].is_boolean());
    // Someone not online: a home, no sessions.
    let (code, v) = get(&g, "/users/bob@example.com").await;
    assert_eq!(code, 200);
    assert_eq!(v["sessions"], json!([]));
    // Not a JID: 400.
    let (code, v) = get(&g, "/users/no%20at%20sign").await;
    assert_eq!(code, 400, "{v}");
    error_of(&v);

    // Adding: bad JSON, missing or unknown fields, bad node, bad JID.
    for (body, want) in [
        ("{not json", 400),
        (r#"{"jid":"frank@example.com"}"#, 400),
        (r#"{"jid":"frank@example.com","node":"imp1","x":1}"#, 400),
        (r#"{"jid":"frank@example.com","node":true}"#, 400),
        (r#"{"jid":"frank@example.com","node":"imp9"}"#, 404),
        (r#"{"jid":"a b@example.com","node":"imp1"}"#, 400),
    ] {
        let (code, v) = post(&g, "/users", Some(body)).await;
        assert_eq!(code, want, "{body}: {v}");
        error_of(&v);
    }
    let (code, v) = post(
        &g,
        "/users",
        Some(r#"{"jid":"Frank@example.com","node":"imp2"}"#),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["home"], 2);
    assert_eq!(g.view.home("frank@example.com"), Ok(N2));
    let (code, _) = post(
        &g,
        "/users",
        Some(r#"{"jid":"frank@example.com","node":1}"#),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(g.view.home("frank@example.com"), Ok(N1));

    // Moving alice to node 2: her home is pinned there and her stream on
    // node 1 ends with a re-login hint.
    for (body, want) in [("[]", 400), (r#"{"node":"imp9"}"#, 404)] {
        let (code, v) = post(&g, "/users/alice@example.com/move", Some(body)).await;
        assert_eq!(code, want, "{body}: {v}");
        error_of(&v);
    }
    let (code, v) = post(
        &g,
        "/users/alice@example.com/move",
        Some(r#"{"node":"imp2"}"#),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["home"], 2);
    assert_eq!(v["evicted"], 1);
    assert_eq!(g.view.home("alice@example.com"), Ok(N2));
    let e = alice.recv(T).await.expect_err("alice's stream is closed");
    let hint = e.relogin().unwrap_or_else(|| panic!("a hint: {e}"));
    assert!(format!("{e}").contains("moves to node imp2"), "{e}");
    drop(hint);
    let s = status_until(&g, "the user move on the timeline", |s| {
        s["moves"].as_array().is_some_and(|m| !m.is_empty())
    })
    .await;
    assert_eq!(s["moves"][0]["why"], "move");
    assert_eq!(s["moves"][0]["to"], 2);
    assert_eq!(s["moves"][0]["evicted"], 1);
    // Moving someone who is not online only pins the home.
    let (code, v) = post(&g, "/users/bob@example.com/move", Some(r#"{"node":"2"}"#)).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["evicted"], 0);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_standby_refuses_adding_users() {
    let mut g = start("active-standby", "").await;
    both_normal(&g).await;
    let (code, v) = post(
        &g,
        "/users",
        Some(r#"{"jid":"frank@example.com","node":"imp2"}"#),
    )
    .await;
    assert_eq!(code, 409, "{v}");
    assert!(error_of(&v).contains("active-standby"), "{v}");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_every_mutating_call() {
    let mut g = start(
        "balanced",
        "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret-token\"\n",
    )
    .await;
    both_normal(&g).await;
    let calls: [(&str, Option<&str>); 5] = [
        ("/failover/imp1", None),
        ("/fallback/imp1", None),
        ("/recover", None),
        (
            "/users",
            Some(r#"{"jid":"frank@example.com","node":"imp1"}"#),
        ),
        ("/users/frank@example.com/move", Some(r#"{"node":"imp1"}"#)),
    ];
    for (path, body) in calls {
        for token in [None, Some("wrong"), Some("s3cret-token2"), Some("")] {
            let (code, v) = call(&g, "POST", path, token, body).await;
            assert_eq!(code, 401, "{path} with {token:?}: {v}");
            error_of(&v);
        }
    }
    // The check comes before the body is read: bad JSON without a token
    // is still 401.
    let (code, _) = call(&g, "POST", "/users", None, Some("{bad")).await;
    assert_eq!(code, 401);
    // With the token the calls go through (to the state machine's answer).
    let (code, v) = call(&g, "POST", "/recover", Some("s3cret-token"), None).await;
    assert_eq!(code, 409, "{v}");
    let (code, v) = call(
        &g,
        "POST",
        "/users",
        Some("s3cret-token"),
        Some(r#"{"jid":"frank@example.com","node":"imp2"}"#),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    // Reads need no token.
    let (code, _) = get(&g, "/status").await;
    assert_eq!(code, 200);
    let (code, _) = get(&g, "/users/frank@example.com").await;
    assert_eq!(code, 200);
    g.stop().await;
}

#[tokio::test]
async fn the_api_can_be_switched_off_and_a_taken_port_is_a_start_error() {
    let certs = Certs::new();
    let nodes = [
        "127.0.0.1:15222".parse().expect("addr"),
        "127.0.0.1:15223".parse().expect("addr"),
    ];
    let off = config_text(&nodes, "balanced", &certs, "[admin]\nenabled = false\n");
    let proxy = prg_proxy::Proxy::bind(prg_proxy::Config::parse(&off).expect("config"))
        .await
        .expect("binds");
    assert_eq!(proxy.admin_addr(), None);
    drop(proxy);

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let text = config_text(
        &nodes,
        "balanced",
        &certs,
        &format!("[admin]\nlisten = \"{addr}\"\n"),
    );
    match prg_proxy::Proxy::bind(prg_proxy::Config::parse(&text).expect("config")).await {
        Err(prg_proxy::proxy::StartError::Bind { addr: a, .. }) => assert_eq!(a, addr),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("bound a taken port"),
    }
    // Off loopback without a token: a config error naming admin.token.
    let open = config_text(
        &nodes,
        "balanced",
        &certs,
        "[admin]\nlisten = \"0.0.0.0:0\"\n",
    );
    match prg_proxy::Proxy::bind(prg_proxy::Config::parse(&open).expect("parses")).await {
        Err(prg_proxy::proxy::StartError::Config(e)) => assert_eq!(e.key, "admin.token"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("started an open admin API without a token"),
    }
}

/// `GET /metrics` serves the Prometheus text format, parseable, with the
/// sessions of a user who logged in counted on its node.
#[tokio::test]
async fn metrics_are_served_in_the_prometheus_text_format() {
    let mut g = start("active-standby", "").await;
    let _alice = g.login("alice", "PLAIN", "desk").await;
    let r = reqwest::get(format!("{}/metrics", base(&g)))
        .await
        .expect("request sent");
    assert_eq!(r.status().as_u16(), 200);
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ctype.starts_with("application/openmetrics-text") || ctype.starts_with("text/plain"),
        "{ctype}"
    );
    let text = r.text().await.expect("body");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parses");
    let sessions = scrape
        .samples
        .iter()
        .find(|s| s.metric.contains("sessions") && s.labels.get("node") == Some("imp1"))
        .unwrap_or_else(|| panic!("no sessions sample for imp1 in\n{text}"));
    match sessions.value {
        prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => {
            assert_eq!(v, 1.0)
        }
        ref other => panic!("{other:?}"),
    }
    g.stop().await;
}
