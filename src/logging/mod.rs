//! Logging: a `tracing` subscriber writing text or JSON to stderr and/or a
//! rotating file, through non-blocking writers (a slow disk or journal
//! never stalls a request; lines dropped under overload are counted and
//! reported). The filter, the exclusions and the format can change at run
//! time; where the lines go is fixed at start-up.

mod rotate;

use std::{
    io::IsTerminal,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use parking_lot::RwLock;
use tracing::{Event, Subscriber, field::Visit};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{
    Layer, Registry,
    filter::Targets,
    layer::{Context, Layered, SubscriberExt},
    reload,
    util::SubscriberInitExt,
};

pub use rotate::{Period, Policy, RotatingFile};

use crate::{
    config::{LogConfig, LogFormat, Rotation},
    untrusted::Budget,
};

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {directives:?}: {message}")]
    Filter { directives: String, message: String },
    #[error("cannot open log file {}: {source}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the logger: {0}")]
    Install(String),
}

type Output = Box<dyn Layer<Registry> + Send + Sync>;
type WithOutput = Layered<reload::Layer<Output, Registry>, Registry>;
type WithExclude = Layered<Exclude, WithOutput>;

/// The installed subscriber's handles: apply reloaded settings, report
/// dropped lines, and flush on drop.
pub struct Logging {
    filter: reload::Handle<Targets, WithExclude>,
    output: reload::Handle<Output, Registry>,
    exclude: Exclude,
    /// Where lines go, fixed at start-up: a change of `log.stderr`,
    /// `log.file` or the rotation needs a restart (`config::reload`).
    writers: Writers,
    /// Dropping these flushes what the writer threads still hold.
    _guards: Vec<WorkerGuard>,
}

impl std::fmt::Debug for Logging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logging").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Writers {
    stderr: Option<NonBlocking>,
    file: Option<NonBlocking>,
    /// stderr is the systemd journal, which stamps lines itself.
    journal: bool,
    ansi: bool,
}

/// `RUST_LOG` if set, else the configured level.
fn filter(config: &LogConfig) -> Result<Targets, LogError> {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| config.level.clone());
    crate::config::log::parse_filter(&directives).map_err(|message| LogError::Filter {
        message,
        directives,
    })
}

