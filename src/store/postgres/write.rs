//! The writer's side: the `Statements` it prepares on its connection, the
//! calls a group commit sends (`calls`, `write_calls`), and `pipeline`,
//! which sends them all before reading the first answer.

use std::{future::Future, pin::Pin, task::Poll};

use tokio_postgres::{Client, Statement, types::ToSql};

use super::{
    CHANNEL, id,
    read::{RUN_COLUMNS, TASK_COLUMNS},
};
use crate::{
    model::TaskState,
    store::{Op, Write, cursor_parts},
};

/// Every statement the writer runs, prepared once per connection.
pub(super) struct Statements {
    insert_task: Statement,
    fire: Statement,
    job_fired: Statement,
    job: Statement,
    run: Statement,
    run_agent: Statement,
    notify: Statement,
    pub(super) reserve: Statement,
    pub(super) after: Statement,
    delivered: Statement,
    claimed: Statement,
    state: Statement,
    cancelled: Statement,
    retried: Statement,
    result: Statement,
    acked: Statement,
    acked_claim: Statement,
    relayed: Statement,
    cursor: Statement,
    agent: Statement,
    presence: Statement,
    /// This server's name: the runs it fires are its own to carry out,
    /// and it writes only those.
    server: String,
}

impl Statements {
    pub(super) async fn prepare(
        client: &Client,
        server: &str,
    ) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            server: server.to_owned(),
            insert_task: client
                .prepare(
                    "INSERT INTO tasks (id, text, target, created_ms, selector, job, direct) \
                     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], \
                     $5::text[], $6::text[], $7::boolean[])",
                )
                .await?,
            // The run's row first: its task is stored only if the row is
            // new (whichever server fires a nominal time first wins). The
            // server that fires it carries it out.
            fire: client
                .prepare(&format!(
                    "WITH run AS (INSERT INTO runs ({RUN_COLUMNS}, server) VALUES \
                     ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
                     $23) \
                     ON CONFLICT (job, nominal_ms) DO NOTHING RETURNING task_id) \
                     INSERT INTO tasks (id, text, target, created_ms, selector, job, direct) \
                     SELECT task_id, $18, $19, $20, $21, $2, $22 FROM run"
                ))
                .await?,
            job_fired: client
                .prepare(
                    "INSERT INTO jobs (name, last_nominal_ms) VALUES ($1, $2) \
                     ON CONFLICT (name) DO UPDATE SET \
                     last_nominal_ms = greatest(jobs.last_nominal_ms, excluded.last_nominal_ms)",
                )
                .await?,
            // The casts matter: without them PostgreSQL takes `$2` and
            // `$4` for INTEGER (from `coalesce(.., 0)`), the BIGINT values
            // cannot be sent, and the whole group commit they are in fails.
            job: client
                .prepare(
                    "INSERT INTO jobs (name, last_nominal_ms, paused, last_success_ms) \
                     VALUES ($1, coalesce($2::bigint, 0), coalesce($3, FALSE), \
                     coalesce($4::bigint, 0)) \
                     ON CONFLICT (name) DO UPDATE SET \
                     last_nominal_ms = greatest(jobs.last_nominal_ms, \
                                                coalesce($2, jobs.last_nominal_ms)), \
                     paused = coalesce($3, jobs.paused), \
                     last_success_ms = greatest(jobs.last_success_ms, coalesce($4, 0))",
                )
                .await?,
            // A run and its agents are written by the server carrying it
            // out only: a server that had lost the database while another
            // took its runs over changes none of them when it is back.
            run: client
                .prepare(
                    "UPDATE runs SET state = $2, finished_ms = $3, acked = $4, failed = $5, \
                     missed = $6, deadline_ms = $7 WHERE task_id = $1 AND server = $8",
                )
                .await?,
            run_agent: client
                .prepare(
                    "INSERT INTO run_agents (task_id, agent, state, tries, at_ms) \
                     SELECT $1::bigint, $2::text, $3::smallint, $4::integer, $5::bigint \
                     WHERE EXISTS (SELECT 1 FROM runs WHERE task_id = $1 AND server = $6) \
                     ON CONFLICT (task_id, agent) DO UPDATE SET \
                     state = excluded.state, tries = excluded.tries, at_ms = excluded.at_ms",
                )
                .await?,
            notify: client
                .prepare(&format!("SELECT pg_notify('{CHANNEL}', '')"))
                .await?,
            // The row stays locked until commit: the next server's
            // reservation waits, so tasks are committed in id order.
            reserve: client
                .prepare(
                    "UPDATE contactd_meta SET value = value + $1 WHERE key = 'next_id' \
                     RETURNING value - $1",
                )
                .await?,
            after: client
                .prepare(&format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE id > $1 ORDER BY id LIMIT $2"
                ))
                .await?,
            delivered: client
                .prepare(
                    "UPDATE tasks SET delivered = delivered + 1, \
                     state = CASE WHEN state = 0 THEN 1 ELSE state END WHERE id = $1",
                )
                .await?,
            // Only if no other agent's claim is in force: servers sharing
            // the database race for tasks, and exactly one wins each.
            claimed: client
                .prepare(
                    "UPDATE tasks SET delivered = delivered + 1, \
                     attempts = greatest(attempts + 1, $2), holder = $3, deadline_ms = $4, \
                     state = 1 \
                     WHERE id = $1 AND state < 2 \
                     AND (holder IS NULL OR holder = $3 OR deadline_ms < $5)",
                )
                .await?,
            state: client
                .prepare(
                    "UPDATE tasks SET state = $2, holder = NULL, deadline_ms = NULL \
                     WHERE id = $1 AND holder IS NOT DISTINCT FROM $3 \
                     AND deadline_ms IS NOT DISTINCT FROM $4",
                )
                .await?,
            cancelled: client
                .prepare(
                    "UPDATE tasks SET state = $2, \
                     holder = CASE WHEN $3 THEN holder END, \
                     deadline_ms = CASE WHEN $3 THEN deadline_ms END WHERE id = $1",
                )
                .await?,
            retried: client
                .prepare(
                    "UPDATE tasks SET state = $2, attempts = 0, holder = NULL, \
                     deadline_ms = NULL, retries = retries + 1 WHERE id = $1",
                )
                .await?,
            result: client
                .prepare(
                    "INSERT INTO results (task_id, agent, ok, text, at_ms) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (task_id, agent) DO UPDATE SET \
                     ok = excluded.ok, text = excluded.text, at_ms = excluded.at_ms",
                )
                .await?,
            // Queue mode: only from the agent holding the claim, and only
            // then its result is kept.
            acked_claim: client
                .prepare(
                    "WITH task AS (UPDATE tasks SET acked = acked + $2, failed = failed + $3, \
                     last_agent = $4, last_result = $5, holder = NULL, deadline_ms = NULL, \
                     state = $6 WHERE id = $1 AND state < 2 AND holder = $4 RETURNING id) \
                     INSERT INTO results (task_id, agent, ok, text, at_ms) \
                     SELECT id, $4, $7, $5, $8 FROM task \
                     ON CONFLICT (task_id, agent) DO UPDATE SET \
                     ok = excluded.ok, text = excluded.text, at_ms = excluded.at_ms",
                )
                .await?,
            // An ack of another server's run (the agent moved here): kept,
            // and counted, only if the agent is running it there; that
            // server reads it from `results` and carries the run on.
            relayed: client
                .prepare(&format!(
                    "WITH task AS (UPDATE tasks SET acked = acked + $2, failed = failed + $3, \
                     last_agent = $4, last_result = $5, \
                     state = CASE WHEN state < 2 THEN $6 ELSE state END \
                     WHERE id = $1 AND EXISTS (SELECT 1 FROM run_agents WHERE task_id = $1 \
                     AND agent = $4 AND state = {running}) RETURNING id) \
                     INSERT INTO results (task_id, agent, ok, text, at_ms) \
                     SELECT id, $4, $7, $5, $8 FROM task \
                     ON CONFLICT (task_id, agent) DO UPDATE SET \
                     ok = excluded.ok, text = excluded.text, at_ms = excluded.at_ms",
                    running = crate::model::RunAgentState::Running as u8
                ))
                .await?,
            acked: client
                .prepare(
                    "UPDATE tasks SET acked = acked + $2, failed = failed + $3, \
                     last_agent = $4, last_result = $5, holder = NULL, deadline_ms = NULL, \
                     state = CASE WHEN state < 2 THEN $6 ELSE state END WHERE id = $1",
                )
                .await?,
            cursor: client
                .prepare(
                    "INSERT INTO cursors (agent, watermark, above, sent_up_to, seen_ms, since) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (agent) DO UPDATE SET watermark = excluded.watermark, \
                     above = excluded.above, sent_up_to = excluded.sent_up_to, \
                     seen_ms = excluded.seen_ms, since = excluded.since \
                     WHERE cursors.seen_ms <= excluded.seen_ms",
                )
                .await?,
            agent: client
                .prepare(
                    "INSERT INTO agents (name, first_ms, last_ms, delivered, acked, failed) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (name) DO UPDATE SET \
                     first_ms = least(agents.first_ms, excluded.first_ms), \
                     last_ms = greatest(agents.last_ms, excluded.last_ms), \
                     delivered = excluded.delivered, acked = excluded.acked, \
                     failed = excluded.failed",
                )
                .await?,

            // A disconnect seen late by the server the agent left must not
            // undo its connect to another.
            presence: client
                .prepare(
                    "INSERT INTO agents (name, first_ms, last_ms, delivered, acked, failed, \
                     server, connected, address) VALUES ($1, $5, $5, 0, 0, 0, $2, $3, $4) \
                     ON CONFLICT (name) DO UPDATE SET \
                     last_ms = greatest(agents.last_ms, $5), \
                     server = CASE WHEN $3 THEN $2 ELSE agents.server END, \
                     address = CASE WHEN $3 THEN $4 ELSE agents.address END, \
                     connected = CASE WHEN $3 THEN TRUE \
                                      WHEN agents.server = $2 THEN FALSE \
                                      ELSE agents.connected END",
                )
                .await?,
        })
    }
}

