//! The admin API (`contactd.admin.v1.Admin`): submit tasks, list agents and
//! tasks, show, cancel and retry one task. A translation: the broker
//! decides, this file turns requests and answers into protobuf. Served on a
//! unix socket only (`[admin] socket`, mode 0660, so access is a matter of
//! file permissions), never on the public port.

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering::Relaxed},
};

use tokio::net::UnixListener;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use super::state::State;
use crate::{
    clock::unix_ms,
    config::{AdminConfig, Amount, JobMode},
    model::{Draft, RunAgentState, Task, TaskState},
    proto::{
        ADMIN_DESCRIPTOR_SET,
        admin::{
            self as pb, AgentTaskState, ListAgentsRequest, ListAgentsResponse, ListTasksRequest,
            ListTasksResponse, ShowTaskResponse, SubmitTaskRequest, SubmitTaskResponse,
            TaskIdRequest,
            admin_server::{Admin, AdminServer},
        },
    },
    selector::Selector,
    store::StoreError,
    tasks::{
        AgentRow, AgentState, Refused, TaskView,
        jobs::{AD_HOC, AD_HOC_TIMEOUT, JobRefused, JobView, RunPlan},
    },
};

/// The socket file this server created, to remove at exit.
#[derive(Debug)]
pub(super) struct SocketFile {
    path: PathBuf,
    /// Device and inode of the file bound, so that a file put at the path
    /// since (another server's socket) is left alone.
    id: (u64, u64),
}

/// Binds the admin socket and serves on it until the server closes;
/// returns the socket file, to remove at exit. A socket that cannot be
/// bound is logged, and the server runs on without its admin API.
pub(super) fn start(
    config: &AdminConfig,
    state: &Arc<State>,
    tracker: &TaskTracker,
) -> Option<SocketFile> {
    if !config.enabled {
        return None;
    }
    let path = config.socket.clone();
    let (listener, id) = match bind(&path) {
        Ok(bound) => bound,
        Err(e) => {
            tracing::warn!(
                socket = %path.display(),
                "admin API not available: {e} (set [admin] socket to a writable path, or enabled = false)"
            );
            return None;
        }
    };
    tracing::info!(socket = %path.display(), "serving the admin API");
    let service = AdminServer::new(AdminService {
        state: Arc::clone(state),
    });
    // Reflection here too, so `grpcurl -unix` works on the socket.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ADMIN_DESCRIPTOR_SET)
        .build_v1();
    let closing = state.closing.clone();
    let (max_connections, idle_timeout) = (config.max_connections, config.idle_timeout);
    tracker.spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .add_optional_service(reflection.ok())
            .serve_with_incoming_shutdown(
                super::admin_conn::incoming(listener, max_connections, idle_timeout),
                closing.cancelled_owned(),
            )
            .await;
        if let Err(e) = result {
            tracing::error!("admin API failed: {e}");
        }
    });
    Some(SocketFile { path, id })
}

fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))
}

fn bind(path: &Path) -> std::io::Result<(UnixListener, (u64, u64))> {
    if let Some(why) = crate::net::untrusted_socket(path) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            why,
        ));
    }
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
    }
    // A socket left by a previous run that did not exit cleanly is
    // replaced; one that still answers belongs to a running server.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another server is serving on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok((listener, file_id(path)?))
}

/// Removes the socket at exit, if the file at its path is still the one
/// this server bound: after another server replaced it, removing it would
/// cut that server's operators off.
pub(super) fn remove_socket(socket: Option<&SocketFile>) {
    let Some(SocketFile { path, id }) = socket else {
        return;
    };
    match file_id(path) {
        Ok(now) if now == *id => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), "cannot remove the admin socket: {e}");
            }
        }
        Ok(_) => tracing::info!(
            socket = %path.display(),
            "the admin socket was replaced by another file: left in place"
        ),
        Err(e) => tracing::debug!(socket = %path.display(), "admin socket already gone: {e}"),
    }
}

/// About the most task bytes one `ListTasks` response holds.
const PAGE_BYTES: usize = 1024 * 1024;

