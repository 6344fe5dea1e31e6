//! The real `contactd` binary as a child process: started with a config in
//! a temp dir, its log lines read as they come, stopped with real signals.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use contactd::proto::admin::{Agent, admin_client::AdminClient};
use tonic::transport::Channel;

use super::{LIMIT, within};

/// A `contactd` child process, its stderr lines read as they come.
pub struct Process {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stderr line read so far.
    pub log: Vec<String>,
}

impl Process {
    /// Starts `contactd ARGS...` with extra environment variables (and none
    /// of the caller's that would change its behaviour).
    pub fn spawn<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Process {
        let mut command = super::contactd();
        command
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().copied());
        Process::spawn_command(command)
    }

    /// Starts `command` (made from [`super::contactd`]), reading its stderr.
    pub fn spawn_command(mut command: std::process::Command) -> Process {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start contactd");
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?} within {LIMIT:?}; log:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Waits until `count` log lines contain `needle`.
    pub fn wait_for_lines(&mut self, needle: &str, count: usize) {
        let deadline = Instant::now() + LIMIT;
        while self.log.iter().filter(|l| l.contains(needle)).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(_) => panic!(
                    "fewer than {count} log lines with {needle:?} within {LIMIT:?}; log:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the process to exit, within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect the rest of the log.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
                    self.log.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "contactd did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `contactd serve`, its config in a temp dir.
pub struct Daemon {
    pub process: Process,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for Daemon {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl Daemon {
    /// Starts `contactd serve` on `config` (TOML without a `listen` key:
    /// port 0 on loopback is added) and waits until it serves.
    pub fn start(config: &str) -> Daemon {
        Daemon::start_with(config, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("contactd.toml");
        let mut config = with_listen(config);
        if !config.contains("[admin]") {
            let socket = dir.path().join("admin.sock");
            config.push_str(&format!("\n[admin]\nsocket = \"{}\"\n", socket.display()));
        }
        std::fs::write(&path, config).unwrap();
        // The store's default place (unless the config names one): this
        // test's directory, as systemd's StateDirectory= would be.
        let state = dir.path().to_str().unwrap().to_owned();
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "STATE_DIRECTORY") {
            env.push(("STATE_DIRECTORY", &state));
        }
        let mut process = Process::spawn(
            &[OsStr::new("serve"), OsStr::new("-c"), path.as_os_str()],
            &env,
        );
        let serving = process.wait_for_line("serving Contact");
        let addr = field(&serving, "addr").parse().expect("an addr= field");
        Daemon { process, addr, dir }
    }

    /// The config file's path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("contactd.toml")
    }

    /// A client of its admin API (on the socket [`start`](Self::start) configures).
    pub async fn admin(&self) -> AdminClient<Channel> {
        let socket = self.dir.path().join("admin.sock");
        within("admin connect", contactd::client::admin::connect(&socket))
            .await
            .unwrap()
    }

    /// The agent `name` as the server lists it, once `done` holds for it
    /// (bounded): its acked and failed counts are the oracle for acks.
    pub async fn agent_until(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(&Agent) -> bool,
    ) -> Agent {
        let admin = self.admin().await;
        super::until(
            what,
            || {
                let mut admin = admin.clone();
                async move {
                    let agents = super::agents(&mut admin).await;
                    agents.into_iter().find(|a| a.name == name)
                }
            },
            |agent| agent.as_ref().is_some_and(&done),
        )
        .await
        .expect("found")
    }
}

fn with_listen(config: &str) -> String {
    if config.contains("listen =") {
        // The test chose the address (a server restarted on its port).
        config.to_owned()
    } else if config.contains("[server]") {
        config.replacen("[server]", "[server]\nlisten = \"127.0.0.1:0\"", 1)
    } else {
        format!("[server]\nlisten = \"127.0.0.1:0\"\n{config}")
    }
}

/// The value of `name=value` in a text log line, or of the field `name` in
/// a JSON one.
pub fn field(line: &str, name: &str) -> String {
    if line.starts_with('{') {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        return event["fields"][name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .to_owned();
    }
    let start = line
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        + name.len()
        + 1;
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

/// The repository's proto directory.
pub fn proto_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/proto"))
}
