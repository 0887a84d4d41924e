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
    let e = with(|c| c.limits.sm_max_unacked_bytes = 1000).unwrap_err();
    assert_eq!(e.key, "limits.sm_max_unacked_bytes");
    let e = with(|c| c.limits.sm_max_unacked_stanzas = 0).unwrap_err();
    assert_eq!(e.key, "limits.sm_max_unacked_stanzas");
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

#[test]
fn heartbeat_and_probe_defaults() {
    let c = example();
    assert_eq!(c.nodes[0].heartbeat, HeartbeatKind::Xmpp);
    assert!(c.nodes[0].critical_services.is_empty());
    assert_eq!(c.srm.probe_timeout, Duration::from_secs(5));
    assert!(c.srm.fast_detect);
    assert_eq!(c.srm.fast_detect_window, Duration::from_secs(2));
    assert_eq!(c.srm.fast_detect_failures, 3);
    assert_eq!(c.srm.monitor_user, None);
}

#[test]
fn critical_services_parse_and_are_checked() {
    let text = EXAMPLE.replace(
        "address = \"127.0.0.1:15222\"\n",
        "address = \"127.0.0.1:15222\"\nheartbeat = \"tcp\"\n\n\
         [[nodes.critical_services]]\nname = \"Cisco XCP Router\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:7400\"\n\n\
         [[nodes.critical_services]]\nname = \"health\"\nkind = \"http\"\ntarget = \"127.0.0.1:8080/health\"\n\n\
         [[nodes.critical_services]]\nname = \"db\"\nkind = \"database\"\ntarget = \"db.example.com:5432\"\n",
    );
    let c = Config::parse(&text).unwrap();
    c.validate().unwrap();
    assert_eq!(c.nodes[0].heartbeat, HeartbeatKind::Tcp);
    let s = &c.nodes[0].critical_services;
    assert_eq!(s.len(), 3);
    assert_eq!(s[1].kind, CriticalServiceKind::Http);
    assert_eq!(s[2].kind, CriticalServiceKind::Database);
    assert!(
        c.nodes[1].critical_services.is_empty(),
        "belong to node 1 only"
    );

    let svc = |kind, target: &str| CriticalServiceConfig {
        name: "x".into(),
        kind,
        target: target.into(),
    };
    let e = with(|c| c.nodes[1].critical_services = vec![svc(CriticalServiceKind::Tcp, "nohost")])
        .unwrap_err();
    assert_eq!(e.key, "nodes[1].critical_services[0].target");
    let e =
        with(|c| c.nodes[0].critical_services = vec![svc(CriticalServiceKind::Tcp, "h:1/path")])
            .unwrap_err();
    assert_eq!(e.key, "nodes[0].critical_services[0].target");
    assert!(e.message.contains("http"), "{}", e.message);
    with(|c| c.nodes[0].critical_services = vec![svc(CriticalServiceKind::Http, "h:80")])
        .expect("http without a path GETs /");
    let e = with(|c| {
        c.nodes[0].critical_services = vec![
            svc(CriticalServiceKind::Tcp, "h:1"),
            svc(CriticalServiceKind::Http, "h:2/x"),
        ]
    })
    .unwrap_err();
    assert_eq!(e.key, "nodes[0].critical_services[1].name");
    let e = with(|c| {
        c.nodes[0].critical_services = vec![CriticalServiceConfig {
            name: " ".into(),
            ..svc(CriticalServiceKind::Tcp, "h:1")
        }]
    })
    .unwrap_err();
    assert_eq!(e.key, "nodes[0].critical_services[0].name");
    let text = EXAMPLE.replace(
        "address = \"127.0.0.1:15222\"\n",
        "address = \"127.0.0.1:15222\"\nheartbeat = \"icmp\"\n",
    );
    assert!(Config::parse(&text).is_err(), "unknown heartbeat kind");
}

#[test]
fn monitor_account_required_for_login_heartbeats() {
    let e = with(|c| c.nodes[1].heartbeat = HeartbeatKind::Login).unwrap_err();
    assert_eq!(e.key, "srm.monitor_user");
    assert!(e.message.contains("nodes[1].heartbeat"), "{}", e.message);
    let e = with(|c| {
        c.srm.auth_service_monitoring = true;
        c.srm.monitor_user = Some("monitor".into());
    })
    .unwrap_err();
    assert_eq!(e.key, "srm.monitor_password");
    assert!(
        e.message.contains("auth_service_monitoring"),
        "{}",
        e.message
    );
    with(|c| {
        c.srm.auth_service_monitoring = true;
        c.nodes[0].heartbeat = HeartbeatKind::Login;
        c.srm.monitor_user = Some("monitor".into());
        c.srm.monitor_password = Some("secret".into());
    })
    .expect("complete monitor account");
}

#[test]
fn probe_knobs_are_checked() {
    let e = with(|c| c.srm.probe_timeout = Duration::ZERO).unwrap_err();
    assert_eq!(e.key, "srm.probe_timeout");
    let mut c = example();
    c.srm.heartbeat_interval = Duration::from_millis(200);
    assert_eq!(c.srm.effective_probe_timeout(), Duration::from_millis(200));
    let e = with(|c| c.srm.fast_detect_failures = 0).unwrap_err();
    assert_eq!(e.key, "srm.fast_detect_failures");
    let e = with(|c| c.srm.fast_detect_window = Duration::ZERO).unwrap_err();
    assert_eq!(e.key, "srm.fast_detect_window");
    let text = format!(
        "{EXAMPLE}\n[srm]\nprobe_timeout = \"300ms\"\nfast_detect = false\nfast_detect_window = \"500ms\"\n\
         monitor_user = \"monitor\"\nmonitor_password = \"pw\"\n"
    );
    let c = Config::parse(&text).unwrap();
    c.validate().unwrap();
    assert_eq!(c.srm.probe_timeout, Duration::from_millis(300));
    assert!(!c.srm.fast_detect);
}

