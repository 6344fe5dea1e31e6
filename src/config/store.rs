//! `[store]`: where tasks, queue claims and ack cursors are kept, with its
//! defaults and checks, and the PostgreSQL URL as config checks it (parsed
//! here, without connecting, so that `check-config` and the store read it
//! the same way).

use std::{path::PathBuf, str::FromStr, time::Duration};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use tokio_postgres::config::{Host, SslMode};

use super::{Checks, ranges, units};

/// `[store]`: where tasks, queue claims and ack cursors are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite` (durable, the default), `postgres` (a PostgreSQL database
    /// at `url`) or `memory` (lost at exit).
    pub kind: StoreKind,
    /// `kind = "postgres"`: the database, as a libpq URL
    /// (`postgres://contactd@db1/contactd?sslmode=require`). TLS only when
    /// it says `sslmode=require` (or `verify-full`, `verify-ca`: the server's
    /// certificate is always verified, against `ca_file` or the system's
    /// roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `kind = "postgres"`: a file holding the URL (for a password kept out
    /// of the config), instead of `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// `kind = "postgres"` with TLS: the CA certificates (PEM) to verify the
    /// database server with; unset: the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `kind = "postgres"`: how long connecting to the database may take.
    #[serde(with = "units::duration")]
    pub connect_timeout: Duration,
    /// `kind = "postgres"`: how often this server looks for tasks other
    /// servers published (besides their notifications), beats its
    /// heartbeat, and tries for the generator's lease.
    #[serde(with = "units::duration")]
    pub poll_interval: Duration,
    /// `kind = "postgres"`: connections for reads (the fleet view, `task
    /// show`, an agent's acks when it connects), besides the writer's and
    /// the watcher's: a server holds at most `pool_size + 2`.
    pub pool_size: usize,
    /// The SQLite database; unset: `$STATE_DIRECTORY/contactd.db`, else
    /// `contactd.db` in the working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `normal` (the default): a committed task survives a crash or kill of
    /// contactd; a power loss or kernel crash may lose the last moments of
    /// commits (the database stays consistent). `full`: it survives those
    /// too, at the cost of an fsync per group commit (milliseconds each on
    /// virtual disks: fewer, larger commits).
    pub sync: StoreSync,
    /// Writes (acks, deliveries, cursors) waiting for the store; beyond,
    /// new ones are dropped and counted (their tasks may be delivered again
    /// after a restart; agents dedupe them).
    pub write_queue: usize,
    /// Agents not seen for this long have their broadcast cursor forgotten.
    #[serde(with = "units::duration")]
    pub forget_agents_after: Duration,
    /// Largest the database and its write-ahead log (`-wal`) may grow
    /// together (`"0"`: as large as the disk allows): the log gets an eighth
    /// (64 KiB to 4 MiB) and is checkpointed and truncated beyond it, the
    /// database the rest. Full, `task submit` is refused with
    /// RESOURCE_EXHAUSTED and the server goes on delivering what it holds,
    /// as on a full disk.
    #[serde(with = "units::size")]
    pub max_size: ByteSize,
}

/// `store.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Postgres,
    Memory,
}

/// `store.sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreSync {
    Full,
    Normal,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Sqlite,
            path: None,
            url: None,
            url_file: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            pool_size: 4,
            sync: StoreSync::Normal,
            write_queue: 65_536,
            forget_agents_after: Duration::from_secs(30 * 86_400),
            max_size: ByteSize(0),
        }
    }
}

impl StoreConfig {
    /// The database file: `path`, else `$STATE_DIRECTORY/contactd.db`
    /// (systemd's `StateDirectory=`; the first one when it lists several),
    /// else `contactd.db` in the working directory.
    pub fn resolved_path(&self) -> PathBuf {
        if let Some(path) = &self.path {
            return path.clone();
        }
        let state = std::env::var_os("STATE_DIRECTORY").and_then(|dirs| {
            std::env::split_paths(&dirs)
                .next()
                .filter(|d| !d.as_os_str().is_empty())
        });
        state.unwrap_or_default().join("contactd.db")
    }

