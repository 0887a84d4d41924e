use super::*;

fn example() -> Config {
    Config::parse(EXAMPLE).expect("example parses")
}

fn with(f: impl FnOnce(&mut Config)) -> Result<(), ConfigError> {
    let mut c = example();
    f(&mut c);
    c.validate()
}

#[test]
fn example_is_valid_and_has_source_defaults() {
    let c = example();
    c.validate().expect("valid");
    assert_eq!(c.srm.heartbeat_interval, Duration::from_secs(15));
    assert_eq!(c.srm.heartbeat_timeout, Duration::from_secs(60));
    assert_eq!(c.srm.initial_heartbeat_timeout, Duration::from_secs(120));
    assert_eq!(c.srm.critical_service_delay, Duration::from_secs(90));
    assert_eq!(c.srm.auto_fallback_after, Duration::from_secs(1800));
    assert!(!c.srm.auto_fallback);
    assert_eq!(c.srm.service_port, 22001);
    assert_eq!(c.srm.admin_rpc_port, 20075);
    assert_eq!(c.nodes[0].relogin_lower, Duration::from_secs(120));
    assert_eq!(c.nodes[0].relogin_upper, Duration::from_secs(537));
    assert_eq!(c.limits.max_stanza_bytes, 262_144);
    assert_eq!(c.group.assignment, AssignmentMode::Balanced);
}

#[test]
fn group_name_rules() {
    for bad in ["", "has space", "dot.ted", "semi;colon", "ü"] {
        let e = with(|c| c.group.name = bad.into()).unwrap_err();
        assert_eq!(e.key, "group.name", "{bad:?}");
    }
    let e = with(|c| c.group.name = "a".repeat(129)).unwrap_err();
    assert_eq!(e.key, "group.name");
    with(|c| c.group.name = "a".repeat(128)).expect("128 is allowed");
    with(|c| c.group.name = "Group_1-b".into()).expect("letters digits _ -");
}

#[test]
fn description_rules() {
    for bad in ["a\"b", "50%", "a&b", "back\\slash", "<tag>"] {
        let e = with(|c| c.group.description = bad.into()).unwrap_err();
        assert_eq!(e.key, "group.description", "{bad:?}");
    }
    let e = with(|c| c.group.description = "x".repeat(129)).unwrap_err();
    assert_eq!(e.key, "group.description");
    with(|c| c.group.description = "Pair (A), 2nd floor; ok!".into()).expect("allowed");
}

#[test]
fn node_count_and_distinctness() {
    let e = with(|c| c.nodes.clear()).unwrap_err();
    assert_eq!(e.key, "nodes");
    let e = with(|c| {
        let n = c.nodes[0].clone();
        c.nodes.push(n)
    })
    .unwrap_err();
    assert_eq!(e.key, "nodes");
    assert!(e.message.contains("at most two"));
    let e = with(|c| c.nodes[1].name = "imp1".into()).unwrap_err();
    assert_eq!(e.key, "nodes[1].name");
    let e = with(|c| c.nodes[1].address = c.nodes[0].address.clone()).unwrap_err();
    assert_eq!(e.key, "nodes[1].address");
    with(|c| {
        c.nodes.pop();
    })
    .expect("a one-node group is allowed");
}

#[test]
fn node_address_forms() {
    let e = with(|c| c.nodes[0].address = Some("nohostport".into())).unwrap_err();
    assert_eq!(e.key, "nodes[0].address");
    let e = with(|c| c.nodes[0].srv = Some("example.com".into())).unwrap_err();
    assert_eq!(e.key, "nodes[0].srv");
    with(|c| {
        c.nodes[0].address = None;
        c.nodes[0].srv = Some("example.com".into());
    })
    .expect("srv form");
    with(|c| c.nodes[0].address = Some("[::1]:5222".into())).expect("ipv6");
    let e = with(|c| c.nodes[0].tls = UpstreamTls::Starttls).unwrap_err();
    assert_eq!(e.key, "nodes[0].tls_roots");
    let e = with(|c| c.nodes[0].relogin_lower = Duration::from_secs(600)).unwrap_err();
    assert_eq!(e.key, "nodes[0].relogin_lower");
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let text = EXAMPLE.replace("high_availability", "high_availabilty");
    let e = Config::parse(&text).unwrap_err();
    assert_eq!(e.key, "high_availabilty");
    let text = format!("{EXAMPLE}\n[limits]\nmax_conections = 5\n");
    let e = Config::parse(&text).unwrap_err();
    assert_eq!(e.key, "max_conections");
}

#[test]
fn durations_are_human_readable() {
    let text = format!("{EXAMPLE}\n[srm]\nheartbeat_interval = \"500ms\"\nheartbeat_timeout = \"2s\"\nauto_fallback_after = \"30m\"\n");
    let c = Config::parse(&text).unwrap();
    c.validate().unwrap();
    assert_eq!(c.srm.heartbeat_interval, Duration::from_millis(500));
    assert_eq!(c.srm.auto_fallback_after, Duration::from_secs(1800));
}

#[test]
fn limits_are_checked() {
    let e = with(|c| c.limits.max_stanza_bytes = 100).unwrap_err();
    assert_eq!(e.key, "limits.max_stanza_bytes");
    let e = with(|c| c.limits.max_connections = 0).unwrap_err();
    assert_eq!(e.key, "limits.max_connections");
    let e = with(|c| {
        c.listen.starttls = None;
        c.listen.direct_tls = None
    })
    .unwrap_err();
    assert_eq!(e.key, "listen");
}

#[test]
fn assignment_overrides() {
    let c = example();
    let m = parse_assignment_overrides(
        "[users]\n\"Alice@example.com\" = \"imp2\"\n\"bob@example.com\" = \"imp1\"\n",
        &c.nodes,
    )
    .unwrap();
    assert_eq!(m["alice@example.com"], 1);
    assert_eq!(m["bob@example.com"], 0);
    let e = parse_assignment_overrides("[users]\n\"a@example.com\" = \"imp9\"\n", &c.nodes)
        .unwrap_err();
    assert!(e.contains("imp9"));
}

#[test]
fn listen_table_names_exactly_the_listeners() {
    let no_table = EXAMPLE.replace(
        "[listen]\nstarttls = \"127.0.0.1:5222\"\ndirect_tls = \"127.0.0.1:5223\"\n",
        "",
    );
    let c = Config::parse(&no_table).unwrap();
    assert_eq!(c.listen.starttls, Some("0.0.0.0:5222".parse().unwrap()));
    assert_eq!(c.listen.direct_tls, Some("0.0.0.0:5223".parse().unwrap()));
    let only = EXAMPLE.replace("direct_tls = \"127.0.0.1:5223\"\n", "");
    let c = Config::parse(&only).unwrap();
    assert_eq!(c.listen.starttls, Some("127.0.0.1:5222".parse().unwrap()));
    assert_eq!(c.listen.direct_tls, None, "not named, not opened");
}
