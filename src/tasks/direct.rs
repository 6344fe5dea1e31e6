//! Direct delivery: the named agents connected to this server, each with a
//! mailbox its `getTask` streams read besides the ring (or the queue). A
//! job's run sends its task to one agent at a time through it, when its
//! rollout admits that agent; nothing else does.
//!
//! A mailbox lives as long as the stream that reads it: an agent that
//! reconnects gets a new one, and its runs send it again what it was sent
//! but did not answer (it dedupes by task id and retry, so it does not run
//! a task twice).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Weak},
};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::{labels::LabelCell, proto::contact::ServerMsg};

/// Messages waiting in one stream's mailbox at most; beyond, the oldest is
/// dropped (its run sends it again when the agent reconnects). Each run
/// sends an agent one message at a time, so this bounds runs, not tasks.
const MAILBOX: usize = 4096;

/// One `getTask` stream's direct messages.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<VecDeque<ServerMsg>>,
    notify: Notify,
}

impl Mailbox {
    /// The next message, if one waits.
    pub fn pop(&self) -> Option<ServerMsg> {
        self.queue.lock().pop_front()
    }

    /// Resolves when a message may be waiting (after one was put in since
    /// the last wake).
    pub async fn ready(&self) {
        self.notify.notified().await;
    }

    /// The next message, waiting for one. Cancel-safe.
    pub async fn recv(&self) -> ServerMsg {
        loop {
            if let Some(msg) = self.pop() {
                return msg;
            }
            self.ready().await;
        }
    }

    fn push(&self, msg: ServerMsg) {
        {
            let mut queue = self.queue.lock();
            if queue.len() >= MAILBOX {
                queue.pop_front();
            }
            queue.push_back(msg);
        }
        // A permit is kept if no one waits: the next `ready` returns at once.
        self.notify.notify_one();
    }
}

/// A connected named agent: its labels and its streams' mailboxes.
#[derive(Debug)]
struct Present {
    labels: LabelCell,
    mailboxes: Vec<Weak<Mailbox>>,
}

/// The named agents connected to this server.
#[derive(Debug, Default)]
pub struct Registry {
    agents: Mutex<HashMap<Arc<str>, Present>>,
}

impl Registry {
    /// A new stream of `name`: its mailbox, kept as long as the stream is.
    pub fn join(&self, name: &Arc<str>, labels: &LabelCell) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox {
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
        });
        let mut agents = self.agents.lock();
        let present = agents.entry(Arc::clone(name)).or_insert_with(|| Present {
            labels: Arc::clone(labels),
            mailboxes: Vec::new(),
        });
        present.labels = Arc::clone(labels);
        present.mailboxes.retain(|m| m.strong_count() > 0);
        present.mailboxes.push(Arc::downgrade(&mailbox));
        mailbox
    }

    /// A stream of `name` ended: forgets the agent once none is left.
    pub fn left(&self, name: &str) {
        let mut agents = self.agents.lock();
        if let Some(present) = agents.get_mut(name) {
            present.mailboxes.retain(|m| m.strong_count() > 0);
            if present.mailboxes.is_empty() {
                agents.remove(name);
            }
        }
    }

    /// Puts `msg` in a mailbox of `name`'s (its newest stream's); false
    /// when it has no stream here.
    pub fn send(&self, name: &str, msg: ServerMsg) -> bool {
        let mailbox = {
            let agents = self.agents.lock();
            agents
                .get(name)
                .and_then(|p| p.mailboxes.iter().rev().find_map(Weak::upgrade))
        };
        match mailbox {
            Some(mailbox) => {
                mailbox.push(msg);
                true
            }
            None => false,
        }
    }

    /// Whether `name` has a stream here.
    pub fn is_connected(&self, name: &str) -> bool {
        self.agents
            .lock()
            .get(name)
            .is_some_and(|p| p.mailboxes.iter().any(|m| m.strong_count() > 0))
    }

    /// Every connected agent with its labels (a snapshot).
    pub fn connected(&self) -> Vec<(Arc<str>, LabelCell)> {
        self.agents
            .lock()
            .iter()
            .filter(|(_, p)| p.mailboxes.iter().any(|m| m.strong_count() > 0))
            .map(|(name, p)| (Arc::clone(name), Arc::clone(&p.labels)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64) -> ServerMsg {
        ServerMsg {
            id,
            ..ServerMsg::default()
        }
    }

    #[tokio::test]
    async fn a_message_reaches_the_newest_stream_and_none_reaches_a_gone_agent() {
        let registry = Registry::default();
        let name: Arc<str> = Arc::from("web-1");
        let labels = LabelCell::default();
        let old = registry.join(&name, &labels);
        let new = registry.join(&name, &labels);
        assert!(registry.send("web-1", msg(7)));
        assert_eq!(new.recv().await.id, 7);
        assert!(old.pop().is_none());
        assert!(!registry.send("db-1", msg(8)));
        drop((old, new));
        registry.left("web-1");
        assert!(!registry.is_connected("web-1"));
        assert!(!registry.send("web-1", msg(9)));
        assert!(registry.connected().is_empty());
    }
}