    /// `kind = "postgres"`: the database URL, from `url` or read from
    /// `url_file` (its first line).
    ///
    /// # Errors
    /// Neither is set, or the file cannot be read.
    pub fn postgres_url(&self) -> Result<String, String> {
        match (&self.url, &self.url_file) {
            (Some(url), None) => Ok(url.clone()),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("store.url_file {}: {e}", file.display()))
                .map(|text| text.lines().next().unwrap_or_default().trim().to_owned()),
            (None, None) => {
                Err("store.kind is \"postgres\": set store.url or store.url_file".into())
            }
            (Some(_), Some(_)) => Err("store.url and store.url_file are both set: keep one".into()),
        }
    }

    /// Range checks, and the keys that belong to one kind of store only.
    pub(crate) fn check(&self, c: &mut Checks) {
        use ranges::*;
        c.count("store.write_queue", self.write_queue as u64, WRITE_QUEUE);
        c.duration(
            "store.forget_agents_after",
            self.forget_agents_after,
            FORGET_AGENTS_AFTER,
        );
        // 0 means no limit, so only other values are held to the range.
        if self.max_size.as_u64() != 0 {
            c.size("store.max_size", self.max_size, STORE_MAX_SIZE);
        }
        c.duration(
            "store.connect_timeout",
            self.connect_timeout,
            STORE_CONNECT_TIMEOUT,
        );
        c.duration(
            "store.poll_interval",
            self.poll_interval,
            STORE_POLL_INTERVAL,
        );
        if self.kind == StoreKind::Postgres {
            c.check(
                self.url.is_some() != self.url_file.is_some(),
                "store.url",
                "set exactly one of store.url and store.url_file for kind = \"postgres\"",
            );
            if let Some(url) = &self.url
                && let Err(problem) = check_url(url)
            {
                c.check(false, "store.url", problem);
            }
            c.check(
                self.path.is_none(),
                "store.path",
                "names an SQLite file, but store.kind is \"postgres\": remove it",
            );
            c.check(
                self.max_size.as_u64() == 0,
                "store.max_size",
                "applies to SQLite only: limit the database in PostgreSQL (a tablespace \
                 or quota) instead",
            );
        } else {
            c.check(
                self.url.is_none() && self.url_file.is_none() && self.ca_file.is_none(),
                "store.url",
                "store.url, url_file and ca_file are for kind = \"postgres\" only",
            );
        }
        c.check(
            self.kind != StoreKind::Sqlite
                || self
                    .path
                    .as_ref()
                    .is_none_or(|p| !p.as_os_str().is_empty() && p.file_name().is_some()),
            "store.path",
            "is not a file path: name the database file, such as \"/var/lib/contactd/contactd.db\"",
        );
    }
}

/// How a URL is connected to: its parsed settings, whether with TLS, and
/// a name for it fit for logs (no password).
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: bool,
    pub name: String,
}

/// Checks a database URL as `check-config` does, without connecting.
///
/// # Errors
/// What is wrong with it (never the URL itself: it may hold a password).
pub fn check_url(url: &str) -> Result<(), String> {
    parse(url).map(|_| ())
}

/// Whether a database URL carries a password.
pub fn has_password(url: &str) -> bool {
    parse(url).is_ok_and(|target| target.config.get_password().is_some())
}

