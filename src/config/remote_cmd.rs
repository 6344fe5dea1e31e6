//! `[remote_cmd]`: the remoteCMD RPC (off by default), which command lines
//! may run and the bounds on running them, with its defaults and checks.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::{Checks, CommandPattern, ranges, units};

/// `[remote_cmd]`: the remoteCMD RPC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteCmdConfig {
    /// Off by default: remoteCMD answers FAILED_PRECONDITION.
    pub enabled: bool,
    /// Command-line patterns that may run; nothing else does.
    pub allow: Vec<CommandPattern>,
    /// Whether patterns that let any program run (`"*"`, `"* *"`) are
    /// accepted; off, such a pattern is a config error.
    pub allow_any: bool,
    /// Longest a command may run before its process group is killed.
    #[serde(with = "units::duration")]
    pub timeout: Duration,
    /// Commands running at once.
    pub max_concurrent: usize,
    /// Calls waiting for a free slot; further calls get RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// Combined stdout and stderr kept per command; the rest is dropped.
    #[serde(with = "units::size")]
    pub max_output: ByteSize,
    /// Certificate names given the operator role (remoteCMD) with mTLS.
    pub callers: Vec<String>,
}

impl Default for RemoteCmdConfig {
    fn default() -> Self {
        RemoteCmdConfig {
            enabled: false,
            allow: Vec::new(),
            allow_any: false,
            timeout: Duration::from_secs(30),
            max_concurrent: 16,
            max_queued: 64,
            max_output: ByteSize::kib(64),
            callers: Vec::new(),
        }
    }
}

impl RemoteCmdConfig {
    /// Range checks, and no pattern that lets any program run unless
    /// `allow_any` says it is meant.
    pub(crate) fn check(&self, c: &mut Checks) {
        use ranges::*;
        c.duration("remote_cmd.timeout", self.timeout, CMD_TIMEOUT);
        c.count(
            "remote_cmd.max_concurrent",
            self.max_concurrent as u64,
            MAX_CONCURRENT,
        );
        c.count("remote_cmd.max_queued", self.max_queued as u64, MAX_QUEUED);
        c.size("remote_cmd.max_output", self.max_output, MAX_OUTPUT);
        if !self.allow_any {
            for pattern in self.allow.iter().filter(|p| p.matches_any_program()) {
                c.check(
                    false,
                    "remote_cmd.allow",
                    format!(
                        "pattern {:?} lets any program run: name the programs \
                         (such as \"ip link add *\"), or set remote_cmd.allow_any = true \
                         if that is really meant",
                        pattern.to_string()
                    ),
                );
            }
        }
    }
}
