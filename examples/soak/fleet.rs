//! One soak run from start to end: the run's directory, its certificates,
//! the servers (one on SQLite, its store on a tmpfs the harness can fill;
//! or, with `--postgres`, two on a throwaway PostgreSQL cluster), the fault
//! proxy's links, the real and in-process agents, the writer of the
//! history, the resource sampler; then traffic and faults for the run's
//! time, a drain and the servers' final view (`end.rs`), an orderly stop,
//! the checker and the report.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicI32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use contactd::{
    config::{AgentFile, LogConfig},
    proto::admin::{self as pb, admin_client::AdminClient},
};
use nix::sys::signal::Signal;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    BoundArgs, Rng,
    history::{Event, Sample},
    light::{self, Note},
    now_ms,
    postgres::Postgres,
    procs::{self, Proc, Tmpfs},
    proxy::{Faults, Route},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Time of traffic and faults (then a drain, the check and the report).
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The run's directory (history, logs, report); must not exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Real `contactd agent` processes.
    #[arg(long, default_value_t = 20)]
    pub real: usize,
    /// In-process agents.
    #[arg(long, default_value_t = 2000)]
    pub light: usize,
    /// Proxy routes the in-process agents are spread over (a fault hits
    /// whole routes).
    #[arg(long, default_value_t = 20)]
    pub groups: usize,
    /// The contactd binary [default: next to this example's directory].
    #[arg(long)]
    pub contactd: Option<PathBuf>,
    /// Size of the store's tmpfs (MiB).
    #[arg(long, default_value_t = 512)]
    pub disk_mib: u64,
    /// Longest the drain may take (every task finished) before the final view.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Longest quiet time between two faults (the shortest is a third of
    /// it): longer lets a large fleet settle between faults.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    pub fault_gap: Duration,
    /// Longest fault (the shortest is 40 % of it): shorter lets a short
    /// run (CI's) go through every kind.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub fault_length: Duration,
    /// Fail unless every fault kind was injected at least once.
    #[arg(long)]
    pub all_faults: bool,
    /// Two servers on a throwaway PostgreSQL cluster the harness makes,
    /// instead of one on SQLite; the `postgres-restart` fault replaces
    /// `disk-full`.
    #[arg(long)]
    pub postgres: bool,
    /// The servers' log filter (`[log] level`), e.g.
    /// `info,contactd::tasks::queue=debug` to follow tasks through a fault.
    #[arg(long, default_value = "info")]
    pub server_log: String,
    #[command(flatten)]
    pub bounds: BoundArgs,
}

/// Keepalive of contactd's agent (interval plus timeout, agent/session.rs):
/// how long a half-open connection can go unnoticed.
pub const KEEPALIVE_DETECT: Duration = Duration::from_secs(50);

/// The servers' `tasks.ack_timeout` (contactd's default, written out): a
/// queue task handed to another agent this long after its run began is
/// at-least-once delivery as designed, which the checker lists apart.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// One `contactd serve` of the run.
pub struct Server {
    /// `server` (on SQLite) or `server-a` and `server-b` (on PostgreSQL):
    /// its log's name (`logs/NAME.log`) and its samples'.
    pub name: String,
    /// Where the proxy's routes to it forward (a restarted server binds a
    /// new port).
    pub upstream: Arc<Mutex<SocketAddr>>,
    pub proc: tokio::sync::Mutex<Option<Proc>>,
    /// Its PID for the sampler (0 while it is stopped).
    pub pid: AtomicI32,
    pub admin_socket: PathBuf,
    pub config_path: PathBuf,
}

/// One path between agents and the servers that a fault hits as a whole:
/// a proxy route to each server, all from the same source address. An
/// agent behind a link lists every server, so a fault on its link cuts it
/// off from all of them, as a fault on a host's network would.
pub struct Link {
    /// One route per server, in the servers' order.
    pub routes: Vec<Arc<Route>>,
}

impl Link {
    pub fn set(&self, faults: Faults) {
        for route in &self.routes {
            route.set(faults);
        }
    }

    pub fn faults(&self) -> Faults {
        self.routes[0].faults()
    }

