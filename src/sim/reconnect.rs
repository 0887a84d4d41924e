//! How simulated clients come back after the proxy (or a node) sent them
//! away: the proxy's re-login hint ([`Relogin`]) and the client's
//! reconnection policy ([`ReconnectPolicy`]). No I/O here.
//!
//! The hint is an application element in a `<stream:error>` or a SASL
//! `<failure>`:
//!
//! ```xml
//! <relogin xmlns='urn:x-prg-proxy:relogin:0' after='317' min='120' max='537' reason='failover'/>
//! ```

use std::time::Duration;

use rand::Rng;

use super::xml::parse_element;

/// Namespace of the proxy's re-login hint.
pub const NS_RELOGIN: &str = "urn:x-prg-proxy:relogin:0";

/// Largest accepted attribute value, in seconds (about 31.7 years); larger
/// values are treated as garbage.
const MAX_SECS: u64 = 1_000_000_000;

/// A re-login hint: when the proxy asks the client to log in again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relogin {
    /// Suggested delay before logging in again.
    pub after: Duration,
    /// Earliest sensible delay (`min <= after`).
    pub min: Duration,
    /// Latest sensible delay (`after <= max`).
    pub max: Duration,
    /// Why, e.g. `failover` or `paced`; empty when not given.
    pub reason: String,
}

impl Relogin {
    /// Read the `<relogin xmlns='urn:x-prg-proxy:relogin:0'/>` child of a
    /// stream error's or SASL failure's raw XML (found at any depth).
    ///
    /// Durations are decimal seconds: `317` or `12.345` (digits, optionally
    /// a `.` and more digits; sub-nanosecond digits are dropped; no sign,
    /// exponent or whitespace other than around the value).
    ///
    /// * `None` when the XML does not parse, has no `relogin` element in
    ///   that namespace, or `after` is missing or garbage: without `after`
    ///   there is no hint.
    /// * A missing or garbage `min` or `max` is taken as `after`; a `min`
    ///   above `after` is lowered to `after`, a `max` below it raised to
    ///   it, so `min <= after <= max` always holds.
    /// * A missing `reason` is the empty string.
    pub fn parse(raw_xml: &str) -> Option<Relogin> {
        let root = parse_element(raw_xml.as_bytes()).ok()?;
        let el = if is_relogin(&root) {
            &root
        } else {
            find_relogin(&root)?
        };
        let after = el.attr("after").and_then(parse_secs)?;
        let min = el.attr("min").and_then(parse_secs).unwrap_or(after);
        let max = el.attr("max").and_then(parse_secs).unwrap_or(after);
        Some(Relogin {
            after,
            min: min.min(after),
            max: max.max(after),
            reason: el.attr("reason").unwrap_or("").to_owned(),
        })
    }
}

fn is_relogin(e: &super::xml::Element) -> bool {
    e.local() == "relogin" && e.ns() == Some(NS_RELOGIN)
}

fn find_relogin(e: &super::xml::Element) -> Option<&super::xml::Element> {
    for c in &e.children {
        if is_relogin(c) {
            return Some(c);
        }
        if let Some(f) = find_relogin(c) {
            return Some(f);
        }
    }
    None
}

/// Decimal seconds (`317`, `12.345`, `0.5`, `7.`) to a duration.
fn parse_secs(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = whole.parse().ok()?;
    if secs > MAX_SECS {
        return None;
    }
    let mut nanos: u32 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(Duration::new(secs, nanos))
}

/// When a client that was sent away logs in again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectPolicy {
    /// Wait the hint's `after`; without a hint, as
    /// [`ReconnectPolicy::Rfc6120Random`].
    Honour,
    /// Reconnect at once, whatever the hint says.
    Immediate,
    /// A uniformly random delay of 0–60 s (RFC 6120 §3.3 suggests one),
    /// ignoring any hint.
    Rfc6120Random,
    /// Always this delay, ignoring any hint.
    Fixed(Duration),
}

impl ReconnectPolicy {
    /// Upper end of the [`ReconnectPolicy::Rfc6120Random`] delay.
    pub const RFC6120_MAX: Duration = Duration::from_secs(60);

