//! What a reload changes: the one comparison of the config in force with
//! the one just read, naming every key whose value moved and when each
//! takes effect. Each daemon's reload logs it in one line (`config reloaded
//! changed=… restart=…`), and what applies a reload asks it what changed
//! (the server's state in `server::reload::follow_config`). Whether a key waits for
//! a restart (or an agent's next connection) is decided here, in
//! [`SERVER_RULES`], [`AGENT_RULES`] and [`LOG_RULES`], and nowhere else.

use std::path::Path;

use serde::Serialize;

use super::{AgentFile, Config, changed_keys, shown_keys};

/// When a changed key takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takes {
    /// At once: the reload applies it.
    Now,
    /// An agent's next connection to a server.
    Reconnect,
    /// Only after the daemon restarts: it shapes something built once at
    /// start-up (a listener, the store, log writers).
    Restart,
}

/// Keys, or whole sections, and when a change to them takes effect;
/// every key not listed applies at once. The most specific entry wins.
type Rules = &'static [(&'static str, Takes)];

/// The server's keys that do not apply at once, with [`LOG_RULES`]. (A
/// listener of its own, such as `[metrics]`, adds its keys here.)
pub const SERVER_RULES: Rules = &[
    // The name a server is known by in a shared store (taken at start).
    ("server.name", Takes::Restart),
    // Its own listener, bound at start.
    ("metrics", Takes::Restart),
    // The web console's listener and its bounds, taken at start.
    ("web", Takes::Restart),
    // The listener and its connections' HTTP/2 settings.
    ("server.listen", Takes::Restart),
    ("server.backlog", Takes::Restart),
    ("server.max_connections", Takes::Restart),
    ("server.max_message_size", Takes::Restart),
    ("server.max_status_message", Takes::Restart),
    ("server.max_result_message", Takes::Restart),
    ("server.max_command_message", Takes::Restart),
    ("server.max_concurrent_streams", Takes::Restart),
    ("server.max_connection_buffer", Takes::Restart),
    ("server.max_buffered", Takes::Restart),
    ("server.max_connection_unsent", Takes::Restart),
    ("server.max_unsent", Takes::Restart),
    ("server.socket_send_buffer", Takes::Restart),
    ("server.connection_window", Takes::Restart),
    ("server.stream_window", Takes::Restart),
    ("server.handshake_timeout", Takes::Restart),
    ("server.max_handshakes", Takes::Restart),
    ("server.max_handshakes_per_address", Takes::Restart),
    ("server.max_connections_per_address", Takes::Restart),
    ("server.accept_rate", Takes::Restart),
    ("server.accept_burst", Takes::Restart),
    ("server.keepalive_interval", Takes::Restart),
    ("server.keepalive_timeout", Takes::Restart),
    // Turning TLS on or off (the section as a whole) changes what the port
    // speaks; its files are re-read at once.
    ("server.tls", Takes::Restart),
    ("server.tls.cert", Takes::Now),
    ("server.tls.key", Takes::Now),
    ("server.tls.client_ca", Takes::Now),
    ("server.tls.client_auth", Takes::Now),
    ("tasks.mode", Takes::Restart),
    ("admin", Takes::Restart),
    ("store", Takes::Restart),
    ("store.forget_agents_after", Takes::Now),
];

/// The agent's keys that do not apply at once, with [`LOG_RULES`].
pub const AGENT_RULES: Rules = &[
    // Its own listener, bound at start.
    ("agent.metrics", Takes::Restart),
    // Read when a session connects (agent::session).
    ("agent.servers", Takes::Reconnect),
    ("agent.name", Takes::Reconnect),
    ("agent.labels", Takes::Reconnect),
    ("agent.tls", Takes::Reconnect),
    ("agent.token_file", Takes::Reconnect),
    ("agent.connect_timeout", Takes::Reconnect),
    // The spool is opened at start (agent::spool); `remember` applies at once.
    ("agent.state_dir", Takes::Restart),
    ("agent.spool_max_size", Takes::Restart),
    ("agent.spool_sync", Takes::Restart),
];

