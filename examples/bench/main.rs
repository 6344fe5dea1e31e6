//! contactd's load generator (issue 5): runs each scenario against the real
//! `contactd` binary at its default config and against a bare tonic server
//! built from the same generated code, alternately, with the servers pinned
//! to one CPU and the load to another, and prints one `RESULT` line per run,
//! then `RATIO`/`TARGET` lines. Not part of the daemon.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench -- run
//! cargo run --example bench -- smoke        # CI: every scenario once, briefly
//! ```
//!
//! The `-tls` and `-mtls` scenarios are TLS variants of the plaintext ones
//! (issue 8), with certificates made for each bench run (`tls.rs`).
//!
//! The `scale` scenarios spread their agents over several processes of this
//! binary (`bench scale-load`, scale.rs): each process here may hold at most
//! 20,000 open files.
//!
//! Everything goes to 127.0.0.1 only; every run is bounded in time and count.
//! BENCHMARKS.md has the scenarios, the figures and how to read them. With
//! `BENCH_SHOW_LOG=1`, the shutdown scenario prints the server's last log
//! lines (the shutdown phases with their timestamps).

mod baseline;
mod ceiling;
mod cmd;
mod jobs;
mod load;
mod postgres;
mod report;
mod restart;
mod scale;
mod scale_load;
mod scenarios;
mod server;
mod store;
mod tls;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{
    report::{Outcome, median, number, result_line},
    scenarios::{Params, Scenario},
    server::{Kind, Launcher},
    tls::{Mode, Pki},
};

