//! The re-login hint planner: where in time each moved user's turn lies.
//!
//! Pure: the caller passes the number of users, the window and a random
//! source; the planner never reads a clock. Slots are *stratified*: the
//! window is cut into one sub-interval per user, the users are assigned to
//! sub-intervals in random order, and each user's slot is a random point
//! inside its own sub-interval. In a flat window the sub-intervals are
//! equal, so the planned rate is N / window instead of clumping as
//! independent random delays do. An adaptive window is a *ramp*: the
//! planned rate starts at the rate the pacer admits now and doubles every
//! second up to `max_rate`, so that a backup faster than the pacer knew is
//! used at once, while the pacer holds (and, past its hold bound, refuses
//! with a later turn) whatever the backup cannot take.

use std::time::Duration;

use rand::seq::SliceRandom;
use rand::Rng;

use crate::config::WindowMode;

/// A re-login window, as offsets from the moment the users were evicted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// No slot earlier than this.
    pub lower: Duration,
    /// No slot later than this.
    pub upper: Duration,
    /// The planned rate's shape from `lower` on; `None`: flat.
    pub ramp: Option<Ramp>,
}

/// A planned rate that starts at `start` logins per second and doubles
/// every `doubling` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    /// Logins per second at the start.
    pub start: f64,
    /// Logins per second at most.
    pub max: f64,
    /// Seconds for the rate to double.
    pub doubling: f64,
}

impl Ramp {
    /// Seconds from the start until `count` logins are planned.
    pub fn time_for(&self, count: f64) -> f64 {
        let (r0, t2) = (self.start, self.doubling);
        let ln2 = std::f64::consts::LN_2;
        let top = (self.max / r0).max(1.0);
        let t_top = t2 * top.log2();
        let c_top = r0 * t2 / ln2 * (top - 1.0);
        if count <= c_top {
            t2 * (1.0 + count * ln2 / (r0 * t2)).log2()
        } else {
            t_top + (count - c_top) / self.max
        }
    }
}

impl Window {
    /// A flat window.
    pub fn flat(lower: Duration, upper: Duration) -> Window {
        Window {
            lower,
            upper,
            ramp: None,
        }
    }

    /// The window's length.
    pub fn len(&self) -> Duration {
        self.upper.saturating_sub(self.lower)
    }

    /// Whether the window has no length (every slot is `lower`).
    pub fn is_empty(&self) -> bool {
        self.len().is_zero()
    }

    /// The logins per second the window plans for `n` users.
    pub fn planned_rate(&self, n: usize) -> f64 {
        let secs = self.len().as_secs_f64();
        if secs > 0.0 {
            n as f64 / secs
        } else {
            f64::INFINITY
        }
    }
}

/// The shortest adaptive window: a move of a handful of users still
/// spreads them over this.
pub const MIN_ADAPTIVE_WINDOW: Duration = Duration::from_secs(1);

/// How fast an adaptive window's planned rate doubles.
pub const RAMP_DOUBLING: f64 = 1.0;

/// The window for `n` users moving to a node whose configured re-login
/// limits are `[lower, upper]` and whose pacer admits `rate` logins per
/// second now, at most `max_rate`.
///
/// - [`WindowMode::Fixed`]: flat over `[lower, upper]`, as the source
///   defines them.
/// - [`WindowMode::Adaptive`]: opens at once (the node is confirmed
///   serving when the move is carried out) and ramps from `rate` up to
///   `max_rate`, doubling every [`RAMP_DOUBLING`] seconds, for as long as
///   `n` users take; flat over `[0, upper]` if that is longer than `upper`,
///   and over at least [`MIN_ADAPTIVE_WINDOW`].
pub fn window(
    mode: WindowMode,
    n: usize,
    rate: f64,
    max_rate: f64,
    lower: Duration,
    upper: Duration,
) -> Window {
    match mode {
        WindowMode::Fixed => Window::flat(lower, upper),
        WindowMode::Adaptive => {
            if !(rate > 0.0 && rate.is_finite()) {
                return Window::flat(Duration::ZERO, upper);
            }
            let ramp = Ramp {
                start: rate,
                max: max_rate.max(rate),
                doubling: RAMP_DOUBLING,
            };
            let len = ramp.time_for(n as f64);
            let min = MIN_ADAPTIVE_WINDOW.min(upper);
            if len > upper.as_secs_f64() {
                Window::flat(Duration::ZERO, upper)
            } else if len < min.as_secs_f64() {
                Window::flat(Duration::ZERO, min)
            } else {
                Window {
                    lower: Duration::ZERO,
                    upper: Duration::from_secs_f64(len),
                    ramp: Some(ramp),
                }
            }
        }
    }
}

/// Stratified slots for `n` users: element `i` is user `i`'s offset from
/// the eviction. The users' order within the window is a random
/// permutation; each slot is uniform inside its own `len / n` stratum.
pub fn stratified<R: Rng + ?Sized>(n: usize, w: Window, rng: &mut R) -> Vec<Duration> {
    let mut strata: Vec<usize> = (0..n).collect();
    strata.shuffle(rng);
    strata
        .into_iter()
        .map(|k| slot_in_stratum(k, n, w, rng))
        .collect()
}

