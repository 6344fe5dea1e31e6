//! contactd's soak and chaos harness: the real binaries for a given time,
//! with a seed, under faults injected through a userspace proxy and churn on
//! a schedule; then a checker that reads the whole history, and a report.
//! RELIABILITY.md says what is checked and how to read the report.
//!
//! ```text
//! cargo run --example soak -- run --duration 3m --seed 1 --out soak-report
//! cargo run --example soak -- check soak-report     # check and report again
//! ```
//!
//! Everything goes to loopback addresses this harness binds itself; every
//! loop is bounded in count and time; its processes are stopped by PID and
//! die with it (`PR_SET_PDEATHSIG`). Needs root for the store's disk-full
//! fault (a tmpfs it mounts and unmounts); without it, that fault is skipped
//! and the report says so. With `--postgres`, two servers share a
//! throwaway PostgreSQL cluster the harness makes, and stops and starts.

mod check;
mod end;
mod faults;
mod fleet;
mod history;
mod light;
#[path = "../../tests/it/common/pg_programs.rs"]
mod pg_programs;
mod postgres;
mod procs;
mod proxy;
mod report;
mod traffic;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "soak", about = "contactd's soak and chaos harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a soak, then check it and write its report into --out.
    Run(fleet::Args),
    /// Check a finished run's directory again and rewrite its report.
    Check {
        dir: PathBuf,
        #[command(flatten)]
        bounds: BoundArgs,
    },
}

/// The checker's bounds (RELIABILITY.md explains each).
#[derive(Debug, Clone, clap::Args)]
pub struct BoundArgs {
    /// Assert that no agent runs a task twice across its own restarts (the
    /// agent spool). Without it such runs are listed as known, not failed.
    #[arg(long)]
    pub spool: bool,
    /// Assert that a queue task is not handed to another agent while the
    /// agent running it has only lost its connection. Without it such runs
    /// are listed as known, not failed (RELIABILITY.md: defect 3).
    #[arg(long)]
    pub keep_claims: bool,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub kill_window: Duration,
    /// An agent cut off by a fault tries again within this of its end: its
    /// backoff's largest delay with jitter (12 s), the retry hint's jitter
    /// (1 s), a connection attempt's timeout (10 s), slack.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconnect_bound: Duration,
    /// ... and is connected again within this (the server's capacity to
    /// take a whole fleet back; in a debug build on a shared machine, long).
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub back_bound: Duration,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub error_window: Duration,
    /// Largest RSS growth per minute over the second half, per process (MiB).
    #[arg(long, default_value_t = 4.0)]
    pub rss_mib_per_min: f64,
    #[arg(long, default_value_t = 5.0)]
    pub fds_per_min: f64,
    #[arg(long, default_value_t = 2.0)]
    pub threads_per_min: f64,
    #[arg(long, default_value_t = 8.0)]
    pub store_mib_per_min: f64,
    /// Growth is not judged this soon after a process starts or after a
    /// fault that cut off the whole fleet ends.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
}

impl BoundArgs {
    pub fn bounds(&self) -> check::Bounds {
        check::Bounds {
            kill_window_ms: self.kill_window.as_millis() as i64,
            reconnect_ms: self.reconnect_bound.as_millis() as i64,
            back_ms: self.back_bound.as_millis() as i64,
            error_window_ms: self.error_window.as_millis() as i64,
            rss_per_min: self.rss_mib_per_min * 1024.0 * 1024.0,
            fds_per_min: self.fds_per_min,
            threads_per_min: self.threads_per_min,
            store_per_min: self.store_mib_per_min * 1024.0 * 1024.0,
            min_span_ms: 30_000,
            settle_ms: self.settle.as_millis() as i64,
            spool: self.spool,
            keep_claims: self.keep_claims,
            ack_timeout_ms: fleet::ACK_TIMEOUT.as_millis() as i64,
        }
    }
}

/// Unix time in ms.
pub fn now_ms() -> i64 {
    contactd::clock::now_ms()
}

/// A seeded generator (splitmix64): the same seed gives the same schedule.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform duration in `[lo, hi]`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => fleet::run(args).await,
            Command::Check { dir, bounds } => report::check_and_report(&dir, &bounds.bounds()),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("soak: the checker found violations (see the report)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::from(2)
        }
    }
}
