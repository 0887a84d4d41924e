//! The status page in headless Chromium: a failover from the page.
//!
//! Needs Debian's `chromium`, `chromium-driver` and `python3-selenium`
//! (`.ci/run` installs them). Without them the test fails, saying so.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use prg_proxy::group::NodeState;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const PYTHON: &str = "/usr/bin/python3";

fn artifacts() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("artifacts")
}

fn require_browser() {
    let mut missing = Vec::new();
    for p in [CHROMIUM, CHROMEDRIVER, PYTHON] {
        if !Path::new(p).exists() {
            missing.push(p.to_string());
        }
    }
    let selenium = std::process::Command::new(PYTHON)
        .args(["-c", "import selenium"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !selenium {
        missing.push("python3-selenium".into());
    }
    assert!(
        missing.is_empty(),
        "the status page test needs a headless browser; missing {missing:?}. Install with: \
         apt-get install -y chromium chromium-driver python3-selenium"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_from_the_status_page() {
    require_browser();
    let mut g = TestGroup::start_with(
        "balanced",
        "[srm]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"60s\"\n\
         initial_heartbeat_timeout = \"120s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"page-token\"\n",
        |_| {},
    )
    .await;
    let mut rx = g.view.group_status();
    tokio::time::timeout(
        T,
        rx.wait_for(|s| {
            NodeId::ALL
                .iter()
                .all(|n| s.state(*n).0 == NodeState::Normal)
        }),
    )
    .await
    .expect("Normal")
    .expect("monitor");
    // Someone to move, so that the timeline has a move with an eviction.
    let _alice = g.login("alice", "PLAIN", "desk").await;

    let dir = artifacts();
    std::fs::create_dir_all(&dir).expect("artifacts folder");
    let shot = dir.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!(
        "http://{}/#token=page-token",
        g.admin.expect("the admin API is on")
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/status_page.py");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(PYTHON)
            .arg(&script)
            .arg(&url)
            .arg(&shot)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser script ends within 2 minutes")
    .expect("the browser script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser check failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The page's failover really happened.
    let s = g.view.group.current();
    assert_eq!(s.state(N1).0, NodeState::Idle);
    assert_eq!(s.state(N2).0, NodeState::RunningInBackupMode);
    let png = std::fs::read(&shot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    g.stop().await;
}
