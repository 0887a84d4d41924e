//! The shipped sample configuration and systemd unit stay valid.

use std::path::Path;

fn contrib(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_sample_config_loads_with_its_certificates_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = prg_proxy::tls::dev_certs(&["example.com"]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &d.chain_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &d.key_pem).unwrap();
    let p = dir.path().join("proxy.toml");
    std::fs::write(&p, contrib("proxy.toml")).unwrap();
    let cfg = prg_proxy::Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.nodes.len(), 2);
    prg_proxy::tls::server_tls(&cfg.tls).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_unit_reloads_with_sighup_and_is_hardened() {
    let unit = contrib("prg-proxy.service");
    for line in [
        "ExecStart=/usr/local/bin/prg-proxy run --config /etc/prg-proxy/proxy.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "RestartPreventExitStatus=64",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line:?}");
    }
    assert!(unit.lines().any(|l| l.starts_with("LimitNOFILE=")));
}