/// Both daemons' `[log]`: its writers are made at start-up, so a reload
/// changes the level, format and exclusions (`Logging::apply`), not where
/// lines go or how files rotate.
pub const LOG_RULES: Rules = &[
    ("log.stderr", Takes::Restart),
    ("log.file", Takes::Restart),
    ("log.rotation", Takes::Restart),
    ("log.max_size", Takes::Restart),
    ("log.backups", Takes::Restart),
    ("log.keep", Takes::Restart),
    ("log.buffer_lines", Takes::Restart),
];

/// A reload's changes: each key whose value differs (dotted, as in the
/// file: `tasks.interval`; a section added or removed as a whole is its
/// name: `server.tls`), in order, with when it takes effect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    keys: Vec<(String, Takes)>,
}

impl Changes {
    /// From the server config in force to `new`: what [`hold_lowering`]
    /// holds back waits for a restart too.
    #[must_use]
    pub fn server(old: &Config, new: &Config) -> Changes {
        let mut changes = Changes::between(old, new, &[SERVER_RULES, LOG_RULES]);
        let (_, held) = hold_lowering(old, new);
        for (key, takes) in &mut changes.keys {
            if held.iter().any(|h| within(key, h)) {
                *takes = Takes::Restart;
            }
        }
        changes
    }

    /// From the agent config in force to `new`.
    #[must_use]
    pub fn agent(old: &AgentFile, new: &AgentFile) -> Changes {
        Changes::between(old, new, &[AGENT_RULES, LOG_RULES])
    }

    fn between<T: Serialize>(old: &T, new: &T, rules: &[Rules]) -> Changes {
        let keys = changed_keys(old, new)
            .into_iter()
            .map(|key| {
                let takes = rules
                    .iter()
                    .copied()
                    .flatten()
                    .filter(|(rule, _)| within(&key, rule))
                    .max_by_key(|(rule, _)| rule.len())
                    .map_or(Takes::Now, |(_, takes)| *takes);
                (key, takes)
            })
            .collect();
        Changes { keys }
    }

    /// Whether `section` (`remote_cmd`, `server.tls`) or anything in it changed.
    #[must_use]
    pub fn touches(&self, section: &str) -> bool {
        self.keys.iter().any(|(key, _)| within(key, section))
    }

    /// The keys that changed, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(key, _)| key.as_str())
    }

    /// The changed keys that take effect `when`.
    #[must_use]
    pub fn taking(&self, when: Takes) -> Vec<&str> {
        self.keys
            .iter()
            .filter(|(_, takes)| *takes == when)
            .map(|(key, _)| key.as_str())
            .collect()
    }

    /// The reload's one log line: INFO `config reloaded` with `changed=`
    /// (keys, or `none`); WARN, with `restart=` (and an agent's
    /// `reconnect=`), when some of it waits.
    pub fn log(&self, path: &Path) {
        let changed = shown(self.keys());
        let restart = shown(self.taking(Takes::Restart).into_iter());
        let reconnect = self.taking(Takes::Reconnect);
        let path = path.display();
        if !reconnect.is_empty() {
            let reconnect = shown(reconnect.into_iter());
            tracing::warn!(
                %path, changed, restart, reconnect,
                "config reloaded: the keys named by reconnect apply at the next connection, \
                 those named by restart after a restart, the rest now"
            );
        } else if restart != "none" {
            tracing::warn!(
                %path, changed, restart,
                "config reloaded: the keys named by restart apply after a restart, the rest now"
            );
        } else {
            tracing::info!(%path, changed, "config reloaded");
        }
    }
}

