//! Jobs: `[[jobs]]` fired on their schedules, and their runs.
//!
//! **Firing.** One loop per server ([`Jobs::run`]) asks each job's
//! [`Schedule`] what is due at the wall-clock now, and fires it only while
//! this server holds the generator lease (always, but with a shared
//! database). A run is identified by its job and nominal fire time, and
//! [`Store::fire`] writes its row and its task in one transaction, unless
//! that job and time have a row already: so a restart, a SIGKILL or the
//! lease moving between servers never fires a period twice, and the job's
//! last nominal time (kept with the row) makes the next server start from
//! where the last one stopped. Periods that pass with no run (downtime, the
//! previous run still running with `overlap = "skip"`, a paused job) are
//! logged with their times and recorded, never fired in a burst.
//!
//! **Runs.** A `broadcast` run is a task published as `[tasks]` publishes
//! them (the server's delivery mode takes it from there). An `each` run
//! sends its task to every agent its target matches, at most `batch` at a
//! time, through the agents' mailboxes ([`Registry`]); an agent that fails
//! is sent it again up to `retries` times; when more than `max_failed`
//! agents failed the run halts until an operator resumes it. Agents that
//! connect and match while it runs join it. An `any` run sends it to one
//! matching agent, and to another after a failure (`retries` more). A run
//! ends when every agent it is for answered, or at its timeout (agents
//! still owed it are then `missed`). Each agent's state is written behind
//! to the store; after a restart the run resumes: agents that answered are
//! not sent it again, agents it was sent to are sent it again with the same
//! task id and retry (they dedupe, so they do not run it twice).
//!
//! With several servers sharing a database, a run is carried out by the
//! server that fired it, for the agents connected to that server: its row
//! names that server, which alone writes it and resumes it after a
//! restart. Every few seconds (`news`) each server reads what the
//! others wrote of its runs: acks made through them by agents that moved
//! there with the task (the ack path relays them), its runs taken over
//! while it could not reach the database, and the runs of servers gone
//! for `tasks.ack_timeout`, which it takes over once they stay gone as
//! long again (the gone server's name lock, free, is the proof it is not
//! running).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    Hub,
    caller::{Acked, Agent},
    direct::{Mailbox, Registry},
};
use crate::{
    clock::now_ms,
    config::{Amount, Config, JobConfig, JobMode, Overlap},
    model::{Draft, RunAgentState, RunState, Task, TaskState},
    proto::contact::ServerMsg,
    schedule::{Due, Schedule},
    selector::Selector,
    store::{Firing, JobRow, RunAgentRow, RunRecord, RunRow, Store, StoreError, Write},
};

/// The name ad hoc rollouts (`task submit --batch`) are kept under.
pub const AD_HOC: &str = "";

/// An ad hoc rollout's timeout.
pub const AD_HOC_TIMEOUT: Duration = Duration::from_secs(3600);

/// Ended runs kept in memory for `job show` (each holds a row per agent it
/// targeted, so the bound is in runs, like `tasks.max_runs`).
const ENDED: usize = 16;

/// Agents not connected a pump passes over at most, before it stops.
const SKIP_AWAY: usize = 256;

/// After a fire the store could not commit, the next try waits this long.
const FIRE_RETRY: Duration = Duration::from_secs(1);

/// The longest the loop sleeps without looking again (a clock step, a
/// lease change).
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// How long an `any` run waits for its agent to come back before handing
/// its task on, until a config gives `tasks.ack_timeout` (its default).
const HAND_ON: Duration = Duration::from_secs(60);

/// Several servers sharing a database: how often each reads the jobs'
/// state the others wrote (their runs, an operator's pause through them).
const REREAD: Duration = Duration::from_secs(5);

/// Why an operator's request about a job or run was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobRefused {
    #[error("no job {0:?} in the config ([[jobs]] name)")]
    NoJob(String),
    #[error("no run {0}: never started, or deleted since (tasks.keep_for)")]
    NoRun(u64),
    #[error("run {0} is {1}: only a halted run can be resumed")]
    NotHalted(u64, RunState),
    #[error("run {0} is {1}: only a running rollout (mode each) can be halted")]
    NotRunning(u64, RunState),
    #[error("{0} runs are in progress (tasks.max_runs): wait for one to end, or raise the bound")]
    TooMany(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// A job as `contactd jobs` shows it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub name: Arc<str>,
    pub schedule: String,
    pub target: String,
    pub mode: JobMode,
    pub paused: bool,
    /// The next nominal fire time (unix ms).
    pub next_ms: Option<i64>,
    /// Its latest run: id, state, start (unix ms).
    pub last_run: Option<(u64, RunState, i64)>,
    pub last_success_ms: i64,
    /// Its runs in progress, and halted.
    pub running: usize,
    pub halted: usize,
}

/// A run as `contactd job show` shows it.
#[derive(Debug, Clone)]
pub struct RunView {
    pub run: RunRow,
    pub text: String,
    pub agents: Vec<RunAgentRow>,
}

/// The metrics' view of jobs, read at a scrape.
#[derive(Debug, Clone, Default)]
pub struct JobStats {
    /// Runs ended since the start, by job and outcome.
    pub outcomes: Vec<(Arc<str>, &'static str, u64)>,
    /// Per configured job: its latest success (unix ms, 0: none).
    pub last_success: Vec<(Arc<str>, i64)>,
    pub running: usize,
    pub halted: usize,
    /// Per configured job: what judging its successes takes.
    pub schedules: Vec<JobSchedule>,
}

/// A configured job's schedule, as the metrics read it at a scrape.
#[derive(Debug, Clone)]
pub struct JobSchedule {
    pub name: Arc<str>,
    pub schedule: Schedule,
    /// Paused: no run is expected.
    pub paused: bool,
    /// When this server began scheduling it: its start, or the reload that
    /// added the job (unix ms; kept in memory only).
    pub since_ms: i64,
}

/// What a run is asked to be (a job's, or an operator's rollout).
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub job: Arc<str>,
    pub nominal_ms: Option<i64>,
    pub text: String,
    pub selector: Arc<Selector>,
    pub mode: JobMode,
    pub batch: Amount,
    pub max_failed: Amount,
    pub wait: Duration,
    pub timeout: Duration,
    pub retries: u32,
}

