//! What a scenario run yields, the machine-readable lines, and the targets.

use std::fmt::Write as _;

use crate::scenarios::Scenario;

/// One scenario run against one server.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Named figures, the compared one first; printed in this order.
    pub figures: Vec<(&'static str, f64)>,
    /// Problems seen (failed calls, streams that ended early, agents that
    /// received nothing): reported, and fatal in smoke mode.
    pub errors: Vec<String>,
}

impl Outcome {
    pub fn figure(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    /// Adds an error unless `ok`.
    pub fn check(&mut self, ok: bool, error: impl FnOnce() -> String) {
        if !ok {
            self.errors.push(error());
        }
    }
}

/// Adds the p50 and p99 of `hist` (nanoseconds) in microseconds.
pub fn percentiles(outcome: &mut Outcome, hist: &hdrhistogram::Histogram<u64>) {
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    outcome.figures.push(("p50_us", us(0.5)));
    outcome.figures.push(("p99_us", us(0.99)));
}

/// `RESULT scenario=... server=... name=value ... errors=N`.
pub fn result_line(scenario: Scenario, server: &str, outcome: &Outcome) -> String {
    let mut line = format!("RESULT scenario={} server={server}", scenario.name());
    for (name, value) in &outcome.figures {
        let _ = write!(line, " {name}={}", number(*value));
    }
    let _ = write!(line, " errors={}", outcome.errors.len());
    if let Some(first) = outcome.errors.first() {
        let _ = write!(line, " first_error={first:?}");
    }
    line
}

/// Numbers as they print: integers plain, small values with decimals.
pub fn number(value: f64) -> String {
    if value.abs() >= 1000.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

/// The median of `values` (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// A target: a figure of contactd's (or its ratio to a reference), at
/// least or at most a limit.
pub struct Target {
    pub what: &'static str,
    pub limit: f64,
    pub at_least: bool,
}

impl Target {
    pub fn met(&self, value: f64) -> bool {
        if self.at_least {
            value >= self.limit
        } else {
            value <= self.limit
        }
    }

    pub fn line(&self, scenario: Scenario, value: f64) -> String {
        format!(
            "TARGET scenario={} what={} value={} target={}{} verdict={}",
            scenario.name(),
            self.what,
            number(value),
            if self.at_least { ">=" } else { "<=" },
            number(self.limit),
            if self.met(value) { "met" } else { "MISSED" },
        )
    }
}
