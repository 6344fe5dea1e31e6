//! The command line: what the user can type, nothing more.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// contactd: push tasks to a fleet of agents over gRPC, collect their status
/// and results, and run allow-listed commands on request.
#[derive(Debug, Parser)]
#[command(name = "contactd", version, propagate_version = true)]
#[command(after_help = "Examples:
  contactd serve                    run on /etc/contactd.toml (built-in defaults if absent)
  contactd serve -c my.toml         run on another config file
  contactd check-config -c my.toml  print the effective config, or every problem in it")]
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
    CheckConfig(ConfigArgs),
}

/// Which config file to use.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Config file [default: /etc/contactd.toml, or built-in defaults if it does not exist]
    #[arg(short, long, value_name = "PATH", env = "CONTACTD_CONFIG")]
    pub config: Option<PathBuf>,
}