/// The jobs and runs of this server (see the module's documentation).
#[derive(Debug)]
pub struct Jobs {
    store: Store,
    /// Where a fired run's task is (so `tasks` shows its counters).
    hub: Arc<Hub>,
    epoch: u64,
    registry: Registry,
    inner: Mutex<Inner>,
    /// Wakes the loop: config applied, a run changed its timers.
    wake: Notify,
    /// Runs in progress or halted (`inner.runs.len()`, read without the
    /// lock).
    active: AtomicUsize,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<Arc<str>, Job>,
    /// What the store says of every job it knows (configured or not).
    rows: HashMap<Arc<str>, JobRow>,
    runs: HashMap<u64, Run>,
    max_runs: usize,
    outcomes: BTreeMap<(Arc<str>, &'static str), u64>,
    /// After a failed fire: no fire before this (unix ms).
    retry_at_ms: i64,
    /// The runs that ended last, at most [`ENDED`], oldest first.
    ended: VecDeque<RunView>,
    /// `tasks.ack_timeout`: how long an `any` run waits for its agent to
    /// come back before it hands its task on ([`HAND_ON`] until
    /// configured).
    hand_on_ms: Option<i64>,
    /// Several servers: the others whose runs are orphans (the server
    /// stopped, or its heartbeat is older than `tasks.ack_timeout`), since
    /// when this server has seen them so; taken over after
    /// `tasks.ack_timeout` more.
    orphaned: HashMap<Arc<str>, i64>,
}

#[derive(Debug)]
struct Job {
    config: Arc<JobConfig>,
    schedule: Schedule,
    selector: Arc<Selector>,
    last_nominal_ms: i64,
    paused: bool,
    last_success_ms: i64,
    next_ms: Option<i64>,
    last_run: Option<(u64, RunState, i64)>,
    /// See [`JobSchedule::since_ms`].
    since_ms: i64,
}

#[derive(Debug)]
struct Run {
    row: RunRow,
    task: Arc<Task>,
    selector: Arc<Selector>,
    mode: JobMode,
    agents: HashMap<Arc<str>, AgentRun>,
    /// Owed agents, in the order they are sent it.
    owed: VecDeque<Arc<str>>,
    running: usize,
    /// No agent is sent it before this (`rollout.wait` after an answer).
    next_slot_ms: i64,
    /// Failures before the last resume: the next halt counts from here.
    halt_base: u32,
    /// `any` runs: agents running its task whose stream ended, since when.
    /// One away longer than `tasks.ack_timeout` is counted missed and the
    /// task goes to the next matching agent: with several servers, an
    /// agent that moved to another one never comes back here.
    away: HashMap<Arc<str>, i64>,
}

#[derive(Debug, Clone, Copy)]
struct AgentRun {
    state: RunAgentState,
    tries: u32,
    at_ms: i64,
}

impl Jobs {
    /// Jobs over `store`, with the jobs and unfinished runs it kept (`task`
    /// finds a run's task).
    pub fn restore(
        store: Store,
        hub: Arc<Hub>,
        epoch: u64,
        rows: Vec<JobRow>,
        runs: Vec<RunRecord>,
        task: impl Fn(u64) -> Option<Arc<Task>>,
    ) -> Jobs {
        let mut inner = Inner {
            rows: rows.into_iter().map(|r| (Arc::clone(&r.name), r)).collect(),
            ..Inner::default()
        };
        for record in runs {
            let Some(task) = task(record.run.task_id) else {
                tracing::warn!(
                    run = record.run.task_id,
                    job = %record.run.job,
                    "a run's task is no longer stored: the run is not resumed"
                );
                continue;
            };
            let run = Run::restored(record, task);
            tracing::info!(
                run = run.row.task_id,
                job = %run.row.job,
                state = %run.row.state,
                agents = run.agents.len(),
                "run resumed after a restart"
            );
            inner.runs.insert(run.row.task_id, run);
        }
        let jobs = Jobs {
            store,
            hub,
            epoch,
            registry: Registry::default(),
            active: AtomicUsize::new(inner.runs.len()),
            inner: Mutex::new(inner),
            wake: Notify::new(),
        };
        let now = now_ms();
        let mut inner = jobs.inner.lock();
        for run in inner.runs.values_mut() {
            run.carried_on(&jobs.registry, jobs.epoch, now);
        }
        drop(inner);
        jobs
    }

    /// Takes the jobs of `config` (added, changed, removed) and
    /// `tasks.max_runs`; at start-up and at each reload.
    pub fn configure(&self, config: &Config) {
        self.configure_at(config, now_ms());
    }

    /// [`configure`](Self::configure) at `now` (unix ms).
    fn configure_at(&self, config: &Config, now: i64) {
        let mut writes = Vec::new();
        {
            let mut inner = self.inner.lock();
            inner.max_runs = config.tasks.max_runs;
            inner.hand_on_ms = Some(millis(config.tasks.ack_timeout));
            let mut jobs = BTreeMap::new();
            for job in &config.jobs {
                let Ok(schedule) = job.schedule() else {
                    // check-config refuses it; a reload cannot bring it.
                    continue;
                };
                let name: Arc<str> = Arc::from(job.name.as_str());
                let old = inner.jobs.remove(&name);
                let row = inner.rows.get(&name).cloned();
                let (last_nominal_ms, paused, last_success_ms) = match (&old, &row) {
                    (Some(old), _) => (old.last_nominal_ms, old.paused, old.last_success_ms),
                    (None, Some(row)) => (row.last_nominal_ms, row.paused, row.last_success_ms),
                    (None, None) => {
                        // First scheduled now: nothing before now is due.
                        writes.push(Write::Job {
                            name: Arc::clone(&name),
                            last_nominal_ms: Some(now),
                            paused: None,
                            last_success_ms: None,
                        });
                        inner.rows.insert(
                            Arc::clone(&name),
                            JobRow {
                                name: Arc::clone(&name),
                                last_nominal_ms: now,
                                paused: false,
                                last_success_ms: 0,
                            },
                        );
                        (now, false, 0)
                    }
                };
                // The first period after the last one fired: if it passed
                // while the server was down, it is due now (`missed`).
                let next_ms = schedule.next_after(last_nominal_ms);
                let since_ms = old.as_ref().map_or(now, |o| o.since_ms);
                let last_run = old.and_then(|o| o.last_run);
                jobs.insert(
                    Arc::clone(&name),
                    Job {
                        config: Arc::new(job.clone()),
                        selector: Arc::new(job.selector()),
                        schedule,
                        last_nominal_ms,
                        paused,
                        last_success_ms,
                        next_ms,
                        last_run,
                        since_ms,
                    },
                );
            }
            for removed in inner.jobs.keys() {
                tracing::info!(job = %removed, "job removed from the config: no longer scheduled");
            }
            inner.jobs = jobs;
        }
        for write in writes {
            self.store.record(write);
        }
        self.wake.notify_one();
    }

    /// A new `getTask` stream of `agent` (named): its mailbox. Runs in
    /// progress send it what it is owed: what they sent it before and it
    /// did not answer, and, if it matches a run it is not in yet, that run.
    pub fn join(&self, agent: &Agent) -> Arc<Mailbox> {
        let mailbox = self.registry.join(&agent.name, &agent.labels);
        let labels = agent.labels.load();
        let now = now_ms();
        let mut inner = self.inner.lock();
        for run in inner.runs.values_mut() {
            run.joined(&agent.name, &labels, &self.registry, self.epoch, now);
        }
        drop(inner);
        self.pump_all();
        mailbox
    }

    /// A stream of `name` ended: an `any` run it was running notes since
    /// when it is away ([`Run::away`]).
    pub fn left(&self, name: &str) {
        self.registry.left(name);
        if self.active.load(Relaxed) == 0 {
            return;
        }
        let now = now_ms();
        let mut inner = self.inner.lock();
        for run in inner.runs.values_mut() {
            if run.mode != JobMode::Any {
                continue;
            }
            if let Some((key, agent)) = run.agents.get_key_value(name)
                && agent.state == RunAgentState::Running
            {
                run.away.entry(Arc::clone(key)).or_insert(now);
            }
        }
    }

    /// An ack of a run's task from `agent`; `None` when `id` is not the
    /// task of a run in progress here.
    pub fn ack(&self, agent: &Agent, id: u64, ok: bool) -> Option<Acked> {
        // Every ack comes through here: with no run in progress, without
        // taking the lock.
        if self.active.load(Relaxed) == 0 {
            return None;
        }
        let now = now_ms();
        let mut inner = self.inner.lock();
        if !inner.runs.get(&id)?.task.direct {
            return None;
        }
        let acked = self.answered(&mut inner, id, &agent.name, ok, now);
        drop(inner);
        if let Acked::Counted { .. } = acked {
            self.pump(id);
        }
        Some(acked)
    }