/// The admin API's methods; the web console calls them in-process, so both
/// doors apply the same checks.
pub(super) struct AdminService {
    pub(super) state: Arc<State>,
}

fn state_of(task: &Task) -> pb::TaskState {
    match task.progress.state() {
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Delivered => pb::TaskState::Delivered,
        TaskState::Acked => pb::TaskState::Acked,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Dead => pb::TaskState::Dead,
        TaskState::Cancelled => pb::TaskState::Cancelled,
    }
}

/// A task as the admin API shows it.
pub(super) fn task_message(t: &Task) -> pb::Task {
    let last = t.progress.last_result();
    pb::Task {
        id: t.id,
        text: t.text.clone(),
        state: state_of(t) as i32,
        target: t.target.as_deref().unwrap_or_default().to_owned(),
        created_ms: unix_ms(t.created),
        delivered: t.progress.delivered.load(Relaxed),
        acked: t.progress.acked.load(Relaxed),
        failed: t.progress.failed.load(Relaxed),
        last_agent: last
            .as_ref()
            .map(|(agent, _)| agent.to_string())
            .unwrap_or_default(),
        last_result: last.map(|(_, text)| text).unwrap_or_default(),
        selector: t
            .selector
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

/// A store failure as the admin API reports it.
fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::Full(_) => Status::resource_exhausted(e.to_string()),
        StoreError::Closed | StoreError::Unavailable(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// A refusal of the broker's as the admin API reports it.
fn refused_status(refused: Refused) -> Status {
    match refused {
        Refused::NotFound(_) => Status::not_found(refused.to_string()),
        Refused::Store(e) => store_status(&e),
        Refused::CannotCancel(..)
        | Refused::NotRetained(_)
        | Refused::CannotRetry(..)
        | Refused::Broadcast(..)
        | Refused::RunTask(_) => Status::failed_precondition(refused.to_string()),
    }
}

fn agent_state(state: AgentState) -> AgentTaskState {
    match state {
        AgentState::Owed => AgentTaskState::Owed,
        AgentState::Delivered => AgentTaskState::Delivered,
        AgentState::Acked => AgentTaskState::Acked,
        AgentState::Failed => AgentTaskState::Failed,
        AgentState::Missed => AgentTaskState::Missed,
        AgentState::Cancelled => AgentTaskState::Cancelled,
    }
}

fn agent_row(row: AgentRow) -> pb::TaskAgent {
    pb::TaskAgent {
        agent: row.agent.to_string(),
        state: agent_state(row.state) as i32,
        result: row.result,
        result_ms: row.result_ms,
        deadline_ms: row.deadline_ms,
    }
}

/// `task show`'s answer.
fn shown(view: TaskView, mode: &str) -> ShowTaskResponse {
    ShowTaskResponse {
        task: Some(task_message(&view.task)),
        mode: mode.to_owned(),
        attempts: view.attempts,
        retries: view.task.progress.retries(),
        agents: view.agents.into_iter().map(agent_row).collect(),
    }
}

impl AdminService {
    /// Several servers sharing one store: adds the agents connected to the
    /// others (and away ones this server never saw) to `agents`, marks each
    /// named agent with its server, and lists the servers.
    async fn fleet(&self, agents: &mut Vec<pb::Agent>) -> Vec<pb::Server> {
        let fleet = match self.state.broker.fleet().await {
            Ok(Some(fleet)) => fleet,
            Ok(None) => return Vec::new(),
            Err(e) => {
                tracing::warn!(
                    "cannot read the fleet from the task store (listing this server's agents): {e}"
                );
                return Vec::new();
            }
        };
        let config = Arc::clone(&self.state.config.borrow());
        let here = config.server.resolved_name();
        let now = crate::clock::now_ms();
        // A server whose heartbeat is older than 3 polls is taken as gone.
        let stale = i64::try_from(3 * config.store.poll_interval.as_millis()).unwrap_or(i64::MAX);
        let alive = |s: &crate::store::ServerRow| !s.stopped && now - s.heartbeat_ms <= stale;
        let servers: Vec<pb::Server> = fleet
            .servers
            .iter()
            .map(|s| pb::Server {
                name: s.name.clone(),
                started_ms: s.started_ms,
                heartbeat_ms: s.heartbeat_ms,
                stopped: s.stopped,
                alive: alive(s),
                this: s.name == here,
            })
            .collect();
        let live: std::collections::HashSet<&str> = fleet
            .servers
            .iter()
            .filter(|s| alive(s))
            .map(|s| s.name.as_str())
            .collect();
        for agent in agents.iter_mut().filter(|a| a.named && a.connected) {
            agent.server.clone_from(&here);
        }
        for remote in fleet.agents {
            let on = remote.server.clone().unwrap_or_default();
            match agents
                .iter_mut()
                .find(|a| a.named && *a.name == *remote.saved.name)
            {
                // Connected here: this server knows it best.
                Some(agent) if agent.connected => {}
                Some(agent) => {
                    agent.server = on.clone();
                    agent.connected = remote.connected && live.contains(on.as_str());
                    agent.last_seen_ms = agent.last_seen_ms.max(remote.saved.last_ms);
                }
                None => agents.push(pb::Agent {
                    name: remote.saved.name.to_string(),
                    named: true,
                    address: remote.address.unwrap_or_default(),
                    connected: remote.connected && live.contains(on.as_str()),
                    server: on,
                    delivered: remote.saved.delivered,
                    acked: remote.saved.acked,
                    failed: remote.saved.failed,
                    first_seen_ms: remote.saved.first_ms,
                    last_seen_ms: remote.saved.last_ms,
                    ..pb::Agent::default()
                }),
            }
        }
        servers
    }
}

/// Room a task's message needs besides its text: the text's tag and length
/// and the other fields, at their largest.
const TASK_FIELDS: u64 = 64;

/// One caller of this server, as `ListAgents` shows it; `loads` are the
/// tasks in flight by agent (queue mode).
pub(super) fn agent_message(
    caller: &super::callers::Caller,
    loads: &std::collections::HashMap<Arc<str>, usize>,
) -> pb::Agent {
    let (last_status, last_status_ms) = caller
        .status()
        .map_or((String::new(), 0), |(text, at)| (text, unix_ms(at)));
    pb::Agent {
        name: caller.id.to_string(),
        named: caller.named,
        address: caller.address().map(|a| a.to_string()).unwrap_or_default(),
        connected: caller.connected(),
        connected_since_ms: unix_ms(caller.connected_since()),
        last_status,
        last_status_ms,
        delivered: caller.delivered.load(Relaxed),
        acked: caller.acked.load(Relaxed),
        failed: caller.failed.load(Relaxed),
        missed: caller.missed.load(Relaxed),
        refused_acks: caller.refused_acks.load(Relaxed),
        in_flight: loads.get(&caller.id).copied().unwrap_or(0) as u64,
        first_seen_ms: caller.first_seen_ms(),
        last_seen_ms: caller.last_seen_ms(),
        server: String::new(),
        labels: caller
            .labels()
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

/// A selector from a request: `None` when empty.
pub(super) fn parse_selector(text: &str) -> Result<Option<Arc<Selector>>, Status> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    Selector::parse(text)
        .map(|selector| Some(Arc::new(selector)))
        .map_err(|e| Status::invalid_argument(format!("bad selector: {e}")))
}

impl AdminService {
    /// A submitted task's selector: broadcast only, and not with an agent.
    fn selector(&self, request: &SubmitTaskRequest) -> Result<Option<Arc<Selector>>, Status> {
        let Some(selector) = parse_selector(&request.selector)? else {
            return Ok(None);
        };
        if !request.agent.is_empty() {
            return Err(Status::invalid_argument(
                "a task is for one agent or for a selector, not both: drop --agent or --target",
            ));
        }
        if self.state.broker.is_queue() {
            return Err(Status::failed_precondition(
                "selectors target broadcast tasks: in queue mode each task goes to any one agent",
            ));
        }
        Ok(Some(selector))
    }
}

/// Jobs and runs.
impl AdminService {
    /// `task submit --batch`: an ad hoc rollout over the selector's agents.
    async fn submit_rollout(
        &self,
        draft: Draft,
        batch: &str,
        max_failed: &str,
    ) -> Result<Response<SubmitTaskResponse>, Status> {
        if draft.target.is_some() {
            return Err(Status::invalid_argument(
                "a rollout is over the agents a selector matches, not one agent: drop --agent",
            ));
        }
        let amount = |text: &str, default: Amount, what: &str| {
            if text.is_empty() {
                return Ok(default);
            }
            text.parse::<Amount>()
                .map_err(|e| Status::invalid_argument(format!("{what}: {e}")))
        };
        let batch = amount(batch, Amount::Percent(100), "--batch")?;
        if matches!(batch, Amount::Count(0) | Amount::Percent(0)) {
            return Err(Status::invalid_argument(
                "--batch: at least one agent must run it at a time",
            ));
        }
        let max_failed = amount(max_failed, Amount::Percent(100), "--max-failed")?;
        let plan = RunPlan {
            job: Arc::from(AD_HOC),
            nominal_ms: None,
            text: draft.text,
            selector: draft
                .selector
                .unwrap_or_else(|| Arc::new(Selector::everything())),
            mode: JobMode::Each,
            batch,
            max_failed,
            wait: std::time::Duration::ZERO,
            timeout: AD_HOC_TIMEOUT,
            retries: 0,
        };
        let selector = plan.selector.to_string();
        let run = self
            .state
            .broker
            .jobs()
            .start(plan)
            .await
            .map_err(job_status)?;
        tracing::info!(run, selector = %selector, batch = %batch, max_failed = %max_failed, "rollout submitted");
        Ok(Response::new(SubmitTaskResponse { id: run, run }))
    }

    /// One run with its agents and their latest results.
    pub(super) async fn run_message(&self, id: u64) -> Result<pb::ShowRunResponse, Status> {
        let jobs = self.state.broker.jobs();
        let view = jobs.show(id).await.map_err(job_status)?;
        let results: std::collections::HashMap<Arc<str>, String> =
            match self.state.broker.store_task(id).await {
                Ok(Some(record)) => record
                    .results
                    .into_iter()
                    .map(|r| (r.agent, r.text))
                    .collect(),
                Ok(None) => std::collections::HashMap::new(),
                Err(e) => return Err(store_status(&e)),
            };
        let run = &view.run;
        let count =
            |state: RunAgentState| view.agents.iter().filter(|a| a.state == state).count() as u32;
        Ok(pb::ShowRunResponse {
            run: Some(pb::Run {
                id: run.task_id,
                job: run.job.to_string(),
                nominal_ms: run.nominal_ms.unwrap_or(0),
                mode: run.mode.to_string(),
                state: run.state.name().to_owned(),
                target: if run.target.is_empty() {
                    String::new()
                } else {
                    run.target.to_string()
                },
                targets: run.targets,
                batch: run.batch,
                max_failed: run.max_failed,
                retries: run.retries,
                started_ms: run.started_ms,
                deadline_ms: run.deadline_ms,
                finished_ms: run.finished_ms,
                acked: run.acked,
                failed: run.failed,
                missed: run.missed,
                text: view.text.clone(),
                running: count(RunAgentState::Running),
                owed: count(RunAgentState::Owed),
            }),
            agents: view
                .agents
                .iter()
                .map(|a| pb::RunAgent {
                    agent: a.agent.to_string(),
                    state: a.state.name().to_owned(),
                    tries: a.tries,
                    at_ms: a.at_ms,
                    result: results.get(&a.agent).cloned().unwrap_or_default(),
                })
                .collect(),
        })
    }
}

fn job_message(job: JobView) -> pb::Job {
    let (last_run, last_state, last_started_ms) = job
        .last_run
        .map_or((0, String::new(), 0), |(id, state, at)| {
            (id, state.name().to_owned(), at)
        });
    pb::Job {
        name: job.name.to_string(),
        schedule: job.schedule,
        target: job.target,
        mode: job.mode.as_str().to_owned(),
        paused: job.paused,
        next_ms: job.next_ms.unwrap_or(0),
        last_run,
        last_state,
        last_started_ms,
        last_success_ms: job.last_success_ms,
        running: job.running as u32,
        halted: job.halted as u32,
    }
}

fn job_status(refused: JobRefused) -> Status {
    match refused {
        JobRefused::NoJob(_) | JobRefused::NoRun(_) => Status::not_found(refused.to_string()),
        JobRefused::NotHalted(..) | JobRefused::NotRunning(..) => {
            Status::failed_precondition(refused.to_string())
        }
        JobRefused::TooMany(_) => Status::resource_exhausted(refused.to_string()),
        JobRefused::Invalid(_) => Status::invalid_argument(refused.to_string()),
        JobRefused::Store(e) => store_status(&e),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn submit_task(
        &self,
        request: Request<SubmitTaskRequest>,
    ) -> Result<Response<SubmitTaskResponse>, Status> {
        let request = request.into_inner();
        if request.text.is_empty() {
            return Err(Status::invalid_argument("the task text is empty"));
        }
        // What agents are sent is bounded like what they send: a larger
        // task could never be delivered.
        let max = self.state.config.borrow().server.max_message_size;
        if request.text.len() as u64 + TASK_FIELDS > max.as_u64() {
            return Err(Status::invalid_argument(format!(
                "the task text is too large: {} bytes, and a task's message may be at most \
                 server.max_message_size ({}) with {TASK_FIELDS} bytes of it for its other fields",
                request.text.len(),
                crate::config::units::size::format(max),
            )));
        }
        let target = (!request.agent.is_empty()).then(|| Arc::from(request.agent.as_str()));
        let rollout = !request.batch.is_empty() || !request.max_failed.is_empty();
        // A rollout's run sends its task to each agent itself: in either
        // delivery mode.
        let selector = if rollout {
            parse_selector(&request.selector)?
        } else {
            self.selector(&request)?
        };
        let shown_selector = selector
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let draft = Draft {
            text: request.text,
            target,
            selector,
            ..Draft::default()
        };
        if rollout {
            return self
                .submit_rollout(draft, &request.batch, &request.max_failed)
                .await;
        }
        // Returns once the task is committed to the store.
        let id = self.state.broker.submit(draft).await.map_err(|e| {
            tracing::error!("task not accepted: {e}");
            store_status(&e)
        })?;
        tracing::info!(
            task_id = id,
            agent = %crate::untrusted::shown(&request.agent),
            selector = %shown_selector,
            "task submitted"
        );
        Ok(Response::new(SubmitTaskResponse { id, run: 0 }))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self.state.broker.jobs().list();
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.into_iter().map(job_message).collect(),
        }))
    }

    async fn run_job(
        &self,
        request: Request<pb::JobNameRequest>,
    ) -> Result<Response<pb::RunResponse>, Status> {
        let name = request.into_inner().name;
        let run = self
            .state
            .broker
            .jobs()
            .run_now(&name)
            .await
            .map_err(job_status)?;
        tracing::info!(job = %crate::untrusted::shown(&name), run, "job run by an operator");
        Ok(Response::new(pb::RunResponse { run }))
    }

    async fn pause_job(
        &self,
        request: Request<pb::PauseJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let request = request.into_inner();
        let jobs = self.state.broker.jobs();
        jobs.pause(&request.name, request.paused)
            .await
            .map_err(job_status)?;
        let job = jobs
            .list()
            .into_iter()
            .find(|j| *j.name == *request.name)
            .ok_or_else(|| job_status(JobRefused::NoJob(request.name.clone())))?;
        Ok(Response::new(job_message(job)))
    }

    async fn show_run(
        &self,
        request: Request<pb::RunIdRequest>,
    ) -> Result<Response<pb::ShowRunResponse>, Status> {
        let id = request.into_inner().run;
        Ok(Response::new(self.run_message(id).await?))
    }

    async fn resume_run(
        &self,
        request: Request<pb::RunIdRequest>,
    ) -> Result<Response<pb::ShowRunResponse>, Status> {
        let id = request.into_inner().run;
        self.state
            .broker
            .jobs()
            .resume(id)
            .await
            .map_err(job_status)?;
        Ok(Response::new(self.run_message(id).await?))
    }

    async fn halt_run(
        &self,
        request: Request<pb::RunIdRequest>,
    ) -> Result<Response<pb::ShowRunResponse>, Status> {
        let id = request.into_inner().run;
        self.state
            .broker
            .jobs()
            .halt(id)
            .await
            .map_err(job_status)?;
        Ok(Response::new(self.run_message(id).await?))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let selector = parse_selector(&request.get_ref().selector)?;
        let callers = self.state.callers.list();
        let loads = self.state.broker.in_flight_by_agent();
        let mut agents: Vec<pb::Agent> = callers
            .iter()
            .map(|caller| agent_message(caller, &loads))
            .collect();
        let servers = self.fleet(&mut agents).await;
        if let Some(selector) = selector {
            // Agents only other servers know carry no labels here: a
            // selector on labels leaves them out, one on names alone not.
            agents.retain(|agent| agent.named && selector.matches(&agent.name, &agent.labels));
        }
        agents.sort_by(|a, b| (!a.named, &a.name).cmp(&(!b.named, &b.name)));
        Ok(Response::new(ListAgentsResponse { agents, servers }))
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let request = request.into_inner();
        let wanted = match request.state() {
            pb::TaskState::Unspecified => None,
            pb::TaskState::Pending => Some(TaskState::Pending),
            pb::TaskState::Delivered => Some(TaskState::Delivered),
            pb::TaskState::Acked => Some(TaskState::Acked),
            pb::TaskState::Failed => Some(TaskState::Failed),
            pb::TaskState::Dead => Some(TaskState::Dead),
            pb::TaskState::Cancelled => Some(TaskState::Cancelled),
        };
        let (mut matching, counters) = self.state.broker.list(wanted).await;
        if request.limit > 0 {
            let excess = matching.len().saturating_sub(request.limit as usize);
            matching.drain(..excess);
        }
        // One page: the tasks after `after_id`, up to PAGE_BYTES encoded
        // (and at least one), so any retained set can be listed.
        let mut bytes = 0;
        let mut more = false;
        let mut listed = Vec::new();
        for t in matching.into_iter().filter(|t| t.id > request.after_id) {
            let task = task_message(&t);
            bytes += prost::Message::encoded_len(&task);
            if bytes > PAGE_BYTES && !listed.is_empty() {
                more = true;
                break;
            }
            listed.push(task);
        }
        Ok(Response::new(ListTasksResponse {
            tasks: listed,
            mode: self.state.broker.mode_name().to_owned(),
            redelivered: counters.redelivered,
            dropped: counters.dropped,
            dead: counters.dead,
            duplicate_acks: counters.duplicate_acks,
            more,
            cancelled_acks: self.state.broker.cancelled_acks(),
        }))
    }

    async fn show_task(
        &self,
        request: Request<TaskIdRequest>,
    ) -> Result<Response<ShowTaskResponse>, Status> {
        let id = request.into_inner().id;
        let broker = &self.state.broker;
        let view = broker.show(id).await.map_err(refused_status)?;
        Ok(Response::new(shown(view, broker.mode_name())))
    }

    async fn cancel_task(
        &self,
        request: Request<TaskIdRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let id = request.into_inner().id;
        let task = self.state.broker.cancel(id).await.map_err(refused_status)?;
        Ok(Response::new(task_message(&task)))
    }

    async fn retry_task(
        &self,
        request: Request<TaskIdRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let id = request.into_inner().id;
        let task = self.state.broker.retry(id).await.map_err(refused_status)?;
        Ok(Response::new(task_message(&task)))
    }
}
