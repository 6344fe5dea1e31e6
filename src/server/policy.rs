//! Who may do what: the remote command rules, the tokens Contact calls may
//! carry and the TLS config of new connections. Read from the config's
//! files at start (`preflight` reads them once, so that a bad file stops
//! the start before READY=1, and hands them to `run`), and re-read at every
//! reload by `reload.rs`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::RwLock;

use super::{ServerError, listener::TlsConfig};
use crate::{
    auth::{TokenError, Verifier},
    config::{Config, ServerConfig},
    labels::{self, Conflict, Labels},
    remote_cmd::Runner,
};

/// Who may do what: read from the config's files at start, swapped on
/// reload.
#[derive(Debug)]
pub struct Policy {
    /// Remote command rules; replaced whole on reload.
    runner: RwLock<Arc<Runner>>,
    /// The tokens Contact calls may carry.
    pub(crate) auth: RwLock<Verifier>,
    /// The TLS config new connections get.
    pub(crate) tls: TlsConfig,
    /// `[[server.agents]]`: labels pinned by agent name.
    pins: RwLock<Arc<Vec<Pin>>>,
    /// Client certificates a reload's client CA no longer trusts, by the
    /// SHA-256 of their DER: calls on connections that presented them
    /// (before the reload) are refused. 32 bytes each, however many.
    pub(crate) distrusted: RwLock<std::collections::HashSet<[u8; 32]>>,
}

/// One `[[server.agents]]` block, its glob compiled.
#[derive(Debug)]
struct Pin {
    name: glob::Pattern,
    labels: Labels,
}

/// The pins of `config`; a name that is not a valid glob (check-config
/// refuses it) pins nothing.
fn pins(config: &Config) -> Arc<Vec<Pin>> {
    Arc::new(
        config
            .server
            .agents
            .iter()
            .filter_map(|pin| {
                Some(Pin {
                    name: glob::Pattern::new(&pin.name).ok()?,
                    labels: pin.labels.clone(),
                })
            })
            .collect(),
    )
}

impl Policy {
    /// Reads the files `config` names (token files, TLS files).
    ///
    /// # Errors
    /// [`ServerError::Token`] or [`ServerError::Tls`].
    pub fn load(config: &Config) -> Result<Policy, ServerError> {
        Ok(Policy {
            runner: RwLock::new(Arc::new(Runner::new(config.remote_cmd.clone()))),
            auth: RwLock::new(verifier(&config.server).map_err(ServerError::Token)?),
            tls: match &config.server.tls {
                Some(tls) => Some(Arc::new(ArcSwap::new(
                    crate::tls::server_config(tls).map_err(ServerError::Tls)?,
                ))),
                None => None,
            },
            pins: RwLock::new(pins(config)),
            distrusted: RwLock::default(),
        })
    }

    /// Replaces the pinned labels (a reload).
    pub(super) fn set_pins(&self, config: &Config) {
        *self.pins.write() = pins(config);
    }

    /// The labels of agent `name` that claims `claimed`: the claim, with
    /// every pin whose name matches in force over it (in file order, a
    /// later block winning), and the claims a pin overrode. With no pin
    /// for the name, the claim itself (shared, not copied: an agent's
    /// labels are held once).
    pub(crate) fn labels_for(
        &self,
        name: &str,
        claimed: &Arc<Labels>,
    ) -> (Arc<Labels>, Vec<Conflict>) {
        let pins = Arc::clone(&self.pins.read());
        let mut pinned = Labels::new();
        for pin in pins.iter().filter(|pin| pin.name.matches(name)) {
            for (key, value) in pin.labels.iter() {
                pinned.insert(key.to_owned(), value.to_owned());
            }
        }
        if pinned.is_empty() {
            return (Arc::clone(claimed), Vec::new());
        }
        let (labels, conflicts) = labels::pin(claimed, &pinned);
        (Arc::new(labels), conflicts)
    }

    /// The remote command rules in force.
    pub(crate) fn runner(&self) -> Arc<Runner> {
        Arc::clone(&self.runner.read())
    }

    /// Replaces the remote command rules (a reload).
    pub(super) fn set_runner(&self, runner: Runner) {
        *self.runner.write() = Arc::new(runner);
    }
}

pub(super) fn verifier(server: &ServerConfig) -> Result<Verifier, TokenError> {
    Verifier::load(
        server.auth_token_file.as_deref(),
        server.tokens_file.as_deref(),
    )
}

/// The key of a certificate in [`Policy::distrusted`].
pub(crate) fn fingerprint(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
