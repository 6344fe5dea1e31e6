//! `contactd cmd`: the operators' client of remoteCMD. Runs each command
//! given (or read from a file) as one call, several in flight at once, and
//! prints each result as it comes, or one JSON object at the end.
//!
//! Commands are numbered from 1 in the order given (empty lines of a file
//! are not counted); that number is the call's `index`.

use std::{io::Read, path::Path, process::ExitCode, sync::Arc, time::Duration};

use serde::Serialize;
use tokio::task::JoinSet;
use tonic::{Code, metadata::MetadataValue, transport::Channel};

use crate::{
    cli::CmdArgs,
    client::health::{Dial, dial, speaks_tls_hint},
    config::{Source, peek::ListenView},
    proto::contact::{CmdRequest, contact_client::ContactClient},
    tls::ClientTls,
};

/// `contactd cmd`'s exit codes.
pub mod exit {
    /// Every command ran and succeeded.
    pub const OK: u8 = 0;
    /// At least one command failed or was refused.
    pub const FAILED: u8 = 1;
    /// No connection could be made, or the command line (or a file it
    /// names) cannot be used.
    pub const NO_CONNECTION: u8 = 2;
    /// A usage error: the same code as clap's.
    pub const USAGE: u8 = 2;
}

/// The address used when neither `--addr` nor `-c` is given: the server's
/// default `listen`.
const DEFAULT_ADDR: &str = "127.0.0.1:55555";

/// Runs `contactd cmd` and returns its exit code.
pub fn run(args: &CmdArgs) -> ExitCode {
    match prepare(args) {
        Ok(plan) => ExitCode::from(execute(plan, args)),
        Err(message) => {
            eprintln!("contactd: {message}");
            ExitCode::from(exit::USAGE)
        }
    }
}

/// What to run, and where, once the command line has been checked.
struct Plan {
    commands: Vec<String>,
    addr: String,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// `-c` naming a server with `[server.tls]`: TLS, verified against its
    /// `client_ca` (the package's CA signed the server's certificate too),
    /// unless --tls options say otherwise.
    tls: Option<ClientTls>,
}

fn prepare(args: &CmdArgs) -> Result<Plan, String> {
    let commands = match &args.file {
        Some(file) => read_commands(file)?,
        None => args.commands.clone(),
    };
    if commands.iter().all(|c| c.trim().is_empty()) {
        return Err("no commands to run".to_owned());
    }
    let (addr, tls) = match (&args.addr, &args.config) {
        (Some(addr), _) => (addr.clone(), None),
        (None, Some(config)) => {
            let view = Source::Given(config.clone())
                .load::<ListenView>()
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            let tls = view.server.tls.as_ref().map(|tls| ClientTls {
                ca: tls.client_ca.clone(),
                ..ClientTls::default()
            });
            (view.client_addr().to_string(), tls)
        }
        (None, None) => (DEFAULT_ADDR.to_owned(), None),
    };
    let token = match &args.token_file {
        None => None,
        Some(path) => {
            let token = crate::auth::read_token(path).map_err(|e| e.to_string())?;
            Some(
                crate::auth::bearer(&token)
                    .parse()
                    .map_err(|_| format!("{}: not a usable token", path.display()))?,
            )
        }
    };
    Ok(Plan {
        commands,
        addr,
        token,
        tls,
    })
}

