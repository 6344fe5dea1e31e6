//! The lightweight agents: contactd's own agent (`contactd::agent::run`,
//! the code the real agents run) in this process, many of them, without a
//! handler program (a task is acked as handled). Every task an agent runs
//! goes to the journal (`journal/light.log`), and every connection it makes
//! or loses to the harness's event log.

use std::{path::Path, sync::Arc, time::Duration};

use contactd::{
    agent::{self, EventKind},
    config::{AgentConfig, AgentTlsConfig, BackoffConfig},
    labels::Labels,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::history::{Event, Run};

/// What the fleet reports to the harness's writer.
pub enum Note {
    Event(Event),
    Run(Run),
    /// An agent's event channel overflowed: runs may be missing from the
    /// journal, so the run is not trustworthy.
    Lagged(String, u64),
}

/// The agent config both kinds of agent share: a spool in `state` (its
/// `agent-spool-NAME.db`, never in the working directory); backoff from 500 ms to at
/// most 10 s (2,000 agents retrying every 2 s kept a debug server on two
/// shared cores refusing handshakes: a storm that never ended), the default
/// status interval, a short healthy period, TLS against the run's CA bundle;
/// every server, the first tried first (after a failure, the next).
pub fn config(
    name: &str,
    servers: Vec<String>,
    kind: &str,
    ca: &Path,
    state: &Path,
) -> AgentConfig {
    let mut labels = Labels::new();
    labels.insert("soak".to_owned(), kind.to_owned());
    AgentConfig {
        servers,
        name: name.to_owned(),
        labels,
        status_interval: Duration::from_secs(60),
        healthy_after: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(10),
        retry_hint_jitter: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
        backoff: BackoffConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(10),
            multiplier: 1.6,
            jitter: 0.2,
        },
        tls: AgentTlsConfig {
            ca: Some(ca.to_owned()),
            ..AgentTlsConfig::default()
        },
        state_dir: Some(state.to_owned()),
        ..AgentConfig::default()
    }
}

/// Starts one in-process agent; its events become notes for the writer.
pub fn start(
    config: AgentConfig,
    notes: mpsc::UnboundedSender<Note>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let name = config.name.clone();
    let (tx, mut events) = broadcast::channel(256);
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let agent = tokio::spawn(agent::run(agent::Run {
        events: Some(tx),
        ..agent::Run::new(config_rx, shutdown)
    }));
    tokio::spawn(async move {
        let _config = config_tx;
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = notes.send(Note::Lagged(name.clone(), n));
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            let at_ms = crate::now_ms();
            let note = match event.kind {
                EventKind::Connected { .. } => Note::Event(Event::Conn {
                    agent: name.clone(),
                    up: true,
                    at_ms,
                }),
                EventKind::Connecting { .. } => Note::Event(Event::Attempt {
                    agent: name.clone(),
                    at_ms,
                }),
                EventKind::Failed { .. } => Note::Event(Event::Conn {
                    agent: name.clone(),
                    up: false,
                    at_ms,
                }),
                EventKind::Handled { task_id, .. } => Note::Run(Run {
                    agent: name.clone(),
                    id: task_id,
                    attempt: 0,
                    at_ms,
                }),
                EventKind::Stopped => break,
                _ => continue,
            };
            if notes.send(note).is_err() {
                break;
            }
        }
        let _ = agent.await;
    })
}
