//! The report: `report/summary.md` (the figures and every violation) and
//! plots over time (SVG, drawn with plotters' SVG backend: no font or
//! system library needed) with the faults marked as shaded spans.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Context;
use plotters::prelude::*;

use crate::{
    check::{Bounds, Verdict, check},
    history::{Event, History},
};

/// Loads the run in `dir`, checks it, writes its report; true when clean.
pub fn check_and_report(dir: &Path, bounds: &Bounds) -> anyhow::Result<bool> {
    let history = History::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let verdict = check(&history, bounds);
    let out = dir.join("report");
    std::fs::create_dir_all(&out)?;
    let summary = summary(&history, &verdict, bounds);
    std::fs::write(out.join("summary.md"), &summary)?;
    plots(&history, &out)?;
    println!("{summary}");
    Ok(verdict.violations.is_empty())
}

fn percentile(sorted: &[i64], p: f64) -> String {
    if sorted.is_empty() {
        return "-".to_owned();
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    format!("{}", sorted[i])
}

fn summary(history: &History, verdict: &Verdict, bounds: &Bounds) -> String {
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut accepted, mut refused, mut cmds_ok, mut cmds_failed) = (0, 0, 0, 0);
    for event in &history.events {
        match event {
            Event::Fault { kind, .. } => *faults.entry(kind).or_default() += 1,
            Event::Accepted { .. } => accepted += 1,
            Event::Refused { .. } => refused += 1,
            Event::Cmd { ok: true, .. } => cmds_ok += 1,
            Event::Cmd { ok: false, .. } => cmds_failed += 1,
            _ => {}
        }
    }
    let agents: std::collections::BTreeSet<&str> =
        history.runs.iter().map(|r| r.agent.as_str()).collect();
    let mut s = String::new();
    let minutes = (history.end_ms - history.start_ms) as f64 / 60_000.0;
    let _ = writeln!(s, "# Soak report (seed {})\n", history.seed);
    let _ = writeln!(
        s,
        "Run: {minutes:.1} min from the first fault's margin to the final view; {} agents ran tasks.\n",
        agents.len()
    );
    let _ = writeln!(s, "| figure | value |\n|---|---|");
    let _ = writeln!(
        s,
        "| faults injected | {} |",
        faults.values().sum::<usize>()
    );
    for (kind, n) in &faults {
        let _ = writeln!(s, "| &nbsp; {kind} | {n} |");
    }
    let _ = writeln!(s, "| tasks (server's final view) | {} |", verdict.tasks);
    let _ = writeln!(
        s,
        "| operator submits accepted / refused | {accepted} / {refused} |"
    );
    let _ = writeln!(
        s,
        "| task runs in the agents' journals | {} |",
        verdict.runs
    );
    let _ = writeln!(
        s,
        "| reported missed/dead/cancelled (per agent) | {} |",
        verdict.reported
    );
    let _ = writeln!(
        s,
        "| queue tasks run twice, in flight at an agent's SIGKILL | {} |",
        verdict.in_flight_at_kill.len()
    );
    let _ = writeln!(
        s,
        "| queue tasks run twice, handed on at their ack timeout | {} |",
        verdict.redelivered_at_timeout.len()
    );
    let _ = writeln!(
        s,
        "| remote commands ok / failed | {cmds_ok} / {cmds_failed} |"
    );
    let l = &verdict.latencies;
    let _ = writeln!(
        s,
        "| delivery latency ms (created → handler start) p50 / p90 / p99 / max | {} / {} / {} / {} |",
        percentile(l, 0.5),
        percentile(l, 0.9),
        percentile(l, 0.99),
        percentile(l, 1.0)
    );
    let r = &verdict.reconnects;
    let _ = writeln!(
        s,
        "| reconnect ms after a fault's end (agents cut off) p50 / p90 / p99 / max, count | {} / {} / {} / {}, {} |",
        percentile(r, 0.5),
        percentile(r, 0.9),
        percentile(r, 0.99),
        percentile(r, 1.0),
        r.len()
    );
    let _ = writeln!(
        s,
        "| (agent, fault) pairs not judged: another fault still on | {} |",
        verdict.overlapped
    );
    let _ = writeln!(
        s,
        "| ERROR log lines (all explained by a fault unless listed below) | {} |",
        history.errors.len()
    );
    let _ = writeln!(s, "| **violations** | **{}** |", verdict.violations.len());
    let _ = writeln!(
        s,
        "| known, listed and not failed (agent spool; claims across a disconnect) | {} |",
        verdict.known.len()
    );
    let _ = writeln!(
        s,
        "\n## Growth over the second half (largest slope per minute)\n"
    );
    let _ = writeln!(
        s,
        "| process, metric | slope/min | bound/min |\n|---|---|---|"
    );
    for (key, slope) in &verdict.slopes {
        let (bound, unit) = match key.rsplit(' ').next() {
            Some("rss") => (bounds.rss_per_min, "bytes"),
            Some("size") => (bounds.store_per_min, "bytes"),
            Some("fds") => (bounds.fds_per_min, ""),
            _ => (bounds.threads_per_min, ""),
        };
        let _ = writeln!(s, "| {key} | {slope:.1} {unit} | {bound:.1} |");
    }
    let _ = writeln!(
        s,
        "\nIncarnations sampled too briefly in the second half to judge: {}.",
        verdict.unjudged
    );
    let _ = writeln!(
        s,
        "\nBounds: kill window {} ms; after a fault's end (plus keepalive detection for half-open connections) an attempt within {} ms and connected within {} ms; ERROR lines within {} ms of a fault; growth judged on settled samples over the second half (outside faults, and {} ms after a process started or the whole fleet was cut off); agent spool asserted: {}; claims kept across a disconnect asserted: {}.",
        bounds.kill_window_ms,
        bounds.reconnect_ms,
        bounds.back_ms,
        bounds.error_window_ms,
        bounds.settle_ms,
        bounds.spool,
        bounds.keep_claims
    );
    let mut by_check: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for v in &verdict.violations {
        by_check.entry(v.check).or_default().push(&v.detail);
    }
    let _ = writeln!(s, "\n## Violations\n");
    if by_check.is_empty() {
        let _ = writeln!(s, "None.");
    }
    for (check, details) in &by_check {
        let _ = writeln!(s, "### {check}: {}\n", details.len());
        for d in details.iter().take(50) {
            let _ = writeln!(s, "- {d}");
        }
        if details.len() > 50 {
            let _ = writeln!(s, "- … and {} more", details.len() - 50);
        }
        let _ = writeln!(s);
    }
    if !verdict.known.is_empty() {
        let _ = writeln!(
            s,
            "\n## Known, listed and not failed (`--spool`, `--keep-claims` assert them)\n"
        );
        for v in verdict.known.iter().take(50) {
            let _ = writeln!(s, "- {}: {}", v.check, v.detail);
        }
        if verdict.known.len() > 50 {
            let _ = writeln!(s, "- … and {} more", verdict.known.len() - 50);
        }
    }
    if !verdict.in_flight_at_kill.is_empty() {
        let _ = writeln!(
            s,
            "\n## Queue tasks in flight at an agent's SIGKILL (run again, allowed)\n"
        );
        let _ = writeln!(s, "{:?}", verdict.in_flight_at_kill);
    }
    if !verdict.redelivered_at_timeout.is_empty() {
        let _ = writeln!(
            s,
            "\n## Queue tasks handed on at their ack timeout (run again, allowed)\n"
        );
        let _ = writeln!(s, "{:?}", verdict.redelivered_at_timeout);
    }
    s
}

