//! Log output: `RUST_LOG` filters (default `info`), to standard error, in
//! colour only on a terminal (and never with `NO_COLOR` set).

use std::io::IsTerminal;

/// Installs the global subscriber once (`default` is the filter used when
/// `RUST_LOG` is not set); later calls do nothing.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}
