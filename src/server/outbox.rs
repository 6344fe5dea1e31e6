//! What the server has queued to send on a connection, bounded.
//!
//! A peer that reads its connection but never the replies on its streams
//! made the server hold every reply it was owed: once a stream's window is
//! spent, hyper holds the next reply, and tonic the buffer it was encoded
//! in, for every stream (40 connections of 250 `sendStatus` streams held
//! 1.29 GB). A peer that stops reading its socket makes HTTP/2 buffer up
//! to 400 KiB per stream the same way.
//!
//! Each connection has an [`Outbox`]: the bytes of replies and queue-mode
//! tasks produced for it that the server still holds. Every chunk an
//! [`Outbound`] body produces is counted until the HTTP/2 stack drops it
//! (written out, or discarded with a reset stream), so the count cannot
//! drift. The body stops producing while its connection holds
//! `server.max_connection_unsent`, or holds anything while all connections
//! together hold `server.max_unsent`, and resumes when chunks are sent. A
//! stream that is not polled is not read either, so the peer's own sends
//! stop at its HTTP/2 windows: the pause is flow control, and the server
//! holds at most the budget and one chunk per connection.
//!
//! Shared broadcast frames are not counted: one copy serves every agent.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http_body::Frame;
use parking_lot::Mutex;
use tonic::{Status, body::Body};

use super::counters::Counters;
use crate::untrusted::{Budget, WARN_EVERY};

/// One connection's bytes produced and not yet written out.
#[derive(Debug)]
pub struct Outbox {
    unsent: AtomicUsize,
    /// Every connection's, together (`Counters::unsent`).
    global: Arc<AtomicUsize>,
    /// Bodies paused on this connection, woken at its next flush.
    waiters: Mutex<Vec<Waker>>,
    has_waiters: AtomicBool,
}

impl Outbox {
    pub(super) fn new(global: Arc<AtomicUsize>) -> Outbox {
        Outbox {
            unsent: AtomicUsize::new(0),
            global,
            waiters: Mutex::new(Vec::new()),
            has_waiters: AtomicBool::new(false),
        }
    }

    fn over(&self, limits: &Limits) -> bool {
        let mine = self.unsent.load(Relaxed);
        mine >= limits.connection || (mine > 0 && self.global.load(Relaxed) >= limits.global)
    }

    fn wait(&self, waker: &Waker) {
        let mut waiters = self.waiters.lock();
        // At most one per stream: `max_concurrent_streams` bounds the list.
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
        self.has_waiters.store(true, Relaxed);
    }

    /// `data` is produced for this connection: counted until dropped.
    fn track(self: &Arc<Outbox>, data: Bytes) -> Bytes {
        let n = data.len();
        self.unsent.fetch_add(n, Relaxed);
        self.global.fetch_add(n, Relaxed);
        Bytes::from_owner(Tracked {
            data,
            outbox: Arc::clone(self),
        })
    }

    /// `n` bytes are no longer held (sent, or dropped with their stream):
    /// paused bodies may go on.
    fn sent(&self, n: usize) {
        self.unsent.fetch_sub(n, Relaxed);
        self.global.fetch_sub(n, Relaxed);
        if self.has_waiters.load(Relaxed) && self.has_waiters.swap(false, Relaxed) {
            let waiters = std::mem::take(&mut *self.waiters.lock());
            for waker in waiters {
                waker.wake();
            }
        }
    }
}

/// A chunk produced for a connection, counted in its outbox while it lives.
struct Tracked {
    data: Bytes,
    outbox: Arc<Outbox>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.outbox.sent(self.data.len());
    }
}

/// `server.max_connection_unsent` and `server.max_unsent`, in bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub connection: usize,
    pub global: usize,
}

/// The pauses' log lines, one per [`WARN_EVERY`] for the whole server.
#[derive(Debug)]
pub(super) struct Pauses {
    pub limits: Limits,
    log: Budget,
}

impl Pauses {
    pub(super) fn new(limits: Limits) -> Pauses {
        Pauses {
            limits,
            log: Budget::every(WARN_EVERY),
        }
    }
}

/// A response body whose bytes count against its connection's [`Outbox`],
/// and which waits while that is over its budget.
pub(super) struct Outbound {
    inner: Body,
    outbox: Arc<Outbox>,
    pauses: Arc<Pauses>,
    counters: Arc<Counters>,
    /// The peer, for the log line.
    peer: Option<std::net::SocketAddr>,
    /// In a pause now (counted once per pause).
    paused: bool,
}

impl Outbound {
    pub(super) fn new(
        inner: Body,
        outbox: Arc<Outbox>,
        pauses: Arc<Pauses>,
        counters: Arc<Counters>,
        peer: Option<std::net::SocketAddr>,
    ) -> Outbound {
        Outbound {
            inner,
            outbox,
            pauses,
            counters,
            peer,
            paused: false,
        }
    }

    fn pause(&mut self) {
        if self.paused {
            return;
        }
        self.paused = true;
        self.counters.sends_paused.fetch_add(1, Relaxed);
        let (outbox, limits) = (&self.outbox, self.pauses.limits);
        let peer = self.peer;
        self.pauses.log.hit(|suppressed| {
            tracing::warn!(
                peer = ?peer,
                unsent = outbox.unsent.load(Relaxed),
                unsent_total = outbox.global.load(Relaxed),
                max_connection_unsent = limits.connection,
                max_unsent = limits.global,
                suppressed,
                "a peer is not reading what it is sent: its replies and tasks wait \
                 (server.max_connection_unsent, server.max_unsent)"
            );
        });
    }
}

impl http_body::Body for Outbound {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let limits = self.pauses.limits;
        if self.outbox.over(&limits) {
            self.outbox.wait(cx.waker());
            // Again after registering: a flush in between would be missed.
            if self.outbox.over(&limits) {
                self.pause();
                return Poll::Pending;
            }
        }
        self.paused = false;
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| match frame.into_data() {
                Ok(data) => Frame::data(self.outbox.track(data)),
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
