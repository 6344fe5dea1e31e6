//! The `cmd` scenario: remoteCMD `true` with many calls in flight, and its
//! reference, a plain `tokio::process` loop spawning `true` (`bench
//! spawn-loop`, run on the server CPU as its own process).

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use contactd::proto::contact::{CmdRequest, contact_client::ContactClient};
use tokio::task::JoinSet;

use crate::{
    load,
    report::{Outcome, percentiles},
    scenarios::Params,
    server::Launcher,
};

/// remoteCMD `true`, `in_flight` calls at once on one connection.
pub async fn calls(
    addr: SocketAddr,
    in_flight: usize,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let channel = load::connect(addr).await?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for worker in 0..in_flight {
        let mut client = ContactClient::new(channel.clone());
        set.spawn(async move {
            let mut hist = load::histogram();
            let mut count = 0u64;
            let mut failures = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                let request = CmdRequest {
                    index: worker as i32,
                    cmd_str: "true".into(),
                    log: "bench".into(),
                };
                match client.remote_cmd(request).await {
                    Ok(response) if response.get_ref().success => {
                        load::record(&mut hist, sent);
                        count += 1;
                    }
                    Ok(response) => failures.push(format!("failed: {:?}", response.get_ref().res)),
                    Err(status) => failures.push(status.to_string()),
                }
                if failures.len() > 10 {
                    break;
                }
            }
            (hist, count, failures)
        });
    }
    let mut hist = load::histogram();
    let mut count = 0;
    let mut outcome = Outcome::default();
    while let Some(done) = set.join_next().await {
        let (h, n, failures) = done?;
        hist.add(&h).context("merging histograms")?;
        count += n;
        outcome.errors.extend(failures);
    }
    outcome
        .figures
        .push(("rate", count as f64 / started.elapsed().as_secs_f64()));
    percentiles(&mut outcome, &hist);
    outcome.figures.push(("count", count as f64));
    Ok(outcome)
}

/// Runs `bench spawn-loop` on the server CPU: the rate at which this machine
/// spawns `true` from a plain tokio process loop.
pub async fn plain_spawn(launcher: &Launcher, params: &Params) -> anyhow::Result<Outcome> {
    let output = launcher
        .command(&launcher.bench)
        .arg("spawn-loop")
        .arg("--in-flight")
        .arg(params.cmd_in_flight.to_string())
        .arg("--duration")
        .arg(humantime::format_duration(params.duration).to_string())
        .stdout(Stdio::piped())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&output.stdout);
    let value = |name: &str| -> anyhow::Result<f64> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("spawn-loop printed no {name}=: {text:?}"))?
            .parse::<f64>()
            .map_err(Into::into)
    };
    let mut outcome = Outcome::default();
    outcome.figures.push(("rate", value("rate")?));
    outcome.figures.push(("p50_us", value("p50_us")?));
    outcome.figures.push(("p99_us", value("p99_us")?));
    let failed = value("failed")?;
    outcome.check(output.status.success() && failed == 0.0, || {
        format!("spawn-loop: {} failures, {}", failed, output.status)
    });
    Ok(outcome)
}

/// `bench spawn-loop`: spawns `true` with `in_flight` at once for
/// `duration`, capturing output as remoteCMD does; prints the rate.
pub async fn spawn_loop(in_flight: usize, duration: Duration) {
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for _ in 0..in_flight.max(1) {
        set.spawn(async move {
            let mut hist = load::histogram();
            let (mut count, mut failed) = (0u64, 0u64);
            while Instant::now() < deadline {
                let sent = Instant::now();
                let out = tokio::process::Command::new("true")
                    .stdin(Stdio::null())
                    .output()
                    .await;
                match out {
                    Ok(out) if out.status.success() => {
                        load::record(&mut hist, sent);
                        count += 1;
                    }
                    _ => failed += 1,
                }
                if failed > 10 {
                    break;
                }
            }
            (hist, count, failed)
        });
    }
    let mut hist = load::histogram();
    let (mut count, mut failed) = (0, 0);
    while let Some(Ok((h, n, f))) = set.join_next().await {
        let _ = hist.add(&h);
        count += n;
        failed += f;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    println!(
        "rate={rate:.1} p50_us={:.1} p99_us={:.1} count={count} failed={failed}",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0
    );
}
