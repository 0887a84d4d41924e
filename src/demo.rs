//! The built-in demonstration (filled in with the simulated node pair).

/// Runs the demo until done or `shutdown`.
pub async fn run(_shutdown: impl std::future::Future<Output = ()>) -> Result<(), String> {
    Err("the demo needs the simulated node pair".into())
}
