//! The end of a run: the drain (generation and jobs stopped, then a wait
//! until no task is open) and the servers' final view through their admin
//! API. With two servers on one database each is asked, and whether they
//! agree is a harness check.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use contactd::proto::admin as pb;
use nix::sys::signal::Signal;

use crate::{
    fleet::Fleet,
    history::{Event, FinalTask, FinalView, Owed, kind_of},
    now_ms,
};

/// Stops generation and jobs, then waits until no task is pending or
/// delivered (twice in a row), bounded by `limit`.
pub async fn drain(fleet: &Fleet, limit: Duration) -> anyhow::Result<()> {
    fleet.write_configs(false)?;
    for i in 0..fleet.servers.len() {
        fleet.signal_server(i, Signal::SIGHUP).await?;
    }
    let deadline = Instant::now() + limit;
    let mut quiet = 0;
    let mut open = usize::MAX;
    while Instant::now() < deadline && quiet < 2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A task is open if any server lists it so (each counted once).
        let mut open_ids = BTreeSet::new();
        for i in 0..fleet.servers.len() {
            for task in list_tasks(fleet, i).await? {
                if matches!(
                    pb::TaskState::try_from(task.state),
                    Ok(pb::TaskState::Pending | pb::TaskState::Delivered)
                ) {
                    open_ids.insert(task.id);
                }
            }
        }
        open = open_ids.len();
        quiet = if open == 0 { quiet + 1 } else { 0 };
    }
    if open > 0 {
        eprintln!("soak: {open} tasks still open after the drain ({limit:?})");
    }
    Ok(())
}

async fn list_tasks(fleet: &Fleet, server: usize) -> anyhow::Result<Vec<pb::Task>> {
    let mut admin = fleet.admin(server).await?;
    let mut tasks = Vec::new();
    let mut after_id = 0;
    // Pages of about 1 MiB; bounded by the count of tasks ever made.
    for _ in 0..100_000 {
        let page = admin
            .list_tasks(pb::ListTasksRequest {
                state: 0,
                limit: 0,
                after_id,
            })
            .await?
            .into_inner();
        after_id = page.tasks.last().map_or(after_id, |t| t.id);
        tasks.extend(page.tasks);
        if !page.more {
            break;
        }
    }
    Ok(tasks)
}

/// The servers' view at the end: every task, and per agent for tasks owed
/// to several; every agent and whether it is connected. With two servers
/// on one database each is asked, and the first's answer is kept for a
/// task both list. They must agree on every such task (the state is the
/// database's after the drain): a harness check says whether they did,
/// and how many tasks only one of them listed (a server lists what it
/// holds in memory, refreshed from the store).
pub async fn final_view(fleet: &Fleet) -> anyhow::Result<FinalView> {
    let mut views = Vec::new();
    for i in 0..fleet.servers.len() {
        views.push(server_view(fleet, i).await?);
    }
    let mut merged: BTreeMap<u64, FinalTask> = BTreeMap::new();
    let mut agents: BTreeMap<String, bool> = BTreeMap::new();
    let (mut both, mut only, mut differ) = (0, vec![0; views.len()], Vec::new());
    for (i, view) in views.iter().enumerate() {
        for task in &view.tasks {
            match merged.get(&task.id) {
                None => {
                    merged.insert(task.id, task.clone());
                }
                Some(kept) => {
                    both += 1;
                    // Per-agent rows are compared where they are owed: a
                    // queue task's row says where each server holds it.
                    let rows_owed = kind_of(&task.text).1 == Owed::Each;
                    if kept.state != task.state || (rows_owed && kept.agents != task.agents) {
                        differ.push(format!(
                            "task {} is {} {:?} on {} but {} {:?} on {}",
                            task.id,
                            kept.state,
                            kept.agents,
                            fleet.servers[0].name,
                            task.state,
                            task.agents,
                            fleet.servers[i].name
                        ));
                    }
                }
            }
        }
        if i > 0 {
            // An open task's rows from every server, in the kept one.
            for task in view
                .tasks
                .iter()
                .filter(|t| kind_of(&t.text).1 != Owed::Each)
            {
                if let Some(kept) = merged.get_mut(&task.id)
                    && kept.agents != task.agents
                {
                    for (agent, state) in &task.agents {
                        kept.agents.push((
                            agent.clone(),
                            format!("{state} on {}", fleet.servers[i].name),
                        ));
                    }
                }
            }
        }
        for (agent, connected) in &view.agents {
            *agents.entry(agent.clone()).or_default() |= connected;
        }
    }
    if views.len() > 1 {
        for (i, view) in views.iter().enumerate() {
            only[i] = view
                .tasks
                .iter()
                .filter(|t| {
                    views
                        .iter()
                        .enumerate()
                        .all(|(j, v)| j == i || v.tasks.iter().all(|u| u.id != t.id))
                })
                .count();
        }
        let what = format!(
            "the servers report the same state for the {both} tasks both list \
             ({} listed by one server only: {only:?}){}",
            only.iter().sum::<usize>(),
            differ
                .iter()
                .take(5)
                .map(|d| format!("; {d}"))
                .collect::<String>()
        );
        eprintln!("soak: {what}: {}", differ.is_empty());
        fleet.note(Event::Check {
            what,
            ok: differ.is_empty(),
            at_ms: now_ms(),
        });
    }
    Ok(FinalView {
        tasks: merged.into_values().collect(),
        agents,
    })
}

/// Server `i`'s view at the end.
async fn server_view(fleet: &Fleet, i: usize) -> anyhow::Result<FinalView> {
    let mut view = FinalView::default();
    let mut admin = fleet.admin(i).await?;
    for task in list_tasks(fleet, i).await? {
        let state = pb::TaskState::try_from(task.state)
            .unwrap_or(pb::TaskState::Unspecified)
            .as_str_name()
            .trim_start_matches("TASK_STATE_")
            .to_ascii_lowercase();
        let mut agents = Vec::new();
        // Per agent for tasks owed to several; and for a task still open,
        // where each server holds it (evidence for the report).
        let open = matches!(
            pb::TaskState::try_from(task.state),
            Ok(pb::TaskState::Pending | pb::TaskState::Delivered)
        );
        if kind_of(&task.text).1 == Owed::Each || open {
            let shown = admin
                .show_task(pb::TaskIdRequest { id: task.id })
                .await?
                .into_inner();
            for row in shown.agents {
                let state = pb::AgentTaskState::try_from(row.state)
                    .unwrap_or(pb::AgentTaskState::Unspecified)
                    .as_str_name()
                    .trim_start_matches("AGENT_TASK_STATE_")
                    .to_ascii_lowercase();
                agents.push((row.agent, state));
            }
            agents.sort();
        }
        view.tasks.push(FinalTask {
            id: task.id,
            text: task.text,
            state,
            created_ms: task.created_ms,
            last_agent: task.last_agent,
            agents,
        });
    }
    for agent in admin
        .list_agents(pb::ListAgentsRequest::default())
        .await?
        .into_inner()
        .agents
    {
        view.agents.insert(agent.name, agent.connected);
    }
    Ok(view)
}
