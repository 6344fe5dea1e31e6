//! The `contactd` binary: parse the command line, run the command, map its
//! error to an exit code.

use std::process::ExitCode;

use clap::Parser;
use contactd::{
    app,
    cli::{
        Cli, Command, ConfigArgs, PackagingCli, PackagingCommand, StoreCommand, TaskCommand,
        TlsCommand, TokenCommand,
    },
    client::{health as probe, remote},
    daemon::Failure,
};

fn main() -> ExitCode {
    if PackagingCli::handles(std::env::args().nth(1).as_deref()) {
        return finish(match PackagingCli::parse().command {
            PackagingCommand::Completions(args) => app::completions(&args),
            PackagingCommand::Man(args) => app::man_pages(&args),
        });
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `health` follows grpc_health_probe: bad arguments exit 1.
            if e.use_stderr() && std::env::args().nth(1).as_deref() == Some("health") {
                let _ = e.print();
                return ExitCode::from(probe::exit::BAD_ARGUMENTS);
            }
            e.exit();
        }
    };
    let result = match &cli.command {
        Command::Serve(args) => app::serve(args),
        Command::CheckConfig(args) if args.agent => {
            return finish(app::agent::check_config(args.path()));
        }
        Command::CheckConfig(args) => app::check_config(&ConfigArgs {
            config: args.path(),
        }),
        Command::Agent(args) => return finish(app::agent::agent(args.config.clone())),
        Command::Health(args) => {
            let tls = args.tls.client();
            let ask = probe::Ask {
                addr: &args.addr,
                service: &args.service,
                timeout: args.timeout,
                wait: args.wait,
                tls: tls.as_ref(),
            };
            return probe::run(&ask);
        }
        Command::Cmd(args) => return remote::run(args),
        Command::Task(TaskCommand::Submit(args)) => app::submit_task(args),
        Command::Task(TaskCommand::Show(args)) => app::show_task(args),
        Command::Task(TaskCommand::Cancel(args)) => app::cancel_task(args),
        Command::Task(TaskCommand::Retry(args)) => app::retry_task(args),
        Command::Agents(args) => app::list_agents(args),
        Command::Tasks(args) => app::list_tasks(args),
        Command::Jobs(args) => app::list_jobs(args),
        Command::Job(command) => app::job(command),
        Command::Tls(TlsCommand::Init(args)) => app::tls_init(args),
        Command::Tls(TlsCommand::Issue(args)) => app::tls_issue(args),
        Command::Token(TokenCommand::Create(args)) => app::token_create(args),
        Command::Store(StoreCommand::Backup(args)) => app::store_backup(args),
    };
    finish(result)
}

/// The exit code for a command's result, its error printed.
fn finish(result: Result<(), impl Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("contactd: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
