//! The README's demo command works and tells the whole story.

use std::process::Command;

#[test]
fn demo_runs_to_completion() {
    let out = Command::new(env!("CARGO_BIN_EXE_prg-proxy"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "home imp1 → bound on imp1",
        "home imp2 → bound on imp2",
        "dave (on imp2) sees alice (on imp1): show=dnd",
        "dave got from alice@example.com/desk: \"Lunch at 12? 🍜\"",
        "imp1: 2 session(s)",
        "node 2 imp2  Running in Backup Mode (Peer Down)",
        "alice logs in again → bound on imp2",
        "adding users now is refused",
        "node 1 imp1  Failed Over",
        "alice logs in again → bound on imp1",
        "alice was told <system-shutdown/>",
        "carol (on imp2) searched alice (on imp1): carol sees alice dnd",
        "carol sees alice offline; imp1 held carol's subscription and forgets it",
        "carol sees alice dnd again",
        "carol did nothing",
        "1 replayed",
        "demo complete",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}
