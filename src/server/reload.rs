//! What a reload changes in the server: [`follow_config`] applies each new
//! config to the broker, the callers and the policy. The policy's files are
//! read by the same code at start ([`Policy::load`]) and at a reload, which
//! swaps in what it could read and keeps what is in force for what it
//! could not (fail closed).

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    ServerError,
    policy::{Policy, verifier},
    state::State,
};
use crate::{
    config::{Config, RemoteCmdConfig, reload::Changes},
    remote_cmd::Runner,
};

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
            state.policy.set_runner(Runner::new(new.remote_cmd.clone()));
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
