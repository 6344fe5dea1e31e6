//! What a remote command's environment holds: the documented minimum and
//! `remote_cmd.env`, never the daemon's own variables (the real binary,
//! started with a secret in its environment, runs `env` for a caller).

use std::collections::BTreeMap;

use nix::sys::signal::Signal;

use crate::common::{LIMIT, daemon::Daemon};

const SECRET: (&str, &str) = ("CONTACTD_TEST_SECRET", "hunter2-in-the-unit-environment");
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn config(tz: &str) -> String {
    format!(
        "[remote_cmd]\nenabled = true\nallow = [\"env\"]\n\
         env = {{ TZ = \"{tz}\", LANG = \"en_US.UTF-8\" }}\n"
    )
}

/// The output of `env` run through `contactd cmd --json` against `daemon`.
fn remote_env(daemon: &Daemon) -> String {
    let out = crate::common::contactd()
        .args(["cmd", "--addr", &daemon.addr.to_string(), "--json", "env"])
        .output()
        .expect("run contactd cmd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let result = &json["results"][0];
    assert_eq!(result["success"], true, "{json}");
    result["output"].as_str().unwrap().to_owned()
}

fn variables(output: &str) -> BTreeMap<&str, &str> {
    output
        .lines()
        .map(|line| line.split_once('=').unwrap_or_else(|| panic!("{line:?}")))
        .collect()
}

#[test]
fn a_remote_command_gets_path_lang_and_remote_cmd_env_and_nothing_of_the_daemons() {
    let mut daemon = Daemon::start_with(&config("UTC"), &[SECRET, ("NOTIFY_SOCKET", "@x")]);
    let output = remote_env(&daemon);
    assert!(!output.contains(SECRET.1), "{output}");
    let vars = variables(&output);
    let names: Vec<&str> = vars.keys().copied().collect();
    assert_eq!(names, ["CONTACTD_RUN", "LANG", "PATH", "TZ"], "{output}");
    assert_eq!(vars["PATH"], DEFAULT_PATH);
    // remote_cmd.env adds TZ and replaces the default LANG (C.UTF-8).
    assert_eq!(vars["LANG"], "en_US.UTF-8");
    assert_eq!(vars["TZ"], "UTC");
    // The reaper's run id: the daemon's pid and a sequence number.
    let pid = daemon.child.id().to_string();
    assert_eq!(vars["CONTACTD_RUN"].split_once('.').unwrap().0, pid);
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}

#[test]
fn a_reload_changes_remote_cmd_env_for_the_next_command() {
    let mut daemon = Daemon::start_with(&config("UTC"), &[SECRET]);
    assert_eq!(variables(&remote_env(&daemon))["TZ"], "UTC");
    let path = daemon.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"UTC\"", "\"Europe/Paris\"")).unwrap();
    daemon.signal(Signal::SIGHUP);
    let reloaded = daemon.wait_for_line("config reloaded");
    assert!(reloaded.contains("remote_cmd.env.TZ"), "{reloaded}");
    let output = remote_env(&daemon);
    assert_eq!(variables(&output)["TZ"], "Europe/Paris");
    assert!(!output.contains(SECRET.1), "{output}");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}