    /// Agent `name` answered run `id`'s task (through this server, or
    /// through another: [`news`](Self::news)).
    fn answered(&self, inner: &mut Inner, id: u64, name: &Arc<str>, ok: bool, now: i64) -> Acked {
        let Some(run) = inner.runs.get_mut(&id) else {
            return Acked::Ignored;
        };
        let Some(entry) = run.agents.get_mut(name) else {
            return Acked::Refused("the run never sent its task to this agent");
        };
        if entry.state != RunAgentState::Running {
            // Late or repeated (after a resend): it changes nothing.
            return Acked::Ignored;
        }
        run.running -= 1;
        run.next_slot_ms = now + run.row.wait_ms;
        entry.at_ms = now;
        let retry = !ok
            && match run.mode {
                JobMode::Each => entry.tries <= run.row.retries,
                _ => false,
            };
        entry.state = if ok {
            RunAgentState::Acked
        } else if retry {
            RunAgentState::Owed
        } else {
            RunAgentState::Failed
        };
        let row = run.agent_row(name);
        if retry {
            run.owed.push_front(Arc::clone(name));
        } else if ok {
            run.row.acked += 1;
        } else {
            run.row.failed += 1;
        }
        self.store.record(Write::RunAgent(row));
        if !retry {
            run.task.progress.record_ack(ok, name, String::new());
        }
        self.settle(inner, id, now);
        Acked::Counted { ok }
    }

    /// Starts a run now: an operator's (`job run`, or an ad hoc rollout).
    ///
    /// # Errors
    /// Too many runs in progress, or the store could not keep it.
    pub async fn start(&self, plan: RunPlan) -> Result<u64, JobRefused> {
        {
            let inner = self.inner.lock();
            let active = inner.active();
            if plan.mode != JobMode::Broadcast && active >= inner.max_runs {
                return Err(JobRefused::TooMany(active));
            }
        }
        let (firing, targets) = self.firing(&plan, now_ms());
        let row = firing.run.clone();
        let ids = self.store.fire(vec![firing]).await?;
        let id = ids
            .first()
            .copied()
            .flatten()
            .ok_or_else(|| JobRefused::Invalid("the run was fired already".into()))?;
        self.started(&plan, row, targets, id);
        Ok(id)
    }

    /// Fires `job` now (`contactd job run NAME`), whatever its schedule.
    ///
    /// # Errors
    /// No such job, too many runs, or the store could not keep it.
    pub async fn run_now(&self, job: &str) -> Result<u64, JobRefused> {
        let plan = {
            let inner = self.inner.lock();
            let job = inner
                .jobs
                .get(job)
                .ok_or_else(|| JobRefused::NoJob(job.to_owned()))?;
            job.plan(None)
        };
        self.start(plan).await
    }

    /// Pauses or resumes a job's schedule (its runs in progress go on).
    ///
    /// # Errors
    /// No such job, or the store could not keep the change.
    pub async fn pause(&self, job: &str, paused: bool) -> Result<(), JobRefused> {
        let name = {
            let mut inner = self.inner.lock();
            let entry = inner
                .jobs
                .get_mut(job)
                .ok_or_else(|| JobRefused::NoJob(job.to_owned()))?;
            entry.paused = paused;
            let name: Arc<str> = Arc::from(entry.config.name.as_str());
            if let Some(row) = inner.rows.get_mut(job) {
                row.paused = paused;
            }
            name
        };
        self.store
            .write_now(Write::Job {
                name,
                last_nominal_ms: None,
                paused: Some(paused),
                last_success_ms: None,
            })
            .committed()
            .await?;
        tracing::info!(
            job,
            paused,
            "job {}",
            if paused { "paused" } else { "resumed" }
        );
        self.wake.notify_one();
        Ok(())
    }

    /// Resumes a halted run: it sends again, and halts again after
    /// `max_failed + 1` more failures.
    ///
    /// # Errors
    /// No such run here, or it is not halted.
    pub async fn resume(&self, id: u64) -> Result<(), JobRefused> {
        self.turn(id, JobRefused::NotHalted, |run| {
            if run.row.state != RunState::Halted {
                return false;
            }
            run.row.state = RunState::Running;
            run.halt_base = run.row.failed;
            true
        })
        .await?;
        tracing::info!(run = id, "run resumed by an operator");
        let now = now_ms();
        {
            let mut inner = self.inner.lock();
            self.settle(&mut inner, id, now);
        }
        self.pump(id);
        Ok(())
    }

    /// Halts a running rollout by hand, as too many failures would: nothing
    /// more is sent (what is out may still answer) until it is resumed, and
    /// its deadline still ends it.
    ///
    /// # Errors
    /// No such run here, or it is not a running rollout.
    pub async fn halt(&self, id: u64) -> Result<(), JobRefused> {
        self.turn(id, JobRefused::NotRunning, |run| {
            if run.row.state != RunState::Running || run.mode != JobMode::Each {
                return false;
            }
            run.row.state = RunState::Halted;
            true
        })
        .await?;
        tracing::info!(run = id, "run halted by an operator");
        self.wake.notify_one();
        Ok(())
    }

    /// An operator's turn of run `id` (halt, resume): `change` changes the
    /// run in memory, or answers false when its state does not allow it
    /// (then `refused` says why); the new row is committed before the
    /// caller goes on. A run not held here has ended (or never started):
    /// refused with its stored state.
    async fn turn(
        &self,
        id: u64,
        refused: fn(u64, RunState) -> JobRefused,
        change: impl FnOnce(&mut Run) -> bool,
    ) -> Result<(), JobRefused> {
        let row = {
            let mut inner = self.inner.lock();
            inner.runs.get_mut(&id).map(|run| {
                if change(run) {
                    Ok(run.row.clone())
                } else {
                    Err(refused(id, run.row.state))
                }
            })
        };
        let row = match row {
            Some(row) => row?,
            None => {
                return match self.store.run(id).await? {
                    Some(record) => Err(refused(id, record.run.state)),
                    None => Err(JobRefused::NoRun(id)),
                };
            }
        };
        self.store.write_now(Write::Run(row)).committed().await?;
        Ok(())
    }

    /// Every configured job.
    pub fn list(&self) -> Vec<JobView> {
        let inner = self.inner.lock();
        inner
            .jobs
            .iter()
            .map(|(name, job)| {
                let (running, halted) = inner.runs.values().filter(|r| r.row.job == *name).fold(
                    (0, 0),
                    |(running, halted), r| match r.row.state {
                        RunState::Running => (running + 1, halted),
                        RunState::Halted => (running, halted + 1),
                        _ => (running, halted),
                    },
                );
                JobView {
                    name: Arc::clone(name),
                    schedule: job.config.schedule_text(),
                    target: job.selector.to_string(),
                    mode: job.config.mode,
                    paused: job.paused,
                    next_ms: job.next_ms,
                    last_run: job.last_run,
                    last_success_ms: job.last_success_ms,
                    running,
                    halted,
                }
            })
            .collect()
    }