/// `new` without what would lower the server's security from `old`, and
/// the keys held back: a reload applies only what keeps or raises it, and
/// the rest waits for a restart (a config cut short by a crashed editor,
/// or a copy of the wrong file, must not open the server up unnoticed).
/// Held back:
/// - authentication turned off (`server.auth_token_file` and
///   `server.tokens_file` both unset where one was set), and identities
///   turned off (names taken from a header where a token or certificate
///   proved them);
/// - `[server.tls]` removed, `server.tls.client_auth` weaker (`require` →
///   `request` → `none`), or `server.tls.client_ca` removed;
/// - remote commands widened: turned on, patterns added, `allow_any`,
///   `allow_exec_args` or certificate names (`callers`) added. The rest of
///   a `[remote_cmd]` change applies (patterns removed, limits), so a
///   reload that removes one pattern and adds another removes it now.
#[must_use]
pub fn hold_lowering(old: &Config, new: &Config) -> (Config, Vec<&'static str>) {
    let mut kept = new.clone();
    let mut held = Vec::new();
    let (o, n) = (&old.server, &new.server);
    let auth = |s: &super::ServerConfig| s.auth_token_file.is_some() || s.tokens_file.is_some();
    if (auth(o) && !auth(n)) || (old.has_identities() && !new.has_identities()) {
        if o.auth_token_file != n.auth_token_file {
            kept.server.auth_token_file.clone_from(&o.auth_token_file);
            held.push("server.auth_token_file");
        }
        if o.tokens_file != n.tokens_file {
            kept.server.tokens_file.clone_from(&o.tokens_file);
            held.push("server.tokens_file");
        }
    }
    if o.tls.is_some() && n.tls.is_none() {
        // The port stays TLS until a restart: so do its client certificates.
        kept.server.tls.clone_from(&o.tls);
        held.push("server.tls");
    }
    if let (Some(o), Some(n)) = (&o.tls, &mut kept.server.tls) {
        let rank = |a: super::ClientAuth| match a {
            super::ClientAuth::None => 0,
            super::ClientAuth::Request => 1,
            super::ClientAuth::Require => 2,
        };
        if rank(n.client_auth()) < rank(o.client_auth()) {
            n.client_auth = Some(o.client_auth());
            held.push("server.tls.client_auth");
        }
        if o.client_ca.is_some() && n.client_ca.is_none() {
            n.client_ca.clone_from(&o.client_ca);
            held.push("server.tls.client_ca");
        }
    }
    let (o, n) = (&old.remote_cmd, &mut kept.remote_cmd);
    if n.enabled && !o.enabled {
        n.enabled = false;
        held.push("remote_cmd.enabled");
    }
    if o.enabled {
        let before: std::collections::HashSet<String> =
            o.allow.iter().map(ToString::to_string).collect();
        let count = n.allow.len();
        n.allow.retain(|p| before.contains(&p.to_string()));
        if n.allow.len() < count {
            held.push("remote_cmd.allow");
        }
    }
    if n.allow_any && !o.allow_any {
        n.allow_any = false;
        held.push("remote_cmd.allow_any");
    }
    if n.allow_exec_args && !o.allow_exec_args {
        n.allow_exec_args = false;
        held.push("remote_cmd.allow_exec_args");
    }
    let count = n.callers.len();
    n.callers.retain(|c| o.callers.contains(c));
    if n.callers.len() < count {
        held.push("remote_cmd.callers");
    }
    (kept, held)
}

