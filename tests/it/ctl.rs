//! The operator commands (`tasks`, `agents`, `task …`) as the real binary:
//! how they find the admin socket, and what they say when they cannot
//! reach it.

use std::{
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    process::{Command, Output},
};

use contactd::config::Config;

use crate::common::{TestServer, within};

fn contactd(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_contactd"));
    command
        .args(args)
        .env_remove("CONTACTD_CONFIG")
        .env_remove("RUST_LOG");
    command
}

/// Runs `command` off the test's runtime, within the tests' limit.
async fn output(mut command: Command) -> Output {
    within(
        "contactd",
        tokio::task::spawn_blocking(move || command.output().expect("run contactd")),
    )
    .await
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn operator_commands_read_only_the_admin_socket_from_the_config() {
    let server = TestServer::start(Config::default()).await;
    server.admin().await; // bound and accepting
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("contactd.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"not an address\"\nfrom_a_newer_contactd = true\n\
             [tasks]\ninterval = -1\n[admin]\nsocket = \"{}\"\n",
            server.admin_socket().display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for args in [
        &["agents", "-c", config][..],
        &["tasks", "-c", config],
        &["task", "submit", "uptime", "-c", config],
    ] {
        let out = output(contactd(args)).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // `serve` and `check-config` still check every key.
    let out = output(contactd(&["check-config", "-c", config])).await;
    assert_eq!(out.status.code(), Some(78));
    server.stop().await;
}

#[tokio::test]
async fn no_socket_says_whether_contactd_runs() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("admin.sock");
    let out = output(contactd(&["tasks", "--socket", missing.to_str().unwrap()])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "contactd: no socket at {}: is contactd running?\n",
            missing.display()
        )
    );
    // A socket file nobody listens on (a server that died): the same.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = output(contactd(&["agents", "--socket", stale.to_str().unwrap()])).await;
    assert!(
        text(&out.stderr).contains("is contactd running?"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn a_socket_the_user_may_not_open_says_which_group_to_join() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("admin.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut command = contactd(&["tasks", "--socket", socket.to_str().unwrap()]);
    // The temp dir belongs to the effective user.
    if std::fs::metadata(dir.path()).unwrap().uid() == 0 {
        // Root opens any socket: run the command as nobody instead.
        command.uid(65534).gid(65534);
    }
    let out = match within(
        "contactd",
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .unwrap()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: cannot run contactd as an unprivileged user ({e})");
            return;
        }
    };
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "contactd: cannot open the admin socket {}: permission denied: add your user to \
             group contactd (or run as root)\n",
            socket.display()
        )
    );
}