fn state_code(state: TaskState) -> i16 {
    i16::from(state as u8)
}

/// One statement with its parameters, owned until it has run.
type Call<'a> = (&'a Statement, Vec<Box<dyn ToSql + Sync + Send>>);

/// What [`calls`] gives: the calls, the claims among them, the fires.
pub(super) type Calls<'a> = (Vec<Call<'a>>, Vec<(usize, usize, i64)>, Vec<(usize, u64)>);

/// The statements that apply `ops`, in order; which of them are queue
/// claims: (its index among the calls, the op's index, the task); and
/// which fire runs: (its index among the calls, the task).
pub(super) fn calls<'a>(s: &'a Statements, ops: &[Op<'_>]) -> Calls<'a> {
    let mut calls: Vec<Call<'a>> = Vec::with_capacity(ops.len() + 1);
    let mut claims = Vec::new();
    let mut fires = Vec::new();
    let mut published = false;
    // Roster rows (`agents`): written last, in name order. Every server
    // writes them, for agents that move between servers in bursts (after a
    // fault): taken in one order by all, their row locks cannot deadlock
    // two servers' group commits (a 40-minute soak saw one). The sort is
    // stable, so one agent's writes keep their order.
    let mut roster: Vec<&Write> = Vec::new();
    for (at, op) in ops.iter().enumerate() {
        match op {
            Op::Fire(tasks, runs) => {
                published = true;
                for (task, run) in tasks.iter().zip(*runs) {
                    if let Some(nominal) = run.nominal_ms {
                        calls.push((
                            &s.job_fired,
                            vec![Box::new(run.job.to_string()), Box::new(nominal)],
                        ));
                    }
                    fires.push((calls.len(), task.id));
                    calls.push((
                        &s.fire,
                        vec![
                            Box::new(id(run.task_id)),
                            Box::new(run.job.to_string()),
                            Box::new(run.nominal_ms),
                            Box::new(run.mode.to_string()),
                            Box::new(i16::from(run.state as u8)),
                            Box::new(run.target.to_string()),
                            Box::new(int(run.targets)),
                            Box::new(int(run.batch)),
                            Box::new(int(run.max_failed)),
                            Box::new(run.wait_ms),
                            Box::new(int(run.retries)),
                            Box::new(run.started_ms),
                            Box::new(run.deadline_ms),
                            Box::new(run.finished_ms),
                            Box::new(int(run.acked)),
                            Box::new(int(run.failed)),
                            Box::new(int(run.missed)),
                            Box::new(task.text.clone()),
                            Box::new(task.target.as_deref().map(str::to_owned)),
                            Box::new(crate::clock::unix_ms(task.created)),
                            Box::new(task.selector.as_ref().map(ToString::to_string)),
                            Box::new(task.direct),
                            Box::new(s.server.clone()),
                        ],
                    ));
                }
            }
            Op::Publish(tasks) => {
                let ids: Vec<i64> = tasks.iter().map(|t| id(t.id)).collect();
                let texts: Vec<String> = tasks.iter().map(|t| t.text.to_string()).collect();
                let targets: Vec<Option<String>> = tasks
                    .iter()
                    .map(|t| t.target.as_deref().map(str::to_owned))
                    .collect();
                let created: Vec<i64> = tasks
                    .iter()
                    .map(|t| crate::clock::unix_ms(t.created))
                    .collect();
                let selectors: Vec<Option<String>> = tasks
                    .iter()
                    .map(|t| t.selector.as_ref().map(ToString::to_string))
                    .collect();
                let jobs: Vec<Option<String>> = tasks
                    .iter()
                    .map(|t| t.job.as_deref().map(str::to_owned))
                    .collect();
                let direct: Vec<bool> = tasks.iter().map(|t| t.direct).collect();
                published = true;
                calls.push((
                    &s.insert_task,
                    vec![
                        Box::new(ids),
                        Box::new(texts),
                        Box::new(targets),
                        Box::new(created),
                        Box::new(selectors),
                        Box::new(jobs),
                        Box::new(direct),
                    ],
                ));
            }
            Op::Write(write @ (Write::Agent(_) | Write::Presence { .. })) => roster.push(write),
            Op::Write(write) => {
                if let Write::Claimed { id: task, .. } = write {
                    claims.push((calls.len(), at, id(*task)));
                }
                calls.extend(write_calls(s, write));
            }
        }
    }
    roster.sort_by_key(|write| match write {
        Write::Agent(agent) => Some(&agent.name),
        Write::Presence { name, .. } => Some(name),
        _ => None,
    });
    for write in roster {
        calls.extend(write_calls(s, write));
    }
    if published {
        // Sent at commit: every server reads the new tasks.
        calls.push((&s.notify, Vec::new()));
    }
    (calls, claims, fires)
}

/// The parameters of an ack kept only on a condition (`acked_claim`,
/// `relayed`): task, acked and failed increments, agent, text, the task's
/// state, ok, and when.
fn kept_ack(
    task: u64,
    agent: &str,
    ok: bool,
    text: &str,
    at_ms: i64,
) -> Vec<Box<dyn ToSql + Sync + Send>> {
    let state = if ok {
        TaskState::Acked
    } else {
        TaskState::Failed
    };
    vec![
        Box::new(id(task)),
        Box::new(i32::from(ok)),
        Box::new(i32::from(!ok)),
        Box::new(agent.to_owned()),
        Box::new(text.to_owned()),
        Box::new(state_code(state)),
        Box::new(ok),
        Box::new(at_ms),
    ]
}

/// A count as an INTEGER column.
fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn write_calls<'a>(s: &'a Statements, write: &Write) -> Vec<Call<'a>> {
    match write {
        Write::Job {
            name,
            last_nominal_ms,
            paused,
            last_success_ms,
        } => vec![(
            &s.job,
            vec![
                Box::new(name.to_string()),
                Box::new(*last_nominal_ms),
                Box::new(*paused),
                Box::new(*last_success_ms),
            ],
        )],
        Write::Run(run) => vec![(
            &s.run,
            vec![
                Box::new(id(run.task_id)),
                Box::new(i16::from(run.state as u8)),
                Box::new(run.finished_ms),
                Box::new(int(run.acked)),
                Box::new(int(run.failed)),
                Box::new(int(run.missed)),
                Box::new(run.deadline_ms),
                Box::new(s.server.clone()),
            ],
        )],
        Write::RunAgent(agent) => vec![(
            &s.run_agent,
            vec![
                Box::new(id(agent.task_id)),
                Box::new(agent.agent.to_string()),
                Box::new(i16::from(agent.state as u8)),
                Box::new(int(agent.tries)),
                Box::new(agent.at_ms),
                Box::new(s.server.clone()),
            ],
        )],
        Write::Delivered { ids } => ids
            .iter()
            .map(|task| -> Call<'a> { (&s.delivered, vec![Box::new(id(*task))]) })
            .collect(),
        Write::Claimed {
            id: task,
            attempt,
            holder,
            deadline_ms,
        } => vec![(
            &s.claimed,
            vec![
                Box::new(id(*task)),
                Box::new(i32::try_from(*attempt).unwrap_or(i32::MAX)),
                Box::new(holder.to_string()),
                Box::new(*deadline_ms),
                Box::new(crate::clock::now_ms()),
            ],
        )],
        Write::State {
            id: task,
            state,
            claim,
        } => vec![(
            &s.state,
            vec![
                Box::new(id(*task)),
                Box::new(state_code(*state)),
                Box::new(claim.as_ref().map(|(holder, _)| holder.to_string())),
                Box::new(claim.as_ref().map(|(_, deadline)| *deadline)),
            ],
        )],
        Write::Cancelled { id: task, held } => vec![(
            &s.cancelled,
            vec![
                Box::new(id(*task)),
                Box::new(state_code(TaskState::Cancelled)),
                Box::new(*held),
            ],
        )],
        Write::Retried { id: task } => vec![(
            &s.retried,
            vec![
                Box::new(id(*task)),
                Box::new(state_code(TaskState::Pending)),
            ],
        )],
        Write::Acked {
            id: task,
            agent,
            ok,
            text,
            at_ms,
            claimed,
        } => {
            let state = if *ok {
                TaskState::Acked
            } else {
                TaskState::Failed
            };
            if *claimed {
                return vec![(&s.acked_claim, kept_ack(*task, agent, *ok, text, *at_ms))];
            }
            vec![
                (
                    &s.result,
                    vec![
                        Box::new(id(*task)),
                        Box::new(agent.to_string()),
                        Box::new(*ok),
                        Box::new(text.clone()),
                        Box::new(*at_ms),
                    ],
                ),
                (
                    &s.acked,
                    vec![
                        Box::new(id(*task)),
                        Box::new(i32::from(*ok)),
                        Box::new(i32::from(!*ok)),
                        Box::new(agent.to_string()),
                        Box::new(text.clone()),
                        Box::new(state_code(state)),
                    ],
                ),
            ]
        }
        Write::Relayed {
            id: task,
            agent,
            ok,
            text,
            at_ms,
        } => vec![(&s.relayed, kept_ack(*task, agent, *ok, text, *at_ms))],
        Write::Cursor(saved) => {
            let (watermark, above) = cursor_parts(&saved.cursor);
            vec![(
                &s.cursor,
                vec![
                    Box::new(saved.agent.to_string()),
                    Box::new(id(watermark)),
                    Box::new(above),
                    Box::new(id(saved.sent_up_to)),
                    Box::new(saved.seen_ms),
                    Box::new(id(saved.since)),
                ],
            )]
        }
        Write::Presence {
            name,
            server,
            connected,
            address,
            at_ms,
        } => vec![(
            &s.presence,
            vec![
                Box::new(name.to_string()),
                Box::new(server.to_string()),
                Box::new(*connected),
                Box::new(address.clone()),
                Box::new(*at_ms),
            ],
        )],
        Write::Agent(agent) => vec![(
            &s.agent,
            vec![
                Box::new(agent.name.to_string()),
                Box::new(agent.first_ms),
                Box::new(agent.last_ms),
                Box::new(id(agent.delivered)),
                Box::new(id(agent.acked)),
                Box::new(id(agent.failed)),
            ],
        )],
    }
}

