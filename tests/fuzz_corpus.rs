//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`)
//! through the property its `cargo fuzz` target checks
//! ([`prg_proxy::xmpp::props`]), so that what the fuzzer found stays fixed
//! without nightly or cargo-fuzz.

use std::path::{Path, PathBuf};

use prg_proxy::xmpp::props;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// Runs `check` on every file of `target`'s corpus, naming the file that fails.
fn replay(target: &str, min_files: usize, check: fn(&[u8])) {
    let files = corpus(target);
    assert!(
        files.len() >= min_files,
        "{target}: {} corpus files, expected at least {min_files}",
        files.len()
    );
    for (path, data) in files {
        if let Err(e) = std::panic::catch_unwind(|| check(&data)) {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{target}: {} fails: {why}", path.display());
        }
    }
}

#[test]
fn framer_corpus_frames_only_well_formed_stanzas() {
    replay("framer", 10, props::framer);
}

#[test]
fn sasl_corpus_identifies_only_normalised_bare_jids() {
    replay("sasl", 10, props::sasl);
}

#[test]
fn stream_header_corpus_round_trips_through_the_proxys_builders() {
    replay("stream_header", 8, props::stream_header);
}