    pub fn reset_all(&self) {
        for route in &self.routes {
            route.reset_all();
        }
    }

    pub fn blackhole_open(&self) {
        for route in &self.routes {
            route.blackhole_open();
        }
    }

    /// The servers' URLs through this link, starting at server `first`
    /// (agents are spread over the servers by the one they try first).
    pub fn urls(&self, first: usize) -> Vec<String> {
        let n = self.routes.len();
        (0..n)
            .map(|k| format!("https://{}", self.routes[(first + k) % n].addr))
            .collect()
    }
}

/// Everything a running soak holds.
pub struct Fleet {
    pub dir: PathBuf,
    pub contactd: PathBuf,
    /// One on SQLite; two on PostgreSQL.
    pub servers: Vec<Server>,
    /// Links `0..real` carry one real agent each, then `groups` links of
    /// in-process agents, then the operators' link (never faulted).
    pub routes: Vec<Link>,
    pub real: usize,
    pub light_names: Vec<Vec<String>>,
    pub agents: tokio::sync::Mutex<Vec<Option<Proc>>>,
    pub agent_pids: Mutex<Vec<i32>>,
    notes: mpsc::UnboundedSender<Note>,
    pub tmpfs: Option<Tmpfs>,
    pub store_dir: PathBuf,
    pub tls_dir: PathBuf,
    /// The servers' shared store with `--postgres`: stopped and started by
    /// the `postgres-restart` fault.
    pub postgres: Option<tokio::sync::Mutex<Postgres>>,
    /// Its URL and data directory (read without the lock, which a fault
    /// holds while the cluster starts).
    pub postgres_url: String,
    pub postgres_data: Option<PathBuf>,
    /// The servers' `[log] level`.
    pub server_log: String,
}

pub fn real_name(i: usize) -> String {
    format!("real-{i:02}")
}

impl Fleet {
    pub fn note(&self, event: Event) {
        let _ = self.notes.send(Note::Event(event));
    }

    /// The agents behind route `i`.
    pub fn route_agents(&self, i: usize) -> Vec<String> {
        if i < self.real {
            vec![real_name(i)]
        } else {
            self.light_names
                .get(i - self.real)
                .cloned()
                .unwrap_or_default()
        }
    }

    /// Routes faults may hit (not the operators').
    pub fn fault_routes(&self) -> usize {
        self.routes.len() - 1
    }

    /// The operators' route to server `server`.
    pub fn operator_route(&self, server: usize) -> SocketAddr {
        self.routes[self.routes.len() - 1].routes[server].addr
    }

    pub fn ca_bundle(&self) -> PathBuf {
        self.tls_dir.join("ca-bundle.pem")
    }

    /// The servers' configs; `generating` false stops generated tasks and
    /// jobs' schedules (the drain).
    pub fn write_configs(&self, generating: bool) -> anyhow::Result<()> {
        for server in &self.servers {
            self.write_config(server, generating)?;
        }
        Ok(())
    }

    fn write_config(&self, server: &Server, generating: bool) -> anyhow::Result<()> {
        let (interval, batch) = if generating { ("1s", 4) } else { ("1s", 0) };
        let jobs = if generating {
            r#"
[[jobs]]
name = "soak-any"
text = "job-any:{rand}"
every = "5s"
mode = "any"

[[jobs]]
name = "soak-each"
text = "job-each:{rand}"
every = "20s"
target = "soak=real"
mode = "each"
rollout = { batch = "50%" }

[[jobs]]
name = "soak-broadcast"
text = "job-broadcast:{rand}"
every = "30s"
mode = "broadcast"
"#
        } else {
            ""
        };
        // Several servers share the fleet's state in one database, each
        // under a name of its own.
        let store = match &self.postgres {
            Some(_) => format!("kind = \"postgres\"\nurl = {:?}\n", self.postgres_url),
            None => format!("path = {:?}\n", self.store_dir.join("contactd.db")),
        };
        let name = match server.name.strip_prefix("server-") {
            Some(letter) => format!("soak-{letter}"),
            None => "soak".to_owned(),
        };
        let toml = format!(
            r#"[server]
name = "{name}"
listen = "127.0.0.1:0"

[server.tls]
cert = {cert:?}
key = {key:?}

[tasks]
mode = "queue"
interval = "{interval}"
batch = {batch}
ack_timeout = "{ack_timeout}s"
template = "gen:{{seq}}"
retain = 100000
max_attempts = 20
retain_finished = 10000000

[remote_cmd]
enabled = true
allow = ["true", "echo *"]

[store]
{store}
[admin]
socket = {admin:?}

[log]
level = {level:?}
format = "json"
file = {log:?}
max_size = "1GiB"
{jobs}"#,
            cert = self.tls_dir.join("server.pem"),
            key = self.tls_dir.join("server.key"),
            admin = server.admin_socket,
            log = self.dir.join("logs").join(format!("{}.log", server.name)),
            level = self.server_log,
            ack_timeout = ACK_TIMEOUT.as_secs(),
        );
        write_atomic(&server.config_path, toml.as_bytes())
    }

