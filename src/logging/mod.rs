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
    parse_filter(&directives).map_err(|message| LogError::Filter {
        message,
        directives,
    })
}

/// Filter directives: a default level and `target=level` pairs, as in
/// `"info"` or `"warn,contactd=debug"`. (tracing-subscriber's `Targets`: the
/// span and field filters of its `EnvFilter` would bring a regex engine into
/// every build, for directives an operator of a daemon does not need.)
///
/// # Errors
/// Words that are not such directives, or no directive at all.
pub fn parse_filter(directives: &str) -> Result<Targets, String> {
    // `Targets` itself lets odd text through (`"="` parses), so each
    // directive is checked first.
    let mut any = false;
    for directive in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        any = true;
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target), level),
            None => (None, directive),
        };
        if let Some(target) = target {
            let ok = target.split("::").all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            });
            if !ok {
                return Err(format!("bad target {target:?} in {directive:?}"));
            }
        }
        // (LevelFilter reads an empty level as ERROR.)
        if level.is_empty()
            || level
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "bad level {level:?} in {directive:?}: expected off, error, warn, info, debug or trace"
            ));
        }
    }
    if !any {
        return Err("no directive: expected a level such as \"info\"".to_owned());
    }
    directives.parse::<Targets>().map_err(|e| e.to_string())
}

/// Why `directives` is not a usable `log.level`, or `None` if it is.
///
/// Stricter than [`parse_filter`] (`Targets`), which takes any word for a
/// target: a level misspelt (`"chatty!!"`, `"inf"`) would parse as a target
/// nobody logs to, and the server would then log nothing at all. So each
/// directive must be a level (`info`), or `target=level` with a module path
/// for a target (`contactd::server=debug`, `h2=warn`), possibly with field
/// names (`target[{field}]=level`).
pub fn filter_problem(directives: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let expected = "expected directives such as \"info\" or \"warn,contactd=debug\"";
    if directives.trim().is_empty() {
        return Some(format!("is empty: {expected}"));
    }
    if let Err(e) = parse_filter(directives) {
        return Some(format!("invalid filter {directives:?} ({e}): {expected}"));
    }
    let is_level = |word: &str| LEVELS.contains(&word.trim().to_ascii_lowercase().as_str());
    let is_path = |target: &str| {
        target.split("::").all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
    };
    for directive in directives.split(',').map(str::trim) {
        let ok = match directive.rsplit_once('=') {
            None => is_level(directive),
            Some((target, level)) => {
                // The field part (`target[{field}]`) is `Targets`' to check.
                let target = target.split('[').next().unwrap_or_default();
                is_level(level) && (target.is_empty() || is_path(target))
            }
        };
        if !ok {
            return Some(format!(
                "{directive:?} in {directives:?} is neither a level (off, error, warn, info, \
                 debug, trace) nor TARGET=LEVEL with a module path for TARGET: {expected}"
            ));
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::parse_filter;

    #[test]
    fn filter_directives() {
        for good in [
            "info",
            "warn,contactd=debug",
            "info,contactd::server=trace,h2=off",
            "DEBUG",
        ] {
            assert!(parse_filter(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("", "no directive"),
            (" , ", "no directive"),
            ("=", "bad target"),
            ("loud", "bad level"),
            ("contactd=", "bad level"),
            ("contactd::server[remoteCMD]=trace", "bad target"),
            ("a::=info", "bad target"),
        ] {
            let err = parse_filter(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
