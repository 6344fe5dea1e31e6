//! The `contactd` binary: parse the command line, run the command, map its
//! error to an exit code.

use std::process::ExitCode;

use clap::Parser;
use contactd::{
    app,
    cli::{Cli, Command},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve(args) => app::serve(args),
        Command::CheckConfig(args) => app::check_config(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("contactd: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
