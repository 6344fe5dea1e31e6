//! Running the configured handler for one task, and turning how it ended
//! into the task's ack. The process work (own process group, bounded
//! output, group kill on timeout) is [`process`](crate::process)'s.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{
    process::{Input, execute_with},
    proto::contact::{Outcome, Result as ResultMsg, ServerMsg},
    untrusted::shown,
};

/// Environment variables a handler gets.
pub const ENV_TASK_ID: &str = "CONTACTD_TASK_ID";
pub const ENV_TASK_ATTEMPT: &str = "CONTACTD_TASK_ATTEMPT";
pub const ENV_AGENT: &str = "CONTACTD_AGENT";

/// How to run handlers, from the config at the time a task starts.
#[derive(Debug, Clone)]
pub struct Handler {
    /// argv; empty: log the task and ack it.
    pub argv: Vec<String>,
    pub timeout: Duration,
    pub max_output: usize,
    /// The agent's name, for `CONTACTD_AGENT`.
    pub agent: String,
}

impl Handler {
    /// Handles `task` and returns its ack. `kill` ends a running handler
    /// early (when the shutdown grace period is over).
    pub async fn handle(&self, task: &ServerMsg, kill: &CancellationToken) -> ResultMsg {
        if self.argv.is_empty() {
            tracing::info!(task_id = task.id, attempt = task.attempt, task = %shown(&task.task), "task received (no handler configured)");
            return ack(task, true, "ok".to_owned());
        }
        let (id, attempt) = (task.id.to_string(), task.attempt.to_string());
        let env = [
            (ENV_TASK_ID, id.as_str()),
            (ENV_TASK_ATTEMPT, attempt.as_str()),
            (ENV_AGENT, self.agent.as_str()),
        ];
        let input = Input {
            stdin: Some(task.task.as_bytes()),
            env: &env,
            keep_tail: true,
            killed: "killed: the agent is shutting down",
        };
        let started = std::time::Instant::now();
        let out = execute_with(&self.argv, input, self.timeout, self.max_output, kill).await;
        let elapsed = started.elapsed();
        if out.success {
            tracing::debug!(task_id = task.id, ?elapsed, "handler succeeded");
            ack(task, true, "ok".to_owned())
        } else {
            let last = out.output.lines().last().unwrap_or_default();
            tracing::warn!(
                task_id = task.id,
                ?elapsed,
                "handler failed: {}",
                shown(last)
            );
            ack(task, false, out.output)
        }
    }
}

fn ack(task: &ServerMsg, ok: bool, ret: String) -> ResultMsg {
    ResultMsg {
        ret,
        task_id: task.id,
        outcome: if ok { Outcome::Ok } else { Outcome::Failed } as i32,
        epoch: task.epoch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(script: &str, timeout: Duration) -> Handler {
        Handler {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout,
            max_output: 4096,
            agent: "test-agent".into(),
        }
    }

    fn task(id: u64, text: &str) -> ServerMsg {
        ServerMsg {
            task: text.into(),
            id,
            attempt: 2,
            epoch: 7,
            retry: 0,
        }
    }

    #[tokio::test]
    async fn the_handler_gets_the_task_and_its_exit_status_decides() {
        let script = r#"read -r t; [ "$t" = "do it" ] && [ "$CONTACTD_TASK_ID" = 7 ] && [ "$CONTACTD_TASK_ATTEMPT" = 2 ] && [ "$CONTACTD_AGENT" = test-agent ]"#;
        let ok = handler(script, Duration::from_secs(10))
            .handle(&task(7, "do it\n"), &CancellationToken::new())
            .await;
        assert_eq!(ok.outcome(), Outcome::Ok, "{ok:?}");
        assert_eq!((ok.task_id, ok.ret.as_str()), (7, "ok"));
        let failed = handler("echo broken >&2; exit 3", Duration::from_secs(10))
            .handle(&task(8, "x"), &CancellationToken::new())
            .await;
        assert_eq!(failed.outcome(), Outcome::Failed);
        assert_eq!(failed.ret, "broken\n[contactd: exit status 3]");
    }

    #[tokio::test]
    async fn a_hanging_handler_is_killed_at_the_timeout_and_fails() {
        let started = std::time::Instant::now();
        // 2 s: long enough for `sh` to start and write its line first even
        // on a loaded machine (300 ms was not, under a parallel test run).
        let out = handler("echo started; sleep 30 & sleep 30", Duration::from_secs(2))
            .handle(&task(9, "x"), &CancellationToken::new())
            .await;
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(out.outcome(), Outcome::Failed);
        assert_eq!(out.ret, "started\n[contactd: killed after the 2s timeout]");
    }

    #[tokio::test]
    async fn no_handler_acks_ok() {
        let none = Handler {
            argv: Vec::new(),
            ..handler("", Duration::from_secs(1))
        };
        let out = none.handle(&task(1, "x"), &CancellationToken::new()).await;
        assert_eq!((out.outcome(), out.ret.as_str()), (Outcome::Ok, "ok"));
    }
}
