//! Cooling-off for source addresses that fail to authenticate too often,
//! as ejabberd's `mod_fail2ban` does: after `limits.auth_fail_limit`
//! failed authentications from one address within `limits.auth_fail_window`,
//! its logins are refused for `limits.auth_ban_time`, by the proxy, before
//! any node is bothered.
//!
//! Memory stays bounded: entries expire with their window or ban, and the
//! table is swept of expired entries whenever it grows past a threshold.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Entries kept before a sweep of the expired ones.
const SWEEP_AT: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: Instant,
    banned_until: Option<Instant>,
}

/// The failure counts and bans, shared by all connections.
#[derive(Debug, Default)]
pub struct AuthBans {
    table: Mutex<HashMap<IpAddr, Entry>>,
    sweep_at: Mutex<usize>,
}

/// The parameters (read from the current limits at each use, so a reload
/// applies at once).
#[derive(Debug, Clone, Copy)]
pub struct BanPolicy {
    /// Failures that start a ban; 0 is off.
    pub limit: u32,
    /// The window failures are counted in.
    pub window: Duration,
    /// How long a ban lasts.
    pub ban: Duration,
}

impl AuthBans {
    /// An empty table.
    pub fn new() -> AuthBans {
        AuthBans::default()
    }

    /// How much longer `ip` is refused, if it is.
    pub fn banned(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let until = table.get(&ip)?.banned_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failed authentication from `ip`; `true` if it starts a ban.
    pub fn failed(&self, ip: IpAddr, now: Instant, p: BanPolicy) -> bool {
        if p.limit == 0 {
            return false;
        }
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let e = table.entry(ip).or_insert(Entry {
            failures: 0,
            window_start: now,
            banned_until: None,
        });
        if e.banned_until.is_some_and(|u| u <= now) {
            e.banned_until = None;
            e.failures = 0;
            e.window_start = now;
        }
        if now.duration_since(e.window_start) > p.window {
            e.failures = 0;
            e.window_start = now;
        }
        e.failures += 1;
        let starts = e.failures >= p.limit && e.banned_until.is_none();
        if starts {
            e.banned_until = Some(now + p.ban);
        }
        let mut sweep_at = self.sweep_at.lock().unwrap_or_else(|e| e.into_inner());
        if *sweep_at == 0 {
            *sweep_at = SWEEP_AT;
        }
        if table.len() >= *sweep_at {
            table.retain(|_, e| match e.banned_until {
                Some(u) => u > now,
                None => now.duration_since(e.window_start) <= p.window,
            });
            // Sweep again only once the table doubled from what is live.
            *sweep_at = (table.len() * 2).max(SWEEP_AT);
        }
        starts
    }

    /// Addresses with an entry (for tests and metrics).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no address has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: BanPolicy = BanPolicy {
        limit: 3,
        window: Duration::from_secs(60),
        ban: Duration::from_secs(600),
    };

    #[test]
    fn bans_after_the_limit_within_the_window_and_lifts_after_the_ban() {
        let b = AuthBans::new();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        assert!(!b.failed(ip, t0, P));
        assert!(!b.failed(ip, t0 + Duration::from_secs(1), P));
        assert!(b.banned(ip, t0).is_none());
        assert!(b.failed(ip, t0 + Duration::from_secs(2), P));
        assert!(b.banned(ip, t0 + Duration::from_secs(3)).is_some());
        assert!(b.banned(other, t0 + Duration::from_secs(3)).is_none());
        assert!(b.banned(ip, t0 + Duration::from_secs(603)).is_none());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let b = AuthBans::new();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..10u64 {
            assert!(!b.failed(ip, t0 + Duration::from_secs(61 * i), P));
            assert!(!b.failed(ip, t0 + Duration::from_secs(61 * i + 1), P));
        }
        assert!(b.banned(ip, t0 + Duration::from_secs(700)).is_none());
    }

    #[test]
    fn off_when_the_limit_is_zero_and_the_table_is_swept() {
        let b = AuthBans::new();
        let t0 = Instant::now();
        let off = BanPolicy { limit: 0, ..P };
        assert!(!b.failed("192.0.2.1".parse().unwrap(), t0, off));
        assert!(b.is_empty());
        for i in 0..(SWEEP_AT as u32 * 3) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            b.failed(ip, t0 + Duration::from_secs(u64::from(i / 1000) * 120), P);
        }
        assert!(b.len() <= SWEEP_AT * 2, "{}", b.len());
    }
}