/// A series: a name and (seconds since the start, value) points.
type Series = (String, Vec<(f64, f64)>);

fn plots(history: &History, out: &Path) -> anyhow::Result<()> {
    let t0 = history.start_ms;
    let secs = |ms: i64| (ms - t0) as f64 / 1000.0;
    let faults: Vec<(f64, f64, String)> = history
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Fault {
                kind,
                start_ms,
                end_ms,
                ..
            } => Some((secs(*start_ms), secs(*end_ms), kind.clone())),
            _ => None,
        })
        .collect();
    // Per sampled process kind: the server, the harness, the largest agent.
    let mut rss: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    let mut fds: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    let mut threads: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for sample in &history.samples {
        let name = if sample.proc.starts_with("agent-") {
            "agents (largest)".to_owned()
        } else {
            sample.proc.clone()
        };
        let second = sample.at_ms / 1000;
        for (map, value) in [
            (&mut rss, sample.rss as f64 / 1048576.0),
            (&mut fds, sample.fds as f64),
            (&mut threads, sample.threads as f64),
        ] {
            let slot = map
                .entry(name.clone())
                .or_default()
                .entry(second)
                .or_insert(0.0);
            *slot = slot.max(value);
        }
    }
    let series = |map: BTreeMap<String, BTreeMap<i64, f64>>, skip_store: bool| -> Vec<Series> {
        map.into_iter()
            .filter(|(name, _)| !(skip_store && name == "store"))
            .map(|(name, points)| {
                (
                    name,
                    points
                        .into_iter()
                        .map(|(s, v)| (secs(s * 1000), v))
                        .collect(),
                )
            })
            .collect()
    };
    plot(
        &out.join("rss.svg"),
        "Resident memory (store: its size)",
        "MiB",
        &series(rss, false),
        &faults,
    )?;
    plot(
        &out.join("fds.svg"),
        "Open file descriptors",
        "fds",
        &series(fds, true),
        &faults,
    )?;
    plot(
        &out.join("threads.svg"),
        "Threads",
        "threads",
        &series(threads, true),
        &faults,
    )?;

    // Throughput and latency per 5 s bucket of run start.
    let created: BTreeMap<u64, i64> = history
        .view
        .tasks
        .iter()
        .map(|t| (t.id, t.created_ms))
        .collect();
    let mut buckets: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for run in &history.runs {
        let latency = created.get(&run.id).map_or(-1, |c| run.at_ms - c);
        buckets
            .entry((run.at_ms - t0).div_euclid(5000))
            .or_default()
            .push(latency);
    }
    let mut throughput = Vec::new();
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for (bucket, mut latencies) in buckets {
        let x = bucket as f64 * 5.0;
        throughput.push((x, latencies.len() as f64 / 5.0));
        latencies.retain(|l| *l >= 0);
        latencies.sort_unstable();
        if !latencies.is_empty() {
            p50.push((x, latencies[latencies.len() / 2] as f64));
            p99.push((x, latencies[(latencies.len() - 1) * 99 / 100] as f64));
        }
    }
    plot(
        &out.join("throughput.svg"),
        "Task runs per second (agents' journals)",
        "runs/s",
        &[("runs".to_owned(), throughput)],
        &faults,
    )?;
    plot(
        &out.join("latency.svg"),
        "Delivery latency (created → handler start)",
        "ms",
        &[("p50".to_owned(), p50), ("p99".to_owned(), p99)],
        &faults,
    )?;

    // Connected agents, from every connection change.
    let mut changes: Vec<(i64, &str, bool)> = history
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Conn { agent, up, at_ms } => Some((*at_ms, agent.as_str(), *up)),
            _ => None,
        })
        .collect();
    changes.sort_unstable();
    let mut up: BTreeMap<&str, bool> = BTreeMap::new();
    let mut count = 0i64;
    // One point per second (the count at its end): 2,000 agents change
    // state tens of thousands of times, and the SVG stays small.
    let mut per_second: BTreeMap<i64, f64> = BTreeMap::new();
    for (at, agent, now) in changes {
        let was = up.insert(agent, now).unwrap_or(false);
        count += i64::from(now) - i64::from(was);
        per_second.insert(at.div_euclid(1000), count as f64);
    }
    let connected: Vec<(f64, f64)> = per_second
        .into_iter()
        .map(|(s, c)| (secs(s * 1000), c))
        .collect();
    plot(
        &out.join("connected.svg"),
        "Connected agents",
        "agents",
        &[("connected".to_owned(), connected)],
        &faults,
    )?;
    Ok(())
}

/// plotters' errors borrow the backend: kept as text.
fn drawing(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

/// One line plot over time with the faults shaded.
fn plot(
    path: &Path,
    title: &str,
    unit: &str,
    series: &[Series],
    faults: &[(f64, f64, String)],
) -> anyhow::Result<()> {
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .chain(faults.iter().map(|f| f.1))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start (shaded: faults)")
        .y_desc(unit)
        .draw()
        .map_err(drawing)?;
    let shade = RGBColor(230, 90, 60).mix(0.15);
    chart
        .draw_series(faults.iter().map(|(start, end, _)| {
            Rectangle::new(
                [(*start, 0.0), (end.max(start + x_max / 500.0), y_max)],
                shade.filled(),
            )
        }))
        .map_err(drawing)?;
    chart
        .draw_series(faults.iter().map(|(start, _, kind)| {
            Text::new(
                kind.clone(),
                (*start, y_max * 0.98),
                ("sans-serif", 9).into_font().color(&RED),
            )
        }))
        .map_err(drawing)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(drawing)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(drawing)?;
    root.present().map_err(drawing)?;
    Ok(())
}
