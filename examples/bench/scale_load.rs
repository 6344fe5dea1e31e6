//! `bench scale-load`: one load process of a scale run (scale.rs), holding
//! its share of the fleet (restart.rs's agents) and answering its parent's
//! commands on stdin, one line each, until stdin closes: see scale.rs for
//! the protocol.

use std::{
    io::{BufRead, Read, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    restart::{Fleet, wait_for},
    scale::{DELIVERY_LIMIT, FLEET_LIMIT, MAX_LINE, line_read},
};

/// Latencies per `lat` line (at most 8 digits each: well within the
/// protocol's longest line).
const LATENCIES_PER_LINE: usize = 1000;
/// Longest error text sent (within the protocol's longest line).
const MAX_ERROR: usize = 2000;

/// `bench scale-load`: one load process of a scale run.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The server's address.
    #[arg(long)]
    addr: SocketAddr,
    /// The fleet-wide number of this process's first agent (it gives the
    /// agents' source addresses and certificate names).
    #[arg(long)]
    first: usize,
    /// Agents in this process.
    #[arg(long)]
    count: usize,
    /// Agents connecting at once at first.
    #[arg(long, default_value_t = 200)]
    parallel: usize,
    /// mTLS: the directory of the run's CA; each agent gets a certificate
    /// of its own, made here.
    #[arg(long)]
    pki: Option<PathBuf>,
}

/// Runs a load process: its agents, driven by its parent's commands on
/// stdin, until stdin closes.
pub fn load_process(args: &LoadArgs) -> anyhow::Result<()> {
    // Ends with the parent however it ends (a SIGKILL included); stdin
    // closing is the other way, for a parent that has closed it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    crate::raise_nofile()?;
    crate::current_thread()?.block_on(obey(args))
}

/// Answers the parent's commands, one at a time, until stdin closes.
async fn obey(args: &LoadArgs) -> anyhow::Result<()> {
    let tls = match &args.pki {
        Some(pki) => Some(crate::tls::agents(pki, args.first, args.count)?),
        None => None,
    };
    let fleet = Fleet::new(args.count);
    let _stop = fleet.stop.clone().drop_guard();
    let (commands_tx, mut commands) = mpsc::channel(4);
    let stop = fleet.stop.clone();
    std::thread::spawn(move || read_commands(&commands_tx, &stop));
    let mut out = std::io::stdout();
    say(&mut out, "ready")?;
    while let Some(command) = commands.recv().await {
        let done = tokio::select! {
            done = carry_out(&command, args, &fleet, tls.as_ref(), &mut out) => done,
            () = fleet.stop.cancelled() => break,
        };
        if let Err(e) = done {
            let mut error = format!("{e:#}").replace('\n', " ");
            error.truncate(error.floor_char_boundary(MAX_ERROR));
            say(&mut out, &format!("error {error}"))?;
        }
    }
    Ok(())
}

/// Forwards the lines on stdin (on a thread of its own: a blocking read,
/// which the process's exit does not wait for); at its end (the parent
/// closed it or died), stops the fleet.
fn read_commands(commands: &mpsc::Sender<String>, stop: &CancellationToken) {
    let mut stdin = std::io::stdin().lock();
    while let Ok(Some(line)) = read_line(&mut stdin) {
        if commands.blocking_send(line).is_err() {
            break;
        }
    }
    stop.cancel();
}

/// One line of at most [`MAX_LINE`] bytes, without its newline; `None` at
/// the end of input.
fn read_line(reader: &mut impl BufRead) -> anyhow::Result<Option<String>> {
    let mut line = Vec::new();
    reader
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    line_read(line)
}

/// Carries out one command of the parent's, and answers it.
async fn carry_out(
    command: &str,
    args: &LoadArgs,
    fleet: &Arc<Fleet>,
    tls: Option<&crate::tls::ClientTls>,
    out: &mut std::io::Stdout,
) -> anyhow::Result<()> {
    let (word, rest) = command.split_once(' ').unwrap_or((command, ""));
    match word {
        "connect" => {
            let agent_tls = |i| tls.map(|tls| (tls.agent(i), tls.name.clone()));
            fleet
                .launch(args.addr, args.first, agent_tls, false, args.parallel)
                .await?;
            say(out, "subscribed")
        }
        "arm" => {
            fleet.arm();
            say(out, "armed")
        }
        "sent" => {
            let sent: u64 = rest.parse().context("sent: unix ns")?;
            report_latencies(fleet, sent, out).await
        }
        "restart" => {
            fleet.restarted.store(true, Ordering::SeqCst);
            say(out, "restarting")?;
            let n = fleet.size() as u64;
            wait_for(&fleet.resubscribed, n, FLEET_LIMIT, "every agent back").await?;
            say(out, "back")
        }
        "stats" => {
            let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            if let Some(error) = fleet.first_error.lock().clone() {
                eprintln!("bench scale-load: first agent error after the restart: {error}");
            }
            let stats = format!(
                "stats {} {} {}",
                count(&fleet.refused),
                count(&fleet.turned_away),
                count(&fleet.other_errors)
            );
            say(out, &stats)
        }
        _ => bail!("unknown command {command:?}"),
    }
}

/// Waits (bounded) until every agent received the task sent at `sent`
/// (Unix ns), then reports each one's latency in µs and how many got it.
async fn report_latencies(
    fleet: &Fleet,
    sent: u64,
    out: &mut std::io::Stdout,
) -> anyhow::Result<()> {
    let n = fleet.size() as u64;
    // Not all of them in time is the parent's to judge, from the count.
    let _ = wait_for(&fleet.received, n, DELIVERY_LIMIT, "the broadcast").await;
    let latencies: Vec<u64> = fleet
        .received_at
        .iter()
        .map(|at| at.load(Ordering::Relaxed))
        .filter(|&at| at != 0)
        .map(|at| at.saturating_sub(sent) / 1000)
        .collect();
    for chunk in latencies.chunks(LATENCIES_PER_LINE) {
        let values: Vec<String> = chunk.iter().map(u64::to_string).collect();
        say(out, &format!("lat {}", values.join(" ")))?;
    }
    say(out, &format!("delivered {} {n}", latencies.len()))
}

/// Writes one line to the parent. A blocking write (tokio's stdout is not
/// built here): the lines are short, and the parent reads them as they
/// come, a pipe's worth of latencies at the most before it gets to them.
fn say(out: &mut std::io::Stdout, line: &str) -> anyhow::Result<()> {
    let mut out = out.lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}
