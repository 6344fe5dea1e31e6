//! `contactd cmd`: the real binary against a real server's remoteCMD.

use std::process::{Output, Stdio};

use tokio::io::AsyncWriteExt;

use crate::common::{TestServer, with_commands, within};

const ALLOW: &[&str] = &["echo *", "true", "false"];

/// Runs `contactd cmd ARGS...` with `stdin` as its input.
async fn cmd(args: &[&str], stdin: &str) -> Output {
    let mut child = tokio::process::Command::from(crate::common::contactd())
        .arg("cmd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run contactd cmd");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    within("contactd cmd", child.wait_with_output())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn several_commands_run_at_once_and_each_result_is_printed() {
    let server = TestServer::start(with_commands(ALLOW)).await;
    let addr = server.addr.to_string();
    let out = cmd(
        &[
            "--addr",
            &addr,
            "--parallel",
            "2",
            "echo one",
            "echo 'two words'",
            "true",
        ],
        "",
    )
    .await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for needle in [
        "[1] ok: echo one\n    one\n",
        "[2] ok: echo 'two words'\n    two words\n",
        "[3] ok: true\n",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_failed_or_refused_command_exits_1_with_its_status_shown() {
    let server = TestServer::start(with_commands(ALLOW)).await;
    let addr = server.addr.to_string();
    let out = cmd(&["--addr", &addr, "true", "false"], "").await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("[2] failed: false\n"),
        "{}",
        text(&out.stdout)
    );

    let out = cmd(&["--addr", &addr, "echo hi", "rm -rf /"], "").await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[1] ok: echo hi\n"), "{stdout}");
    assert!(
        stdout.contains("[2] PERMISSION_DENIED: rm -rf /: "),
        "{stdout}"
    );
    server.stop().await;
}

#[tokio::test]
async fn nothing_listening_exits_2() {
    // A port that was free a moment ago, and is closed now.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let out = cmd(&["--addr", &addr, "--timeout", "10s", "true"], "").await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("failed to connect to {addr}")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn commands_come_from_stdin_one_a_line_and_print_as_json() {
    let server = TestServer::start(with_commands(ALLOW)).await;
    let addr = server.addr.to_string();
    let out = cmd(
        &["--addr", &addr, "-f", "-", "--json"],
        "echo a\n\n   \nfalse\necho 'not\nrm x\n",
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let results = json["results"].as_array().unwrap();
    let summary: Vec<_> = results
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["command"].as_str().unwrap(),
                r["success"].as_bool().unwrap(),
                r["output"].as_str(),
                r["code"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "echo a", true, Some("a\n"), None),
            (2, "false", false, Some("[contactd: exit status 1]"), None),
            (3, "echo 'not", false, None, Some("INVALID_ARGUMENT")),
            (4, "rm x", false, None, Some("PERMISSION_DENIED")),
        ]
    );
    assert!(results[3]["message"].as_str().unwrap().contains("rm x"));
    server.stop().await;
}

#[tokio::test]
async fn the_address_comes_from_the_servers_config_with_a_wildcard_meaning_loopback() {
    let server = TestServer::start(with_commands(ALLOW)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("contactd.toml");
    // Keys this contactd does not know do not stop a client.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"0.0.0.0:{}\"\nnewer_key = 1\n[tasks]\ninterval = \"soon\"\n",
            server.addr.port()
        ),
    )
    .unwrap();
    let out = cmd(&["-c", config.to_str().unwrap(), "echo via config"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("    via config\n"));
    server.stop().await;
}

#[tokio::test]
async fn no_commands_is_a_usage_error() {
    let out = cmd(&[], "").await;
    assert_eq!(out.status.code(), Some(2));
    let out = cmd(&["-f", "-"], "\n\n").await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no commands to run"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn results_into_a_closed_pipe_end_quietly_with_the_commands_exit_code() {
    // And `health`'s SERVING line: its exit code is what counts.
    let server = TestServer::start(with_commands(ALLOW)).await;
    let addr = server.addr.to_string();
    for (args, code) in [
        (vec!["cmd", "--addr", &addr, "echo a", "echo b"], 0),
        (vec!["cmd", "--addr", &addr, "--json", "false"], 1),
        (vec!["health", "--addr", &addr], 0),
    ] {
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let dir = tempfile::tempdir().unwrap();
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::cli::with_closed_stdout(&args, dir.path())
        });
        let out = within("contactd cmd", out).await.unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert!(stderr.is_empty(), "{stderr}");
    }
    server.stop().await;
}
