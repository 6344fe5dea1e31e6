//! `[admin]`: the operators' API socket, with its defaults and checks.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::Checks;

/// `[admin]`: the operators' API (submit tasks, list agents and tasks), on
/// a unix socket only, never on the public port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Whether to serve the admin API.
    pub enabled: bool,
    /// The socket's path; it is created with mode 0660.
    pub socket: PathBuf,
    /// Connections at once; one more is closed at once.
    pub max_connections: usize,
    /// A connection without a byte either way for this long is closed.
    #[serde(with = "super::units::duration")]
    pub idle_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            socket: PathBuf::from("/run/contactd/admin.sock"),
            max_connections: 64,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The longest admin socket path a unix socket address holds (108 bytes
/// with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

impl AdminConfig {
    /// A socket path that a unix socket address can hold.
    pub(crate) fn check(&self, c: &mut Checks) {
        c.count(
            "admin.max_connections",
            self.max_connections as u64,
            1..=4096,
        );
        c.duration(
            "admin.idle_timeout",
            self.idle_timeout,
            Duration::from_secs(1)..=Duration::from_secs(3600),
        );
        c.check(
            !self.enabled || !self.socket.as_os_str().is_empty(),
            "admin.socket",
            "is empty: set a path, or admin.enabled = false",
        );
        c.check(
            self.socket.as_os_str().len() <= MAX_SOCKET_PATH,
            "admin.socket",
            format!(
                "is {} bytes long: a unix socket path holds at most {MAX_SOCKET_PATH}",
                self.socket.as_os_str().len()
            ),
        );
    }
}