    /// Starts server `i` (again).
    pub async fn start_server(&self, i: usize) -> anyhow::Result<()> {
        let server = &self.servers[i];
        let (proc, addr) = Proc::server(&self.contactd, &server.name, &server.config_path).await?;
        *server.upstream.lock() = addr;
        server.pid.store(proc.pid, Ordering::Relaxed);
        *server.proc.lock().await = Some(proc);
        Ok(())
    }

    /// Stops server `i` with `signal` (and waits for its exit).
    pub async fn stop_server(&self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let server = &self.servers[i];
        let proc = server
            .proc
            .lock()
            .await
            .take()
            .with_context(|| format!("{} is not running", server.name))?;
        server.pid.store(0, Ordering::Relaxed);
        proc.end(signal).await
    }

    pub async fn signal_server(&self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let server = &self.servers[i];
        match &*server.proc.lock().await {
            Some(proc) => proc.signal(signal),
            None => bail!("{} is not running", server.name),
        }
    }

    /// Writes real agent `i`'s config: its route, its journal, its log.
    fn write_agent_config(&self, i: usize) -> anyhow::Result<PathBuf> {
        let name = real_name(i);
        let mut agent = light::config(
            &name,
            self.routes[i].urls(i),
            "real",
            &self.ca_bundle(),
            &self.dir.join("state"),
        );
        let journal = self.dir.join("journal").join(format!("{name}.log"));
        // Appends `AGENT ID ATTEMPT UNIX_MS` when the task starts (one
        // short write with O_APPEND: lines never interleave), then works.
        agent.handler = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            format!(
                "echo \"$CONTACTD_AGENT $CONTACTD_TASK_ID $CONTACTD_TASK_ATTEMPT $(date +%s%3N)\" >> '{}'; sleep 0.5",
                journal.display()
            ),
        ];
        agent.handler_timeout = Duration::from_secs(30);
        let log: LogConfig = toml::from_str(&format!(
            "format = \"json\"\nstderr = false\nfile = {:?}\nmax_size = \"1GiB\"\n",
            self.dir.join("logs").join(format!("agent-{name}.log"))
        ))?;
        let path = self.dir.join("config").join(format!("{name}.toml"));
        let text = toml::to_string(&AgentFile { agent, log })?;
        write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Starts real agent `i` (again).
    pub async fn start_agent(&self, i: usize) -> anyhow::Result<()> {
        let path = self
            .dir
            .join("config")
            .join(format!("{}.toml", real_name(i)));
        let proc = Proc::agent(&self.contactd, &real_name(i), &path)?;
        self.agent_pids.lock()[i] = proc.pid;
        self.agents.lock().await[i] = Some(proc);
        Ok(())
    }

    /// Takes real agent `i` out (to kill it or stop it).
    pub async fn take_agent(&self, i: usize) -> Option<Proc> {
        self.agent_pids.lock()[i] = 0;
        self.agents.lock().await[i].take()
    }

    pub async fn signal_agent(&self, i: usize, signal: Signal) {
        if let Some(proc) = &self.agents.lock().await[i] {
            let _ = proc.signal(signal);
        }
    }

