//! The command line: what the user can type, nothing more.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::selector::Selector;

/// `contactd --version`: the version, the git commit it was built from and
/// the build date (stamped by build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CONTACTD_COMMIT"),
    ", built ",
    env!("CONTACTD_BUILD_DATE"),
    ")"
);

/// contactd: push tasks to a fleet of agents over gRPC, collect their status
/// and results, and run allow-listed commands on request.
#[derive(Debug, Parser)]
#[command(name = "contactd", version = VERSION, propagate_version = true)]
#[command(after_help = "Examples:
  contactd serve                    run on /etc/contactd.toml (built-in defaults if absent)
  contactd serve -c my.toml         run on another config file
  contactd check-config -c my.toml  print the effective config, or every problem in it
  contactd agent                    run an agent on /etc/contactd-agent.toml
  contactd check-config --agent -c agent.toml
                                    check an agent config file
  contactd health --addr 127.0.0.1:55555
                                    exit 0 if the server is SERVING
  contactd cmd 'ip link show' uptime
                                    run allow-listed commands on the server
  contactd task submit 'uptime' --agent web1
  contactd task show 42             one task: each agent's state and latest result
  contactd task retry 42            queue mode: run a failed or dead task again
  contactd agents                   the fleet: connected, last status, counts
  contactd tasks --state dead       tasks no agent acked
  contactd jobs                     the jobs: schedule, target, next and last run
  contactd task submit 'apt-get -y upgrade' --target role=web --batch 10% --max-failed 2
                                    a rollout that halts after 3 failures
  contactd job halt 42              stop a rollout sending (what is out may still answer)
  contactd job resume 42            go on with a halted run
  contactd tls init /etc/contactd/tls --dns server.example
  contactd tls issue web1 --dir /etc/contactd/tls
  contactd token create web1 --role agent --file /etc/contactd/tokens
  contactd store backup /var/backups/contactd.db")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: serve the Contact service, generate tasks, answer health probes.
    Serve(ConfigArgs),
    /// Check a config file: print the effective config (exit 0) or every problem in it (exit 78).
    CheckConfig(CheckConfigArgs),
    /// Run an agent: connect to the server(s), run the handler for each task, ack it, report status.
    Agent(AgentArgs),
    /// Probe a server's health, for monitoring: exit 0 SERVING, 1 bad arguments,
    /// 2 connection failure, 3 RPC failure or timeout, 4 not serving.
    ///
    /// Bad arguments exit 1 here, where every other command exits 2: these are
    /// grpc_health_probe's codes, which monitoring checks rely on.
    Health(HealthArgs),
    /// Run allow-listed commands on the server (remoteCMD), several at once,
    /// printing each result as it comes: exit 0 all succeeded, 1 any failed
    /// or was refused, 2 no connection or a usage error.
    Cmd(CmdArgs),
    /// Operator commands on tasks (through the server's admin socket).
    #[command(subcommand)]
    Task(TaskCommand),
    /// List the agents (and seed clients) the server knows, with their labels
    /// and last status.
    Agents(AgentsArgs),
    /// List the server's retained and queued tasks and how their delivery went.
    Tasks(TasksArgs),
    /// List the jobs ([[jobs]]): schedule, target, mode, next and last run.
    Jobs(JobsArgs),
    /// Operator commands on jobs and their runs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Make TLS certificates: a CA and server certificate, and one per agent.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Make named tokens (server.tokens_file).
    #[command(subcommand)]
    Token(TokenCommand),
    /// The task store (store.path).
    #[command(subcommand)]
    Store(StoreCommand),
}

/// The commands the package build runs, `contactd completions SHELL` and
/// `contactd man DIR`: a parser of their own, so that neither `--help` nor
/// the completions and man pages they write offer them to operators (clap's
/// completion scripts list hidden subcommands too).
#[derive(Debug, Parser)]
#[command(name = "contactd", version = VERSION)]
pub struct PackagingCli {
    #[command(subcommand)]
    pub command: PackagingCommand,
}

impl PackagingCli {
    /// Whether `first`, the first argument, names one of these commands.
    #[must_use]
    pub fn handles(first: Option<&str>) -> bool {
        matches!(first, Some("completions" | "man"))
    }
}