    /// One run: from memory while it is in progress, else from the store.
    ///
    /// # Errors
    /// No such run, or the store cannot be read.
    pub async fn show(&self, id: u64) -> Result<RunView, JobRefused> {
        {
            let inner = self.inner.lock();
            if let Some(run) = inner.runs.get(&id) {
                return Ok(run.view());
            }
            // Ended lately: kept here too, for the memory store (which
            // keeps nothing) and for who follows a run to its end.
            if let Some(view) = inner.ended.iter().find(|v| v.run.task_id == id) {
                return Ok(view.clone());
            }
        }
        let record = self.store.run(id).await?.ok_or(JobRefused::NoRun(id))?;
        let text = self
            .store
            .task(id)
            .await?
            .map(|t| t.task.text)
            .unwrap_or_default();
        Ok(RunView {
            run: record.run,
            text,
            agents: record.agents,
        })
    }

    /// The metrics' view.
    pub fn stats(&self) -> JobStats {
        let inner = self.inner.lock();
        JobStats {
            outcomes: inner
                .outcomes
                .iter()
                .map(|((job, outcome), n)| (Arc::clone(job), *outcome, *n))
                .collect(),
            last_success: inner
                .jobs
                .iter()
                .map(|(name, job)| (Arc::clone(name), job.last_success_ms))
                .collect(),
            running: inner
                .runs
                .values()
                .filter(|r| r.row.state == RunState::Running)
                .count(),
            halted: inner
                .runs
                .values()
                .filter(|r| r.row.state == RunState::Halted)
                .count(),
            schedules: inner
                .jobs
                .iter()
                .map(|(name, job)| JobSchedule {
                    name: Arc::clone(name),
                    schedule: job.schedule.clone(),
                    paused: job.paused,
                    since_ms: job.since_ms,
                })
                .collect(),
        }
    }

