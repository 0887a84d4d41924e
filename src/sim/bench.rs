//! Pieces the load benches share: users split by their balanced home,
//! percentiles, and chatters timing their messages' round trips.

use std::time::{Duration, Instant};

use crate::config::AssignmentMode;
use crate::node::NodeId;
use crate::route::Assignment;

use super::SimClient;

/// Users named `u{i}` whose balanced homes (nodes `imp1`, `imp2`) give
/// `on1` users on node 1 and `on2` on node 2.
pub fn users_by_home(domain: &str, on1: usize, on2: usize) -> (Vec<String>, Vec<String>) {
    let a = Assignment::new(
        AssignmentMode::Balanced,
        &["imp1".into(), "imp2".into()],
        Default::default(),
    );
    let (mut n1, mut n2) = (Vec::new(), Vec::new());
    let mut i = 0;
    while n1.len() < on1 || n2.len() < on2 {
        let u = format!("u{i}");
        match a.home(&format!("{u}@{domain}")) {
            Ok(NodeId::Node1) if n1.len() < on1 => n1.push(u),
            Ok(NodeId::Node2) if n2.len() < on2 => n2.push(u),
            _ => {}
        }
        i += 1;
    }
    (n1, n2)
}

/// The `p` percentile (0–1) of sorted values; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Every chatter sends messages to itself, one at a time with `pause`
/// between them, for `phase`; returns the sorted round-trip times in
/// milliseconds. A chatter whose message does not come back within 30 s
/// stops.
pub async fn chat(
    chatters: &mut Vec<SimClient>,
    phase: Duration,
    pause: Duration,
) -> Result<Vec<f64>, String> {
    let deadline = Instant::now() + phase;
    let mut tasks = Vec::new();
    for mut c in chatters.drain(..) {
        tasks.push(tokio::spawn(async move {
            let me = c.jid().unwrap_or_default().to_string();
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let body = format!("ping {n}");
                let t = Instant::now();
                if c.send_message(&me, &body).await.is_err() {
                    break;
                }
                match c
                    .wait_for(Duration::from_secs(30), |s| {
                        s.name == "message" && s.body().as_deref() == Some(&body)
                    })
                    .await
                {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => break,
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            (c, lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let (c, lat) = t.await.map_err(|e| e.to_string())?;
        chatters.push(c);
        all.extend(lat);
    }
    all.sort_by(|a, b| a.total_cmp(b));
    Ok(all)
}
