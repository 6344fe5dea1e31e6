//! `[remote_cmd]`: the remoteCMD RPC (off by default), which command lines
//! may run and the bounds on running them, with its defaults and checks.

use std::{collections::BTreeMap, time::Duration};

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
    /// Whether patterns that let callers choose the arguments of a program
    /// that runs programs named in its arguments (`"find /var *"` allows
    /// `find /var -exec sh ;`) are accepted; off, such a pattern is a
    /// config error.
    pub allow_exec_args: bool,
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
    /// Environment variables commands get, beyond (or replacing) the fixed
    /// `PATH` and `LANG`; nothing of the daemon's own environment is passed
    /// on. In name order, so a command sees the same environment each run.
    pub env: BTreeMap<String, String>,
}

/// Programs that run other programs named in their arguments (`find
/// -exec`, `tar --checkpoint-action=exec=`, `rsync -e`, `awk 'BEGIN {
/// system(...) }'`, a shell's `-c`, `env PROG`, a wrapper's command), so a
/// pattern that lets callers choose their arguments lets callers run
/// anything. Interpreters are here too: their arguments are programs.
pub const RUNS_ITS_ARGUMENTS: &[&str] = &[
    "awk",
    "bash",
    "busybox",
    "chroot",
    "dash",
    "doas",
    "env",
    "expect",
    "find",
    "flock",
    "gawk",
    "gdb",
    "git",
    "ionice",
    "ksh",
    "less",
    "lua",
    "make",
    "man",
    "mawk",
    "more",
    "nawk",
    "nice",
    "node",
    "nohup",
    "nsenter",
    "perl",
    "php",
    "python",
    "python2",
    "python3",
    "rsync",
    "ruby",
    "runuser",
    "scp",
    "script",
    "sed",
    "setsid",
    "sh",
    "ssh",
    "stdbuf",
    "strace",
    "su",
    "sudo",
    "systemd-run",
    "tar",
    "tclsh",
    "time",
    "timeout",
    "unshare",
    "vi",
    "vim",
    "watch",
    "xargs",
    "zip",
    "zsh",
];

/// The most `remote_cmd.env` entries.
pub const MAX_ENV_ENTRIES: usize = 64;
/// The longest `remote_cmd.env` value, in bytes.
pub const MAX_ENV_VALUE: usize = 4096;
/// The longest `remote_cmd.env` name, in bytes.
pub const MAX_ENV_NAME: usize = 256;
/// Set on every command by the daemon (`process::reaper::ENV_RUN`): it is
/// how what a command leaves behind is found, so the config may not set it.
pub const ENV_RESERVED: &str = "CONTACTD_RUN";