    /// Fires the jobs on their schedules and keeps runs' timers, until
    /// `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut leader = self.store.leader();
        let mut was_leader = *leader.borrow();
        let mut reread_at = now_ms() + millis(REREAD);
        // Only a shared database's watcher moves the lease; with SQLite or
        // the memory store its sender is gone from the start, and a closed
        // channel's `changed()` is ready at once, every time: awaiting it
        // made this loop spin (a whole core, with or without jobs).
        let mut lease_moves = true;
        loop {
            let is_leader = *leader.borrow_and_update();
            // Several servers: what the others fired, and pauses and
            // resumes said to them, from the database.
            if self.store.is_shared() && ((is_leader && !was_leader) || now_ms() >= reread_at) {
                self.reread().await;
                self.news().await;
                reread_at = now_ms() + millis(REREAD);
            }
            was_leader = is_leader;
            let now = now_ms();
            self.timers(now);
            if is_leader {
                self.fire_due(now).await;
            }
            let next = self.next_wake(now_ms());
            let sleep =
                Duration::from_millis(u64::try_from(next - now_ms()).unwrap_or(0)).min(MAX_SLEEP);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(sleep) => {}
                () = self.wake.notified() => {}
                changed = leader.changed(), if lease_moves => lease_moves = changed.is_ok(),
            }
        }
    }

    /// Another server held the lease: what it fired, as the store says.
    async fn reread(&self) {
        match self.store.jobs().await {
            Ok(rows) => {
                let mut inner = self.inner.lock();
                for row in rows {
                    if let Some(job) = inner.jobs.get_mut(&row.name) {
                        if row.last_nominal_ms > job.last_nominal_ms {
                            job.last_nominal_ms = row.last_nominal_ms;
                            job.next_ms = job.schedule.next_after(row.last_nominal_ms);
                        }
                        job.paused = row.paused;
                        job.last_success_ms = job.last_success_ms.max(row.last_success_ms);
                    }
                    inner.rows.insert(Arc::clone(&row.name), row);
                }
            }
            Err(e) => tracing::warn!("cannot read the jobs' last runs from the task store: {e}"),
        }
    }

    /// Several servers: what the database says of this server's runs.
    /// Acks of their tasks made through another server (the agent moved
    /// there) are counted; a run another server took over (while this one
    /// could not reach the database) is left to it; and the runs of a
    /// server gone for `tasks.ack_timeout` (seen so here for as long
    /// again) are taken over and carried on here.
    async fn news(&self) {
        let now = now_ms();
        let (mine, after) = {
            let inner = self.inner.lock();
            let mine: Vec<(u64, i64)> = inner
                .runs
                .values()
                .map(|run| {
                    let since = run
                        .agents
                        .values()
                        .filter(|a| a.state == RunAgentState::Running)
                        .map(|a| a.at_ms)
                        .min()
                        .unwrap_or(i64::MAX);
                    (run.row.task_id, since)
                })
                .collect();
            (mine, inner.hand_on_ms.unwrap_or(millis(HAND_ON)))
        };
        let news = match self.store.runs_news(mine, now - after).await {
            Ok(news) => news,
            Err(e) => {
                tracing::debug!("cannot read the runs' news from the task store: {e}");
                return;
            }
        };
        let mut pumped = Vec::new();
        let mut adopt: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
        {
            let mut inner = self.inner.lock();
            for ack in news.relayed {
                let at_or_after = inner
                    .runs
                    .get(&ack.task_id)
                    .and_then(|run| run.agents.get(&ack.agent))
                    .is_some_and(|a| a.state == RunAgentState::Running && ack.at_ms >= a.at_ms);
                if at_or_after
                    && let Acked::Counted { ok } =
                        self.answered(&mut inner, ack.task_id, &ack.agent, ack.ok, now)
                {
                    tracing::info!(
                        run = ack.task_id,
                        agent = %ack.agent,
                        ok,
                        "job run: its agent answered through another server"
                    );
                    pumped.push(ack.task_id);
                }
            }
            for (id, server) in news.taken {
                if let Some(run) = inner.runs.remove(&id) {
                    tracing::warn!(
                        run = id,
                        job = %shown_job(&run.row.job),
                        server = %server,
                        "job run taken over by another server (this one was away from the \
                         database for tasks.ack_timeout): carried on there, no longer here"
                    );
                }
            }
            self.active.store(inner.runs.len(), Relaxed);
            let mut seen: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
            for (id, server) in news.orphans {
                seen.entry(server).or_default().push(id);
            }
            inner.orphaned.retain(|server, _| seen.contains_key(server));
            for (server, ids) in seen {
                let since = *inner.orphaned.entry(Arc::clone(&server)).or_insert(now);
                if now - since >= after {
                    // Only the runs whose task is here to send.
                    let ids: Vec<u64> = ids
                        .into_iter()
                        .filter(|id| self.hub.get(*id).is_some_and(|t| !t.void))
                        .collect();
                    if !ids.is_empty() {
                        adopt.insert(server, ids);
                    }
                }
            }
        }
        for id in pumped {
            self.pump(id);
        }
        for (server, ids) in adopt {
            self.take_over(server, ids).await;
        }
    }

    /// Takes runs `ids` of `server` (gone) over, if the store lets it (the
    /// server is not running), and carries them on here.
    async fn take_over(&self, server: Arc<str>, ids: Vec<u64>) {
        let records = match self.store.adopt(Arc::clone(&server), ids).await {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(server = %server, "cannot take over a gone server's runs: {e}");
                return;
            }
        };
        let now = now_ms();
        let mut inner = self.inner.lock();
        for record in records {
            let Some(task) = self.hub.get(record.run.task_id) else {
                continue;
            };
            let mut run = Run::restored(record, task);
            tracing::warn!(
                run = run.row.task_id,
                job = %shown_job(&run.row.job),
                server = %server,
                agents = run.agents.len(),
                "job run taken over from a server gone for tasks.ack_timeout: carried on here"
            );
            run.carried_on(&self.registry, self.epoch, now);
            inner.runs.insert(run.row.task_id, run);
        }
        inner.orphaned.remove(&server);
        self.active.store(inner.runs.len(), Relaxed);
        drop(inner);
        self.pump_all();
    }

    /// Fires what is due at `now`, in one transaction.
    async fn fire_due(&self, now: i64) {
        let mut plans = Vec::new();
        let mut writes = Vec::new();
        {
            let mut inner = self.inner.lock();
            if now < inner.retry_at_ms {
                return;
            }
            let mut active = inner.active();
            let max_runs = inner.max_runs;
            let mut skipped_runs = Vec::new();
            let busy: HashMap<Arc<str>, usize> =
                inner.runs.values().fold(HashMap::new(), |mut m, r| {
                    if !r.row.state.is_finished() {
                        *m.entry(Arc::clone(&r.row.job)).or_default() += 1;
                    }
                    m
                });
            let Inner { jobs, .. } = &mut *inner;
            for (name, job) in jobs.iter_mut() {
                if job.next_ms.is_none_or(|next| next > now) {
                    continue;
                }
                let due: Due = job
                    .schedule
                    .due(job.last_nominal_ms, now, job.config.missed);
                job.next_ms = due.next_ms;
                if let Some(skipped) = due.skipped {
                    tracing::warn!(
                        job = %name,
                        count = %skipped.count,
                        first = %shown_ms(skipped.first_ms),
                        last = %shown_ms(skipped.last_ms),
                        "job runs skipped: their times passed while no server could fire them \
                         (missed = \"{}\")",
                        if job.config.missed == crate::schedule::Missed::Once { "once" } else { "skip" }
                    );
                }
                let Some(nominal) = due.fire else {
                    if due.last_ms != job.last_nominal_ms {
                        job.last_nominal_ms = due.last_ms;
                        writes.push(job.recorded(name));
                    }
                    continue;
                };
                let skip = if job.paused {
                    Some("the job is paused")
                } else if job.config.overlap == Overlap::Skip
                    && busy.get(name).copied().unwrap_or(0) > 0
                {
                    Some("its previous run is still in progress (overlap = \"skip\")")
                } else if job.config.mode != JobMode::Broadcast && active >= max_runs {
                    Some("tasks.max_runs runs are in progress")
                } else {
                    None
                };
                if let Some(why) = skip {
                    if !job.paused {
                        tracing::warn!(job = %name, nominal = %shown_ms(nominal), "job run skipped: {why}");
                        skipped_runs.push(Arc::clone(name));
                    }
                    job.last_nominal_ms = nominal;
                    writes.push(job.recorded(name));
                    continue;
                }
                if job.config.mode != JobMode::Broadcast {
                    active += 1;
                }
                plans.push(job.plan(Some(nominal)));
            }
            for name in skipped_runs {
                *inner.outcomes.entry((name, "skipped")).or_default() += 1;
            }
        }
        for write in writes {
            self.store.record(write);
        }
        if plans.is_empty() {
            return;
        }
        let firings: Vec<(Firing, Vec<Arc<str>>)> =
            plans.iter().map(|plan| self.firing(plan, now)).collect();
        let (firings, targets): (Vec<Firing>, Vec<Vec<Arc<str>>>) = firings.into_iter().unzip();
        let rows: Vec<RunRow> = firings.iter().map(|f| f.run.clone()).collect();
        match self.store.fire(firings).await {
            Ok(ids) => {
                for (((plan, row), targets), id) in plans.iter().zip(rows).zip(targets).zip(ids) {
                    let nominal = plan.nominal_ms.unwrap_or(0);
                    {
                        let mut inner = self.inner.lock();
                        if let Some(job) = inner.jobs.get_mut(&plan.job) {
                            job.last_nominal_ms = job.last_nominal_ms.max(nominal);
                        }
                    }
                    match id {
                        Some(id) => self.started(plan, row, targets, id),
                        None => tracing::info!(
                            job = %plan.job,
                            nominal = %shown_ms(nominal),
                            "job run not fired: another server (or this one before a restart) \
                             fired it already"
                        ),
                    }
                }
            }
            Err(e) => {
                tracing::error!(
                    runs = plans.len(),
                    "job runs not fired, tried again in {}: {e}",
                    humantime::format_duration(FIRE_RETRY)
                );
                let mut inner = self.inner.lock();
                inner.retry_at_ms = now + millis(FIRE_RETRY);
                for plan in &plans {
                    if let Some(job) = inner.jobs.get_mut(&plan.job) {
                        // Asked again: the same nominal time is due.
                        job.next_ms = Some(now + millis(FIRE_RETRY));
                    }
                }
            }
        }
    }

    /// The run's task and row, and (`each`, `any`) the agents it targets
    /// now.
    fn firing(&self, plan: &RunPlan, now: i64) -> (Firing, Vec<Arc<str>>) {
        let mut targets: Vec<Arc<str>> = if plan.mode == JobMode::Broadcast {
            Vec::new()
        } else {
            self.registry
                .connected()
                .into_iter()
                .filter(|(name, labels)| plan.selector.matches(name, &**labels.load()))
                .map(|(name, _)| name)
                .collect()
        };
        targets.sort();
        let count = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let (batch, max_failed) = match plan.mode {
            JobMode::Each => (
                plan.batch.of(targets.len()).max(1),
                plan.max_failed.of(targets.len()),
            ),
            JobMode::Any => (1, usize::try_from(plan.retries).unwrap_or(usize::MAX)),
            JobMode::Broadcast => (0, 0),
        };
        let broadcast = plan.mode == JobMode::Broadcast;
        let row = RunRow {
            task_id: 0,
            job: Arc::clone(&plan.job),
            nominal_ms: plan.nominal_ms,
            mode: Arc::from(plan.mode.as_str()),
            state: if broadcast {
                RunState::Succeeded
            } else {
                RunState::Running
            },
            target: Arc::from(plan.selector.to_string()),
            targets: count,
            batch: u32::try_from(batch).unwrap_or(u32::MAX),
            max_failed: u32::try_from(max_failed).unwrap_or(u32::MAX),
            wait_ms: millis(plan.wait),
            retries: plan.retries,
            started_ms: now,
            deadline_ms: now + millis(plan.timeout),
            finished_ms: if broadcast { now } else { 0 },
            acked: 0,
            failed: 0,
            missed: 0,
        };
        let draft = Draft {
            text: plan.text.clone(),
            target: None,
            selector: (!plan.selector.is_everything()).then(|| Arc::clone(&plan.selector)),
            job: Some(Arc::clone(&plan.job)),
            direct: !broadcast,
        };
        (Firing { draft, run: row }, targets)
    }

    /// A run was fired with task `id`: keeps it (each, any) and sends.
    fn started(&self, plan: &RunPlan, mut row: RunRow, targets: Vec<Arc<str>>, id: u64) {
        let now = now_ms();
        let task = self.task_for(id, plan);
        let mut inner = self.inner.lock();
        row.task_id = id;
        if let Some(job) = inner.jobs.get_mut(&plan.job) {
            job.last_run = Some((id, row.state, row.started_ms));
        }
        tracing::info!(
            job = %shown_job(&plan.job),
            run = id,
            mode = plan.mode.as_str(),
            targets = targets.len(),
            nominal = %plan.nominal_ms.map(shown_ms).unwrap_or_else(|| "now (operator)".into()),
            "job run started"
        );
        if plan.mode == JobMode::Broadcast {
            if let Some(job) = inner.jobs.get_mut(&plan.job) {
                job.last_success_ms = now;
            }
            *inner
                .outcomes
                .entry((Arc::clone(&plan.job), "succeeded"))
                .or_default() += 1;
            drop(inner);
            self.store.record(Write::Job {
                name: Arc::clone(&plan.job),
                last_nominal_ms: None,
                paused: None,
                last_success_ms: Some(now),
            });
            return;
        }
        let agents = targets
            .iter()
            .map(|name| {
                (
                    Arc::clone(name),
                    AgentRun {
                        state: RunAgentState::Owed,
                        tries: 0,
                        at_ms: now,
                    },
                )
            })
            .collect();
        let mut owed: VecDeque<Arc<str>> = targets.into_iter().collect();
        if plan.mode == JobMode::Any && !owed.is_empty() {
            // Spread `any` runs over the matching agents.
            let turn = usize::try_from(id).unwrap_or(0) % owed.len();
            owed.rotate_left(turn);
        }
        let run = Run {
            selector: Arc::clone(&plan.selector),
            mode: plan.mode,
            agents: if plan.mode == JobMode::Each {
                agents
            } else {
                HashMap::new()
            },
            owed,
            running: 0,
            next_slot_ms: now,
            halt_base: 0,
            away: HashMap::new(),
            row,
            task,
        };
        // Every agent it is owed to, kept: after a restart the run waits
        // for them (and not only for those it had sent it to).
        for name in run.agents.keys() {
            self.store.record(Write::RunAgent(run.agent_row(name)));
        }
        let nobody = run.owed.is_empty();
        inner.runs.insert(id, run);
        self.active.store(inner.runs.len(), Relaxed);
        if nobody {
            // Waiting for agents that may never come would hold up the
            // job's next runs (overlap = "skip"): it ends, and says why.
            tracing::warn!(
                job = %shown_job(&plan.job),
                run = id,
                target = %plan.selector,
                "job run matched no connected agent: it ends as failed"
            );
            // Its task too: nothing will ever send it, and left pending it
            // would be listed as waiting for ever.
            if let Some(run) = inner.runs.get(&id) {
                run.task.progress.set_state(TaskState::Failed);
            }
            self.store.record(Write::State {
                id,
                state: TaskState::Failed,
                claim: None,
            });
            self.finish(&mut inner, id, RunState::Failed, now);
            return;
        }
        self.settle(&mut inner, id, now);
        drop(inner);
        self.pump(id);
        self.wake.notify_one();
    }

    /// The run's task as the hub has it (so its counters are the ones
    /// `tasks` shows), else made from the plan.
    fn task_for(&self, id: u64, plan: &RunPlan) -> Arc<Task> {
        if let Some(task) = self.hub.get(id).filter(|t| !t.void) {
            return task;
        }
        Arc::new(Task::from_draft(
            id,
            Draft {
                text: plan.text.clone(),
                target: None,
                selector: Some(Arc::clone(&plan.selector)),
                job: Some(Arc::clone(&plan.job)),
                direct: plan.mode != JobMode::Broadcast,
            },
            std::time::SystemTime::now(),
        ))
    }

    /// Sends run `id`'s task to the agents its window admits now.
    fn pump(&self, id: u64) {
        let now = now_ms();
        let mut inner = self.inner.lock();
        let Some(run) = inner.runs.get_mut(&id) else {
            return;
        };
        let sent = run.fill(&self.registry, now, self.epoch);
        for row in sent {
            self.store.record(Write::RunAgent(row));
        }
        self.settle(&mut inner, id, now);
    }

    fn pump_all(&self) {
        let ids: Vec<u64> = self.inner.lock().runs.keys().copied().collect();
        for id in ids {
            self.pump(id);
        }
    }

    /// Timeouts, and windows to refill after `rollout.wait`.
    fn timers(&self, now: i64) {
        let ids: Vec<u64> = {
            let mut inner = self.inner.lock();
            let expired: Vec<u64> = inner
                .runs
                .values()
                .filter(|r| r.row.deadline_ms <= now)
                .map(|r| r.row.task_id)
                .collect();
            for id in expired {
                if let Some(run) = inner.runs.get_mut(&id) {
                    let mut missed = Vec::new();
                    for (name, agent) in &mut run.agents {
                        if !agent.state.is_finished() {
                            agent.state = RunAgentState::Missed;
                            agent.at_ms = now;
                            missed.push(Arc::clone(name));
                        }
                    }
                    run.row.missed += u32::try_from(missed.len()).unwrap_or(u32::MAX);
                    for name in &missed {
                        self.store.record(Write::RunAgent(run.agent_row(name)));
                    }
                    run.owed.clear();
                    run.running = 0;
                    tracing::warn!(
                        run = id,
                        job = %shown_job(&run.row.job),
                        missed = missed.len(),
                        "job run timed out: agents still owed it, or running it, are counted missed"
                    );
                    self.finish(&mut inner, id, RunState::TimedOut, now);
                }
            }
            self.hand_on(&mut inner, now);
            inner
                .runs
                .values()
                .filter(|r| r.row.state == RunState::Running && r.next_slot_ms <= now)
                .map(|r| r.row.task_id)
                .collect()
        };
        for id in ids {
            self.pump(id);
        }
    }

    /// `any` runs whose agent has been away `tasks.ack_timeout`: that agent
    /// is counted missed (it may still run the task: at least once, as
    /// queue mode's redelivery) and the next matching agent is sent it.
    fn hand_on(&self, inner: &mut Inner, now: i64) {
        let after = inner.hand_on_ms.unwrap_or(millis(HAND_ON));
        let mut settle = Vec::new();
        for run in inner.runs.values_mut() {
            if run.away.is_empty() || run.row.state != RunState::Running {
                continue;
            }
            let gone: Vec<Arc<str>> = run
                .away
                .iter()
                .filter(|(name, since)| {
                    now.saturating_sub(**since) >= after && !self.registry.is_connected(name)
                })
                .map(|(name, _)| Arc::clone(name))
                .collect();
            for name in gone {
                run.away.remove(&name);
                let Some(agent) = run.agents.get_mut(&name) else {
                    continue;
                };
                if agent.state != RunAgentState::Running {
                    continue;
                }
                agent.state = RunAgentState::Missed;
                agent.at_ms = now;
                run.running = run.running.saturating_sub(1);
                run.row.missed += 1;
                self.store.record(Write::RunAgent(run.agent_row(&name)));
                tracing::warn!(
                    run = run.row.task_id,
                    job = %shown_job(&run.row.job),
                    agent = %name,
                    "job run: its agent has been away for tasks.ack_timeout (it may have moved to \
                     another server): counted missed, the task goes to the next matching agent"
                );
                settle.push(run.row.task_id);
            }
        }
        for id in settle {
            self.settle(inner, id, now);
        }
    }

    /// When the loop must look again: the next nominal time of a job, a
    /// run's timeout or window.
    fn next_wake(&self, now: i64) -> i64 {
        let inner = self.inner.lock();
        let jobs = inner.jobs.values().filter_map(|j| j.next_ms);
        let runs = inner.runs.values().flat_map(|r| {
            let slot = (r.row.state == RunState::Running
                && r.running < r.row.batch as usize
                && !r.owed.is_empty()
                && r.next_slot_ms > now)
                .then_some(r.next_slot_ms);
            [Some(r.row.deadline_ms), slot].into_iter().flatten()
        });
        jobs.chain(runs)
            .chain([inner.retry_at_ms].into_iter().filter(|t| *t > now))
            .min()
            .unwrap_or(now + millis(MAX_SLEEP))
    }

    /// Halts or ends run `id` if its state says so.
    fn settle(&self, inner: &mut Inner, id: u64, now: i64) {
        let Some(run) = inner.runs.get_mut(&id) else {
            return;
        };
        if run.row.state == RunState::Running
            && run.row.failed.saturating_sub(run.halt_base) > run.row.max_failed
            && run.mode == JobMode::Each
        {
            run.row.state = RunState::Halted;
            tracing::warn!(
                run = id,
                job = %shown_job(&run.row.job),
                failed = run.row.failed,
                max_failed = run.row.max_failed,
                "job run halted: more agents failed than rollout.max_failed; nothing more is \
                 sent until `contactd job resume {id}`"
            );
            self.store.record(Write::Run(run.row.clone()));
            return;
        }
        if run.row.state != RunState::Running {
            return;
        }
        let outcome = match run.mode {
            JobMode::Any => {
                if run.row.acked > 0 {
                    Some(RunState::Succeeded)
                } else if run.row.failed > run.row.retries
                    || (run.running == 0
                        && run.owed.is_empty()
                        && run.row.failed + run.row.missed > 0)
                {
                    Some(RunState::Failed)
                } else {
                    None
                }
            }
            _ => (run.running == 0
                && run.agents.values().all(|a| a.state.is_finished())
                && !run.agents.is_empty())
            .then_some(if run.row.failed > 0 {
                RunState::Failed
            } else {
                RunState::Succeeded
            }),
        };
        if let Some(outcome) = outcome {
            self.finish(inner, id, outcome, now);
        }
    }

    /// Run `id` ended as `state`.
    fn finish(&self, inner: &mut Inner, id: u64, state: RunState, now: i64) {
        let Some(mut run) = inner.runs.remove(&id) else {
            return;
        };
        self.active.store(inner.runs.len(), Relaxed);
        run.row.state = state;
        run.row.finished_ms = now;
        if inner.ended.len() >= ENDED {
            inner.ended.pop_front();
        }
        inner.ended.push_back(run.view());
        tracing::info!(
            run = id,
            job = %shown_job(&run.row.job),
            outcome = %state,
            acked = run.row.acked,
            failed = run.row.failed,
            missed = run.row.missed,
            "job run ended"
        );
        self.store.record(Write::Run(run.row.clone()));
        *inner
            .outcomes
            .entry((Arc::clone(&run.row.job), state.name()))
            .or_default() += 1;
        if let Some(job) = inner.jobs.get_mut(&run.row.job) {
            if job.last_run.is_some_and(|(last, ..)| last == id) {
                job.last_run = Some((id, state, run.row.started_ms));
            }
            if state == RunState::Succeeded {
                job.last_success_ms = job.last_success_ms.max(run.row.started_ms);
                self.store.record(Write::Job {
                    name: Arc::clone(&run.row.job),
                    last_nominal_ms: None,
                    paused: None,
                    last_success_ms: Some(run.row.started_ms),
                });
            }
        }
        self.wake.notify_one();
    }
}

