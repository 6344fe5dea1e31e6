//! What a reload changes in the server: [`follow_config`] applies each new
//! config to the broker, the callers and the policy. The policy's files are
//! read by the same code at start ([`Policy::load`](super::Policy::load))
//! and at a reload, which swaps in what it could read and keeps what is in
//! force for what it could not (fail closed).

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ServerError, policy::verifier, state::State};
use crate::{
    config::{Config, RemoteCmdConfig},
    labels::Labels,
    remote_cmd::Runner,
};

/// Applies every config sent on `config` after `built_from` (the one the
/// server's state was built from), until `shutdown`. A config sent before
/// this task first ran is applied at once, not missed.
pub(super) async fn follow_config(
    state: Arc<State>,
    mut config: watch::Receiver<Arc<Config>>,
    built_from: Arc<Config>,
    shutdown: CancellationToken,
) {
    let mut current = built_from;
    loop {
        let new = Arc::clone(&config.borrow_and_update());
        if !Arc::ptr_eq(&new, &current) {
            apply(&state, &current, &new);
            current = new;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = config.changed() => if changed.is_err() { return },
        }
    }
}

/// Applies `new` where the server follows its config live, `old` being the
/// config in force. What changed, and what waits for a restart, is decided
/// and logged once, by whoever sent the config (`contactd serve`'s reload:
/// [`Changes`](crate::config::reload::Changes)); every part here is cheap and
/// idempotent, so it is applied whole rather than by a second diff.
fn apply(state: &State, old: &Config, new: &Config) {
    // Credentials first: once a reload's new rules are seen, its
    // credentials are in force too.
    reload_credentials(state, old, new);
    if old.remote_cmd != new.remote_cmd {
        warn_if_widened(&old.remote_cmd, &new.remote_cmd);
        state.policy.set_runner(Runner::new(new.remote_cmd.clone()));
        tracing::info!(
            enabled = new.remote_cmd.enabled,
            patterns = new.remote_cmd.allow.len(),
            "remote command rules updated"
        );
    }
    state.callers.set_limits(
        new.server.max_callers,
        new.server.max_status_size.as_u64() as usize,
    );
    state.broker.apply(new);
    if old.server.agents != new.server.agents {
        state.policy.set_pins(new);
        let policy = &state.policy;
        let resolve = |name: &str, claimed: &Arc<Labels>| policy.labels_for(name, claimed);
        for caller in state.callers.list() {
            caller.relabel(&resolve);
        }
        tracing::info!(
            pins = new.server.agents.len(),
            "pinned labels updated ([[server.agents]]): connected agents' labels changed where they match"
        );
    }
}

/// Re-reads the token files and TLS files (so rotated ones apply on SIGHUP).
/// Fails closed: a file that cannot be used keeps the credentials in force;
/// a change that turns authentication off is applied, with a WARN naming it.
fn reload_credentials(state: &State, old: &Config, new: &Config) {
    let policy = &state.policy;
    match verifier(&new.server) {
        Ok(verifier)
            if verifier.has_tokens()
                && verifier.token_count() == 0
                && policy.auth.read().token_count() > 0 =>
        {
            // Emptied or truncated (an editor's crash, a full disk, a
            // botched copy): taken at its word it would lock every agent
            // out, or with a shared secret alone let anyone holding it in.
            tracing::error!(
                path = %new.server.tokens_file.as_deref().unwrap_or(std::path::Path::new("")).display(),
                kept = policy.auth.read().token_count(),
                "server.tokens_file holds no token now: keeping the tokens in force (to stop \
                 using named tokens, remove server.tokens_file and restart)"
            );
        }
        Ok(verifier) => {
            let was = policy.auth.read().requires_shared() || policy.auth.read().has_tokens();
            if was && !verifier.requires_shared() && !verifier.has_tokens() {
                tracing::warn!(
                    "config reload turns token authentication OFF: server.auth_token_file and \
                     server.tokens_file are no longer set; Contact calls need no token now"
                );
            }
            let revoked = policy.auth.read().revoked_in(&verifier);
            *policy.auth.write() = verifier;
            // After the swap: a revoked agent's reconnect is refused.
            if !revoked.is_empty() {
                let ended = state.callers.revoke(&revoked);
                state.broker.let_go(&revoked);
                tracing::warn!(
                    revoked = revoked.len(),
                    with_open_streams = ended,
                    "config reload revoked named tokens: the agents that held them are cut off"
                );
            }
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
                distrust(state, tls);
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

/// Ends the streams of the connected agents whose client certificate the
/// client CA now in force no longer trusts (a CA replaced or rotated), and
/// refuses further calls on their connections: their queue claims go back
/// as for a revoked token.
fn distrust(state: &State, tls: &crate::config::ServerTlsConfig) {
    if tls.client_ca.is_none() {
        return;
    }
    let mut untrusted = Vec::new();
    for caller in state.callers.list() {
        let Some(chain) = caller.chain().filter(|_| caller.connected()) else {
            continue;
        };
        match crate::tls::client_trusted(tls, &chain) {
            Ok(true) => {}
            Ok(false) => {
                if let Some(end) = chain.first() {
                    let key = super::policy::fingerprint(end.as_ref());
                    state.policy.distrusted.write().insert(key);
                }
                untrusted.push(Arc::clone(&caller.id));
            }
            Err(e) => {
                tracing::error!("cannot check the agents' certificates against the client CA: {e}");
                return;
            }
        }
    }
    if !untrusted.is_empty() {
        let ended = state.callers.revoke(&untrusted);
        state.broker.let_go(&untrusted);
        tracing::warn!(
            agents = ?untrusted,
            with_open_streams = ended,
            "config reload: server.tls.client_ca no longer trusts these agents' certificates; \
             their streams are ended"
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
