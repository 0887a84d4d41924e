//! The admin HTTP API, the status page and the client the CLI uses.
//!
//! Configured by `[admin]`: `enabled` (default true), `listen` (default
//! `127.0.0.1:20075`) and an optional `token`. On a non-loopback address a
//! token is required (the proxy refuses to start, naming `admin.token`).
//! The listener is bound with the client listeners, so a port clash is a
//! start error (`Proxy::admin_addr` gives the bound address).
//!
//! # Routes
//!
//! JSON in and out; every error is `{"error": "..."}` with its status.
//! A node in a path or body is its configured name (`imp1`) or `1` / `2`.
//!
//! | route | what | errors |
//! | --- | --- | --- |
//! | `GET /` | the status page (HTML) | |
//! | `GET /status` | group (name, description, high availability, assignment mode, Table 2 row, recommended action, `can_recover`), each node (state, reason, recommended action, `can_failover`, `can_fallback`, sessions, logins per second, pacer rate), pending re-login slots, hints issued, the last 10 moves | |
//! | `POST /failover/{node}` | manual failover of the node | 404 unknown node, 409 refused by the state machine, 503 monitor not running |
//! | `POST /fallback/{node}` | manual fallback to the node | same |
//! | `POST /recover` | manual recovery (both nodes failed) | 409, 503 |
//! | `POST /reload` | re-read the configuration file (as SIGHUP) | 400, 409 |
//! | `GET /users/{jid}` | home node, serving node, sessions (resource, node, presence) | 400 invalid JID |
//! | `POST /users` `{"jid","node"}` | add a user to the assignment | 400, 404, 409 during failover or in active-standby |
//! | `POST /users/{jid}/move` `{"node"}` | pin the user's home to the node and close the user's streams elsewhere with a re-login hint | 400, 404, 409 |
//!
//! Mutating calls (`POST`) need `Authorization: Bearer TOKEN` when a token
//! is configured (401 otherwise; compared in constant time). Reads are open
//! to whoever reaches the address. A body that is not the expected JSON is
//! 400; an unknown route 404; a wrong method 405.
//!
//! # Status page
//!
//! `GET /` is one self-contained page (no external resources) that polls
//! `/status` every second: both nodes with state, reason and the recommended
//! action, live counters, and only the buttons valid now (Failover on a
//! Normal node, Fallback on an Idle or Failed Over node, Recover when both
//! nodes are failed), each confirmed first. Opened as `/#token=TOKEN` it
//! sends the token. The timeline draws the last moves: logins per second at
//! the target for 120 s after each move against the planned rate, and when
//! as many logins as evicted streams were back.
//!
//! # CLI
//!
//! `prg-proxy status | failover NODE | fallback NODE | recover | user JID |
//! add-user JID NODE | move-user JID NODE` call this API ([`cli`]); exit
//! codes 0 success, 2 refused (4xx), 3 unreachable or 5xx.

mod api;
pub mod cli;
pub mod sampler;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::view::ProxyView;

/// Serves the API on `listener` until `stop` turns true, sampling logins
/// and recording moves meanwhile.
pub async fn serve(listener: TcpListener, view: ProxyView, mut stop: watch::Receiver<bool>) {
    let sampler = Arc::new(sampler::Sampler::new(&view));
    let state = Arc::new(api::AdminState {
        view: view.clone(),
        sampler: sampler.clone(),
        token: view.config.admin.token.clone(),
    });
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, token = state.token.is_some(), "admin API up");
    }
    let app = api::router(state);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    tokio::select! {
        _ = sampler.run(view) => {}
        r = server => {
            if let Err(e) = r {
                warn!(error = %e, "admin API stopped");
            }
        }
    }
}