    /// The delay before reconnecting, given the hint of the error that ended
    /// the session (if it had one).
    pub fn delay<R: Rng + ?Sized>(&self, hint: Option<&Relogin>, rng: &mut R) -> Duration {
        match self {
            ReconnectPolicy::Honour => match hint {
                Some(h) => h.after,
                None => ReconnectPolicy::Rfc6120Random.delay(None, rng),
            },
            ReconnectPolicy::Immediate => Duration::ZERO,
            ReconnectPolicy::Rfc6120Random => rng.gen_range(Duration::ZERO..=Self::RFC6120_MAX),
            ReconnectPolicy::Fixed(d) => *d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const STREAM_ERROR: &str = "<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>node imp1 failed over; reconnect in 317 s</text><relogin xmlns='urn:x-prg-proxy:relogin:0' after='317' min='120' max='537' reason='failover'/></stream:error>";
    const SASL_FAILURE: &str = "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><temporary-auth-failure/><text>login paced; retry in 12.345 s</text><relogin xmlns='urn:x-prg-proxy:relogin:0' after='12.345' min='0.5' max='30.000000000999' reason='paced'/></failure>";

    fn with_attrs(attrs: &str) -> String {
        format!("<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><temporary-auth-failure/><relogin xmlns='urn:x-prg-proxy:relogin:0'{attrs}/></failure>")
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn parses_stream_error_hint() {
        let r = Relogin::parse(STREAM_ERROR).expect("hint");
        assert_eq!(
            r,
            Relogin {
                after: s(317),
                min: s(120),
                max: s(537),
                reason: "failover".into(),
            }
        );
    }

    #[test]
    fn parses_sasl_failure_hint_with_fractions() {
        let r = Relogin::parse(SASL_FAILURE).expect("hint");
        assert_eq!(r.after, Duration::from_millis(12_345));
        assert_eq!(r.min, Duration::from_millis(500));
        // Digits beyond nanoseconds are dropped.
        assert_eq!(r.max, s(30));
        assert_eq!(r.reason, "paced");
    }

    #[test]
    fn bare_relogin_element_parses() {
        let r = Relogin::parse(
            "<relogin xmlns='urn:x-prg-proxy:relogin:0' after='7.' min='1' max='9'/>",
        )
        .expect("hint");
        assert_eq!((r.after, r.min, r.max), (s(7), s(1), s(9)));
        assert_eq!(r.reason, "");
    }

    #[test]
    fn no_hint_gives_none() {
        // No relogin child.
        assert_eq!(Relogin::parse("<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"), None);
        // Wrong namespace.
        assert_eq!(
            Relogin::parse("<failure><relogin xmlns='urn:example' after='5'/></failure>"),
            None
        );
        assert_eq!(
            Relogin::parse("<failure><relogin after='5'/></failure>"),
            None
        );
        // Not XML, or truncated.
        assert_eq!(Relogin::parse(""), None);
        assert_eq!(Relogin::parse("garbage"), None);
        assert_eq!(
            Relogin::parse(&STREAM_ERROR[..STREAM_ERROR.len() - 5]),
            None
        );
    }

    #[test]
    fn missing_or_garbage_after_gives_none() {
        for attrs in [
            "",
            " min='1' max='2'",
            " after=''",
            " after='soon'",
            " after='-5'",
            " after='+5'",
            " after='1e3'",
            " after='inf'",
            " after='NaN'",
            " after='.5'",
            " after='1.2.3'",
            " after='1 2'",
            " after='99999999999999999999999'",
            " after='1000000001'",
        ] {
            assert_eq!(Relogin::parse(&with_attrs(attrs)), None, "{attrs}");
        }
        assert!(Relogin::parse(&with_attrs(" after=' 5 '")).is_some());
    }

    #[test]
    fn missing_or_garbage_bounds_default_to_after() {
        let r = Relogin::parse(&with_attrs(" after='10'")).expect("hint");
        assert_eq!((r.min, r.max, r.reason.as_str()), (s(10), s(10), ""));
        let r =
            Relogin::parse(&with_attrs(" after='10' min='x' max='-1' reason='r'")).expect("hint");
        assert_eq!((r.min, r.max, r.reason.as_str()), (s(10), s(10), "r"));
        // Inconsistent bounds are clamped around after.
        let r = Relogin::parse(&with_attrs(" after='10' min='20' max='5'")).expect("hint");
        assert_eq!((r.min, r.after, r.max), (s(10), s(10), s(10)));
    }

    #[test]
    fn honour_uses_after() {
        let mut rng = StdRng::seed_from_u64(1);
        let h = Relogin::parse(STREAM_ERROR).expect("hint");
        assert_eq!(ReconnectPolicy::Honour.delay(Some(&h), &mut rng), s(317));
        let p = Relogin::parse(SASL_FAILURE).expect("hint");
        assert_eq!(
            ReconnectPolicy::Honour.delay(Some(&p), &mut rng),
            Duration::from_millis(12_345)
        );
    }

    #[test]
    fn honour_without_hint_is_rfc6120_random() {
        let mut a = StdRng::seed_from_u64(7);
        let mut b = StdRng::seed_from_u64(7);
        for _ in 0..100 {
            let d = ReconnectPolicy::Honour.delay(None, &mut a);
            assert!(d <= ReconnectPolicy::RFC6120_MAX, "{d:?}");
            assert_eq!(d, ReconnectPolicy::Rfc6120Random.delay(None, &mut b));
        }
    }

    #[test]
    fn immediate_and_fixed_ignore_hints() {
        let mut rng = StdRng::seed_from_u64(2);
        let h = Relogin::parse(STREAM_ERROR).expect("hint");
        assert_eq!(
            ReconnectPolicy::Immediate.delay(Some(&h), &mut rng),
            Duration::ZERO
        );
        assert_eq!(
            ReconnectPolicy::Immediate.delay(None, &mut rng),
            Duration::ZERO
        );
        let f = ReconnectPolicy::Fixed(Duration::from_millis(1500));
        assert_eq!(f.delay(Some(&h), &mut rng), Duration::from_millis(1500));
        assert_eq!(f.delay(None, &mut rng), Duration::from_millis(1500));
    }

    #[test]
    fn rfc6120_random_spreads_over_a_minute_and_ignores_hints() {
        let mut rng = StdRng::seed_from_u64(3);
        let h = Relogin::parse(STREAM_ERROR).expect("hint");
        let ds: Vec<Duration> = (0..2000)
            .map(|i| {
                let hint = (i % 2 == 0).then_some(&h);
                ReconnectPolicy::Rfc6120Random.delay(hint, &mut rng)
            })
            .collect();
        assert!(ds.iter().all(|d| *d <= s(60)));
        // Uniform: every 10 s bucket gets a fair share (expected ~333).
        for b in 0..6u64 {
            let n = ds
                .iter()
                .filter(|d| d.as_secs() / 10 == b || (b == 5 && d.as_secs() == 60))
                .count();
            assert!((250..420).contains(&n), "bucket {b}: {n}");
        }
        let mean = ds.iter().sum::<Duration>() / ds.len() as u32;
        assert!(mean > s(27) && mean < s(33), "{mean:?}");
    }
}