impl Inner {
    /// Runs in progress or halted.
    fn active(&self) -> usize {
        self.runs.len()
    }
}

impl Job {
    fn plan(&self, nominal_ms: Option<i64>) -> RunPlan {
        let config = &self.config;
        RunPlan {
            job: Arc::from(config.name.as_str()),
            nominal_ms,
            text: config.text.render(0),
            selector: Arc::clone(&self.selector),
            mode: config.mode,
            batch: config.rollout.batch,
            max_failed: config.rollout.max_failed,
            wait: config.rollout.wait,
            timeout: config.timeout,
            retries: config.retries,
        }
    }

    /// The store's write of its last nominal time.
    fn recorded(&self, name: &Arc<str>) -> Write {
        Write::Job {
            name: Arc::clone(name),
            last_nominal_ms: Some(self.last_nominal_ms),
            paused: None,
            last_success_ms: None,
        }
    }
}

impl Run {
    fn restored(record: RunRecord, task: Arc<Task>) -> Run {
        let mode = JobMode::parse(&record.run.mode).unwrap_or(JobMode::Each);
        let selector = Arc::new(Selector::parse(&record.run.target).unwrap_or_else(|_| {
            Selector::parse("!name").expect("a selector that matches no agent")
        }));
        let mut agents = HashMap::new();
        let mut owed = VecDeque::new();
        for a in record.agents {
            if a.state == RunAgentState::Owed {
                owed.push_back(Arc::clone(&a.agent));
            }
            agents.insert(
                a.agent,
                AgentRun {
                    state: a.state,
                    tries: a.tries,
                    at_ms: a.at_ms,
                },
            );
        }
        let running = agents
            .values()
            .filter(|a| a.state == RunAgentState::Running)
            .count();
        // The counts are the agents' rows' (the run's own row is written
        // when it halts or ends, its agents' as they change).
        let mut row = record.run;
        let count = |state| {
            u32::try_from(agents.values().filter(|a| a.state == state).count()).unwrap_or(u32::MAX)
        };
        row.acked = count(RunAgentState::Acked);
        row.failed = count(RunAgentState::Failed);
        row.missed = count(RunAgentState::Missed);
        let halt_base = if row.state == RunState::Running && row.failed > row.max_failed {
            row.failed
        } else {
            0
        };
        Run {
            row,
            task,
            selector,
            mode,
            agents,
            owed,
            running,
            next_slot_ms: 0,
            halt_base,
            away: HashMap::new(),
        }
    }