    /// A client of server `i`'s admin API (a new connection each time: the
    /// server may have been restarted).
    pub async fn admin(&self, i: usize) -> anyhow::Result<AdminClient<Channel>> {
        Ok(contactd::client::admin::connect(&self.servers[i].admin_socket).await?)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn default_contactd() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/soak → target/<profile>/contactd
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?;
    Ok(profile.join("contactd"))
}

/// Raises this process's open-file limit to its hard limit (the agents'
/// connections and the proxy's two sockets per connection).
fn raise_nofile() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

/// Runs a whole soak; true when the checker found no violation.
pub async fn run(args: Args) -> anyhow::Result<bool> {
    raise_nofile()?;
    if args.out.exists() {
        bail!("{} exists: give a new directory", args.out.display());
    }
    let dir = args.out.clone();
    for sub in ["logs", "journal", "config", "tls", "store", "state"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let dir = dir.canonicalize()?;
    let contactd = match &args.contactd {
        Some(path) => path.clone(),
        None => default_contactd()?,
    };
    if !contactd.exists() {
        bail!("no contactd at {} (cargo build first)", contactd.display());
    }
    let tls_dir = dir.join("tls");
    contactd::tls::pki::init(&tls_dir, &[], &[], 30, false)?;
    std::fs::copy(tls_dir.join("ca.pem"), tls_dir.join("ca-bundle.pem"))?;
    let store_dir = dir.join("store");
    // The disk-full fault is SQLite's: PostgreSQL's data directory is not
    // put on the tmpfs (PostgreSQL stops at a full disk for its WAL, which
    // the postgres-restart fault covers by stopping it outright).
    let tmpfs = if args.postgres {
        None
    } else {
        let tmpfs = Tmpfs::mount(&store_dir, args.disk_mib);
        if tmpfs.is_none() {
            eprintln!("soak: cannot mount a tmpfs for the store (not root?): no disk-full fault");
        }
        tmpfs
    };
    let postgres = if args.postgres {
        let cluster = Postgres::start(&dir.join("postgres.log")).await?;
        eprintln!(
            "soak: PostgreSQL {} on port {} (data in {})",
            crate::postgres::DATABASE,
            cluster.port,
            cluster.data_dir().display()
        );
        Some(cluster)
    } else {
        None
    };
    let server_names: &[&str] = if args.postgres {
        &["server-a", "server-b"]
    } else {
        &["server"]
    };
    let servers: Vec<Server> = server_names
        .iter()
        .map(|name| Server {
            name: (*name).to_owned(),
            upstream: Arc::new(Mutex::new(SocketAddr::from(([127, 0, 0, 1], 9)))),
            proc: tokio::sync::Mutex::new(None),
            pid: AtomicI32::new(0),
            admin_socket: match name.strip_prefix("server-") {
                Some(letter) => dir.join(format!("admin-{letter}.sock")),
                None => dir.join("admin.sock"),
            },
            config_path: match name.strip_prefix("server-") {
                Some(letter) => dir.join(format!("config/contactd-{letter}.toml")),
                None => dir.join("config/contactd.toml"),
            },
        })
        .collect();

    let stop = CancellationToken::new();
    let mut rng = Rng::new(args.seed);
    let mut routes = Vec::new();
    for i in 0..args.real + args.groups + 1 {
        // 127.1.X.Y: one loopback "host" per link. Its route to each
        // server has the same seed: one server's schedule is the same as
        // before there were two.
        let source = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
        let seed = rng.next_u64();
        let mut link = Vec::new();
        for server in &servers {
            link.push(
                Route::start(
                    Arc::clone(&server.upstream),
                    source.into(),
                    seed,
                    stop.clone(),
                )
                .await?,
            );
        }
        routes.push(Link { routes: link });
    }
    let light_names: Vec<Vec<String>> = (0..args.groups)
        .map(|g| {
            (0..args.light)
                .filter(|n| n % args.groups == g)
                .map(|n| format!("light-{n:04}"))
                .collect()
        })
        .collect();
    let (notes, notes_rx) = mpsc::unbounded_channel();
    let fleet = Arc::new(Fleet {
        dir: dir.clone(),
        contactd,
        servers,
        routes,
        real: args.real,
        light_names,
        postgres_url: postgres
            .as_ref()
            .map_or_else(String::new, |p| p.url(crate::postgres::DATABASE)),
        postgres_data: postgres.as_ref().map(|p| p.data_dir()),
        postgres: postgres.map(tokio::sync::Mutex::new),
        server_log: args.server_log.clone(),
        agents: tokio::sync::Mutex::new((0..args.real).map(|_| None).collect()),
        agent_pids: Mutex::new(vec![0; args.real]),
        notes,
        tmpfs,
        store_dir,
        tls_dir,
    });
    let writer = tokio::spawn(write_history(dir.clone(), notes_rx));
    let result = soak(&fleet, &args, &mut rng, &stop).await;
    // Everything stops whatever happened: agents, then the servers, then
    // PostgreSQL.
    for i in 0..args.real {
        if let Some(proc) = fleet.take_agent(i).await {
            let _ = proc.end(Signal::SIGTERM).await;
        }
    }
    let mut server_stop = Ok(());
    for i in 0..fleet.servers.len() {
        let stopped = fleet.stop_server(i, Signal::SIGTERM).await;
        server_stop = server_stop.and(stopped);
    }
    if let Some(postgres) = &fleet.postgres {
        let mut postgres = postgres.lock().await;
        if postgres.pid().is_some() {
            let _ = postgres.stop(crate::postgres::Stop::Fast).await;
        }
    }
    stop.cancel();
    let times = result?;
    server_stop.context("the servers' final stop")?;
    fleet.note(Event::Run {
        seed: args.seed,
        start_ms: times.0,
        faults_end_ms: times.1,
        end_ms: times.2,
    });
    let Ok(fleet) = Arc::try_unwrap(fleet) else {
        bail!("the fleet is still in use");
    };
    drop(fleet); // closes the notes channel: the writer finishes
    let lagged = writer.await??;
    if lagged > 0 {
        bail!("{lagged} in-process agent events were lost: the journal is incomplete");
    }
    crate::report::check_and_report(&dir, &args.bounds.bounds())
}

/// The run itself, between setup and stop: returns (start, end of faults,
/// end) in Unix ms.
async fn soak(
    fleet: &Arc<Fleet>,
    args: &Args,
    rng: &mut Rng,
    stop: &CancellationToken,
) -> anyhow::Result<(i64, i64, i64)> {
    fleet.write_configs(true)?;
    for i in 0..fleet.servers.len() {
        fleet.start_server(i).await?;
    }
    for i in 0..args.real {
        fleet.write_agent_config(i)?;
        fleet.start_agent(i).await?;
    }
    let light_stop = CancellationToken::new();
    let mut light = Vec::new();
    for (g, names) in fleet.light_names.iter().enumerate() {
        let link = &fleet.routes[fleet.real + g];
        for (n, name) in names.iter().enumerate() {
            let config = light::config(
                name,
                link.urls(n),
                "light",
                &fleet.ca_bundle(),
                &fleet.dir.join("state"),
            );
            light.push(light::start(
                config,
                fleet.notes.clone(),
                light_stop.clone(),
            ));
        }
    }
    let sampler_stop = stop.child_token();
    let sampler = tokio::spawn(sample(Arc::clone(fleet), sampler_stop.clone()));
    wait_connected(fleet, args.real + args.light, Duration::from_secs(120)).await?;

    let start = now_ms();
    eprintln!(
        "soak: {} agents connected; running for {:?}",
        args.real + args.light,
        args.duration
    );
    let deadline = Instant::now() + args.duration;
    let traffic_stop = stop.child_token();
    let traffic = tokio::spawn(crate::traffic::run(
        Arc::clone(fleet),
        Rng::new(rng.next_u64()),
        traffic_stop.clone(),
    ));
    let faults = crate::faults::run(
        Arc::clone(fleet),
        Rng::new(rng.next_u64()),
        deadline,
        args.fault_gap,
        args.fault_length,
        args.all_faults,
    );
    let kills = crate::faults::kills(Arc::clone(fleet), Rng::new(rng.next_u64()), deadline);
    let (faults, kills) = tokio::join!(faults, kills);
    tokio::time::sleep_until(deadline.into()).await;
    traffic_stop.cancel();
    let traffic = traffic.await?;
    let faults_end = now_ms();
    eprintln!("soak: traffic and faults over; draining");
    faults?;
    kills?;
    traffic?;
    crate::end::drain(fleet, args.drain).await?;
    let view = crate::end::final_view(fleet).await?;
    let end = now_ms();
    std::fs::write(fleet.dir.join("final.json"), serde_json::to_vec(&view)?)?;
    light_stop.cancel();
    for mut agent in light {
        if tokio::time::timeout(Duration::from_secs(30), &mut agent)
            .await
            .is_err()
        {
            agent.abort();
        }
    }
    sampler_stop.cancel();
    sampler.await?;
    Ok((start, faults_end, end))
}

/// Waits until the first server lists `count` connected agents (with
/// PostgreSQL, its fleet view has those on the other server too).
async fn wait_connected(fleet: &Fleet, count: usize, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut seen = 0;
    while Instant::now() < deadline {
        if let Ok(mut admin) = fleet.admin(0).await
            && let Ok(agents) = admin.list_agents(pb::ListAgentsRequest::default()).await
        {
            seen = agents
                .into_inner()
                .agents
                .iter()
                .filter(|a| a.connected)
                .count();
            if seen >= count {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("only {seen} of {count} agents connected within {limit:?}")
}

/// Samples every process's RSS, fds and threads and the store's size each
/// second into `samples.jsonl`.
async fn sample(fleet: Arc<Fleet>, stop: CancellationToken) {
    let Ok(file) = std::fs::File::create(fleet.dir.join("samples.jsonl")) else {
        return;
    };
    let mut out = std::io::BufWriter::new(file);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let me = std::process::id() as i32;
    while !stop.is_cancelled() {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let at_ms = now_ms();
        let mut procs: Vec<(String, i32)> = fleet
            .servers
            .iter()
            .map(|s| (s.name.clone(), s.pid.load(Ordering::Relaxed)))
            .collect();
        procs.push(("harness".to_owned(), me));
        for (i, pid) in fleet.agent_pids.lock().iter().enumerate() {
            procs.push((format!("agent-{}", real_name(i)), *pid));
        }
        let mut samples = Vec::new();
        for (proc, pid) in procs.into_iter().filter(|(_, pid)| *pid > 0) {
            if let Some((rss, fds, threads)) = procs::usage(pid) {
                samples.push(Sample {
                    at_ms,
                    proc,
                    pid,
                    rss,
                    fds,
                    threads,
                });
            }
        }
        samples.push(Sample {
            at_ms,
            proc: "store".to_owned(),
            pid: 0,
            // The store's size: the SQLite files, or PostgreSQL's data.
            rss: match &fleet.postgres_data {
                Some(data) => crate::postgres::data_size(data),
                None => procs::dir_size(&fleet.store_dir),
            },
            fds: 0,
            threads: 0,
        });
        for s in samples {
            if let Ok(line) = serde_json::to_string(&s) {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    let _ = out.flush();
}

/// Writes the notes into `events.jsonl` and `journal/light.log`; returns
/// how many in-process agent events were lost.
async fn write_history(
    dir: PathBuf,
    mut notes: mpsc::UnboundedReceiver<Note>,
) -> anyhow::Result<u64> {
    let mut events = std::io::BufWriter::new(std::fs::File::create(dir.join("events.jsonl"))?);
    let mut journal =
        std::io::BufWriter::new(std::fs::File::create(dir.join("journal/light.log"))?);
    let mut lagged = 0;
    while let Some(note) = notes.recv().await {
        match note {
            Note::Event(event) => writeln!(events, "{}", serde_json::to_string(&event)?)?,
            Note::Run(run) => writeln!(
                journal,
                "{} {} {} {}",
                run.agent, run.id, run.attempt, run.at_ms
            )?,
            Note::Lagged(agent, n) => {
                eprintln!("soak: {agent} lost {n} events");
                lagged += n;
            }
        }
    }
    events.flush()?;
    journal.flush()?;
    Ok(lagged)
}