/// `key` is `section` or inside it.
fn within(key: &str, section: &str) -> bool {
    key.strip_prefix(section)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

fn shown<'a>(keys: impl Iterator<Item = &'a str>) -> String {
    shown_keys(&keys.map(str::to_owned).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_holds_back_what_lowers_security_and_applies_what_raises_it() {
        let mut old = Config::default();
        old.server.tokens_file = Some("/etc/contactd/tokens".into());
        old.server.tls = Some(
            crate::config::parse::<Config>(
                "[server.tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n",
            )
            .unwrap()
            .server
            .tls
            .unwrap(),
        );
        old.remote_cmd.enabled = true;
        old.remote_cmd.allow = vec!["true".parse().unwrap(), "false".parse().unwrap()];
        old.remote_cmd.callers = vec!["ops".into()];

        let mut new = old.clone();
        new.server.tokens_file = None;
        let tls = new.server.tls.as_mut().unwrap();
        tls.client_auth = Some(crate::config::ClientAuth::Request);
        new.remote_cmd.allow = vec!["true".parse().unwrap(), "id".parse().unwrap()];
        new.remote_cmd.allow_any = true;
        new.remote_cmd.callers = vec!["ops".into(), "intruder".into()];
        new.tasks.batch = 3;
        let (kept, held) = hold_lowering(&old, &new);
        assert_eq!(
            held,
            [
                "server.tokens_file",
                "server.tls.client_auth",
                "remote_cmd.allow",
                "remote_cmd.allow_any",
                "remote_cmd.callers"
            ]
        );
        assert_eq!(kept.server.tokens_file, old.server.tokens_file);
        assert_eq!(
            kept.server.tls.as_ref().unwrap().client_auth(),
            crate::config::ClientAuth::Require
        );
        let allowed: Vec<String> = kept
            .remote_cmd
            .allow
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            allowed,
            ["true"],
            "a removed pattern applies now, an added one waits"
        );
        assert!(!kept.remote_cmd.allow_any);
        assert_eq!(kept.remote_cmd.callers, ["ops"]);
        assert_eq!(kept.tasks.batch, 3, "the rest applies");
        let changes = Changes::server(&old, &new);
        let restart = changes.taking(Takes::Restart);
        assert!(restart.contains(&"server.tokens_file"), "{restart:?}");
        assert!(restart.contains(&"remote_cmd.allow"), "{restart:?}");
        assert!(!restart.contains(&"tasks.batch"));

        // Raising it applies at once.
        let mut lower = old.clone();
        lower.server.tokens_file = None;
        lower.server.tls.as_mut().unwrap().client_auth = Some(crate::config::ClientAuth::None);
        lower.remote_cmd.allow.push("id".parse().unwrap());
        let (kept, held) = hold_lowering(&lower, &old);
        assert!(held.is_empty(), "{held:?}");
        assert_eq!(kept, old);
    }

    #[test]
    fn each_server_key_applies_now_unless_a_rule_says_restart() {
        let old = Config::default();
        assert_eq!(Changes::server(&old, &old), Changes::default());
        let mut new = old.clone();
        new.tasks.interval = std::time::Duration::from_secs(1);
        new.log.level = "debug".into();
        new.server.listen = "127.0.0.1:1".parse().unwrap();
        new.store.path = Some("/tmp/x.db".into());
        new.store.forget_agents_after = std::time::Duration::from_secs(7200);
        new.admin.socket = "/tmp/a.sock".into();
        new.log.max_size = bytesize::ByteSize::mib(1);
        let changes = Changes::server(&old, &new);
        assert_eq!(
            changes.keys().collect::<Vec<_>>(),
            [
                "admin.socket",
                "log.level",
                "log.max_size",
                "server.listen",
                "store.forget_agents_after",
                "store.path",
                "tasks.interval"
            ]
        );
        assert_eq!(
            changes.taking(Takes::Restart),
            [
                "admin.socket",
                "log.max_size",
                "server.listen",
                "store.path"
            ]
        );
        assert_eq!(
            changes.taking(Takes::Now),
            ["log.level", "store.forget_agents_after", "tasks.interval"]
        );
        assert!(changes.touches("store") && changes.touches("tasks"));
        assert!(!changes.touches("remote_cmd") && !changes.touches("stor"));
    }

    #[test]
    fn turning_tls_on_needs_a_restart_but_new_files_apply_now() {
        let plain = Config::default();
        let tls =
            crate::config::parse("[server.tls]\ncert = \"/a.pem\"\nkey = \"/a.key\"\n").unwrap();
        let on = Changes::server(&plain, &tls);
        assert_eq!(on.taking(Takes::Restart), ["server.tls"]);
        let mut renewed = tls.clone();
        renewed.server.tls.as_mut().unwrap().cert = "/b.pem".into();
        let files = Changes::server(&tls, &renewed);
        assert_eq!(files.taking(Takes::Now), ["server.tls.cert"]);
        assert!(files.touches("server.tls"));
    }

    #[test]
    fn an_agents_servers_and_name_wait_for_the_next_connection() {
        let old = AgentFile::default();
        let mut new = old.clone();
        new.agent.servers = vec!["http://[::1]:1".into()];
        new.agent.handler = vec!["true".into()];
        new.log.file = Some("/tmp/agent.log".into());
        let changes = Changes::agent(&old, &new);
        assert_eq!(changes.taking(Takes::Reconnect), ["agent.servers"]);
        assert_eq!(changes.taking(Takes::Now), ["agent.handler"]);
        assert_eq!(changes.taking(Takes::Restart), ["log.file"]);
    }
}