/// `contactd completions|man`.
#[derive(Debug, Subcommand)]
pub enum PackagingCommand {
    /// Print the completion script for SHELL
    Completions(CompletionsArgs),
    /// Write the man pages into DIR
    Man(ManArgs),
}

/// `contactd completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish (or elvish, powershell)
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// `contactd man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory for contactd.1 and a contactd-COMMAND.1 per command (created if needed)
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// `contactd store ...`
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy the task store to FILE, consistently, while the server runs
    /// (SQLite's online backup); FILE must not exist. To restore: stop
    /// contactd, put the copy at store.path, start it.
    Backup(StoreBackupArgs),
}

/// `contactd store backup`.
#[derive(Debug, Args)]
pub struct StoreBackupArgs {
    /// Where to write the copy
    pub file: PathBuf,
    /// The database to copy [default: the config's store.path]
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `contactd tls ...`
#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Write a CA (ca.pem, ca.key) and a server certificate signed by it
    /// (server.pem, server.key) into DIR; keys are mode 0600.
    Init(TlsInitArgs),
    /// Write a client certificate whose identity is NAME (DIR/NAME.pem,
    /// DIR/NAME.key), signed by the CA in DIR.
    Issue(TlsIssueArgs),
}

/// `contactd tls init`.
#[derive(Debug, Args)]
pub struct TlsInitArgs {
    /// Directory for the files (created if needed)
    pub dir: PathBuf,
    /// A DNS name of the server (repeatable) [default: localhost, 127.0.0.1 and ::1]
    #[arg(long, value_name = "NAME")]
    pub dns: Vec<String>,
    /// An IP address of the server (repeatable)
    #[arg(long, value_name = "ADDR")]
    pub ip: Vec<std::net::IpAddr>,
    /// Days the server certificate is valid (the CA: 10 years)
    #[arg(long, value_name = "N", default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Replace existing files
    #[arg(long)]
    pub force: bool,
}

/// `contactd tls issue`.
#[derive(Debug, Args)]
pub struct TlsIssueArgs {
    /// The identity: the agent's name (or an operator's, for remote_cmd.callers)
    pub name: String,
    /// Directory holding ca.pem and ca.key (from `contactd tls init`)
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Days the certificate is valid
    #[arg(long, value_name = "N", default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Replace an existing certificate for NAME
    #[arg(long)]
    pub force: bool,
    /// Let this group read the key (mode 0640): the packaged agent runs as
    /// group contactd [default: the key is readable by its owner only, 0600]
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
}

/// `contactd token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Add a token for NAME to FILE (only its SHA-256 digest is stored) and
    /// print the token once; the server re-reads FILE on SIGHUP.
    Create(TokenCreateArgs),
}

/// `contactd token create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The identity: an agent's name, or an operator's
    pub name: String,
    /// What the token allows: agent (getTask, sendStatus, tellResult) or operator (remoteCMD)
    #[arg(long, value_name = "ROLE", value_parser = parse_role)]
    pub role: crate::auth::Role,
    /// The tokens file (server.tokens_file); created mode 0600 if missing
    #[arg(long, value_name = "PATH")]
    pub file: PathBuf,
    /// Replace NAME's existing token (the old one stops working at the next reload)
    #[arg(long)]
    pub force: bool,
}

fn parse_role(text: &str) -> Result<crate::auth::Role, String> {
    text.parse()
}

/// `contactd task ...`
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Submit a task: to every agent (broadcast mode), to one agent of the
    /// queue (queue mode), or with --agent to one named agent.
    Submit(SubmitArgs),
    /// Show one task and where it stands for each agent: owed, delivered,
    /// acked, failed, missed or cancelled, with each agent's latest result.
    Show(TaskIdArgs),
    /// Cancel a pending or delivered task: it is not sent any more. An agent
    /// that already has it still runs it; its ack is ignored.
    Cancel(TaskIdArgs),
    /// Queue mode: send a failed or dead task back to the queue (pending,
    /// attempts reset); an agent runs it again.
    Retry(TaskIdArgs),
}

