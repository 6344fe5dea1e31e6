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
    let mut command = crate::common::contactd();
    command.args(args);
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

/// Runs `contactd task submit ARGS... --socket S` with `stdin` as input.
async fn submit(server: &TestServer, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let socket = server.admin_socket();
    let mut command = contactd(&["task", "submit"]);
    command
        .args(args)
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let stdin = stdin.to_owned();
    within(
        "contactd task submit",
        tokio::task::spawn_blocking(move || {
            let mut child = command.spawn().expect("run contactd");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }),
    )
    .await
    .unwrap()
}

/// A config where only submitted tasks exist.
fn manual_tasks() -> Config {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config
}

async fn task_texts(server: &TestServer) -> Vec<String> {
    let mut admin = server.admin().await;
    let request = contactd::proto::admin::ListTasksRequest::default();
    let tasks = admin.list_tasks(request).await.unwrap().into_inner().tasks;
    tasks.into_iter().map(|t| t.text).collect()
}

#[tokio::test]
async fn task_text_comes_from_the_argument_stdin_or_a_file() {
    let server = TestServer::start(manual_tasks()).await;
    server.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.txt");
    std::fs::write(&file, "line one\nline two\n\n").unwrap();
    for (args, stdin) in [
        (&["from the argument"][..], ""),
        (&["-"], "from stdin\n"),
        (&["--file", file.to_str().unwrap()], ""),
    ] {
        let out = submit(&server, args, stdin).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    }
    assert_eq!(
        task_texts(&server).await,
        ["from the argument", "from stdin", "line one\nline two"]
    );
    server.stop().await;
}

#[tokio::test]
async fn empty_task_text_is_a_usage_error() {
    let server = TestServer::start(manual_tasks()).await;
    server.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.txt");
    std::fs::write(&file, "\n\n").unwrap();
    for (args, stdin, from) in [
        (&[""][..], "", "the argument"),
        (&["  "], "", "the argument"),
        (&["-"], "", "stdin"),
        (&["-"], "\n", "stdin"),
        (&["--file", file.to_str().unwrap()], "", "the file"),
    ] {
        let out = submit(&server, args, stdin).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with(&format!("contactd: the task's text from {from} is empty")),
            "{stderr}"
        );
    }
    assert!(task_texts(&server).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn submitting_to_an_agent_never_seen_warns() {
    use contactd::proto::{AGENT_HEADER, contact::Empty, contact::contact_client::ContactClient};
    let server = TestServer::start(manual_tasks()).await;
    server.admin().await;
    let out = submit(&server, &["uptime", "--agent", "web9"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("warning: no agent named \"web9\" has connected to this server"),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout), "submitted task 1\n");

    // Once web1 has connected, no warning.
    let mut client = ContactClient::new(server.channel().await);
    let mut request = tonic::Request::new(Empty {});
    request
        .metadata_mut()
        .insert(AGENT_HEADER, "web1".parse().unwrap());
    let _stream = within("getTask", client.get_task(request)).await.unwrap();
    let out = submit(&server, &["uptime", "--agent", "web1"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_status_cannot_forge_a_row_or_drive_the_terminal() {
    use contactd::proto::{
        AGENT_HEADER,
        admin::ListAgentsRequest,
        contact::{ClientMsg, contact_client::ContactClient},
    };
    let server = TestServer::start(Config::default()).await;
    let mut admin = server.admin().await;
    let hostile = "fine\nweb9  127.0.0.1:1  up 1s  9  9  0  0  forged\u{1b}[2J";
    let mut request = tonic::Request::new(tokio_stream::iter([ClientMsg {
        msg: hostile.into(),
    }]));
    request
        .metadata_mut()
        .insert(AGENT_HEADER, "web1".parse().unwrap());
    let mut client = ContactClient::new(server.channel().await);
    let mut replies = within("sendStatus", client.send_status(request))
        .await
        .unwrap()
        .into_inner();
    within("the reply", replies.message()).await.unwrap();
    within("the status kept", async {
        loop {
            let agents = admin
                .list_agents(ListAgentsRequest::default())
                .await
                .unwrap();
            if agents
                .into_inner()
                .agents
                .iter()
                .any(|a| a.last_status == hostile)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let socket = server.admin_socket();
    let out = output(contactd(&["agents", "--socket", socket.to_str().unwrap()])).await;
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        table.lines().count(),
        2,
        "a header and web1's row:\n{table}"
    );
    assert!(!table.contains('\u{1b}'), "{table:?}");
    assert!(
        table.contains("fine\\nweb9") && table.contains("forged\\u{1b}[2J"),
        "{table}"
    );
    drop(replies);
    server.stop().await;
}

// ---- the admin socket: a cap, an idle timeout, and only where it is safe ----

/// Whether the server closed `stream` (a read gives end of file or an
/// error), within [`crate::common::LIMIT`].
async fn closed(stream: &mut tokio::net::UnixStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    crate::common::within("the server closing the connection", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                // HTTP/2 settings the server sends first.
                Ok(_) => {}
            }
        }
    })
    .await
}

#[tokio::test]
async fn the_admin_socket_caps_connections_and_closes_idle_ones() {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.admin.max_connections = 3;
    config.admin.idle_timeout = std::time::Duration::from_secs(1);
    let server = crate::common::TestServer::start(config).await;
    let socket = server.admin_socket();
    // An admin client (once the socket serves) and two clients that never
    // say anything hold the three slots (each taken as the server accepts,
    // in order); a fourth is closed at once.
    let idle_admin = server.admin().await;
    let mut first = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut second = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut third = tokio::net::UnixStream::connect(&socket).await.unwrap();
    assert!(closed(&mut third).await, "a fourth connection was kept");
    // The idle ones are closed after admin.idle_timeout, and the socket
    // serves again.
    assert!(closed(&mut first).await);
    assert!(closed(&mut second).await);
    drop(idle_admin);
    let mut admin = server.admin().await;
    crate::common::submit(&mut admin, "after the idle ones", "").await;
    server.stop().await;
}

#[tokio::test]
async fn an_admin_socket_where_another_user_could_put_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = open.join("admin.sock");
    // The server does not bind it (and says why before it serves) ...
    let server = crate::common::daemon::Daemon::start(&format!(
        "[tasks]\nbatch = 0\n[admin]\nsocket = \"{}\"\n",
        socket.display()
    ));
    assert!(
        !socket.exists(),
        "the server bound a socket in a 0777 directory"
    );
    assert!(
        server
            .log
            .iter()
            .any(|l| l.contains("writable by every user")),
        "{:#?}",
        server.log
    );
    // ... and the operator commands do not use one put there.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let out = crate::common::contactd()
        .args(["agents", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    drop(listener);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by every user"), "{err}");

    // In a sticky directory (as /tmp), a socket of another user's.
    if nix::unistd::geteuid().is_root() {
        let sticky = dir.path().join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let socket = sticky.join("admin.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        nix::unistd::chown(&socket, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let out = crate::common::contactd()
            .args(["agents", "--socket"])
            .arg(&socket)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("owned by uid 65534"), "{err}");
    }
}