/// Longest one scenario run may take beyond its duration before it counts
/// as failed.
const RUN_SLACK: Duration = Duration::from_secs(120);

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "contactd's load generator: contactd vs a bare tonic baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenarios against contactd and the baseline and print the ratios.
    Run(RunArgs),
    /// CI smoke test: every scenario once, briefly, with few agents, against
    /// both servers; fails on any error, judges no figure.
    Smoke(CommonArgs),
    /// The PostgreSQL store: queue mode on one and two servers, submits,
    /// and what each task costs the database (contactd only).
    Pg(postgres::Args),
    /// The bare baseline server (started by `run` as its own process).
    BaselineServer(baseline::Args),
    /// One load process of the scale scenarios (started by `run`, several
    /// at once; ends when its stdin closes).
    #[command(hide = true)]
    ScaleLoad(scale_load::LoadArgs),
    /// Spawn `true` in a loop and print the rate (started by `run` on the
    /// server CPU, as the reference for `cmd`).
    SpawnLoop {
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

#[derive(Debug, clap::Args)]
struct CommonArgs {
    /// The contactd binary [default: `contactd` next to this example's
    /// directory, i.e. target/<profile>/contactd].
    #[arg(long)]
    contactd: Option<PathBuf>,
    /// TOML appended to every contactd config, as `[store]\nkind = "memory"`
    /// (a table no scenario sets: tables cannot be given twice).
    #[arg(long, default_value = "")]
    contactd_toml: String,
    /// Do not pin the servers and the load to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// CPU the servers run on.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// CPU the load generator runs on.
    #[arg(long, default_value_t = 0)]
    load_cpu: usize,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Scenarios to run [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Measurement time of each run.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Runs per server and scenario; the order alternates, medians are compared.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, default_value_t = 1000)]
    fanout_agents: usize,
    #[arg(long, default_value_t = 10_000)]
    hold_agents: usize,
    #[arg(long, default_value_t = 5000)]
    shutdown_streams: usize,
    /// Server starts measured per startup run.
    #[arg(long, default_value_t = 5)]
    startups: usize,
    #[arg(long, default_value_t = 32)]
    cmd_in_flight: usize,
    /// Agents in the queue scenario.
    #[arg(long, default_value_t = 100)]
    queue_agents: usize,
    /// Agents in the rollout scenarios (one connection each).
    #[arg(long, default_value_t = 10_000)]
    rollout_agents: usize,
    /// `[[jobs]]` (each `every = "1s"`) in the jobs scenario.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Agents connecting at once in fanout, hold and shutdown (the
    /// baseline's listen backlog is tokio's 1024).
    #[arg(long, default_value_t = 200)]
    connect_parallel: usize,
    /// Agents in the restart scenarios.
    #[arg(long, default_value_t = 10_000)]
    restart_agents: usize,
    /// Restart scenarios: each server binds its port itself, instead of
    /// being passed one held across servers (socket activation).
    #[arg(long)]
    restart_rebind: bool,
    /// Restart scenarios: the agents ignore retry hints (agents before
    /// hints existed).
    #[arg(long)]
    restart_legacy_agents: bool,
    /// Restart scenarios: the listen backlog of the socket held across
    /// servers (capped by net.core.somaxconn).
    #[arg(long, default_value_t = 4096)]
    restart_backlog: u32,
    /// Fleet sizes of the scale scenarios, one run each (at most 19,400:
    /// the server's open files).
    #[arg(long, value_delimiter = ',', default_values_t = [5000, 10_000, 19_000])]
    scale_agents: Vec<usize>,
    /// Agents per load process in the scale scenarios (each process holds
    /// one socket per agent, under the same 20,000 open files).
    #[arg(long, default_value_t = 5000)]
    scale_per_process: usize,
    /// Agents acking at once in queue-ceiling.
    #[arg(long, default_value_t = 200)]
    ceiling_agents: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => bench(args, false),
        Command::Smoke(common) => bench(
            RunArgs {
                common,
                scenarios: Vec::new(),
                duration: Duration::from_millis(500),
                repeat: 1,
                fanout_agents: 20,
                hold_agents: 50,
                shutdown_streams: 50,
                startups: 1,
                cmd_in_flight: 4,
                queue_agents: 10,
                rollout_agents: 20,
                jobs: 1000,
                connect_parallel: 50,
                restart_agents: 50,
                restart_rebind: false,
                restart_legacy_agents: false,
                restart_backlog: 4096,
                // 2 load processes of 20 agents each.
                scale_agents: vec![40],
                scale_per_process: 20,
                ceiling_agents: 10,
            },
            true,
        ),
        Command::Pg(args) => pg(&args),
        Command::BaselineServer(args) => baseline::serve(&args),
        Command::ScaleLoad(args) => scale_load::load_process(&args),
        Command::SpawnLoop {
            in_flight,
            duration,
        } => current_thread().map(|rt| rt.block_on(cmd::spawn_loop(in_flight, duration))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pg(args: &postgres::Args) -> anyhow::Result<()> {
    raise_nofile()?;
    let launcher = launcher(&CommonArgs {
        contactd: args.contactd.clone(),
        contactd_toml: String::new(),
        // The servers and the database share both cores: nothing to pin.
        no_pin: true,
        server_cpu: 1,
        load_cpu: 0,
    })?;
    current_thread()?.block_on(postgres::run(args, &launcher))
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Raises the soft open-file limit to the hard one: 10,000 agents need
/// 10,000 sockets here and in the server, which inherits the limit.
fn raise_nofile() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

/// Pins this process (its threads are created later and inherit it) to `cpu`.
fn pin_self(cpu: usize) -> anyhow::Result<()> {
    use nix::{sched::CpuSet, unistd::Pid};
    let mut set = CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

fn launcher(common: &CommonArgs) -> anyhow::Result<Launcher> {
    let bench = std::env::current_exe().context("locating this binary")?;
    let contactd = match &common.contactd {
        Some(path) => path.clone(),
        // target/<profile>/examples/bench → target/<profile>/contactd
        None => bench
            .parent()
            .and_then(|examples| examples.parent())
            .context("locating target/<profile>")?
            .join("contactd"),
    };
    anyhow::ensure!(
        contactd.is_file(),
        "no contactd binary at {} (build it first: `cargo build --release`, or pass --contactd)",
        contactd.display()
    );
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let pin = !common.no_pin && cpus >= 2 && which("taskset");
    if pin {
        pin_self(common.load_cpu)?;
    } else if !common.no_pin {
        eprintln!("bench: not pinning (needs 2 CPUs and taskset)");
    }
    Ok(Launcher {
        contactd,
        bench,
        contactd_toml: common.contactd_toml.clone(),
        cpu: pin.then_some(common.server_cpu),
    })
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn bench(args: RunArgs, smoke: bool) -> anyhow::Result<()> {
    let nofile = raise_nofile()?;
    let needed = args
        .hold_agents
        .max(args.shutdown_streams)
        .max(args.restart_agents)
        .max(args.rollout_agents) as u64
        + 100;
    anyhow::ensure!(
        nofile >= needed,
        "open-file limit {nofile} is below the {needed} this run needs (raise it with `ulimit -Hn` / prlimit)"
    );
    let scale = scale::Options {
        sizes: args.scale_agents.clone(),
        agents: 0,
        per_process: args.scale_per_process,
        parallel: args.connect_parallel,
        backlog: args.restart_backlog,
    };
    scale.check(nofile)?;
    let launcher = launcher(&args.common)?;
    let params = Params {
        duration: args.duration,
        fanout_agents: args.fanout_agents,
        hold_agents: args.hold_agents,
        shutdown_streams: args.shutdown_streams,
        startups: args.startups,
        cmd_in_flight: args.cmd_in_flight,
        queue_agents: args.queue_agents,
        rollout_agents: args.rollout_agents,
        jobs: args.jobs,
        connect_parallel: args.connect_parallel,
        restart: restart::Options {
            agents: args.restart_agents,
            rebind: args.restart_rebind,
            legacy_agents: args.restart_legacy_agents,
            parallel: args.connect_parallel,
            backlog: args.restart_backlog,
        },
        scale,
        ceiling_agents: args.ceiling_agents,
    };
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    println!(
        "# bench: contactd={} pinned={} duration={:?} repeat={}",
        launcher.contactd.display(),
        launcher.cpu.map_or("no".into(), |c| format!(
            "server cpu {c}, load cpu {}",
            args.common.load_cpu
        )),
        args.duration,
        args.repeat
    );
    if smoke {
        println!("# smoke: brief runs with few agents; the figures are not judged");
    }
    let runtime = current_thread()?;
    let pki = runtime.block_on(certificates(&scenarios, &launcher, &params))?;
    let failures = runtime.block_on(run_all(
        &scenarios,
        &launcher,
        &params,
        pki.as_ref(),
        args.repeat.max(1),
    ));
    if failures > 0 {
        anyhow::bail!("{failures} scenario runs had errors");
    }
    if smoke {
        println!("smoke: every scenario completed without errors");
    }
    Ok(())
}

/// The certificates of this bench run, if a TLS variant is among
/// `scenarios`: in mTLS, one agent certificate per agent of the largest
/// fleet (the handshakes scenario's agents take them in turn).
async fn certificates(
    scenarios: &[Scenario],
    launcher: &Launcher,
    params: &Params,
) -> anyhow::Result<Option<Pki>> {
    if scenarios.iter().all(|s| s.tls().is_none()) {
        return Ok(None);
    }
    let agents = scenarios
        .iter()
        .filter(|s| s.tls() == Some(Mode::Mutual))
        .map(|s| match s.base() {
            Scenario::Fanout => params.fanout_agents,
            Scenario::Hold | Scenario::Handshakes => params.hold_agents,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    let started = std::time::Instant::now();
    let pki = Pki::make(&launcher.contactd, agents)
        .await
        .context("making the TLS certificates")?;
    println!(
        "# tls: a CA and server certificate (contactd tls init), a status client's (tls issue) \
         and {agents} agents' certificates made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Some(pki))
}

/// One run, bounded in time; an error becomes an outcome with that error.
async fn run_one(
    scenario: Scenario,
    kind: Option<Kind>,
    launcher: &Launcher,
    params: &Params,
    pki: Option<&Pki>,
) -> Outcome {
    let mut limit = params.duration * 3 + RUN_SLACK;
    if scenario.base() == Scenario::Scale {
        limit = limit.max(scale::RUN_LIMIT);
    }
    let result = tokio::time::timeout(limit, async {
        match kind {
            Some(kind) => scenarios::run(scenario, kind, launcher, params, pki).await,
            None => cmd::plain_spawn(launcher, params).await,
        }
    })
    .await;
    match result {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Outcome {
            figures: Vec::new(),
            errors: vec![format!("{e:#}")],
        },
        Err(_) => Outcome {
            figures: Vec::new(),
            errors: vec![format!("did not finish within {limit:?}")],
        },
    }
}

/// Runs every scenario `repeat` times per server, alternating which server
/// goes first; returns how many runs had errors.
async fn run_all(
    scenarios: &[Scenario],
    launcher: &Launcher,
    params: &Params,
    pki: Option<&Pki>,
    repeat: usize,
) -> usize {
    let mut failures = 0;
    let mut summary = Vec::new();
    for &scenario in scenarios {
        for params in params.for_scenario(scenario) {
            let runs = run_rounds(scenario, launcher, &params, pki, repeat, &mut failures).await;
            summary.extend(compare(scenario, &runs));
        }
    }
    println!("# summary: figures are medians over runs; ratios are medians of per-round ratios");
    for line in summary {
        println!("{line}");
    }
    failures
}

/// Runs `scenario` `repeat` times per server, alternating which server
/// goes first; counts the runs with errors in `failures`.
async fn run_rounds(
    scenario: Scenario,
    launcher: &Launcher,
    params: &Params,
    pki: Option<&Pki>,
    repeat: usize,
    failures: &mut usize,
) -> Vec<(&'static str, usize, Outcome)> {
    let mut runs = Vec::new();
    for round in 0..repeat {
        let mut order = vec![Some(Kind::Contactd), Some(Kind::Baseline)];
        if round % 2 == 1 {
            order.reverse();
        }
        if scenario.contactd_only() {
            order = vec![Some(Kind::Contactd)];
        }
        if scenario == Scenario::Cmd {
            order.push(None);
        }
        for kind in order {
            let name = kind.map_or("plain-spawn", Kind::name);
            let outcome = run_one(scenario, kind, launcher, params, pki).await;
            println!("{}", result_line(scenario, name, &outcome));
            for error in outcome.errors.iter().skip(1).take(3) {
                println!("#   also: {error}");
            }
            if !outcome.errors.is_empty() {
                *failures += 1;
            }
            runs.push((name, round, outcome));
        }
    }
    runs
}

/// The median of a figure over one server's runs.
fn median_of(runs: &[(&str, usize, Outcome)], server: &str, figure: &str) -> f64 {
    let values: Vec<f64> = runs
        .iter()
        .filter(|(name, _, _)| *name == server)
        .filter_map(|(_, _, outcome)| outcome.figure(figure))
        .collect();
    median(&values)
}

/// The median of the per-round ratios `server`/`reference` of a figure:
/// the two runs of a round are adjacent in time, so a load that drifts over
/// the whole run (another build on the machine) cancels out better than in
/// the ratio of the medians.
fn paired_ratio(
    runs: &[(&str, usize, Outcome)],
    server: &str,
    reference: &str,
    figure: &str,
) -> f64 {
    let value = |name: &str, round: usize| {
        runs.iter()
            .find(|(n, r, _)| *n == name && *r == round)
            .and_then(|(_, _, o)| o.figure(figure))
    };
    let rounds = runs.iter().map(|(_, r, _)| *r + 1).max().unwrap_or(0);
    let ratios: Vec<f64> = (0..rounds)
        .filter_map(|r| Some(value(server, r)? / value(reference, r)?))
        .collect();
    median(&ratios)
}

/// The RATIO and TARGET lines of one scenario.
fn compare(scenario: Scenario, runs: &[(&str, usize, Outcome)]) -> Vec<String> {
    let mut lines = Vec::new();
    // The compared figure: the first one, after a fleet's size.
    let first = runs
        .iter()
        .find_map(|(_, _, o)| o.figures.iter().map(|(n, _)| *n).find(|n| *n != "agents"))
        .unwrap_or("rate");
    let contactd = median_of(runs, "contactd", first);
    let baseline = median_of(runs, "baseline", first);
    if scenario.contactd_only() {
        lines.push(format!(
            "FIGURE scenario={} figure={first} contactd={} server_cpu_ns_per_op={}",
            scenario.name(),
            number(contactd),
            number(median_of(runs, "contactd", "server_cpu_ns_per_op")),
        ));
        for (figure, target) in scenario.absolute_targets() {
            lines.push(target.line(scenario, median_of(runs, "contactd", figure)));
        }
        if scenario.base() == Scenario::Scale {
            // One summary per fleet size: say which.
            let agents = number(median_of(runs, "contactd", "agents"));
            for line in &mut lines {
                line.push_str(&format!(" agents={agents}"));
            }
        }
        return lines;
    }
    let ratio = paired_ratio(runs, "contactd", "baseline", first);
    let cpu = paired_ratio(runs, "contactd", "baseline", "server_cpu_ns_per_op");
    lines.push(format!(
        "RATIO scenario={} figure={first} contactd={} baseline={} contactd/baseline={} \
         server_cpu_per_op_contactd/baseline={}",
        scenario.name(),
        number(contactd),
        number(baseline),
        number(ratio),
        number(cpu),
    ));
    if let Some(target) = scenario.ratio_target() {
        lines.push(target.line(scenario, ratio));
    }
    if scenario == Scenario::Cmd {
        let spawn = median_of(runs, "plain-spawn", "rate");
        let ratio = paired_ratio(runs, "contactd", "plain-spawn", "rate");
        let target = report::Target {
            what: "ratio_vs_plain_spawn",
            limit: 0.8,
            at_least: true,
        };
        lines.push(format!(
            "RATIO scenario=cmd figure=rate contactd={} plain-spawn={} contactd/plain-spawn={}",
            number(contactd),
            number(spawn),
            number(ratio)
        ));
        lines.push(target.line(scenario, ratio));
    }
    if scenario == Scenario::Fanout {
        let receiving = median_of(runs, "contactd", "agents_receiving");
        let agents = median_of(runs, "contactd", "agents");
        let target = report::Target {
            what: "agents_not_receiving",
            limit: 0.0,
            at_least: false,
        };
        lines.push(target.line(scenario, agents - receiving));
    }
    for (figure, target) in scenario.absolute_targets() {
        lines.push(target.line(scenario, median_of(runs, "contactd", figure)));
    }
    lines
}
