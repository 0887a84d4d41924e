//! The Prometheus exposition: parsed with a Prometheus text parser, its
//! values match what the proxy knows after real logins.

mod common;

use common::*;
use prometheus_parse::{Scrape, Value};

fn scrape(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

fn value(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        other => panic!("unexpected value {other:?}"),
    }
}

/// The value of `metric` with `label` = `val` (or the unlabelled one).
fn get(s: &Scrape, metric: &str, label: Option<(&str, &str)>) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && label.map_or(true, |(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| value(&x.value))
}

#[tokio::test]
async fn metrics_show_sessions_and_logins_per_node() {
    let mut g = TestGroup::start().await;
    let users = ["alice", "bob", "carol", "dave"];
    let mut clients = Vec::new();
    for u in users {
        clients.push(g.login(u, "PLAIN", "r").await);
    }
    let mut want = [0.0f64; 2];
    for u in users {
        want[g.view.home(&format!("{u}@{DOMAIN}")).unwrap().index()] += 1.0;
    }
    let names = ["imp1", "imp2"];
    let ok = eventually(T, || {
        let s = scrape(&prg_proxy::prometheus::render(&g.view));
        names.iter().enumerate().all(|(i, n)| {
            get(&s, "prg_proxy_sessions", Some(("node", n))) == Some(want[i])
                && get(&s, "prg_proxy_logins_completed_total", Some(("node", n))) == Some(want[i])
        })
    })
    .await;
    let text = prg_proxy::prometheus::render(&g.view);
    assert!(ok, "want {want:?}:\n{text}");
    let s = scrape(&text);
    assert_eq!(get(&s, "prg_proxy_connections_total", None), Some(4.0));
    assert_eq!(get(&s, "prg_proxy_connections_active", None), Some(4.0));
    assert_eq!(get(&s, "prg_proxy_logins_routed_total", None), Some(4.0));
    assert_eq!(get(&s, "prg_proxy_logins_rerouted_total", None), Some(0.0));
    assert_eq!(
        get(&s, "prg_proxy_connections_refused_total", None),
        Some(0.0)
    );
    assert!(
        get(
            &s,
            "prg_proxy_bytes_total",
            Some(("direction", "client_to_node"))
        )
        .unwrap()
            > 0.0
    );
    assert!(
        get(
            &s,
            "prg_proxy_stanzas_total",
            Some(("direction", "node_to_client"))
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(get(&s, "prg_proxy_pacer_refused_total", None), Some(0.0));
    assert_eq!(get(&s, "prg_proxy_pacer_abandoned_total", None), Some(0.0));
    assert_eq!(get(&s, "prg_proxy_pending_slots", None), Some(0.0));
    assert!(get(&s, "prg_proxy_pacer_rate", Some(("node", "imp2"))).unwrap() > 0.0);
    // Each node's state, as a labelled gauge.
    for n in names {
        let st = s
            .samples
            .iter()
            .find(|x| x.metric == "prg_proxy_node_state" && x.labels.get("node") == Some(n))
            .unwrap_or_else(|| panic!("no node_state for {n}:\n{text}"));
        assert_eq!(value(&st.value), 1.0);
        assert!(st.labels.get("state").is_some() && st.labels.get("reason").is_some());
    }
    // The types are declared.
    assert!(text.contains("# TYPE prg_proxy_sessions gauge"), "{text}");
    assert!(
        text.contains("# TYPE prg_proxy_logins_completed_total counter"),
        "{text}"
    );
    for c in clients {
        let _ = c.close().await;
    }
    g.stop().await;
}