pub(super) type Pending<'a> =
    Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Runs `futures` to the end, first polling each once in order.
///
/// tokio-postgres sends a statement when its future is first polled and
/// the connection answers in the order it was sent, so every statement
/// goes out before the first answer is awaited: one round trip for all.
/// (`join_all` would do the same for a few, but over 30 futures it does
/// not promise the order it first polls them in.) After the first pass,
/// each wake-up polls from the first unfinished future on and stops at
/// the first still waiting: answers come in order.
pub(super) async fn pipeline(
    mut futures: Vec<Pending<'_>>,
) -> Vec<Result<u64, tokio_postgres::Error>> {
    let mut results: Vec<Option<Result<u64, tokio_postgres::Error>>> =
        std::iter::repeat_with(|| None)
            .take(futures.len())
            .collect();
    let mut first_pass = true;
    let mut done = 0;
    std::future::poll_fn(|cx| {
        for (at, future) in futures.iter_mut().enumerate().skip(done) {
            if results[at].is_some() {
                continue;
            }
            match future.as_mut().poll(cx) {
                Poll::Ready(result) => results[at] = Some(result),
                Poll::Pending if first_pass => {}
                Poll::Pending => break,
            }
        }
        first_pass = false;
        while done < results.len() && results[done].is_some() {
            done += 1;
        }
        if done == results.len() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    results.into_iter().map(Option::unwrap).collect()
}
