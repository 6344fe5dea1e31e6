//! The task generator: one for the whole server, publishing `tasks.batch`
//! tasks every `tasks.interval` (the first batch at start-up), following
//! config reloads. With several servers sharing a PostgreSQL store, one
//! for the fleet: only the server holding the lease
//! ([`Store::leader`]) publishes; the others keep the schedule idle.

use std::sync::Arc;

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::{
    config::{Config, TasksConfig},
    store::Store,
};

/// Runs until `shutdown` is cancelled: each batch is committed to `store`
/// before it reaches the hub (and so any agent).
pub async fn run(
    hub: Arc<Hub>,
    store: Store,
    mut config: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
) {
    let mut tasks: TasksConfig = config.borrow_and_update().tasks.clone();
    hub.set_retain(tasks.retain);
    let mut last = Instant::now();
    let mut next = last;
    let mut failures = 0u64;
    let leader = store.leader();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(next) => {
                if *leader.borrow() {
                    generate(&store, &tasks, &mut failures).await;
                }
                last = next;
                // After a stall (a suspended host), resume the schedule
                // instead of publishing the missed batches in a burst.
                next = after(last, tasks.interval).max(Instant::now());
            }
            changed = config.changed() => {
                if changed.is_err() {
                    // The config owner is gone: keep the schedule as it is.
                    shutdown.cancelled().await;
                    return;
                }
                let new = config.borrow_and_update().tasks.clone();
                // (The server applies the rest of a reload, the hub's
                // retention included: here, only this loop's schedule.)
                if new.interval != tasks.interval {
                    next = after(last, new.interval).max(Instant::now());
                }
                tasks = new;
            }
        }
    }
}

/// `interval` after `last`. check-config bounds the interval, but an
/// overflow here would end generation for good (a panic in this task), so
/// it saturates to a year, and a later reload still reschedules.
fn after(last: Instant, interval: std::time::Duration) -> Instant {
    last.checked_add(interval)
        .unwrap_or_else(|| last + std::time::Duration::from_secs(365 * 86_400))
}

/// Publishes one batch; failures (a full store, every batch until it has
/// room again) are logged at the 1st, 2nd, 4th, 8th … in a row.
async fn generate(store: &Store, tasks: &TasksConfig, failures: &mut u64) {
    if tasks.batch == 0 {
        return;
    }
    let template = tasks.template.clone();
    let batch = store.publish(tasks.batch as usize, move |id| (template.render(id), None));
    match batch.await {
        Ok(ids) => {
            if *failures > 0 {
                tracing::info!(
                    failed_batches = *failures,
                    "generated tasks published again"
                );
                *failures = 0;
            }
            tracing::debug!(first = ids.start, last = ids.end - 1, "generated tasks");
        }
        Err(e) => {
            *failures += 1;
            if failures.is_power_of_two() {
                tracing::error!(
                    failed_batches = *failures,
                    "generated tasks not published: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tasks::{Delivery, Start};

    #[tokio::test(start_paused = true)]
    async fn publishes_batches_on_schedule_and_follows_reloads() {
        let hub = Hub::new(100);
        let mut config = Config::default();
        config.tasks.batch = 2;
        config.tasks.interval = Duration::from_secs(40);
        let (tx, rx) = watch::channel(Arc::new(config.clone()));
        let token = CancellationToken::new();
        let mut sub = hub.subscribe(Start::Oldest);
        let store = Store::memory();
        store.set_sink({
            let hub = Arc::clone(&hub);
            Arc::new(move |tasks| hub.append_tasks(tasks))
        });
        let generator = tokio::spawn(run(hub.clone(), store, rx, token.clone()));

        let mut ids = Vec::new();
        for _ in 0..4 {
            match sub.recv().await {
                Delivery::Task(t) => ids.push(t.id),
                Delivery::Skipped(n) => panic!("skipped {n}"),
            }
        }
        assert_eq!(ids, [1, 2, 3, 4]);
        let started = Instant::now();

        config.tasks.interval = Duration::from_secs(1);
        config.tasks.batch = 1;
        tx.send_replace(Arc::new(config));
        for want in 5..8 {
            match sub.recv().await {
                Delivery::Task(t) => assert_eq!(t.id, want),
                Delivery::Skipped(n) => panic!("skipped {n}"),
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        token.cancel();
        generator.await.unwrap();
    }
}
