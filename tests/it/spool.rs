//! The agent's spool, with the real binaries: `contactd agent` processes
//! killed with SIGKILL and started again on the same state directory, a
//! real `contactd serve` on a SQLite store (whose epoch, sent with every
//! task, survives its restart) killed and restarted too. What is checked:
//! an ack that never arrived is sent after the agent's restart and its task
//! is not run again; a task whose handler was running when the agent died is
//! not run again either (it is acked FAILED, as interrupted); a task whose
//! agent only lost its connection (through a relay the test cuts) stays with
//! it, and its ack, spooled meanwhile, arrives when it is back; an ack
//! whose call failed in flight is sent again and counted once; a damaged
//! spool stops the agent with an error naming the file.

use crate::common;

use std::{
    ffi::OsStr,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{
    LIMIT,
    daemon::{Daemon, Process, field},
    submit, until, within,
};
use contactd::proto::admin::{ListTasksRequest, Task, TaskState};
use nix::sys::signal::Signal;

/// A server in queue mode on `store`, generating nothing; on `listen` if
/// given (a restart on the same port).
fn server_config(store: &Path, listen: Option<SocketAddr>) -> String {
    let listen = listen.map_or_else(String::new, |a| format!("listen = \"{a}\"\n"));
    format!(
        "[server]\n{listen}[tasks]\nmode = \"queue\"\nbatch = 0\nack_timeout = \"1h\"\n\
         [store]\npath = \"{}\"\n",
        store.display()
    )
}

/// An agent whose handler appends its task id to `runs`, then waits until
/// the test opens `gate` (a fifo) for writing, then succeeds.
struct AgentFiles {
    config: PathBuf,
    runs: PathBuf,
    gate: PathBuf,
    state: PathBuf,
}

fn agent_files(dir: &Path, addr: SocketAddr, name: &str) -> AgentFiles {
    let runs = dir.join("runs");
    let gate = dir.join("gate");
    let state = dir.join("agent-state");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&gate)
            .status()
            .unwrap()
            .success()
    );
    let config = dir.join("agent.toml");
    let script = format!(
        "cat >/dev/null; echo $CONTACTD_TASK_ID >> {}; cat {} >/dev/null",
        runs.display(),
        gate.display()
    );
    std::fs::write(
        &config,
        format!(
            "[agent]\nservers = [\"http://{addr}\"]\nname = \"{name}\"\nstate_dir = \"{}\"\n\
             handler = [\"sh\", \"-c\", \"{script}\"]\nstatus_interval = \"1h\"\n\
             [agent.backoff]\ninitial = \"50ms\"\nmax = \"500ms\"\n\
             [log]\nlevel = \"info,contactd::agent=debug\"\n",
            state.display()
        ),
    )
    .unwrap();
    AgentFiles {
        config,
        runs,
        gate,
        state,
    }
}

/// Releases a handler still waiting at the gate when a test ends, passed
/// or failed (handlers outlive an agent killed with SIGKILL: they run in
/// their own process groups). Without a reader, opening fails at once.
impl Drop for AgentFiles {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&self.gate);
    }
}

fn start_agent(files: &AgentFiles) -> Process {
    Process::spawn(
        &[
            OsStr::new("agent"),
            OsStr::new("-c"),
            files.config.as_os_str(),
        ],
        &[],
    )
}

