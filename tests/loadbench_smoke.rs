//! Runs `scripts/loadbench.sh --quick` and a short `scripts/soak.sh`
//! against the binaries of this build, so that the load bench, the soak and
//! their scripts cannot rot. No timing is asserted: only that every part ran
//! and printed its summary.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Generous bound for the quick mode (which takes a few seconds).
const LIMIT: Duration = Duration::from_secs(180);

/// Runs a script of `scripts/` with `args` within [`LIMIT`]; returns its
/// standard output once it succeeded.
fn run_script(script: &str, args: &[&str]) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new("bash")
        .arg(format!("{root}/scripts/{script}"))
        .args(args)
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
            panic!("{script} did not finish in {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().expect("reader");
    println!("{out}");
    assert!(status.success(), "{script} failed: {status}\n{out}");
    out
}

#[test]
fn load_bench_script_quick_mode() {
    let out = run_script("loadbench.sh", &["--quick", "--no-install"]);
    for part in [
        "SUMMARY relay:",
        "ratio prg-proxy/tokio-relay",
        "SUMMARY logins: ratio prg-proxy/direct",
        "SUMMARY memory:",
    ] {
        assert!(out.contains(part), "missing {part:?} in:\n{out}");
    }
}

#[test]
fn soak_script_short_run() {
    // Generous bounds: a few seconds on a busy machine prove nothing about
    // leaks, only that the soak runs and reports.
    let out = run_script(
        "soak.sh",
        &[
            "--idle",
            "20",
            "--chatters",
            "2",
            "--duration",
            "3",
            "--max-rss-growth-pct",
            "100",
            "--max-fd-growth",
            "1000",
        ],
    );
    for part in [
        "SUMMARY soak: start",
        "SUMMARY soak: end",
        "SUMMARY soak: growth",
    ] {
        assert!(out.contains(part), "missing {part:?} in:\n{out}");
    }
}
