//! Socket activation without systemd: the test binds the listening socket,
//! as a socket unit would, and starts the real binary with it as fd 3,
//! `LISTEN_FDS=1` and `LISTEN_PID` its own pid (sd_listen_fds' protocol).
//! The socket outlives each server process, so a connection made while no
//! server runs waits in its backlog and is served by the next one.

use std::{
    net::{SocketAddr, TcpListener},
    os::{fd::AsRawFd, unix::process::CommandExt},
    time::Duration,
};

use nix::sys::signal::Signal;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{
    daemon::{Process, field},
    within,
};

/// `contactd serve -c CONFIG` with `listener` passed as fd 3 under `name`.
/// `LISTEN_PID` must be the server's own pid, known only once it runs: a
/// shell sets it to `$$` and execs contactd, which keeps the pid. With
/// `pid_of_another`, it names another process, so the sockets are not
/// contactd's to take.
fn activated(
    listener: &TcpListener,
    name: &str,
    config: &std::path::Path,
    pid_of_another: bool,
) -> Process {
    let mut command = std::process::Command::new("/bin/sh");
    let pid = if pid_of_another { "1" } else { "$$" };
    command
        .arg("-c")
        .arg(format!(
            "LISTEN_PID={pid} LISTEN_FDS=1 LISTEN_FDNAMES={name} exec \"$0\" serve -c \"$1\""
        ))
        .arg(env!("CARGO_BIN_EXE_contactd"))
        .arg(config)
        .env_remove("CONTACTD_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env("STATE_DIRECTORY", config.parent().unwrap());
    let fd = listener.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; nothing else runs between fork
    // and exec. The copy on fd 3 is not close-on-exec, so contactd gets it.
    unsafe {
        command.pre_exec(move || {
            let listener = std::os::fd::BorrowedFd::borrow_raw(fd);
            if fd == 3 {
                nix::fcntl::fcntl(
                    listener,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )?;
            } else {
                // Kept open for exec: the returned owner is not dropped.
                let copy = nix::unistd::dup2_raw(listener, 3)?;
                let _ = std::os::fd::IntoRawFd::into_raw_fd(copy);
            }
            Ok(())
        });
    }
    Process::spawn_command(command)
}

fn config_file(dir: &tempfile::TempDir, listen: SocketAddr) -> std::path::PathBuf {
    let path = dir.path().join("contactd.toml");
    let socket = dir.path().join("admin.sock");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"{listen}\"\n[admin]\nsocket = \"{}\"\n",
            socket.display()
        ),
    )
    .unwrap();
    path
}

async fn serving(addr: SocketAddr) -> i32 {
    let channel = within(
        "connect",
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .expect("connected");
    let mut health = HealthClient::new(channel);
    within("health", health.check(HealthCheckRequest::default()))
        .await
        .expect("health answers")
        .into_inner()
        .status
}

#[tokio::test]
async fn a_passed_socket_is_served_and_queues_connections_across_a_restart() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir, addr);

    let mut first = activated(&listener, "contact", &config, false);
    let line = first.wait_for_line("listening on a socket passed by systemd");
    assert!(line.contains(&addr.to_string()), "{line}");
    let serving_line = first.wait_for_line("serving Contact");
    assert_eq!(field(&serving_line, "addr"), addr.to_string());
    assert_eq!(serving(addr).await, 1, "SERVING");

    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(30)).success());
    // No server runs now, and yet the port takes connections: they wait in
    // the socket's backlog (the kernel completes the TCP handshake).
    let waiting = within(
        "a connection while no server runs",
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .expect("not refused");

    let mut second = activated(&listener, "contact", &config, false);
    second.wait_for_line("serving Contact");
    // The connection made in the gap is the new server's: an HTTP/2
    // session over it answers.
    let (mut send, connection) = within(
        "HTTP/2 over the waiting connection",
        h2::client::handshake(waiting),
    )
    .await
    .expect("the new server speaks HTTP/2 on it");
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    // An empty HealthCheckRequest: flag 0, length 0.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = within("the health answer", response).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = within("the body", body.data()).await {
        data.extend_from_slice(&chunk.unwrap());
    }
    // SERVING is field 1, value 1: the message is [0x08, 0x01].
    assert_eq!(&data[5..], &[0x08, 0x01], "{data:?}");
    let trailers = within("the trailers", body.trailers()).await.unwrap();
    assert_eq!(trailers.unwrap()["grpc-status"], "0");

    second.signal(Signal::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test]
async fn a_socket_unit_that_disagrees_with_the_config_stops_the_start_saying_both() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let passed = listener.local_addr().unwrap();
    // Another address, held so that it is free of any server.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let configured = other.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir, configured);

    // Named for the Contact port, but elsewhere.
    let mut named = activated(&listener, "contact", &config, false);
    let status = named.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(78), "{}", named.log.join("\n"));
    let log = named.log.join("\n");
    assert!(
        log.contains(&passed.to_string()) && log.contains(&configured.to_string()),
        "{log}"
    );
    assert!(log.contains("[server] listen"), "{log}");
    assert!(log.contains("contactd.socket"), "{log}");

    // Unnamed (a socket unit's default name), at no configured address.
    let mut unnamed = activated(&listener, "contactd.socket", &config, false);
    let status = unnamed.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(78), "{}", unnamed.log.join("\n"));
    let log = unnamed.log.join("\n");
    assert!(
        log.contains(&passed.to_string()) && log.contains(&configured.to_string()),
        "{log}"
    );
}

#[tokio::test]
async fn an_unnamed_socket_is_matched_by_its_address() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir, addr);
    let mut server = activated(&listener, "contactd.socket", &config, false);
    server.wait_for_line("listening on a socket passed by systemd");
    server.wait_for_line("serving Contact");
    assert_eq!(serving(addr).await, 1, "SERVING");
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test]
async fn sockets_meant_for_another_process_are_left_alone() {
    // LISTEN_PID names another process: contactd binds its own port.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir, "127.0.0.1:0".parse().unwrap());
    let mut server = activated(&listener, "contact", &config, true);
    let line = server.wait_for_line("serving Contact");
    let addr: SocketAddr = field(&line, "addr").parse().unwrap();
    assert_ne!(addr, listener.local_addr().unwrap());
    assert!(
        !server.log.iter().any(|l| l.contains("passed by systemd")),
        "{}",
        server.log.join("\n")
    );
    assert_eq!(serving(addr).await, 1, "SERVING");
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
}