/// The task ids the handler was started for, in order.
fn runs(files: &AgentFiles) -> Vec<u64> {
    std::fs::read_to_string(&files.runs)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// Waits until the handler has started `count` times.
async fn until_runs(files: &AgentFiles, count: usize) {
    within("the handler to start", async {
        while runs(files).len() < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Lets the handlers waiting at the gate go on (opening the fifo for
/// writing), if any still waits: a handler a killed agent left behind is
/// killed by the next agent's start where agents may make cgroups, and
/// without a reader, opening fails at once (bounded retries while the
/// reader may still be opening its end).
async fn open_gate(files: &AgentFiles) {
    use std::os::unix::fs::OpenOptionsExt;
    let gate = files.gate.clone();
    within("the gate opened", async move {
        for _ in 0..200 {
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&gate);
            if opened.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// The server's tasks once `done` holds for them.
async fn tasks_until(daemon: &Daemon, what: &str, done: impl Fn(&[Task]) -> bool) -> Vec<Task> {
    let admin = daemon.admin().await;
    until(
        what,
        || {
            let mut admin = admin.clone();
            async move {
                admin
                    .list_tasks(ListTasksRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .tasks
            }
        },
        |tasks| done(tasks),
    )
    .await
}

/// The server's tasks once task `id` is acked.
async fn until_acked(daemon: &Daemon, id: u64) -> Vec<Task> {
    tasks_until(daemon, "the task acked", |tasks| {
        tasks
            .iter()
            .any(|t| t.id == id && t.state() == TaskState::Acked)
    })
    .await
}

fn kill(process: &mut Process) {
    process.signal(Signal::SIGKILL);
    process.wait_exit(LIMIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_that_never_arrived_is_sent_after_the_agents_restart_and_the_task_is_not_run_again()
{
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("contactd.db");
    let mut server = Daemon::start(&server_config(&store, None));
    let addr = server.addr;
    let files = agent_files(dir.path(), addr, "spooler");
    let mut agent = start_agent(&files);
    agent.wait_for_line("connected to");
    let id = submit(&mut server.admin().await, "the task", "").await;
    until_runs(&files, 1).await;

    // The server goes away while the handler runs: its ack cannot arrive.
    kill(&mut server);
    open_gate(&files).await;
    agent.wait_for_line("result spooled");
    // Killed with the ack still unsent.
    kill(&mut agent);

    let mut agent = start_agent(&files);
    let opened = agent.wait_for_line("agent spool opened");
    assert_eq!(field(&opened, "to_resend"), "1", "{opened}");
    assert_eq!(field(&opened, "interrupted"), "0", "{opened}");
    let server = Daemon::start(&server_config(&store, Some(addr)));
    // The restarted server hands the task back to its holder (the claim was
    // kept), which acks it from the spool; the spooled ack arrives too.
    let tasks = until_acked(&server, id).await;
    common::assert_each_acked_once(&tasks);
    assert_eq!(runs(&files), [id], "the handler ran once");
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(LIMIT).success());
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_handler_ran_when_the_agent_died_is_not_run_again_but_acked_failed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("contactd.db");
    let server = Daemon::start(&server_config(&store, None));
    let files = agent_files(dir.path(), server.addr, "interrupted");
    let mut agent = start_agent(&files);
    agent.wait_for_line("connected to");
    let id = submit(&mut server.admin().await, "the task", "").await;
    until_runs(&files, 1).await;
    // Killed while its handler runs (which, in its own process group, goes
    // on: it is let go at the end, unless the next agent kills it, where it
    // may make cgroups: a command outlives no agent).
    kill(&mut agent);

    let mut agent = start_agent(&files);
    let warned = agent.wait_for_line("not run again, acked as FAILED (interrupted)");
    assert!(warned.contains(&format!("[{id}]")), "{warned}");
    let tasks = tasks_until(&server, "the task failed", |tasks| {
        tasks
            .iter()
            .any(|t| t.id == id && t.state() == TaskState::Failed)
    })
    .await;
    let task = tasks.iter().find(|t| t.id == id).unwrap();
    assert!(task.last_result.contains("interrupted"), "{task:?}");
    open_gate(&files).await;
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(LIMIT).success());
    assert_eq!(runs(&files), [id], "the handler was not started again");
}

#[test]
fn a_damaged_spool_stops_the_agent_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let files = agent_files(dir.path(), "127.0.0.1:9".parse().unwrap(), "damaged");
    std::fs::create_dir_all(&files.state).unwrap();
    let spool = files.state.join("agent-spool-damaged.db");
    let garbage = b"SQLite format 3\0 but not really: cut short".repeat(100);
    std::fs::write(&spool, &garbage).unwrap();
    let mut agent = start_agent(&files);
    let status = agent.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(78), "{}", agent.log.join("\n"));
    let log = agent.log.join("\n");
    assert!(log.contains(&spool.display().to_string()), "{log}");
    assert!(log.contains("damaged"), "{log}");
    assert!(log.contains("Move it aside"), "{log}");
    assert_eq!(std::fs::read(&spool).unwrap(), garbage, "left as it was");
}

/// A TCP relay on loopback to `upstream` that the test can cut: every
/// connection through it closes and none is accepted until it is started
/// again on the same address; or mute one way: the server's bytes stop
/// reaching the agent (what the agent sends still arrives), or the agent's
/// stop reaching the server. At most 100 connections (a bound; the test
/// needs a handful).
struct Relay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    muted: Arc<AtomicBool>,
    agent_muted: Arc<AtomicBool>,
}

impl Relay {
    async fn start(at: SocketAddr, upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(at).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let muted = Arc::new(AtomicBool::new(false));
        let agent_muted = Arc::new(AtomicBool::new(false));
        let (mute, mute_agent) = (Arc::clone(&muted), Arc::clone(&agent_muted));
        let task = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            for _ in 0..100 {
                let Ok((down, _)) = listener.accept().await else {
                    return;
                };
                let (mute, mute_agent) = (Arc::clone(&mute), Arc::clone(&mute_agent));
                links.spawn(async move {
                    if let Ok(up) = tokio::net::TcpStream::connect(upstream).await {
                        let (down_read, down_write) = down.into_split();
                        let (up_read, up_write) = up.into_split();
                        tokio::join!(
                            pump(down_read, up_write, Some(mute_agent)),
                            pump(up_read, down_write, Some(mute)),
                        );
                    }
                });
            }
        });
        Self {
            addr,
            task,
            muted,
            agent_muted,
        }
    }

    /// From now on, what the agent sends is dropped (its acks never
    /// arrive; tasks still reach it).
    fn mute_the_agent(&self) {
        self.agent_muted.store(true, Ordering::SeqCst);
    }

    /// From now on, what the server sends is dropped.
    fn mute_the_server(&self) {
        self.muted.store(true, Ordering::SeqCst);
    }

    /// Closes every connection and the listener (dropping the task drops
    /// its links); returns the address to start again on.
    async fn cut(self) -> SocketAddr {
        self.task.abort();
        let _ = self.task.await;
        self.addr
    }
}

/// Copies `from` to `to` until either ends; while `muted` is set, drops
/// what it reads instead.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    muted: Option<Arc<AtomicBool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if muted.as_ref().is_some_and(|m| m.load(Ordering::SeqCst)) {
            continue;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// An ack whose tellResult call failed in flight (the server has it, but
/// its answer never reaches the agent: the link goes down in between) stays
/// in the spool and is sent again once the agent is back; the server counts
/// the task acked once, and the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_whose_call_failed_in_flight_is_sent_again_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("contactd.db");
    let server = Daemon::start(&server_config(&store, None));
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), server.addr).await;
    let files = agent_files(dir.path(), relay.addr, "answerless");
    let mut agent = start_agent(&files);
    agent.wait_for_line("connected to");
    let id = submit(&mut server.admin().await, "the task", "").await;
    until_runs(&files, 1).await;

    // The handler ends; its ack reaches the server, the answer does not.
    relay.mute_the_server();
    open_gate(&files).await;
    agent.wait_for_line("sending acks");
    until_acked(&server, id).await;
    let addr = relay.cut().await;
    agent.wait_for_line("disconnected from");
    let relay = Relay::start(addr, server.addr).await;
    agent.wait_for_lines("connected to", 2);
    agent.wait_for_lines("sending acks", 2);
    let sent: Vec<&String> = agent
        .log
        .iter()
        .filter(|l| l.contains("sending acks"))
        .collect();
    assert!(
        sent.iter()
            .all(|line| field(line, "first_task_id") == id.to_string()),
        "{sent:?}"
    );
    let tasks = tasks_until(&server, "the task listed", |tasks| {
        tasks.iter().any(|t| t.id == id)
    })
    .await;
    common::assert_each_acked_once(&tasks);
    assert_eq!(runs(&files), [id], "the handler ran once");
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(LIMIT).success());
    relay.cut().await;
}

