//! What a reload changes in the server, and the policy read at start and
//! re-read at every reload: remote command rules, tokens, TLS files.
//!
//! One path for both: [`Policy::load`] reads the files at start (after
//! `preflight` read them once to refuse a bad start before READY=1), and a
//! reload builds what it can and swaps it in, keeping what is in force for
//! what cannot be read (fail closed). [`follow_config`] applies each new
//! config to the broker, the callers and the policy.

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::RwLock;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ServerError, listener::TlsConfig, state::State};
use crate::{
    auth::{TokenError, Verifier},
    config::{Config, RemoteCmdConfig, ServerConfig, reload::Changes},
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
        })
    }

    /// The remote command rules in force.
    pub(crate) fn runner(&self) -> Arc<Runner> {
        Arc::clone(&self.runner.read())
    }
}

fn verifier(server: &ServerConfig) -> Result<Verifier, TokenError> {
    Verifier::load(
        server.auth_token_file.as_deref(),
        server.tokens_file.as_deref(),
    )
}

/// Applies reloaded settings that can change live, until `shutdown`.
pub(super) async fn follow_config(
    state: Arc<State>,
    mut config: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
) {
    let mut current = Arc::clone(&config.borrow_and_update());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = config.changed() => if changed.is_err() { return },
        }
        let new = Arc::clone(&config.borrow_and_update());
        // What waits for a restart is logged by whoever sent the config
        // (`contactd serve`'s reload, once); here, the state that follows
        // the config, changed only where the config did.
        let changes = Changes::server(&current, &new);
        if changes.touches("remote_cmd") {
            warn_if_widened(&current.remote_cmd, &new.remote_cmd);
            *state.policy.runner.write() = Arc::new(Runner::new(new.remote_cmd.clone()));
            tracing::info!(
                enabled = new.remote_cmd.enabled,
                patterns = new.remote_cmd.allow.len(),
                "remote command rules updated"
            );
        }
        if changes.touches("server.max_callers") || changes.touches("server.max_status_size") {
            state.callers.set_limits(
                new.server.max_callers,
                new.server.max_status_size.as_u64() as usize,
            );
        }
        if changes.touches("tasks") || changes.touches("store") {
            state.broker.apply(&new);
        }
        // Unconditional: a rotated token or certificate file keeps its path.
        reload_credentials(&state.policy, &current, &new);
        current = new;
    }
}

/// Re-reads the token files and TLS files (so rotated ones apply on SIGHUP).
/// Fails closed: a file that cannot be used keeps the credentials in force;
/// a change that turns authentication off is applied, with a WARN naming it.
fn reload_credentials(policy: &Policy, old: &Config, new: &Config) {
    match verifier(&new.server) {
        Ok(verifier) => {
            let was = policy.auth.read().requires_shared() || policy.auth.read().has_tokens();
            if was && !verifier.requires_shared() && !verifier.has_tokens() {
                tracing::warn!(
                    "config reload turns token authentication OFF: server.auth_token_file and \
                     server.tokens_file are no longer set; Contact calls need no token now"
                );
            }
            *policy.auth.write() = verifier;
        }
        Err(e) => tracing::error!("{}; keeping the tokens in force", ServerError::Token(e)),
    }
    if old.has_identities() && !new.has_identities() {
        tracing::warn!(
            "config reload turns caller identities OFF: agent names are now taken from a header"
        );
    }
    if let (Some(swap), Some(tls)) = (&policy.tls, &new.server.tls) {
        match crate::tls::server_config(tls) {
            Ok(config) => {
                swap.store(config);
                tracing::info!(cert = %tls.cert.display(), "TLS certificate and keys re-read: new connections use them");
            }
            Err(e) => tracing::error!(
                "{}; new connections keep the certificate in force",
                ServerError::Tls(e)
            ),
        }
    } else if policy.tls.is_some() {
        tracing::warn!(
            "config reload removes [server.tls]: the port stays TLS with the certificate in \
             force until a restart"
        );
    }
}

/// Warns when a reload lets more commands run.
fn warn_if_widened(old: &RemoteCmdConfig, new: &RemoteCmdConfig) {
    let before: std::collections::HashSet<String> =
        old.allow.iter().map(ToString::to_string).collect();
    let added: Vec<String> = new
        .allow
        .iter()
        .map(ToString::to_string)
        .filter(|p| !before.contains(p))
        .collect();
    if new.enabled && (!old.enabled || !added.is_empty()) {
        tracing::warn!(
            turned_on = !old.enabled,
            added = ?added,
            "config reload widens remote_cmd: more commands may run now"
        );
    }
    let callers: Vec<&String> = new
        .callers
        .iter()
        .filter(|c| !old.callers.contains(c))
        .collect();
    if !callers.is_empty() {
        tracing::warn!(added = ?callers, "config reload gives more certificate names the operator role (remote_cmd.callers)");
    }
}