/// The commands in `file` (`-`: stdin), one a line, empty lines skipped.
fn read_commands(file: &Path) -> Result<Vec<String>, String> {
    let mut text = String::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut text))
    };
    read.map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    Ok(text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// One command's outcome, as printed (and as `--json` shows it).
#[derive(Debug, Serialize)]
struct Outcome {
    index: usize,
    command: String,
    success: bool,
    /// The command's output, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    /// The gRPC status code, when the call was refused or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl Outcome {
    /// The outcome as text: a header line, then the output indented.
    fn text(&self) -> String {
        let mut text = match (self.success, self.code) {
            (true, _) => format!("[{}] ok: {}\n", self.index, self.command),
            (false, None) => format!("[{}] failed: {}\n", self.index, self.command),
            (false, Some(code)) => format!(
                "[{}] {code}: {}: {}\n",
                self.index,
                self.command,
                self.message.as_deref().unwrap_or_default()
            ),
        };
        for line in self.output.as_deref().unwrap_or_default().lines() {
            text.push_str("    ");
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

fn execute(plan: Plan, args: &CmdArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("contactd: cannot start the runtime: {e}");
            return exit::FAILED;
        }
    };
    let tls = args.tls.client().or_else(|| plan.tls.clone());
    let channel = match runtime.block_on(dial(&plan.addr, args.timeout, tls.as_ref())) {
        Ok(channel) => channel,
        Err(Dial::BadArguments(message)) => {
            eprintln!("contactd: {message}");
            return exit::NO_CONNECTION;
        }
        Err(Dial::Failed(message)) => {
            let hint = runtime.block_on(speaks_tls_hint(&plan.addr, args.timeout, tls.as_ref()));
            eprintln!("contactd: {message}{hint}");
            return exit::NO_CONNECTION;
        }
    };
    let mut outcomes = runtime.block_on(run_all(
        channel,
        plan,
        args.parallel as usize,
        args.timeout,
        args.json,
    ));
    let failed = outcomes.iter().any(|o| !o.success);
    if args.json {
        outcomes.sort_by_key(|o| o.index);
        let json = serde_json::json!({ "results": outcomes });
        let text = serde_json::to_string_pretty(&json).expect("outcomes serialize");
        if let Err(e) = crate::client::write_out(&format!("{text}\n")) {
            eprintln!("contactd: cannot write the output: {e}");
            return exit::FAILED;
        }
    }
    if failed { exit::FAILED } else { exit::OK }
}

/// Runs every command, `parallel` at a time, printing each outcome as it
/// comes unless `quiet`; returns them in the order they finished.
async fn run_all(
    channel: Channel,
    plan: Plan,
    parallel: usize,
    timeout: Duration,
    quiet: bool,
) -> Vec<Outcome> {
    let client = ContactClient::new(channel);
    let token = Arc::new(plan.token);
    let mut queue = plan.commands.into_iter().enumerate();
    let mut running = JoinSet::new();
    let mut outcomes = Vec::new();
    loop {
        while running.len() < parallel {
            let Some((i, command)) = queue.next() else {
                break;
            };
            let (client, token) = (client.clone(), Arc::clone(&token));
            running.spawn(call(client, token, i + 1, command, timeout));
        }
        let Some(done) = running.join_next().await else {
            return outcomes;
        };
        let outcome = done.expect("a call does not panic");
        if !quiet {
            // A reader that went away (`| head`) ends the printing, not
            // the commands: they were asked for, and their exit code counts.
            let _ = crate::client::write_out(&outcome.text());
        }
        outcomes.push(outcome);
    }
}

async fn call(
    mut client: ContactClient<Channel>,
    token: Arc<Option<MetadataValue<tonic::metadata::Ascii>>>,
    index: usize,
    command: String,
    timeout: Duration,
) -> Outcome {
    let mut request = tonic::Request::new(CmdRequest {
        index: i32::try_from(index).unwrap_or(i32::MAX),
        cmd_str: command.clone(),
        log: format!("contactd cmd #{index}"),
    });
    request.set_timeout(timeout);
    if let Some(token) = token.as_ref() {
        request
            .metadata_mut()
            .insert(crate::auth::HEADER, token.clone());
    }
    match client.remote_cmd(request).await {
        Ok(response) => {
            let response = response.into_inner();
            Outcome {
                index,
                command,
                success: response.success,
                output: Some(response.res),
                code: None,
                message: None,
            }
        }
        Err(status) => Outcome {
            index,
            command,
            success: false,
            output: None,
            code: Some(code_name(status.code())),
            message: Some(status.message().to_owned()),
        },
    }
}

/// A status code's canonical name, as gRPC tools print it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
