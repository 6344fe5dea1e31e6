//! Logging: a `tracing` subscriber writing to stderr, whose filter can be
//! changed at run time (on a config reload).

use std::io::IsTerminal;

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

use crate::config::LogConfig;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter: {0}")]
    Filter(String),
    #[error("cannot install the logger: {0}")]
    Install(String),
}

/// Handle on the installed subscriber, to apply reloaded settings.
#[derive(Debug)]
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
}

/// `RUST_LOG` if set, else the configured level.
fn filter(config: &LogConfig) -> Result<EnvFilter, LogError> {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| config.level.clone());
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| LogError::Filter(format!("{directives:?}: {e}")))
}

/// Installs the global subscriber.
///
/// # Errors
/// A bad filter, or a subscriber already installed.
pub fn init(config: &LogConfig) -> Result<Logging, LogError> {
    let (filter_layer, handle) = reload::Layer::new(filter(config)?);
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .try_init()
        .map_err(|e| LogError::Install(e.to_string()))?;
    Ok(Logging { filter: handle })
}

impl Logging {
    /// Applies the settings of a reloaded config.
    ///
    /// # Errors
    /// A bad filter; the old one stays in force.
    pub fn apply(&self, config: &LogConfig) -> Result<(), LogError> {
        let filter = filter(config)?;
        self.filter
            .reload(filter)
            .map_err(|e| LogError::Install(e.to_string()))
    }
}
