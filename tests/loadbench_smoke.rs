//! Runs `scripts/loadbench.sh --quick` against the binaries of this build,
//! so that the load bench and its script cannot rot. No timing is asserted:
//! only that every part ran and printed its summary with a ratio.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Generous bound for the quick mode (which takes a few seconds).
const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn load_bench_script_quick_mode() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new("bash")
        .arg(format!("{root}/scripts/loadbench.sh"))
        .arg("--quick")
        .arg("--no-install")
        .env("LOADBENCH_BIN", env!("CARGO_BIN_EXE_loadbench"))
        .env("PRG_PROXY_BIN", env!("CARGO_BIN_EXE_prg-proxy"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("bash runs the script");
    let mut out = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("loadbench.sh --quick did not finish in {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().expect("reader");
    println!("{out}");
    assert!(status.success(), "loadbench.sh --quick failed: {status}");
    for part in [
        "SUMMARY relay:",
        "ratio prg-proxy/tokio-relay",
        "SUMMARY logins: ratio prg-proxy/direct",
        "SUMMARY memory:",
    ] {
        assert!(out.contains(part), "missing {part:?} in:\n{out}");
    }
}