    /// The run as `job show` shows it.
    fn view(&self) -> RunView {
        let mut agents: Vec<RunAgentRow> = self
            .agents
            .keys()
            .map(|name| self.agent_row(name))
            .collect();
        agents.sort_by(|a, b| a.agent.cmp(&b.agent));
        RunView {
            run: self.row.clone(),
            text: self.task.text.clone(),
            agents,
        }
    }

    fn agent_row(&self, name: &Arc<str>) -> RunAgentRow {
        let agent = self.agents.get(name).copied().unwrap_or(AgentRun {
            state: RunAgentState::Owed,
            tries: 0,
            at_ms: 0,
        });
        RunAgentRow {
            task_id: self.row.task_id,
            agent: Arc::clone(name),
            state: agent.state,
            tries: agent.tries,
            at_ms: agent.at_ms,
        }
    }

    fn message(&self, tries: u32, epoch: u64) -> ServerMsg {
        ServerMsg {
            task: self.task.text.clone(),
            id: self.row.task_id,
            attempt: tries,
            epoch,
            retry: tries.saturating_sub(1),
        }
    }

    /// `name` (with `labels`) is connected now: sent again what it was
    /// sent and did not answer, put first in line if it is owed, added if
    /// the run is for it and it is not in the run yet.
    fn joined(
        &mut self,
        name: &Arc<str>,
        labels: &crate::labels::Labels,
        registry: &Registry,
        epoch: u64,
        now: i64,
    ) {
        if self.row.state != RunState::Running && self.row.state != RunState::Halted {
            return;
        }
        match self.agents.get(name).map(|a| a.state) {
            Some(RunAgentState::Running) => {
                self.away.remove(name);
                self.resend(registry, name, epoch);
            }
            // Connected now: first in line. (An agent in the line twice
            // is sent it once: `fill` skips it when it is no longer
            // owed.)
            Some(RunAgentState::Owed) => self.owed.push_front(Arc::clone(name)),
            Some(_) => {}
            None => {
                if self.mode == JobMode::Each && self.selector.matches(name, labels) {
                    self.agents.insert(
                        Arc::clone(name),
                        AgentRun {
                            state: RunAgentState::Owed,
                            tries: 0,
                            at_ms: now,
                        },
                    );
                    self.owed.push_front(Arc::clone(name));
                } else if self.mode == JobMode::Any && self.selector.matches(name, labels) {
                    self.owed.push_front(Arc::clone(name));
                }
            }
        }
    }