/// Installs the global subscriber.
///
/// # Errors
/// A bad filter, a log file that cannot be opened, or a subscriber already
/// installed.
pub fn init(config: &LogConfig) -> Result<Logging, LogError> {
    let filter = filter(config)?;
    let mut guards = Vec::new();
    let mut writer = |w: Box<dyn std::io::Write + Send>, name: &str| {
        let (writer, guard) = NonBlockingBuilder::default()
            .buffered_lines_limit(config.buffer_lines)
            .lossy(true)
            .thread_name(name)
            .finish(w);
        guards.push(guard);
        writer
    };
    let file = match &config.file {
        Some(path) => {
            let rotating =
                RotatingFile::open(path, policy(config)).map_err(|source| LogError::File {
                    path: path.clone(),
                    source,
                })?;
            Some(writer(Box::new(rotating), "contactd-log-file"))
        }
        None => None,
    };
    let stderr = config
        .stderr
        .then(|| writer(Box::new(std::io::stderr()), "contactd-log-stderr"));
    let writers = Writers {
        stderr,
        file,
        journal: stderr_is_journal(),
        ansi: std::io::stderr().is_terminal(),
    };
    let exclude = Exclude::default();
    exclude.set(&config.exclude);
    let (output, output_handle) = reload::Layer::new(output_layer(config.format, &writers));
    let (filter, filter_handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(output)
        .with(exclude.clone())
        .with(filter)
        .try_init()
        .map_err(|e| LogError::Install(e.to_string()))?;
    Ok(Logging {
        filter: filter_handle,
        output: output_handle,
        exclude,
        writers,
        _guards: guards,
    })
}

fn policy(config: &LogConfig) -> Policy {
    match config.rotation {
        Rotation::Size => Policy::Size {
            max_bytes: config.max_size.as_u64(),
            backups: config.backups,
        },
        Rotation::Hourly => Policy::Time {
            period: Period::Hourly,
            keep: config.keep,
        },
        Rotation::Daily => Policy::Time {
            period: Period::Daily,
            keep: config.keep,
        },
    }
}

/// systemd sets `JOURNAL_STREAM=dev:inode` when stderr goes to the journal.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

fn output_layer(format: LogFormat, writers: &Writers) -> Output {
    use tracing_subscriber::fmt;
    let mut layers: Vec<Output> = Vec::new();
    if let Some(w) = writers.stderr.clone() {
        layers.push(match (format, writers.journal) {
            (LogFormat::Json, _) => fmt::layer().json().with_writer(w).boxed(),
            // The journal stamps each line itself.
            (LogFormat::Text, true) => fmt::layer()
                .without_time()
                .with_ansi(false)
                .with_writer(w)
                .boxed(),
            (LogFormat::Text, false) => fmt::layer().with_ansi(writers.ansi).with_writer(w).boxed(),
        });
    }
    if let Some(w) = writers.file.clone() {
        layers.push(match format {
            LogFormat::Json => fmt::layer().json().with_writer(w).boxed(),
            LogFormat::Text => fmt::layer().with_ansi(false).with_writer(w).boxed(),
        });
    }
    Box::new(layers)
}

impl Logging {
    /// Applies the settings of a reloaded config: filter, exclusions and
    /// format change live; the rest waits for a restart (the reload's log
    /// line says so: `config::reload`).
    ///
    /// # Errors
    /// A bad filter; the old settings stay in force.
    pub fn apply(&self, config: &LogConfig) -> Result<(), LogError> {
        let filter = filter(config)?;
        self.filter
            .reload(filter)
            .map_err(|e| LogError::Install(e.to_string()))?;
        self.exclude.set(&config.exclude);
        self.output
            .reload(output_layer(config.format, &self.writers))
            .map_err(|e| LogError::Install(e.to_string()))?;
        Ok(())
    }

    /// Lines dropped so far because a writer's buffer was full.
    pub fn dropped_lines(&self) -> usize {
        [&self.writers.stderr, &self.writers.file]
            .into_iter()
            .flatten()
            .map(|w| w.error_counter().dropped_lines())
            .sum()
    }

    /// Every `every`, logs how many lines were dropped since the last report
    /// (if any). Runs until `stop` is cancelled.
    pub async fn report_dropped(
        &self,
        every: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut reported = 0;
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while stop.run_until_cancelled(ticks.tick()).await.is_some() {
            let noise = self.exclude.peer_noise.take_suppressed();
            if noise > 0 {
                tracing::warn!(
                    left_out = noise,
                    "HTTP/2 warnings about misbehaving peers left out of the log (at most \
                     {PEER_NOISE} a minute are written)"
                );
            }
            let dropped = self.dropped_lines();
            if dropped > reported {
                tracing::warn!(
                    dropped = dropped - reported,
                    total = dropped,
                    "log lines dropped: the log writer could not keep up (raise log.buffer_lines or lower the level)"
                );
                reported = dropped;
            }
        }
    }
}

/// Warnings of the HTTP/2 layer (h2, hyper) let through per
/// [`PEER_NOISE_WINDOW`]. h2 warns once per abusive connection (too many
/// resets, a ping ack never asked for): a peer that opens such connections
/// in a loop would otherwise write the log full.
const PEER_NOISE: u32 = 10;
const PEER_NOISE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Drops events whose message contains one of the configured substrings
/// (the seed's logging filter), and the HTTP/2 layer's warnings beyond
/// their budget.
#[derive(Clone)]
struct Exclude {
    active: Arc<AtomicBool>,
    patterns: Arc<RwLock<Vec<String>>>,
    peer_noise: Arc<Budget>,
}

impl Default for Exclude {
    fn default() -> Self {
        Exclude {
            active: Arc::default(),
            patterns: Arc::default(),
            peer_noise: Arc::new(Budget::new(PEER_NOISE, PEER_NOISE_WINDOW)),
        }
    }
}

/// Whether an event comes from the HTTP/2 layer, about a peer.
fn is_peer_noise(metadata: &tracing::Metadata<'_>) -> bool {
    let target = metadata.target();
    *metadata.level() <= tracing::Level::WARN
        && ["h2", "hyper"].iter().any(|crate_name| {
            target
                .strip_prefix(crate_name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

impl Exclude {
    fn set(&self, patterns: &[String]) {
        *self.patterns.write() = patterns.to_vec();
        self.active.store(!patterns.is_empty(), Ordering::Relaxed);
    }
}

impl<S: Subscriber> Layer<S> for Exclude {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        if is_peer_noise(event.metadata()) && !self.peer_noise.allow() {
            return false;
        }
        if !self.active.load(Ordering::Relaxed) {
            return true;
        }
        let mut message = MessageText(String::new());
        event.record(&mut message);
        !self
            .patterns
            .read()
            .iter()
            .any(|p| message.0.contains(p.as_str()))
    }
}

struct MessageText(String);

impl Visit for MessageText {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            use std::fmt::Write;
            let _ = write!(self.0, "{value:?}");
        }
    }
}