/// `contactd task show|cancel|retry`.
#[derive(Debug, Args)]
pub struct TaskIdArgs {
    /// The task's id (as `task submit` and `contactd tasks` print it)
    pub id: u64,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `contactd task submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The task's text, as agents receive it; `-` reads it from stdin
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    pub text: Option<String>,
    /// Read the task's text from this file (its final newlines are dropped, as from stdin)
    #[arg(short, long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Only this agent receives the task
    #[arg(long, value_name = "NAME", conflicts_with = "target")]
    pub agent: Option<String>,
    /// Broadcast: only the agents this label selector matches receive it
    /// (`role=web,region!=us`, `role in (web,api)`, `!canary`, `name=web-*`)
    #[arg(long, value_name = "SELECTOR", value_parser = parse_selector)]
    pub target: Option<Selector>,
    /// A rollout: every agent --target matches runs it, at most this many at
    /// once (`10%` or a count); the command follows it until it ends or halts
    #[arg(long, value_name = "N|PCT", conflicts_with = "agent", value_parser = parse_amount)]
    pub batch: Option<String>,
    /// A rollout halts when more agents than this failed (`2` or `5%`;
    /// implies a rollout)
    #[arg(long, value_name = "N|PCT", conflicts_with = "agent", value_parser = parse_amount)]
    pub max_failed: Option<String>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

fn parse_amount(text: &str) -> Result<String, String> {
    text.parse::<crate::config::Amount>()
        .map(|amount| amount.to_string())
}

/// `contactd job ...`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Fire a job now, whatever its schedule, and print its run's id.
    Run(JobRunArgs),
    /// Show one run: its rollout and each agent's state (owed, running,
    /// acked, failed, missed) with its latest result.
    Show(RunIdArgs),
    /// Pause a job's schedule (its runs in progress go on).
    Pause(JobNameArgs),
    /// Resume a paused job (a NAME), or a halted run (a RUN id, as `job
    /// show` and `task submit --batch` print it).
    Resume(JobResumeArgs),
    /// Halt a running rollout (a RUN id): nothing more is sent until `job
    /// resume RUN` (agents that have it may still answer); its deadline
    /// still ends it.
    Halt(RunIdArgs),
}

