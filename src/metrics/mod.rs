//! Prometheus metrics, shared by the server and the agent: the registry
//! each builds at start, the process-wide series (build, start time,
//! dropped log lines, config reloads), the two text formats, and
//! [`http`], the small server that answers `GET /metrics`.
//!
//! Counting costs the hot paths nothing new: what is counted per task
//! (deliveries, acks) is read at scrape time from the per-caller counters
//! `contactd agents` already shows, and gauges are read from the state
//! they describe. Only cold events (a connection refused, a reload, a
//! command run) get counters of their own.

pub mod http;

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        info::Info,
    },
    registry::Registry,
};

/// The exposition formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text format 0.0.4, the default.
    Prometheus,
    /// OpenMetrics 1.0 text, when the `Accept` header names it.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Encodes `registry` in `format`.
///
/// # Errors
/// Only a formatting error of the encoder (a bug).
pub fn render(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(8192);
    match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
    }
    Ok(out)
}

/// A new registry with the series every contactd process has, prefixed
/// `prefix` (`contactd` or `contactd_agent`).
pub fn registry(prefix: &str, logging: Option<Arc<crate::logging::Logging>>) -> Registry {
    let mut registry = Registry::with_prefix(prefix);
    registry.register(
        "build",
        "The running build: version and git commit (see --version)",
        Info::new([
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", env!("CONTACTD_COMMIT")),
        ]),
    );
    registry.register_collector(Box::new(Process {
        start: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        logging,
    }));
    registry
}

/// A metrics endpoint about to be served: its bound listener and the
/// registry with the process' own series; the server or the agent adds
/// its collector and serves it with [`Endpoint::serve`].
#[derive(Debug)]
pub struct Endpoint {
    pub listener: tokio::net::TcpListener,
    pub registry: Registry,
}

impl Endpoint {
    /// Serves `GET /metrics` with `collector` added, until `stop`.
    pub fn serve(
        mut self,
        config: &crate::config::MetricsConfig,
        collector: impl Collector,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.registry.register_collector(Box::new(collector));
        match self.listener.local_addr() {
            Ok(addr) => tracing::info!(%addr, "metrics endpoint listening: GET /metrics"),
            Err(e) => tracing::warn!("metrics endpoint: cannot read its address: {e}"),
        }
        let limits = http::Limits::from(config);
        http::serve(self.listener, limits, Arc::new(self.registry), stop)
    }
}

/// Counts of config reloads, by result.
#[derive(Debug, Clone, Default)]
pub struct Reloads {
    pub applied: Counter<u64, AtomicU64>,
    pub failed: Counter<u64, AtomicU64>,
}

impl Reloads {
    /// Registers the counters in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(self.clone()));
    }
}

impl Collector for Reloads {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(
            "config_reloads",
            "Config reloads (SIGHUP), by result: applied, or failed (the config in force was kept)",
            None,
            MetricType::Counter,
        )?;
        for (result, counter) in [("applied", &self.applied), ("failed", &self.failed)] {
            counter.encode(m.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}

/// The process' start time and its dropped log lines.
#[derive(Debug)]
struct Process {
    start: f64,
    logging: Option<Arc<crate::logging::Logging>>,
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "start_time_seconds",
            "When the process started, in seconds since the Unix epoch",
            self.start,
        )?;
        if let Some(logging) = &self.logging {
            counter(
                &mut encoder,
                "log_lines_dropped",
                "Log lines dropped because the log writer could not keep up",
                logging.dropped_lines() as u64,
            )?;
        }
        Ok(())
    }
}

/// Encodes one unlabelled gauge.
pub(crate) fn gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    N: prometheus_client::encoding::EncodeGaugeValue,
{
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// Encodes one unlabelled counter (the `_total` suffix is added).
pub(crate) fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

/// Encodes a counter with one label, a sample per `(label value, count)`.
pub(crate) fn labelled_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in values {
        ConstCounter::new(*count).encode(m.encode_family(&[(label, *value)])?)?;
    }
    Ok(())
}

/// Encodes a gauge with one label.
pub(crate) fn labelled_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, count) in values {
        ConstGauge::new(*count).encode(m.encode_family(&[(label, *value)])?)?;
    }
    Ok(())
}

/// Histogram buckets for durations from 1 ms to about 2 minutes.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 4.0, 9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }

    #[test]
    fn both_formats_encode_the_process_series() {
        let mut registry = registry("contactd", None);
        Reloads::default().register(&mut registry);
        let text = render(&registry, Format::Prometheus).unwrap();
        assert!(
            text.contains("# TYPE contactd_config_reloads_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("contactd_config_reloads_total{result=\"failed\"} 0\n"),
            "{text}"
        );
        let open = render(&registry, Format::OpenMetrics).unwrap();
        assert!(open.contains("# TYPE contactd_build info\n"), "{open}");
        assert!(open.ends_with("# EOF\n"), "{open}");
    }
}
