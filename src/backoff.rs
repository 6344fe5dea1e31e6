//! Reconnection delays as a pure value: gRPC's connection backoff
//! (doc/connection-backoff.md): exponential with a multiplier, capped, with
//! ±jitter, started over by [`Backoff::reset`].
//!
//! Why not a crate: `backoff` is unmaintained (RUSTSEC-2025-0012), and
//! `backon` stops after 3 tries by default and jitters differently from
//! gRPC (it adds up to one extra delay rather than moving it by ±20 %).
//! The algorithm is a few lines; as a value that takes its randomness as an
//! argument it is unit-tested without sleeping.

use std::time::Duration;

use crate::config::BackoffConfig;

/// The state of a backoff: the next base delay.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    config: BackoffConfig,
    /// The next delay, before jitter.
    current: Duration,
}

impl Backoff {
    /// A backoff at its start: the next delay is `initial` (± jitter).
    pub fn new(config: BackoffConfig) -> Backoff {
        Backoff {
            current: config.initial,
            config,
        }
    }

    /// Replaces the parameters (after a config reload), keeping the
    /// position within `[initial, max]`.
    pub fn set_config(&mut self, config: BackoffConfig) {
        self.current = self
            .current
            .clamp(config.initial, config.max.max(config.initial));
        self.config = config;
    }

    /// Starts over: the next delay is `initial` again.
    pub fn reset(&mut self) {
        self.current = self.config.initial;
    }

    /// The next delay, given `unit`, a random number in `[0, 1)`: the base
    /// delay moved by `jitter * (2 * unit - 1)` of itself. Then the base
    /// grows by `multiplier`, up to `max`.
    ///
    /// Unlike gRPC's pseudo-code, the first delay is jittered too: a fleet
    /// that loses its server at the same instant then spreads its very first
    /// attempts.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        let base = self.current.as_secs_f64();
        let delay = base * (1.0 + self.config.jitter * (2.0 * unit - 1.0));
        let max = self.config.max.as_secs_f64();
        self.current = Duration::from_secs_f64((base * self.config.multiplier).min(max));
        Duration::from_secs_f64(delay.max(0.0))
    }

    /// The next delay, with jitter from the thread's random generator.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(fastrand::f64())
    }

    /// The longest delay this backoff can produce: `max` plus its jitter.
    pub fn bound(&self) -> Duration {
        self.config.max.mul_f64(1.0 + self.config.jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: Duration) -> f64 {
        (d.as_secs_f64() * 1000.0).round() / 1000.0
    }

    #[test]
    fn grows_by_the_multiplier_up_to_max() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        let delays: Vec<f64> = (0..14).map(|_| secs(backoff.next_with(0.5))).collect();
        assert_eq!(
            delays,
            [
                1.0, 1.6, 2.56, 4.096, 6.554, 10.486, 16.777, 26.844, 42.950, 68.719, 109.951,
                120.0, 120.0, 120.0
            ]
        );
    }

    #[test]
    fn jitter_moves_each_delay_either_way() {
        let mut low = Backoff::new(BackoffConfig::default());
        let mut high = low.clone();
        assert_eq!(secs(low.next_with(0.0)), 0.8);
        assert_eq!(secs(high.next_with(1.0)), 1.2);
        assert_eq!(secs(low.next_with(0.0)), 1.28);
        assert_eq!(secs(high.next_with(1.0)), 1.92);
        for _ in 0..20 {
            low.next_with(0.0);
            high.next_with(1.0);
        }
        assert_eq!(secs(low.next_with(0.0)), 96.0);
        assert_eq!(secs(high.next_with(1.0)), 144.0);
        assert_eq!(high.bound(), Duration::from_secs(144));
        for _ in 0..1000 {
            let delay = high.next_delay();
            assert!((96.0..=144.0).contains(&delay.as_secs_f64()), "{delay:?}");
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        for _ in 0..5 {
            backoff.next_with(0.5);
        }
        backoff.reset();
        assert_eq!(backoff.next_with(0.5), Duration::from_secs(1));
    }

    #[test]
    fn no_jitter_and_no_growth_are_allowed() {
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(100),
            multiplier: 1.0,
            jitter: 0.0,
        });
        for unit in [0.0, 0.3, 0.99] {
            assert_eq!(backoff.next_with(unit), Duration::from_millis(100));
        }
    }

    #[test]
    fn a_reload_keeps_the_position_within_the_new_bounds() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        for _ in 0..20 {
            backoff.next_with(0.5);
        }
        backoff.set_config(BackoffConfig {
            max: Duration::from_secs(10),
            jitter: 0.0,
            ..BackoffConfig::default()
        });
        assert_eq!(backoff.next_with(0.5), Duration::from_secs(10));
    }
}