/// RELIABILITY.md's defect 3: a queue task whose agent only lost its
/// connection stays with that agent (it may still be running it) instead of
/// going to another agent at once and running twice. The agent finishes the
/// task while it is cut off (its ack waits in the spool), comes back, and
/// its ack is the task's only one; the other agent, connected all along,
/// never runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_stays_with_an_agent_that_lost_its_connection_which_acks_it_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("contactd.db");
    let mut server = Daemon::start(&server_config(&store, None));
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), server.addr).await;
    let (cut_off_dir, other_dir) = (dir.path().join("cut-off"), dir.path().join("other"));
    std::fs::create_dir_all(&cut_off_dir).unwrap();
    std::fs::create_dir_all(&other_dir).unwrap();
    let cut_off_files = agent_files(&cut_off_dir, relay.addr, "cut-off");
    let other_files = agent_files(&other_dir, server.addr, "other");
    let mut cut_off = start_agent(&cut_off_files);
    cut_off.wait_for_line("connected to");
    let id = submit(&mut server.admin().await, "the task", "").await;
    until_runs(&cut_off_files, 1).await;
    let mut other = start_agent(&other_files);
    other.wait_for_line("connected to");
    server.wait_for_lines("agent connected", 2);

    // The link goes; the handler goes on, and ends while the agent is cut off.
    let addr = relay.cut().await;
    server.wait_for_line("agent disconnected");
    open_gate(&cut_off_files).await;
    cut_off.wait_for_line("result spooled");
    let relay = Relay::start(addr, server.addr).await;
    cut_off.wait_for_lines("connected to", 2);
    let tasks = until_acked(&server, id).await;
    common::assert_each_acked_once(&tasks);
    let task = tasks.iter().find(|t| t.id == id).unwrap();
    assert_eq!(task.last_agent, "cut-off", "{task:?}");
    assert_eq!(runs(&cut_off_files), [id], "the handler ran once");
    assert!(
        runs(&other_files).is_empty(),
        "the other agent never ran it"
    );
    for agent in [&mut cut_off, &mut other] {
        agent.signal(Signal::SIGTERM);
        assert!(agent.wait_exit(LIMIT).success());
    }
    relay.cut().await;
}