#[test]
fn assignment_file_is_refused_in_active_standby() {
    let mut c = example();
    c.group.assignment = AssignmentMode::ActiveStandby;
    c.group.assignment_file = Some("users.toml".into());
    assert_eq!(c.validate().unwrap_err().key, "group.assignment_file");
    c.group.assignment = AssignmentMode::None;
    c.validate().expect("mode none may list its users");
}

#[test]
fn admin_api_defaults_and_token_rule() {
    let c = example();
    assert!(c.admin.enabled);
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:20075");
    assert_eq!(c.admin.token, None);
    // Off loopback without a token: refused, naming admin.token.
    let e = with(|c| c.admin.listen = "0.0.0.0:20075".parse().unwrap()).unwrap_err();
    assert_eq!(e.key, "admin.token");
    assert!(e.message.contains("0.0.0.0:20075"), "{e}");
    with(|c| {
        c.admin.listen = "0.0.0.0:20075".parse().unwrap();
        c.admin.token = Some("s3cret".into());
    })
    .unwrap();
    // Disabled: no rule applies.
    with(|c| {
        c.admin.listen = "0.0.0.0:20075".parse().unwrap();
        c.admin.enabled = false;
    })
    .unwrap();
    let e = with(|c| c.admin.token = Some("two words".into())).unwrap_err();
    assert_eq!(e.key, "admin.token");
    let e = Config::parse(&format!("{}\n[admin]\nport = 1\n", crate::config::EXAMPLE)).unwrap_err();
    assert!(e.message.contains("unknown field `port`"), "{e}");
}

#[test]
fn temp_presence_defaults_and_bounds() {
    let c = example();
    let tp = &c.temp_presence;
    assert!(tp.enabled);
    assert_eq!(tp.min_interval, Duration::from_secs(30));
    assert_eq!((tp.max_pairs_per_watcher, tp.max_pairs), (200, 1_000_000));
    for (f, key) in [
        (
            (|c: &mut Config| c.temp_presence.max_pairs_per_watcher = 0) as fn(&mut Config),
            "temp_presence.max_pairs_per_watcher",
        ),
        (
            |c: &mut Config| c.temp_presence.max_pairs = 10,
            "temp_presence.max_pairs",
        ),
        (
            |c: &mut Config| c.temp_presence.replay_rate = f64::NAN,
            "temp_presence.replay_rate",
        ),
        (
            |c: &mut Config| c.temp_presence.ttl = Duration::ZERO,
            "temp_presence.ttl",
        ),
        (
            |c: &mut Config| c.temp_presence.min_interval = Duration::from_secs(9 * 3600),
            "temp_presence.min_interval",
        ),
    ] {
        assert_eq!(with(f).unwrap_err().key, key);
    }
    let t = format!(
        "{}\n[temp_presence]\nmin_interval = \"2s\"\nreplay_rate = 10.0\n",
        crate::config::EXAMPLE
    );
    let c = Config::parse(&t).unwrap();
    assert_eq!(c.temp_presence.min_interval, Duration::from_secs(2));
    let e = Config::parse(&format!(
        "{}\n[temp_presence]\nrate = 1\n",
        crate::config::EXAMPLE
    ))
    .unwrap_err();
    assert!(e.message.contains("unknown field `rate`"), "{e}");
}

#[test]
fn toml_type_and_syntax_errors_name_the_dotted_key() {
    let key = |text: &str| Config::parse(text).unwrap_err().key;
    let base = EXAMPLE.to_string();
    assert_eq!(
        key(&base.replace(
            "[listen]",
            "[limits]\nmax_connections = \"many\"\n\n[listen]"
        )),
        "limits.max_connections"
    );
    assert_eq!(
        key(&base.replace("address = \"127.0.0.1:15223\"", "address = 15223")),
        "nodes[1].address"
    );
    assert_eq!(
        key(&base.replace("high_availability = true", "high_availability = tru")),
        "group.high_availability"
    );
    assert_eq!(key("[group]\nname = \"x\n"), "group.name");
}

#[test]
fn the_same_port_for_two_listeners_is_refused() {
    let e = with(|c| {
        c.listen.starttls = Some("0.0.0.0:5222".parse().unwrap());
        c.listen.direct_tls = Some("127.0.0.1:5222".parse().unwrap());
    })
    .unwrap_err();
    assert_eq!(e.key, "listen.direct_tls", "{e}");
    // Port 0 asks the kernel for a free port: no clash.
    with(|c| {
        c.listen.starttls = Some("127.0.0.1:0".parse().unwrap());
        c.listen.direct_tls = Some("127.0.0.1:0".parse().unwrap());
    })
    .unwrap();
    // Different addresses on one port are fine.
    with(|c| {
        c.listen.starttls = Some("127.0.0.1:5222".parse().unwrap());
        c.listen.direct_tls = Some("127.0.0.2:5222".parse().unwrap());
    })
    .unwrap();
}