impl Default for RemoteCmdConfig {
    fn default() -> Self {
        RemoteCmdConfig {
            enabled: false,
            allow: Vec::new(),
            allow_any: false,
            allow_exec_args: false,
            timeout: Duration::from_secs(30),
            max_concurrent: 16,
            max_queued: 64,
            max_output: ByteSize::kib(64),
            callers: Vec::new(),
            env: BTreeMap::new(),
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
        self.check_env(c);
        if !self.allow_exec_args {
            for pattern in &self.allow {
                let Some(program) = runs_chosen_programs(pattern) else {
                    continue;
                };
                if pattern.takes_chosen_arguments() {
                    c.check(
                        false,
                        "remote_cmd.allow",
                        format!(
                            "pattern {:?} lets callers choose the arguments of {program}, which \
                             runs programs named in its arguments (find -exec, tar \
                             --checkpoint-action, xargs, env, a shell, awk, rsync -e, ...): so \
                             it lets callers run anything. Spell out the arguments it may \
                             take, or set remote_cmd.allow_exec_args = true if that is really \
                             meant",
                            pattern.to_string()
                        ),
                    );
                }
            }
        }
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

    /// `env`: portable names (what a shell can name), values an environment
    /// can carry, and bounded, so the config cannot make every command's
    /// start copy megabytes.
    fn check_env(&self, c: &mut Checks) {
        c.check(
            self.env.len() <= MAX_ENV_ENTRIES,
            "remote_cmd.env",
            format!(
                "{} variables: at most {MAX_ENV_ENTRIES} may be set",
                self.env.len()
            ),
        );
        for (name, value) in &self.env {
            if !is_env_name(name) {
                c.check(
                    false,
                    "remote_cmd.env",
                    format!(
                        "\"{}\" is not a variable name: expected a letter or \"_\", then \
                         letters, digits or \"_\" (no \"=\"), at most {MAX_ENV_NAME} bytes",
                        crate::untrusted::shown(name)
                    ),
                );
                continue;
            }
            let key = format!("remote_cmd.env.{name}");
            c.check(
                name != ENV_RESERVED,
                &key,
                format!("{ENV_RESERVED} is set by contactd on every command: choose another name"),
            );
            c.check(
                !value.contains('\0'),
                &key,
                "the value holds a NUL character, which an environment cannot carry",
            );
            c.check(
                value.len() <= MAX_ENV_VALUE,
                &key,
                format!(
                    "the value is {} bytes long: at most {MAX_ENV_VALUE} bytes (4KiB) are allowed",
                    value.len()
                ),
            );
        }
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_ENV_NAME`] bytes.
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_ENV_NAME
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Wrappers whose next word is the program they run (`setsid sleep *`
/// lets callers choose only `sleep`'s arguments).
const RUN_THE_NEXT_WORD: &[&str] = &["nice", "nohup", "setsid", "time"];

/// The program of `pattern` that runs programs named in its arguments, if
/// any: its first word's, or, through wrappers that run their next word
/// (when that word is spelt out and not an option), the wrapped one's.
fn runs_chosen_programs(pattern: &CommandPattern) -> Option<&str> {
    let mut at = 0;
    // Bounded by the pattern's words.
    while let Some(program) = pattern.literal(at) {
        if !runs_its_arguments(program) {
            return None;
        }
        let next = pattern
            .literal(at + 1)
            .filter(|word| !word.starts_with('-'));
        if !(RUN_THE_NEXT_WORD.contains(&program) && next.is_some()) {
            return Some(program);
        }
        at += 1;
    }
    None
}

/// Whether `program` (a file name) runs programs named in its arguments;
/// versioned names count as theirs (`python3.11`, `gawk-5`).
fn runs_its_arguments(program: &str) -> bool {
    let base = program.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '-');
    RUNS_ITS_ARGUMENTS.contains(&program) || RUNS_ITS_ARGUMENTS.contains(&base)
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, parse};

    fn problems(env: &str) -> Vec<(String, String)> {
        let text = format!("[remote_cmd]\nenv = {env}\n");
        match parse::<Config>(&text) {
            Ok(_) => Vec::new(),
            Err(problems) => problems
                .into_iter()
                .map(|p| (p.key.unwrap_or_default(), p.message))
                .collect(),
        }
    }

    /// What a hostile review ran as root: `find DIR -exec id ;` through
    /// `find DIR *`, `--checkpoint-action=exec=id` through `tar -cf
    /// /dev/null DIR *`.
    #[test]
    fn patterns_that_let_callers_choose_what_runs_are_refused_without_opt_in() {
        let allow = |patterns: &str, opt_in: bool| {
            let text = format!("[remote_cmd]\nallow = {patterns}\nallow_exec_args = {opt_in}\n");
            match parse::<Config>(&text) {
                Ok(_) => Vec::new(),
                Err(problems) => problems.into_iter().map(|p| p.message).collect(),
            }
        };
        for refused in [
            r#"["find /srv *"]"#,
            r#"["tar -cf /dev/null /srv *"]"#,
            r#"["/usr/bin/xargs *"]"#,
            r#"["env *"]"#,
            r#"["sh -c *"]"#,
            r#"["python3.11 *"]"#,
            r#"["awk -f* /etc/passwd"]"#,
            r#"["rsync -a * /backup"]"#,
        ] {
            let problems = allow(refused, false);
            assert!(
                problems.len() == 1 && problems[0].contains("lets callers run anything"),
                "{refused}: {problems:?}"
            );
            assert!(allow(refused, true).is_empty(), "{refused} with the opt-in");
        }
        // Through a wrapper of its next word: what it wraps decides.
        assert!(allow(r#"["setsid sleep *", "nohup /bin/sleep 5"]"#, false).is_empty());
        assert_eq!(allow(r#"["setsid sh *"]"#, false).len(), 1);
        assert_eq!(allow(r#"["nice -n 5 *"]"#, false).len(), 1);
        // Arguments spelt out, or programs that run nothing of theirs.
        for accepted in [
            r#"["find /srv -name core -delete"]"#,
            r#"["tar -cf /backup/etc.tar /etc"]"#,
            r#"["ip link add *", "uptime", "ls /tmp/*", "systemctl restart web*"]"#,
        ] {
            assert!(allow(accepted, false).is_empty(), "{accepted}");
        }
    }

    #[test]
    fn env_names_and_values_are_checked() {
        assert!(problems("{}").is_empty());
        assert!(
            problems(r#"{ TZ = "UTC", _x1 = "a=b", PATH = "/opt/bin", LANG = "" }"#).is_empty()
        );
        for (env, key, says) in [
            (
                r#"{ "1X" = "v" }"#,
                "remote_cmd.env",
                "\"1X\" is not a variable name",
            ),
            (r#"{ "A=B" = "v" }"#, "remote_cmd.env", "(no \"=\")"),
            (r#"{ "A B" = "v" }"#, "remote_cmd.env", "expected a letter"),
            (
                r#"{ "" = "v" }"#,
                "remote_cmd.env",
                "is not a variable name",
            ),
            (
                r#"{ "É" = "v" }"#,
                "remote_cmd.env",
                "is not a variable name",
            ),
            (r#"{ X = "a\u0000b" }"#, "remote_cmd.env.X", "NUL character"),
            (
                r#"{ CONTACTD_RUN = "1" }"#,
                "remote_cmd.env.CONTACTD_RUN",
                "set by contactd",
            ),
        ] {
            let found = problems(env);
            assert_eq!(found.len(), 1, "{env}: {found:?}");
            assert_eq!(found[0].0, key, "{env}: {found:?}");
            assert!(found[0].1.contains(says), "{env}: {found:?}");
        }
    }

    #[test]
    fn env_is_bounded() {
        let long = format!("{{ X = \"{}\" }}", "v".repeat(4097));
        let found = problems(&long);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "remote_cmd.env.X");
        assert!(
            found[0].1.contains("4097 bytes long: at most 4096 bytes"),
            "{found:?}"
        );
        assert!(problems(&format!("{{ X = \"{}\" }}", "v".repeat(4096))).is_empty());
        let name = format!("{{ {} = \"v\" }}", "N".repeat(257));
        assert!(problems(&name)[0].1.contains("at most 256 bytes"));

        let entries = |n: usize| {
            let list: Vec<String> = (0..n).map(|i| format!("V{i} = \"x\"")).collect();
            format!("{{ {} }}", list.join(", "))
        };
        assert!(problems(&entries(64)).is_empty());
        let found = problems(&entries(65));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "remote_cmd.env");
        assert!(found[0].1.contains("65 variables: at most 64"), "{found:?}");
    }
}
