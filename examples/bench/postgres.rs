//! The PostgreSQL store (issue 12), contactd only: queue mode end to end
//! on one and on two servers sharing one database, submit latency, and
//! what each task costs the database (round trips and statements, as the
//! servers count them; transactions and rows, as PostgreSQL counts them;
//! and the CPU time of PostgreSQL's processes). On one machine the servers
//! and the database share the cores, so scaling shows in those costs more
//! than in the rate.
//!
//! ```text
//! bench pg --url postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! The URL names a database the bench may create others next to (one per
//! run, dropped afterwards); the cluster should run nothing else, since its
//! processes' CPU time is read from /proc.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use tokio_postgres::NoTls;

use crate::{
    report::{Outcome, median, number},
    server::{Kind, Launcher, Setup},
    store,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A database URL with the right to create databases.
    #[arg(long)]
    url: String,
    /// The contactd binary [default: target/<profile>/contactd].
    #[arg(long)]
    pub contactd: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 100)]
    agents: usize,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

/// PostgreSQL's own counts for one database.
#[derive(Debug, Clone, Copy, Default)]
struct DbStats {
    transactions: i64,
    rows: i64,
}

pub async fn run(args: &Args, launcher: &Launcher) -> anyhow::Result<()> {
    let (admin, connection) = tokio_postgres::connect(&args.url, NoTls)
        .await
        .context("connecting to --url")?;
    tokio::spawn(connection);
    println!(
        "# pg: queue mode, {} agents, {:?} per run, {} runs per server count; postgres CPU from /proc",
        args.agents, args.duration, args.repeat
    );
    for servers in [1usize, 2] {
        let mut rates = Vec::new();
        for round in 0..args.repeat {
            let db = format!("contactd_bench_{}_{servers}_{round}", std::process::id());
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .context("creating the run's database")?;
            let result = queue_run(args, launcher, &admin_url(&args.url, &db)?, servers).await;
            admin
                .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
                .await
                .context("dropping the run's database")?;
            let outcome = result?;
            print!("RESULT scenario=pg-queue servers={servers}");
            for (name, value) in &outcome.figures {
                print!(" {name}={}", number(*value));
            }
            println!(" errors={}", outcome.errors.len());
            for e in &outcome.errors {
                println!("#   error: {e}");
            }
            rates.extend(outcome.figure("rate"));
        }
        println!(
            "MEDIAN scenario=pg-queue servers={servers} rate={}",
            number(median(&rates))
        );
    }
    for clients in [1usize, 16] {
        let db = format!("contactd_bench_{}_submit_{clients}", std::process::id());
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
        let result = submit_run(args, launcher, &admin_url(&args.url, &db)?, clients).await;
        admin
            .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .await?;
        let outcome = result?;
        print!("RESULT scenario=pg-submit clients={clients}");
        for (name, value) in &outcome.figures {
            print!(" {name}={}", number(*value));
        }
        println!(" errors={}", outcome.errors.len());
    }
    Ok(())
}

/// `url` with its database replaced by `db`.
fn admin_url(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, query) = url.split_once('?').map_or((url, ""), |(b, q)| (b, q));
    let (server, _) = base.rsplit_once('/').context("a URL with a database")?;
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    Ok(format!("{server}/{db}{query}"))
}

fn store_toml(url: &str) -> String {
    format!(
        "[store]\nkind = \"postgres\"\nurl = \"{url}\"\npoll_interval = \"200ms\"\n\
         [log]\nlevel = \"info,contactd::store::postgres=debug\"\n"
    )
}

/// `servers` servers on the database at `url`, the agents shared out, the
/// generator offering 50,000 tasks/s on whichever holds its lease.
async fn queue_run(
    args: &Args,
    launcher: &Launcher,
    url: &str,
    servers: usize,
) -> anyhow::Result<Outcome> {
    let cpu_before = postgres_cpu()?;
    let db_before = db_stats(url).await?;
    let mut started = Vec::new();
    for n in 0..servers {
        let setup = Setup {
            server_toml: format!("name = \"bench-{n}\""),
            contactd_toml: format!(
                "[tasks]\nmode = \"queue\"\ninterval = \"10ms\"\nbatch = 500\nwindow = 64\n{}",
                store_toml(url)
            ),
            ..Setup::default()
        };
        started.push(launcher.start(Kind::Contactd, &setup).await?);
    }
    let addrs: Vec<SocketAddr> = started.iter().map(|s| s.addr).collect();
    let mut outcome = store::queue_on(&addrs, args.agents, args.duration).await?;
    let logs: Vec<_> = started.iter().map(|s| s.log_handle()).collect();
    for server in started {
        server.stop().await?;
    }
    let acked = acked(url).await?;
    let db_after = db_stats(url).await?;
    let cpu = postgres_cpu()? - cpu_before;
    let (round_trips, statements) = counted(&logs)?;
    let per = |n: f64| n / acked.max(1) as f64;
    outcome.figures.push(("acked_total", acked as f64));
    outcome
        .figures
        .push(("round_trips_per_task", per(round_trips as f64)));
    outcome
        .figures
        .push(("statements_per_task", per(statements as f64)));
    outcome.figures.push((
        "transactions_per_task",
        per((db_after.transactions - db_before.transactions) as f64),
    ));
    outcome.figures.push((
        "rows_per_task",
        per((db_after.rows - db_before.rows) as f64),
    ));
    outcome.figures.push(("pg_cpu_us_per_task", per(cpu * 1e6)));
    Ok(outcome)
}

/// Submits through one server's admin socket on the database at `url`.
async fn submit_run(
    args: &Args,
    launcher: &Launcher,
    url: &str,
    clients: usize,
) -> anyhow::Result<Outcome> {
    let setup = Setup {
        contactd_toml: format!("[tasks]\nbatch = 0\n{}", store_toml(url)),
        ..Setup::default()
    };
    let server = launcher.start(Kind::Contactd, &setup).await?;
    let outcome = store::submits(&server.admin, clients, args.duration).await;
    server.stop().await?;
    outcome
}

/// Tasks acked, as the database has them.
async fn acked(url: &str) -> anyhow::Result<i64> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client
        .query_one("SELECT count(*) FROM tasks WHERE state = 2", &[])
        .await?
        .get(0))
}

async fn db_stats(url: &str) -> anyhow::Result<DbStats> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted \
             FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(DbStats {
        transactions: row.get(0),
        rows: row.get(1),
    })
}

/// The round trips and statements the servers' store backends counted
/// (their debug line at close).
fn counted(
    logs: &[std::sync::Arc<parking_lot::Mutex<std::collections::VecDeque<String>>>],
) -> anyhow::Result<(u64, u64)> {
    let mut totals = (0, 0);
    for log in logs {
        let log = log.lock();
        let line = log
            .iter()
            .rev()
            .find(|l| l.contains("task store closing"))
            .context("a server did not log its store's counts")?;
        let field = |name: &str| -> anyhow::Result<u64> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .context("a count in the closing line")?
                .parse()
                .context("a number")
        };
        totals.0 += field("round_trips")?;
        totals.1 += field("statements")?;
    }
    Ok(totals)
}

/// CPU seconds (user + system) of every `postgres` process now.
fn postgres_cpu() -> anyhow::Result<f64> {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if !entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.ends_with("(postgres") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Its own time and its waited-for children's (exited backends).
        for at in [11, 12, 13, 14] {
            ticks += fields.get(at).and_then(|f| f.parse().ok()).unwrap_or(0);
        }
    }
    Ok(ticks as f64 / 100.0)
}