/// A uniform point inside stratum `k` of `n` of the window.
pub fn slot_in_stratum<R: Rng + ?Sized>(k: usize, n: usize, w: Window, rng: &mut R) -> Duration {
    if n == 0 || w.is_empty() {
        return w.lower;
    }
    if let Some(r) = w.ramp {
        let at = r.time_for(k.min(n - 1) as f64 + rng.gen::<f64>());
        return (w.lower + Duration::from_secs_f64(at)).min(w.upper);
    }
    let width = w.len().as_secs_f64() / n as f64;
    let at = (k.min(n - 1) as f64 + rng.gen::<f64>()) * width;
    (w.lower + Duration::from_secs_f64(at)).min(w.upper)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const S120: Duration = Duration::from_secs(120);
    const S537: Duration = Duration::from_secs(537);

    /// Logins per 1-second bucket.
    fn buckets(slots: &[Duration]) -> Vec<usize> {
        let last = slots.iter().max().map_or(0, |d| d.as_secs() as usize);
        let mut b = vec![0; last + 1];
        for s in slots {
            b[s.as_secs() as usize] += 1;
        }
        b
    }

    #[test]
    fn fixed_window_is_the_source_defaults() {
        let w = window(WindowMode::Fixed, 10_000, 200.0, 2000.0, S120, S537);
        assert_eq!(w, Window::flat(S120, S537));
        let mut rng = StdRng::seed_from_u64(7);
        for s in stratified(10_000, w, &mut rng) {
            assert!((S120..=S537).contains(&s), "{s:?} outside 120–537 s");
        }
    }

    #[test]
    fn ten_thousand_users_no_second_above_1_1_times_the_planned_rate() {
        let w = window(WindowMode::Fixed, 10_000, 0.0, 2000.0, S120, S537);
        let planned = w.planned_rate(10_000);
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let slots = stratified(10_000, w, &mut rng);
            let b = buckets(&slots);
            // Every whole second inside the window.
            let peak = b[120..537].iter().copied().max().unwrap_or(0);
            assert!(
                peak as f64 <= 1.1 * planned,
                "seed {seed}: peak {peak}/s against planned {planned:.2}/s"
            );
            assert_eq!(b.iter().sum::<usize>(), 10_000);
        }
    }

    #[test]
    fn independent_uniform_delays_would_clump() {
        // What the stratification buys: the same N uniform in the window
        // exceed the planned rate by far in some second.
        let w = Window::flat(S120, S537);
        let mut rng = StdRng::seed_from_u64(1);
        let slots: Vec<Duration> = (0..10_000)
            .map(|_| S120 + Duration::from_secs_f64(rng.gen::<f64>() * 417.0))
            .collect();
        let peak = buckets(&slots).into_iter().max().unwrap_or(0);
        assert!(peak as f64 > 1.2 * w.planned_rate(10_000), "peak {peak}");
    }

    #[test]
    fn every_user_gets_a_distinct_stratum() {
        let w = Window::flat(Duration::ZERO, Duration::from_secs(100));
        let mut rng = StdRng::seed_from_u64(3);
        let slots = stratified(100, w, &mut rng);
        let mut per_second = buckets(&slots);
        per_second.resize(100, 0);
        assert!(per_second.iter().all(|&c| c == 1), "{per_second:?}");
    }

    #[test]
    fn adaptive_window_ramps_from_the_pacers_rate_within_the_limits() {
        // 3,000 users from 200/s doubling every second, at most 2,000/s:
        // 200, 400, 800, 1,600 ... the 3,000th turn is in under 4 s.
        let w = window(WindowMode::Adaptive, 3_000, 200.0, 2000.0, S120, S537);
        assert_eq!(w.lower, Duration::ZERO);
        let len = w.upper.as_secs_f64();
        assert!((3.0..4.0).contains(&len), "{len}");
        // Slots follow the ramp: the first second holds about 200 / ln 2 ...
        let mut rng = StdRng::seed_from_u64(11);
        let slots = stratified(3_000, w, &mut rng);
        let b = buckets(&slots);
        assert!((280..300).contains(&b[0]), "{b:?}");
        // ... and every later second more than the one before.
        assert!(b.windows(2).take(2).all(|p| p[1] > p[0]), "{b:?}");
        // Past the top the rate is flat at the maximum.
        let r = w.ramp.expect("a ramp");
        let t = r.time_for(20_000.0) - r.time_for(18_000.0);
        assert!((t - 1.0).abs() < 1e-9, "{t}");
        // 10 M users at most 2,000/s would need 5,000 s: flat over the limit.
        let w = window(WindowMode::Adaptive, 10_000_000, 200.0, 2000.0, S120, S537);
        assert_eq!(w, Window::flat(Duration::ZERO, S537));
        // A handful of users still spread over a second.
        let w = window(WindowMode::Adaptive, 3, 200.0, 2000.0, S120, S537);
        assert_eq!(w, Window::flat(Duration::ZERO, MIN_ADAPTIVE_WINDOW));
        // No rate known: the whole upper limit.
        let w = window(WindowMode::Adaptive, 10, 0.0, 2000.0, S120, S537);
        assert_eq!(w.upper, S537);
    }

    #[test]
    fn degenerate_windows_and_counts() {
        let mut rng = StdRng::seed_from_u64(5);
        assert!(stratified(0, Window::flat(S120, S537), &mut rng).is_empty());
        let point = Window::flat(S120, S120);
        assert_eq!(stratified(3, point, &mut rng), vec![S120; 3]);
        assert!(point.planned_rate(3).is_infinite());
    }
}