    /// A run read from the store (after a restart, or taken over from a
    /// gone server) is carried on: the agents connected here join it, and
    /// an `any` run's agents running it elsewhere count as away from now
    /// (one that never comes back here, or answers through another
    /// server, is handed on after `tasks.ack_timeout`).
    fn carried_on(&mut self, registry: &Registry, epoch: u64, now: i64) {
        if self.mode == JobMode::Any {
            for (name, agent) in &self.agents {
                if agent.state == RunAgentState::Running && !registry.is_connected(name) {
                    self.away.entry(Arc::clone(name)).or_insert(now);
                }
            }
        }
        for (name, labels) in registry.connected() {
            let labels = labels.load();
            self.joined(&name, &labels, registry, epoch, now);
        }
    }

    /// Sends the task again to an agent that has it and did not answer
    /// (its stream ended): same id and retry, so it dedupes.
    fn resend(&self, registry: &Registry, name: &Arc<str>, epoch: u64) {
        if let Some(agent) = self.agents.get(name) {
            registry.send(name, self.message(agent.tries, epoch));
        }
    }

    /// Sends to owed, connected agents while the window has room; the
    /// rows of the agents sent it.
    fn fill(&mut self, registry: &Registry, now: i64, epoch: u64) -> Vec<RunAgentRow> {
        let mut sent = Vec::new();
        if self.row.state != RunState::Running || now < self.next_slot_ms {
            return sent;
        }
        let mut away = Vec::new();
        while self.running < self.row.batch as usize {
            let Some(name) = self.owed.pop_front() else {
                break;
            };
            let entry = self.agents.entry(Arc::clone(&name)).or_insert(AgentRun {
                state: RunAgentState::Owed,
                tries: 0,
                at_ms: now,
            });
            if entry.state != RunAgentState::Owed {
                continue;
            }
            if !registry.is_connected(&name) {
                // Sent when it connects again (`join`), within the timeout.
                away.push(name);
                if away.len() >= SKIP_AWAY {
                    // The rest wait for the next pump: each agent's
                    // reconnection pumps, so a fleet coming back after a
                    // restart costs a bounded scan each, not the line.
                    break;
                }
                continue;
            }
            entry.tries += 1;
            entry.state = RunAgentState::Running;
            entry.at_ms = now;
            let tries = entry.tries;
            if registry.send(&name, self.message(tries, epoch)) {
                self.task.progress.record_delivery();
                self.running += 1;
                sent.push(self.agent_row(&name));
            } else if let Some(entry) = self.agents.get_mut(&name) {
                entry.tries -= 1;
                entry.state = RunAgentState::Owed;
                away.push(name);
            }
        }
        self.owed.extend(away);
        if self.mode == JobMode::Any {
            // Not in the run until sent it.
            self.agents.retain(|_, a| a.state != RunAgentState::Owed);
        }
        sent
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A unix-ms time as an RFC 3339 UTC instant, for log lines.
pub fn shown_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

fn shown_job(job: &str) -> &str {
    if job == AD_HOC { "(ad hoc)" } else { job }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{StoreConfig, StoreKind},
        store,
    };

    fn ms(text: &str) -> i64 {
        text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    fn open(path: &std::path::Path) -> Jobs {
        let config = StoreConfig {
            kind: StoreKind::Sqlite,
            path: Some(path.to_owned()),
            ..StoreConfig::default()
        };
        let (store, snapshot) = store::open(&config, "test", 10, false).unwrap().start();
        Jobs::restore(
            store,
            Hub::new(10),
            snapshot.epoch,
            snapshot.jobs,
            snapshot.runs,
            |_| None,
        )
    }

    /// A clock the test moves: the runner is driven at the times it says,
    /// through a real store, restarted (only what the store kept survives)
    /// every few steps; the runs the store kept are every period's, once.
    async fn fires_each_period_once(job: &str, start: &str, step_ms: i64, steps: i64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let config: Config = crate::config::parse(job).unwrap();
        let start = ms(start);
        let mut jobs = open(&path);
        jobs.configure_at(&config, start);
        let mut restarts = 0;
        for step in 1..=steps {
            let now = start + step * step_ms;
            if step % 11 == 0 {
                jobs.store.close().await;
                jobs = open(&path);
                jobs.configure_at(&config, now);
                restarts += 1;
            }
            jobs.fire_due(now).await;
        }
        let end = start + steps * step_ms;
        let mut fired: Vec<i64> = jobs
            .store
            .runs(None, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|r| r.nominal_ms)
            .collect();
        fired.sort_unstable();
        let schedule = config.jobs[0].schedule().unwrap();
        let mut expected = Vec::new();
        let mut at = start;
        while let Some(next) = schedule.next_after(at).filter(|&n| n <= end) {
            expected.push(next);
            at = next;
        }
        assert!(restarts > 2);
        assert!(expected.len() > 5, "{expected:?}");
        assert_eq!(fired, expected);
        jobs.store.close().await;
    }

    #[tokio::test]
    async fn a_cron_job_fires_each_period_once_through_the_store_across_restarts_and_dst() {
        // Berlin's repeated hour (2026-10-25): 02:00 to 03:00 runs once.
        fires_each_period_once(
            "[[jobs]]\nname = \"half\"\ntext = \"x\"\ncron = \"*/30 * * * *\"\n\
             time_zone = \"Europe/Berlin\"\nmode = \"broadcast\"\n",
            "2026-10-24T22:00:00Z",
            7 * 60_000,
            60,
        )
        .await;
        // New York's missing hour (2026-03-08): 02:00 runs at 03:00.
        fires_each_period_once(
            "[[jobs]]\nname = \"ny\"\ntext = \"x\"\ncron = \"0 * * * *\"\n\
             time_zone = \"America/New_York\"\nmode = \"broadcast\"\n",
            "2026-03-08T04:00:00Z",
            17 * 60_000,
            40,
        )
        .await;
    }

    #[tokio::test]
    async fn after_downtime_one_catch_up_run_fires_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let config: Config = crate::config::parse(
            "[[jobs]]\nname = \"tick\"\ntext = \"x\"\nevery = \"10s\"\nmode = \"broadcast\"\n",
        )
        .unwrap();
        let start = ms("2026-05-01T12:00:01Z");
        let jobs = open(&path);
        jobs.configure_at(&config, start);
        jobs.fire_due(start + 10_000).await;
        jobs.store.close().await;
        // Down for a minute: at start-up, the latest missed period fires,
        // not the next one's.
        let later = start + 70_000;
        let jobs = open(&path);
        jobs.configure_at(&config, later);
        jobs.fire_due(later).await;
        let mut fired: Vec<i64> = jobs
            .store
            .runs(None, 100)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|r| r.nominal_ms)
            .collect();
        fired.sort_unstable();
        assert_eq!(
            fired,
            [ms("2026-05-01T12:00:10Z"), ms("2026-05-01T12:01:10Z")]
        );
        jobs.store.close().await;
    }
}
