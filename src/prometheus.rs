//! The Prometheus exposition of the proxy's counters (`GET /metrics`).
//!
//! Nothing here counts anything: [`render`] reads the sources of truth at
//! scrape time — the atomics of [`crate::metrics::Metrics`], the session
//! tracker, the group's published status, the pacer and the hints — into a
//! fresh `prometheus-client` registry and encodes it in the Prometheus text
//! format (version 0.0.4). Every name starts with `prg_proxy_`; counters end
//! in `_total`.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `connections_total`, `connections_active`, `connections_refused_total` | counter, gauge, counter | |
//! | `sessions` | gauge | `node` |
//! | `stanzas_total`, `bytes_total` | counter | `direction` (`client_to_node`, `node_to_client`) |
//! | `logins_routed_total`, `logins_rerouted_total`, `logins_completed_total` | counter | –, –, `node` |
//! | `node_failures_total`, `fast_detections_total`, `write_timeouts_total` | counter | |
//! | `group_transitions_total`, `group_moves_total`, `group_evictions_total` | counter | |
//! | `stanzas_bounced_total`, `sm_unretained_total` | counter | |
//! | `hints_issued_total` | counter | |
//! | `pacer_admitted_total`, `pacer_held_total`, `pacer_refused_total`, `pacer_abandoned_total`, `pacer_held_seconds_total` | counter | |
//! | `pacer_rate`, `pacer_waiting` | gauge | `node` |
//! | `pending_slots` | gauge | |
//! | `temp_presence_pairs` | gauge | |
//! | `temp_presence_replays_total`, `temp_presence_replays_deferred_total`, `temp_presence_disco_cached_total`, `temp_presence_refused_total`, `temp_presence_expired_total` | counter | |
//! | `node_state` | gauge (always 1) | `node`, `state`, `reason` |
//!
//! Like every module that takes a [`ProxyView`], it is an outer layer: no
//! inner module imports it.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::node::NodeId;
use crate::view::ProxyView;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    r.register(name, help, c);
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    r.register(name, help, g);
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn clamp(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The proxy's metrics in the Prometheus text format, read now.
pub fn render(view: &ProxyView) -> String {
    let mut reg = Registry::with_prefix("prg_proxy");
    let m = &view.metrics;
    let r = &mut reg;
    // The configured nodes, with their names.
    let nodes: Vec<(NodeId, String)> = NodeId::ALL
        .into_iter()
        .zip(&view.config.nodes)
        .map(|(id, n)| (id, n.name.clone()))
        .collect();
    let node_label = |name: &str| -> Labels { vec![("node", name.to_string())] };

    counter(
        r,
        "connections",
        "Client connections accepted",
        load(&m.connections_total),
    );
    gauge(
        r,
        "connections_active",
        "Client connections open now",
        clamp(load(&m.connections_active) as usize),
    );
    counter(
        r,
        "connections_refused",
        "Client connections refused with resource-constraint at max_connections",
        load(&m.connections_refused),
    );

    let sessions = Family::<Labels, Gauge>::default();
    for (id, name) in &nodes {
        sessions
            .get_or_create(&node_label(name))
            .set(clamp(view.tracker.count_on(*id)));
    }
    r.register("sessions", "JSM sessions bound on each node", sessions);

    for (name, help, up, down) in [
        (
            "stanzas",
            "Stanzas relayed, by direction",
            &m.stanzas_up,
            &m.stanzas_down,
        ),
        (
            "bytes",
            "Bytes relayed, by direction",
            &m.bytes_up,
            &m.bytes_down,
        ),
    ] {
        let f = Family::<Labels, Counter>::default();
        f.get_or_create(&vec![("direction", "client_to_node".to_string())])
            .inc_by(load(up));
        f.get_or_create(&vec![("direction", "node_to_client".to_string())])
            .inc_by(load(down));
        r.register(name, help, f);
    }

    counter(
        r,
        "logins_routed",
        "Logins routed to a node (auth forwarded)",
        load(&m.logins_routed),
    );
    counter(
        r,
        "logins_rerouted",
        "Logins routed again because their node was marked down while connecting",
        load(&m.logins_rerouted),
    );
    let stats = &view.hints.pacer().stats;
    let completed = Family::<Labels, Counter>::default();
    for (id, name) in &nodes {
        let v = stats.completed.get(id.index()).map_or(0, load);
        completed.get_or_create(&node_label(name)).inc_by(v);
    }
    r.register(
        "logins_completed",
        "Logins completed (bind result) on each node",
        completed,
    );
    counter(
        r,
        "node_failures",
        "Node connection failures seen by the relay",
        load(&m.node_failures),
    );
    counter(
        r,
        "fast_detections",
        "Node failures confirmed by fast detection",
        load(&m.fast_detections),
    );
    counter(
        r,
        "write_timeouts",
        "Connections closed because a peer did not read within limits.write_timeout",
        load(&m.write_timeouts),
    );
    counter(
        r,
        "group_transitions",
        "Node state transitions of the redundancy group",
        load(&m.group_transitions),
    );
    counter(
        r,
        "group_moves",
        "Routing changes (a home's users moved)",
        load(&m.group_moves),
    );
    counter(
        r,
        "group_evictions",
        "Streams closed because their user's home moved",
        load(&m.group_evictions),
    );
    counter(
        r,
        "stanzas_bounced",
        "Client messages the node never acknowledged (XEP-0198), bounced to their sender",
        load(&m.stanzas_bounced),
    );
    counter(
        r,
        "sm_unretained",
        "Unacknowledged client messages over limits.sm_max_unacked_*, not retained for a bounce",
        load(&m.sm_unretained),
    );
    counter(
        r,
        "hints_issued",
        "Re-login hints issued",
        load(&view.hints.stats.issued),
    );

    counter(
        r,
        "pacer_admitted",
        "Logins admitted by the pacer without waiting",
        load(&stats.admitted),
    );
    counter(
        r,
        "pacer_held",
        "Logins held by the pacer before being admitted",
        load(&stats.held),
    );
    counter(
        r,
        "pacer_refused",
        "Logins refused by the pacer with a fresh hint",
        load(&stats.refused),
    );
    counter(
        r,
        "pacer_abandoned",
        "Held logins whose client left before its turn (nothing reached the node)",
        load(&stats.abandoned),
    );
    let held: Counter<f64, AtomicU64> = Counter::default();
    held.inc_by(load(&stats.held_ms) as f64 / 1000.0);
    r.register(
        "pacer_held_seconds",
        "Total time admitted logins were held, in seconds",
        held,
    );
    let pacer = view.hints.pacer();
    let rate = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let waiting = Family::<Labels, Gauge>::default();
    for (id, name) in &nodes {
        rate.get_or_create(&node_label(name)).set(pacer.rate(*id));
        waiting
            .get_or_create(&node_label(name))
            .set(clamp(pacer.waiting(*id)));
    }
    r.register(
        "pacer_rate",
        "Logins per second the pacer admits at each node now",
        rate,
    );
    r.register(
        "pacer_waiting",
        "Logins waiting for a token at each node now",
        waiting,
    );
    gauge(
        r,
        "pending_slots",
        "Moved users' re-login slots remembered now",
        clamp(pacer.pending_slots()),
    );

    let tp = &view.presence.stats;
    gauge(
        r,
        "temp_presence_pairs",
        "Temporary presence (watcher, target) pairs held for replay",
        i64::try_from(load(&tp.pairs)).unwrap_or(i64::MAX),
    );
    for (name, help, v) in [
        (
            "temp_presence_replays",
            "Temporary presence subscriptions replayed to a node",
            &tp.replays_sent,
        ),
        (
            "temp_presence_replays_deferred",
            "Temporary presence replays put off by the 30-second rule",
            &tp.replays_deferred,
        ),
        (
            "temp_presence_disco_cached",
            "disco#info queries answered by the proxy from its caps cache",
            &tp.disco_from_cache,
        ),
        (
            "temp_presence_refused",
            "Temporary presence pairs not kept because of a bound",
            &tp.refused,
        ),
        (
            "temp_presence_expired",
            "Temporary presence pairs dropped by the TTL",
            &tp.expired,
        ),
    ] {
        counter(r, name, help, load(v));
    }

    let status = view.group.subscribe().borrow().clone();
    let state = Family::<Labels, Gauge>::default();
    for n in &status.nodes {
        let Some(name) = &n.name else { continue };
        state
            .get_or_create(&vec![
                ("node", name.clone()),
                ("state", n.state.to_string()),
                ("reason", n.reason.to_string()),
            ])
            .set(1);
    }
    r.register(
        "node_state",
        "Each node's recovery-manager state and reason (value always 1)",
        state,
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &reg);
    out
}
