//! The operators' traffic: tasks submitted in every delivery mode (queue,
//! direct to one agent, rollouts to a selector), jobs fired by hand, and
//! remote commands; each submit the server gives an id to is logged as
//! accepted, each it refuses as refused (nothing is owed for it).

use std::{sync::Arc, time::Duration};

use contactd::proto::admin as pb;
use tokio_util::sync::CancellationToken;

use crate::{Rng, fleet::Fleet, history::Event, now_ms};

/// Longest one operator call may take.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Time between two operator actions.
const TICK: Duration = Duration::from_millis(250);

/// Submits until `stop`; at most one action per tick.
pub async fn run(fleet: Arc<Fleet>, mut rng: Rng, stop: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        n += 1;
        // Operators take turns at the servers (with one, always it).
        let server = n as usize % fleet.servers.len();
        match rng.below(20) {
            0..=9 => submit(&fleet, server, "queue", format!("queue:{n}"), "", "", "").await,
            10..=14 => {
                let agent = pick_agent(&fleet, &mut rng);
                submit(
                    &fleet,
                    server,
                    "direct",
                    format!("direct:{agent}:{n}"),
                    &agent,
                    "",
                    "",
                )
                .await;
            }
            15 => {
                submit(
                    &fleet,
                    server,
                    "rollout",
                    format!("rollout:{n}"),
                    "",
                    "soak=real",
                    "5",
                )
                .await
            }
            16 => run_job(&fleet, server, "soak-any").await,
            _ => command(&fleet, server, n).await,
        }
    }
}

fn pick_agent(fleet: &Fleet, rng: &mut Rng) -> String {
    let route = rng.below(fleet.fault_routes() as u64) as usize;
    let names = fleet.route_agents(route);
    names[rng.below(names.len() as u64) as usize].clone()
}

async fn submit(
    fleet: &Fleet,
    server: usize,
    kind: &str,
    text: String,
    agent: &str,
    selector: &str,
    batch: &str,
) {
    let at_ms = now_ms();
    let request = pb::SubmitTaskRequest {
        text,
        agent: agent.to_owned(),
        selector: selector.to_owned(),
        batch: batch.to_owned(),
        ..pb::SubmitTaskRequest::default()
    };
    let answer = tokio::time::timeout(CALL_LIMIT, async {
        let mut admin = fleet.admin(server).await?;
        Ok::<_, anyhow::Error>(admin.submit_task(request).await?.into_inner())
    })
    .await;
    fleet.note(match answer {
        Ok(Ok(answer)) => Event::Accepted {
            id: answer.id,
            kind: kind.to_owned(),
            at_ms,
        },
        Ok(Err(e)) => Event::Refused {
            kind: kind.to_owned(),
            at_ms,
            error: format!("{e:#}"),
        },
        Err(_) => Event::Refused {
            kind: kind.to_owned(),
            at_ms,
            error: format!("no answer within {CALL_LIMIT:?}"),
        },
    });
}

/// Fires a job now (its run's task is made by the server: the checker
/// finds it by its text, like the scheduled ones).
async fn run_job(fleet: &Fleet, server: usize, name: &str) {
    let at_ms = now_ms();
    let answer = tokio::time::timeout(CALL_LIMIT, async {
        let mut admin = fleet.admin(server).await?;
        Ok::<_, anyhow::Error>(
            admin
                .run_job(pb::JobNameRequest {
                    name: name.to_owned(),
                })
                .await?
                .into_inner(),
        )
    })
    .await;
    if !matches!(answer, Ok(Ok(_))) {
        fleet.note(Event::Refused {
            kind: format!("job {name}"),
            at_ms,
            error: match answer {
                Ok(Err(e)) => format!("{e:#}"),
                _ => format!("no answer within {CALL_LIMIT:?}"),
            },
        });
    }
}

/// A remote command through the operators' route (`contactd cmd`, TLS).
async fn command(fleet: &Fleet, server: usize, n: u64) {
    let at_ms = now_ms();
    let started = std::time::Instant::now();
    let mut cmd = tokio::process::Command::new(&fleet.contactd);
    cmd.arg("cmd")
        .arg("--addr")
        .arg(fleet.operator_route(server).to_string())
        .arg("--tls")
        .arg("--tls-ca-cert")
        .arg(fleet.ca_bundle())
        .arg("--timeout")
        .arg("10s")
        .arg(format!("echo soak {n}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let ok = matches!(
        tokio::time::timeout(CALL_LIMIT + Duration::from_secs(5), cmd.status()).await,
        Ok(Ok(status)) if status.success()
    );
    fleet.note(Event::Cmd {
        ok,
        at_ms,
        ms: started.elapsed().as_millis() as u64,
    });
}