/// `contactd job run`.
#[derive(Debug, Args)]
pub struct JobRunArgs {
    /// The job's name ([[jobs]] name)
    pub name: String,
    /// Follow the run's progress until it ends or halts (exit 1 unless it succeeded)
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `contactd job show` and `job halt`.
#[derive(Debug, Args)]
pub struct RunIdArgs {
    /// The run's id
    pub run: u64,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `contactd job pause`.
#[derive(Debug, Args)]
pub struct JobNameArgs {
    /// The job's name ([[jobs]] name)
    pub name: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `contactd job resume`.
#[derive(Debug, Args)]
pub struct JobResumeArgs {
    /// A job's name (its schedule resumes), or a halted run's id
    #[arg(value_name = "NAME|RUN")]
    pub what: String,
    /// A run: follow its progress until it ends or halts again
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `contactd jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `contactd agents`.
#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// Only the agents this label selector matches (`role=web`, `name=web-*`)
    #[arg(long, value_name = "SELECTOR", value_parser = parse_selector)]
    pub selector: Option<Selector>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `contactd tasks`.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only tasks in this state: pending, delivered, acked, failed, dead or cancelled
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    pub state: Option<crate::proto::admin::TaskState>,
    /// At most this many (the newest); 0 = all
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub limit: u32,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// How to reach the admin API.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The server's admin socket [default: `[admin] socket` of the server's config]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The server's config file, to find its admin socket [default: /etc/contactd.toml]
    #[arg(short, long, value_name = "PATH", env = "CONTACTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print one JSON object, for scripts (each time as NAME_ms, Unix milliseconds, and
    /// NAME_at, RFC 3339)
    #[arg(long)]
    pub json: bool,
}

/// What to probe.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Server address
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:55555")]
    pub addr: String,
    /// Service to ask about: "" for the whole server, or "Contact"
    #[arg(long, value_name = "NAME", default_value = "")]
    pub service: String,
    /// How long to wait for the connection and for the answer
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Keep asking (every 100ms) until SERVING, for at most this long: for
    /// scripts that start the server and then use it. 0: ask once
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub wait: Duration,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How to reach the Contact port over TLS (`health`, `cmd`).
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Use TLS (implied by the other --tls-* options)
    #[arg(long)]
    pub tls: bool,
    /// CA certificates (PEM) to verify the server with [default: the system's]
    #[arg(long, value_name = "PATH")]
    pub tls_ca_cert: Option<PathBuf>,
    /// Client certificate (PEM), for servers that require one
    #[arg(long, value_name = "PATH", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// Client key (PEM)
    #[arg(long, value_name = "PATH", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Name to verify the server's certificate against, instead of the address's host
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Do not verify the server's certificate
    #[arg(long)]
    pub tls_no_verify: bool,
}

impl TlsArgs {
    /// The TLS settings, if any --tls option is given.
    pub fn client(&self) -> Option<crate::tls::ClientTls> {
        let any = self.tls
            || self.tls_ca_cert.is_some()
            || self.tls_client_cert.is_some()
            || self.tls_server_name.is_some()
            || self.tls_no_verify;
        any.then(|| crate::tls::ClientTls {
            ca: self.tls_ca_cert.clone(),
            cert: self.tls_client_cert.clone(),
            key: self.tls_client_key.clone(),
            server_name: self.tls_server_name.clone(),
            no_verify: self.tls_no_verify,
        })
    }
}

/// `contactd cmd`.
#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 every command succeeded, 1 one or more failed or were \
refused, 2 no connection (or a usage error).

Examples:
  contactd cmd 'ip link show' 'uptime'
  contactd cmd -f commands.txt --parallel 4 --json
  echo uptime | contactd cmd -f - --token-file ~/.contactd-token"
)]
pub struct CmdArgs {
    /// The commands, one argument each (quote them: `'ip link show'`); numbered from 1 in
    /// this order (each call's index)
    #[arg(
        value_name = "COMMAND",
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    pub commands: Vec<String>,
    /// Read the commands from FILE (`-` for stdin), one a line; empty lines are skipped
    #[arg(short, long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Server address [default: the config's server.listen (a wildcard address means
    /// loopback), else 127.0.0.1:55555]
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "config")]
    pub addr: Option<String>,
    /// The server's config file, to find its address
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Commands in flight at once
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub parallel: u32,
    /// How long to wait for the connection, and for each command's answer
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Send this file's token (`contactd token create --role operator`)
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Print one JSON object at the end, `{"results": [...]}`, for scripts
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::config::units::duration::parse(text)
}

/// Which config file to check.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Config file [default: /etc/contactd.toml, or /etc/contactd-agent.toml with --agent;
    /// built-in defaults if it does not exist] [env: CONTACTD_CONFIG, or CONTACTD_AGENT_CONFIG
    /// with --agent]
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Check an agent config file (for `contactd agent`) instead of the server's
    #[arg(long)]
    pub agent: bool,
}

impl CheckConfigArgs {
    /// `--config`, else the environment variable for the kind of file.
    pub fn path(&self) -> Option<PathBuf> {
        let var = if self.agent {
            crate::config::agent::AGENT_CONFIG_ENV
        } else {
            "CONTACTD_CONFIG"
        };
        self.config.clone().or_else(|| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
    }
}

/// Which agent config file to use.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file [default: /etc/contactd-agent.toml, or built-in defaults if it does not exist]
    #[arg(short, long, value_name = "PATH", env = "CONTACTD_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Which config file to use.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Config file [default: /etc/contactd.toml, or built-in defaults if it does not exist]
    #[arg(short, long, value_name = "PATH", env = "CONTACTD_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Parses a task state as given to `--state`.
///
/// # Errors
/// An unknown state name.
fn parse_state(text: &str) -> Result<crate::proto::admin::TaskState, String> {
    use crate::{model::TaskState, proto::admin::TaskState as Pb};
    let all = [
        (TaskState::Pending, Pb::Pending),
        (TaskState::Delivered, Pb::Delivered),
        (TaskState::Acked, Pb::Acked),
        (TaskState::Failed, Pb::Failed),
        (TaskState::Dead, Pb::Dead),
        (TaskState::Cancelled, Pb::Cancelled),
    ];
    all.into_iter()
        .find(|(state, _)| state.name() == text)
        .map(|(_, pb)| pb)
        .ok_or_else(|| {
            format!(
                "unknown state {text:?}: expected pending, delivered, acked, failed, dead or \
                 cancelled"
            )
        })
}

/// Parses a label selector as given to `--target` and `--selector`.
///
/// # Errors
/// Where the selector stops making sense, and what was expected there.
fn parse_selector(text: &str) -> Result<Selector, String> {
    Selector::parse(text).map_err(|e| e.to_string())
}
