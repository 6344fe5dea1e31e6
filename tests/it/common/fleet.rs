//! In-process agents for tests: started with `agent::run`, observed
//! through their events.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use contactd::{
    agent::{self, AgentEvent, EventKind},
    config::{AgentConfig, BackoffConfig},
    proto::contact::Outcome,
};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::within;

/// A loopback port that was free a moment ago (for a server that starts
/// after its agent).
pub fn reserve_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// An agent config for tests: fast backoff, a short healthy period.
pub fn agent_config(addr: SocketAddr, name: &str) -> AgentConfig {
    AgentConfig {
        servers: vec![format!("http://{addr}")],
        name: name.to_owned(),
        status_interval: Duration::from_millis(200),
        healthy_after: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
        backoff: BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 1.6,
            jitter: 0.2,
        },
        ..AgentConfig::default()
    }
}

/// An in-process agent and its events.
pub struct TestAgent {
    pub events: broadcast::Receiver<AgentEvent>,
    shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), agent::AgentError>>,
    _config: watch::Sender<Arc<AgentConfig>>,
}

impl TestAgent {
    pub fn start(config: AgentConfig) -> TestAgent {
        let (tx, events) = broadcast::channel(4096);
        let (config_tx, config_rx) = watch::channel(Arc::new(config));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent::run(agent::Run {
            events: Some(tx),
            ..agent::Run::new(config_rx, shutdown.clone())
        }));
        TestAgent {
            events,
            shutdown,
            task,
            _config: config_tx,
        }
    }

    /// An agent started by the caller (with `agent::run` and a metrics endpoint).
    pub fn from_parts(
        events: broadcast::Receiver<AgentEvent>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), agent::AgentError>>,
        config: watch::Sender<Arc<AgentConfig>>,
    ) -> TestAgent {
        TestAgent {
            events,
            shutdown,
            task,
            _config: config,
        }
    }

    /// Waits for the first event that `pick` accepts.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&AgentEvent) -> Option<T>,
    ) -> T {
        within(what, async {
            loop {
                match self.events.recv().await {
                    Ok(event) => {
                        if let Some(found) = pick(&event) {
                            return found;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => panic!("missed {n} events"),
                    Err(broadcast::error::RecvError::Closed) => panic!("the agent stopped"),
                }
            }
        })
        .await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        within("agent exit", self.task).await.unwrap().unwrap();
    }
}

pub fn connected(event: &AgentEvent) -> Option<Instant> {
    matches!(event.kind, EventKind::Connected { .. }).then_some(event.at)
}

pub fn failed(event: &AgentEvent) -> Option<Instant> {
    matches!(event.kind, EventKind::Failed { .. }).then_some(event.at)
}

pub fn handled(event: &AgentEvent) -> Option<(u64, Outcome)> {
    match event.kind {
        EventKind::Handled { task_id, outcome } => Some((task_id, outcome)),
        _ => None,
    }
}
