//! The real `contactd` binary: config checking, exit codes, start-up errors.

use std::{
    path::Path,
    process::{Command, Output},
};

fn contactd(args: &[&str], dir: &Path) -> Output {
    crate::common::contactd()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run contactd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_example_config_is_valid_and_prints_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/contactd.toml");
    let out = contactd(&["check-config", "-c", example], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let effective: contactd::config::Config = contactd::config::parse(&text(&out.stdout)).unwrap();
    let example: contactd::config::Config = contactd::config::load(Path::new(example)).unwrap();
    assert_eq!(effective, example);
}

#[test]
fn check_config_reports_every_problem_with_line_and_column_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"localhost\"\n\n[tasks]\ninterval = \"soon\"\nbatchs = 3\n",
    )
    .unwrap();
    let out = contactd(&["check-config", "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(78));
    let stderr = text(&out.stderr);
    let file = path.display().to_string();
    for needle in [
        format!("{file}:2:10: server.listen: invalid address \"localhost\": expected IP:PORT"),
        format!(
            "{file}:5:12: tasks.interval: invalid duration \"soon\": expected a number with a unit"
        ),
        format!("{file}:6:1: tasks.batchs: unknown field `batchs`, expected one of"),
    ] {
        assert!(stderr.contains(&needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(out.stdout.is_empty());
}

#[test]
fn a_missing_explicit_config_is_an_error_but_a_missing_default_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let out = contactd(&["check-config", "-c", "nope.toml"], dir.path());
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("cannot read config file nope.toml"),
        "{}",
        text(&out.stderr)
    );

    let out = crate::common::contactd()
        .args(["check-config"])
        .env("CONTACTD_CONFIG", dir.path().join("also-missing.toml"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(78),
        "$CONTACTD_CONFIG names a file that must exist"
    );
}

#[test]
fn serve_fails_clearly_when_the_address_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, format!("[server]\nlisten = \"{addr}\"\n")).unwrap();
    let out = contactd(&["serve", "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "contactd: cannot listen on {addr}: Address already in use"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn serve_exits_78_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[tasks]\nretain = -1\n").unwrap();
    let out = contactd(&["serve", "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains(":2:10: tasks.retain:"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn version_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let out = contactd(&["--version"], dir.path());
    let version = text(&out.stdout);
    let version = version.trim();
    let rest = version
        .strip_prefix(&format!("contactd {} (commit ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("{version}"));
    // The commit (12 hex digits; `unknown` outside git), then the build date.
    let (commit, date) = rest.split_once(", built ").expect(version);
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{version}"
    );
    let date = date.strip_suffix(')').expect(version);
    let parts: Vec<&str> = date.split('-').collect();
    assert!(
        parts.len() == 3 && parts[0].len() == 4 && date.len() == 10,
        "{version}"
    );
    let out = contactd(&["--help"], dir.path());
    let help = text(&out.stdout);
    for needle in ["serve", "check-config", "Examples:"] {
        assert!(help.contains(needle), "{help}");
    }
}

#[test]
fn an_unwritable_log_directory_is_a_clear_start_up_error_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    // A regular file where the log directory should be.
    std::fs::write(dir.path().join("not-a-dir"), "").unwrap();
    let log = dir.path().join("not-a-dir/contactd.log");
    std::fs::write(&path, format!("[log]\nfile = \"{}\"\n", log.display())).unwrap();
    let out = contactd(&["serve", "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(78), "a config problem: no restart");
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "contactd: cannot open log file {}: ",
            log.display()
        )),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2_but_health_exits_1_as_grpc_health_probe() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["serve", "--bogus"][..],
        &["check-config", "--bogus"],
        &["agent", "--bogus"],
        &["cmd", "--bogus", "true"],
        &["cmd"],
        &["task", "submit"],
        &["task", "show", "not-a-number"],
        &["agents", "--bogus"],
        &["tasks", "--state", "sleeping"],
        &["tls", "issue", "web1"],
        &["token", "create", "web1"],
        &["store", "backup"],
        &["no-such-command"],
    ] {
        let out = contactd(args, dir.path());
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = contactd(&["health", "--bogus"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let out = contactd(&["health", "--help"], dir.path());
    assert!(
        text(&out.stdout).contains("grpc_health_probe"),
        "{}",
        text(&out.stdout)
    );
}

/// Runs `contactd ARGS...` with its stdout a pipe whose reader is closed
/// before it starts, as `| head` is once it has read enough: every write
/// fails with EPIPE.
pub fn with_closed_stdout(args: &[&str], dir: &Path) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    crate::common::contactd()
        .args(args)
        .current_dir(dir)
        .stdout(writer)
        .output()
        .expect("run contactd")
}

#[test]
fn help_and_version_into_a_closed_pipe_end_quietly() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--help"][..],
        &["--version"],
        &["help", "tasks"],
        &["health", "--help"],
        &["check-config"],
    ] {
        let out = with_closed_stdout(args, dir.path());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Every visible command as its man page names it: `contactd`,
/// `contactd-serve`, `contactd-task-submit`, …
fn command_pages(command: &clap::Command, prefix: &str, pages: &mut Vec<String>) {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        command_pages(sub, &format!("{prefix}-{}", sub.get_name()), pages);
    }
    pages.push(prefix.to_owned());
}

#[test]
fn completions_name_every_command_for_bash_zsh_and_fish() {
    use clap::CommandFactory;
    let dir = tempfile::tempdir().unwrap();
    let root = contactd::cli::Cli::command();
    let commands: Vec<&str> = root
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(clap::Command::get_name)
        .collect();
    assert!(commands.contains(&"task") && commands.contains(&"serve"));
    for shell in ["bash", "zsh", "fish"] {
        let out = contactd(&["completions", shell], dir.path());
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for command in &commands {
            assert!(script.contains(command), "{shell}: no {command}");
        }
        // Nested commands and options too.
        for needle in ["submit", "socket", "json"] {
            assert!(script.contains(needle), "{shell}: no {needle}");
        }
        // The packaging commands are not offered to operators.
        assert!(!script.contains("completions"), "{shell}");
    }
    let out = contactd(&["completions", "bash"], dir.path());
    let script = dir.path().join("contactd.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check.stderr));

    let out = contactd(&["completions", "tcsh"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let help = text(&contactd(&["--help"], dir.path()).stdout);
    assert!(
        !help.contains("completions") && !help.contains(" man "),
        "{help}"
    );
}

#[test]
fn man_pages_render_one_page_per_command() {
    use clap::CommandFactory;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man1");
    let out = contactd(&["man", out_dir.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mut expected = Vec::new();
    command_pages(&contactd::cli::Cli::command(), "contactd", &mut expected);
    let mut written: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    written.sort();
    let mut names: Vec<String> = expected.iter().map(|p| format!("{p}.1")).collect();
    names.sort();
    assert_eq!(written, names);
    assert_eq!(text(&out.stdout).lines().count(), names.len());
    for page in &expected {
        let roff = std::fs::read_to_string(out_dir.join(format!("{page}.1"))).unwrap();
        let header = format!(".TH {page} 1 ");
        assert!(
            roff.lines().any(|l| l.starts_with(&header)),
            "{page}: no {header:?} in\n{roff}"
        );
        for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS"] {
            assert!(roff.contains(section), "{page}: no {section}");
        }
    }
    let main = std::fs::read_to_string(out_dir.join("contactd.1")).unwrap();
    assert!(main.contains("contactd\\-task(1)"), "{main}");
}