/// A full spool, end to end: while the agent's acks cannot reach the server
/// (the relay drops what the agent sends) broadcast tasks still arrive, and
/// their large results fill `agent.spool_max_size`. The next task waits
/// for room (not started, its handler never runs); once the agent is back
/// through a working link, its spooled acks arrive, the spool has room
/// again, the waiting task starts, and every task is handled exactly once.
/// (It was refused, and a broadcast server sends a task again only on the
/// agent's next connection: on a steady one it was never run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_holds_the_next_task_until_the_acks_are_through_and_loses_none() {
    const TASKS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("contactd.db");
    let mut server = Daemon::start(&format!(
        "[tasks]\nbatch = 0\n[store]\npath = \"{}\"\n",
        store.display()
    ));
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), server.addr).await;
    let (runs, state) = (dir.path().join("runs"), dir.path().join("agent-state"));
    // Each result is 200 KiB (a failure's output is its result); the
    // spool keeps room for one more (max_output) before each start: 1 MiB
    // holds three or four of them.
    let script = format!(
        "cat >/dev/null; echo $CONTACTD_TASK_ID >> {}; head -c 204800 /dev/zero | tr '\\\\0' x; \
         exit 1",
        runs.display()
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nservers = [\"http://{}\"]\nname = \"filler\"\nstate_dir = \"{}\"\n\
             handler = [\"sh\", \"-c\", \"{script}\"]\nstatus_interval = \"1h\"\n\
             handler_concurrency = 1\nmax_output = \"256KiB\"\nspool_max_size = \"1MiB\"\n\
             [agent.backoff]\ninitial = \"50ms\"\nmax = \"500ms\"\n\
             [log]\nlevel = \"info,contactd::agent=debug\"\n",
            relay.addr,
            state.display()
        ),
    )
    .unwrap();
    let ran = || -> Vec<u64> {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect()
    };
    let mut agent = Process::spawn(
        &[OsStr::new("agent"), OsStr::new("-c"), config.as_os_str()],
        &[],
    );
    agent.wait_for_line("connected to");
    server.wait_for_line("agent connected");

    relay.mute_the_agent();
    let mut admin = server.admin().await;
    let mut ids = Vec::new();
    for n in 0..TASKS {
        ids.push(submit(&mut admin, &format!("task {n}"), "").await);
    }
    let waits = agent.wait_for_line("task waits for room in the agent spool");
    assert!(waits.contains("not yet delivered"), "{waits}");
    let before = ran();
    assert!(
        !before.is_empty() && before.len() < TASKS,
        "the spool held {before:?}"
    );
    let waiting: u64 = field(&waits, "task_id").parse().unwrap();
    assert!(!before.contains(&waiting), "the waiting task ran");

    // A working link: the spooled acks arrive, and the rest are sent again.
    let addr = relay.cut().await;
    agent.wait_for_line("disconnected from");
    let relay = Relay::start(addr, server.addr).await;
    let tasks = tasks_until(&server, "every task answered", |tasks| {
        ids.iter()
            .all(|id| tasks.iter().any(|t| t.id == *id && t.failed > 0))
    })
    .await;
    for task in tasks.iter().filter(|t| ids.contains(&t.id)) {
        assert_eq!((task.acked, task.failed), (0, 1), "{task:?}");
    }
    agent.wait_for_line("room in the agent spool: task started");
    assert!(
        agent.log.iter().all(|l| !l.contains("nor acked")),
        "a task was dropped"
    );
    let mut after = ran();
    after.sort_unstable();
    assert_eq!(after, ids, "each task handled exactly once");
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(LIMIT).success());
    relay.cut().await;
}