/// Parses a database URL (libpq's URL or key=value form) into how it is
/// connected to.
///
/// # Errors
/// What is wrong with it (never the URL itself: it may hold a password).
pub fn parse(url: &str) -> Result<Target, String> {
    // libpq's verifying modes: tokio-postgres knows only `require`, which
    // here always verifies the certificate (rustls has no other way).
    let mut explicit_prefer = false;
    let mut text = String::with_capacity(url.len());
    for (i, part) in url.split("sslmode=").enumerate() {
        if i > 0 {
            text.push_str("sslmode=");
            let mode = part.split(['&', ' ']).next().unwrap_or_default();
            explicit_prefer |= mode == "prefer" || mode == "allow";
            if mode == "verify-full" || mode == "verify-ca" {
                text.push_str("require");
                text.push_str(&part[mode.len()..]);
                continue;
            }
        }
        text.push_str(part);
    }
    if explicit_prefer {
        return Err(
            "sslmode=prefer (or allow) falls back to plain text, which protects \
                    nothing: say sslmode=require for TLS, or leave sslmode out for none"
                .into(),
        );
    }
    let mut config = tokio_postgres::Config::from_str(&text)
        .map_err(|e| format!("is not a PostgreSQL URL ({e})"))?;
    if config.get_hosts().is_empty() {
        return Err("names no host: say postgres://USER@HOST/DATABASE".into());
    }
    let tls = config.get_ssl_mode() == SslMode::Require;
    if !tls {
        config.ssl_mode(SslMode::Disable);
    }
    if config.get_application_name().is_none() {
        config.application_name("contactd");
    }
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(at, host)| {
            let host = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            // One port for every host, or one each; 5432 when none.
            match ports.get(at).or(ports.first()) {
                Some(port) if *port != 5432 => format!("{host}:{port}"),
                _ => host,
            }
        })
        .collect();
    let name = format!(
        "{}@{}/{}",
        config.get_user().unwrap_or("?"),
        hosts.join(","),
        config.get_dbname().unwrap_or("?"),
    );
    Ok(Target { config, tls, name })
}

#[cfg(test)]
mod tests {
    use super::*;
    // `parse` here is the URL's; the config file's is `parse_config`.
    use crate::config::{Config, parse as parse_config};

    #[test]
    fn urls_are_checked_without_echoing_them() {
        let secret = "postgres://contactd:hunter2@db1/contactd?sslmode=prefer";
        let error = check_url(secret).unwrap_err();
        assert!(error.contains("sslmode=require"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        let error = check_url("postgres://contactd:hunter2@db1/contactd?bogus=1").unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");

        assert!(has_password("postgres://contactd:hunter2@db1/fleet"));
        assert!(!has_password("postgres://contactd@db1/fleet"));
        let plain = parse("postgres://contactd:hunter2@db1:5433/fleet").unwrap();
        assert!(!plain.tls);
        assert_eq!(plain.name, "contactd@db1:5433/fleet");
        assert!(!plain.name.contains("hunter2"));
        for mode in ["require", "verify-full", "verify-ca"] {
            let tls = parse(&format!(
                "postgres://c@db1/fleet?sslmode={mode}&connect_timeout=3"
            ));
            assert!(tls.unwrap().tls, "{mode}");
        }
        let words = parse("host=/run/postgresql user=contactd dbname=fleet").unwrap();
        assert_eq!(words.name, "contactd@/run/postgresql/fleet");
        assert!(check_url("postgres:///fleet").is_err(), "no host");
    }

    #[test]
    fn a_postgres_store_needs_one_url_that_asks_for_tls_or_none_and_no_sqlite_keys() {
        let keys = |store: &str| -> Vec<String> {
            let text = format!("[store]\nkind = \"postgres\"\n{store}");
            match parse_config::<Config>(&text) {
                Ok(_) => Vec::new(),
                Err(problems) => problems.iter().filter_map(|p| p.key.clone()).collect(),
            }
        };
        assert!(keys("url = \"postgres://c@db1/fleet?sslmode=require\"").is_empty());
        assert!(keys("url_file = \"/etc/contactd/db-url\"").is_empty());
        assert_eq!(keys(""), ["store.url"]);
        assert_eq!(
            keys("url = \"postgres://c@db1/f\"\nurl_file = \"/x\""),
            ["store.url"]
        );
        assert_eq!(
            keys("url = \"postgres://c@db1/f?sslmode=prefer\""),
            ["store.url"]
        );
        assert_eq!(
            keys("url = \"postgres://c@db1/f\"\npath = \"/x.db\"\nmax_size = \"1GiB\""),
            ["store.path", "store.max_size"]
        );
        assert_eq!(
            keys("url = \"postgres://c@db1/f\"\npoll_interval = \"10ms\""),
            ["store.poll_interval"]
        );
        let sqlite = parse_config::<Config>("[store]\nurl = \"postgres://c@db1/f\"\n").unwrap_err();
        assert_eq!(sqlite[0].key.as_deref(), Some("store.url"), "{sqlite:#?}");
    }
}
