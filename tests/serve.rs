//! `contactd serve` as a process: real sockets, real signals, and the seed's
//! own Python client.

mod common;

use std::{process::Command, time::Duration};

use common::daemon::{Daemon, proto_dir};
use nix::sys::signal::Signal;

#[test]
fn sigterm_stops_an_idle_server_with_exit_0() {
    let mut daemon = Daemon::start("");
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log.join("\n"));
    assert!(
        daemon.log.iter().any(|l| l.contains("server stopped")),
        "{}",
        daemon.log.join("\n")
    );
}

/// The seed's Python client (grpcio) against contactd. CI installs grpcio;
/// elsewhere the test says it was skipped unless grpcio is there.
#[test]
fn the_seed_python_client_gets_its_answers() {
    let has_grpcio = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_grpcio {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install grpcio and grpcio-tools (see .ci/run)"
        );
        eprintln!("skipped: python3 with grpcio and grpcio-tools is not installed");
        return;
    }
    let mut daemon = Daemon::start(
        "[tasks]\ninterval = \"1h\"\n[remote_cmd]\nenabled = true\nallow = [\"echo *\"]\n",
    );
    let out_dir = daemon.dir.path().join("py");
    std::fs::create_dir(&out_dir).unwrap();
    let output = Command::new("timeout")
        .args([
            "60",
            "python3",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/seed/contact_client.py"),
        ])
        .arg(daemon.addr.to_string())
        .arg(proto_dir())
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();

    let replies: Vec<String> = (0..10)
        .map(|i| format!("server received: data:{i}"))
        .collect();
    assert_eq!(report["status_replies"], serde_json::json!(replies));
    let tasks = report["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3);
    for task in tasks {
        let n: u32 = task
            .as_str()
            .unwrap()
            .strip_prefix("task:")
            .unwrap()
            .parse()
            .unwrap();
        assert!((100..=200).contains(&n), "{task}");
    }
    assert_eq!(report["tell_result"], "ok");
    let commands = report["commands"].as_array().unwrap();
    for (i, command) in commands.iter().enumerate() {
        assert_eq!(command, &serde_json::json!([i, true, format!("veth{i}\n")]));
    }
    assert_eq!(report["denied"], "PERMISSION_DENIED");

    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).code(), Some(0));
}
