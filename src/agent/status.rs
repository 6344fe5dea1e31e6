//! The status text sent on sendStatus: a built-in line (host, uptime, load,
//! tasks handled) or the output of the configured status command.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::process::{Input, execute_with};

/// The longest a status command may run.
const STATUS_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The most status text sent.
const MAX_STATUS: usize = 4096;

/// The status text: `command`'s output if it is set, else the built-in line.
pub async fn text(command: &[String], name: &str, handled: u64, failed: u64) -> String {
    if command.is_empty() {
        return builtin(name, handled, failed);
    }
    let out = execute_with(
        command,
        Input::default(),
        STATUS_COMMAND_TIMEOUT,
        MAX_STATUS,
        &CancellationToken::new(),
    )
    .await;
    if !out.success {
        tracing::warn!(output = %crate::untrusted::shown(&out.output), "status command failed");
    }
    out.output.trim_end().to_owned()
}

/// `agent=web-01 host=web-01 uptime=3d4h load=0.10,0.20,0.30 handled=12 failed=1`.
pub fn builtin(name: &str, handled: u64, failed: u64) -> String {
    let host = crate::config::host_name().unwrap_or_else(|| "localhost".to_owned());
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
        .map_or_else(
            || "unknown".to_owned(),
            |secs| humantime::format_duration(Duration::from_secs(secs as u64)).to_string(),
        );
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|load| !load.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!(
        "agent={name} host={host} uptime={} load={load} handled={handled} failed={failed}",
        uptime.replace(' ', "")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builtin_and_command_status() {
        let line = text(&[], "a1", 3, 1).await;
        assert!(line.starts_with("agent=a1 host="), "{line}");
        assert!(line.ends_with(" handled=3 failed=1"), "{line}");
        let argv = ["echo".to_owned(), "all good".to_owned()];
        assert_eq!(text(&argv, "a1", 0, 0).await, "all good");
    }
}
