//! Who is calling: one entry per caller (an agent by its name, a seed client
//! by its peer's IP address, so that reconnecting does not make new
//! entries), with its latest status and counters, bounded in number.
//! Delivery state (ack cursors) is not kept here: an evicted entry loses
//! nothing but counters. Named agents are the roster: the store keeps when
//! each was first and last seen and its counters
//! ([`Callers::roster_changes`]), and a restarted server starts from them.
//!
//! Streams hold their caller's entry (`Arc<Caller>`) for as long as they are
//! open, so per-message bookkeeping touches only that entry, never the map.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;
use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TaskTrackerToken},
};

use crate::{
    clock::{now_ms, unix_ms},
    labels::{Conflict, LabelCell, Labels},
    model::SavedAgent,
    net::shown_address,
    tasks::Agent,
    untrusted::{Budget, WARN_EVERY},
};

/// A connected agent's roster entry is saved at least this often (its
/// last-seen time), even when nothing else changed.
const SEEN_EVERY_MS: i64 = 60_000;

/// Refusal lines logged per caller, and for all callers together, per
/// [`REFUSAL_WINDOW`]; the rest are counted in the next line let through.
const REFUSALS_PER_CALLER: u32 = 5;
const REFUSALS_OVERALL: u32 = 50;
const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// One caller's record.
#[derive(Debug)]
pub struct Caller {
    /// How the caller is known: its agent name, or its peer address.
    pub id: Arc<str>,
    /// Whether `id` is an agent name (else a peer address).
    pub named: bool,
    /// Peer address of its latest call.
    address: Mutex<Option<SocketAddr>>,
    /// Broadcast mode: tasks it never got because they left retention.
    pub missed: AtomicU64,
    /// When its first open call began (reset when it reconnects after
    /// having no open call).
    connected_since: Mutex<SystemTime>,
    /// Calls open now; 0 means disconnected.
    open_calls: AtomicU32,
    /// When it was first seen (unix ms; kept across restarts for agents).
    first_seen_ms: i64,
    /// When a call of it last began or ended (unix ms).
    last_seen_ms: AtomicI64,
    /// Named agents: the roster entry last handed to the store.
    saved: Mutex<Option<SavedAgent>>,
    /// Latest status text (truncated) and when it was received.
    status: Mutex<Option<(String, SystemTime)>>,
    /// Longest status text kept.
    max_status: usize,
    /// Tasks sent to it, results received, results that reported failure.
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    /// Acks that changed nothing because the task was not delivered to it.
    pub refused_acks: AtomicU64,
    /// What limits its log lines, made at the first.
    budgets: OnceLock<Box<LogBudgets>>,
    /// The labels it said it has when it last opened a stream.
    claimed: Mutex<Arc<Labels>>,
    /// Its labels in force: the claimed ones with the server's pins over
    /// them (empty for seed clients), shared with its streams.
    labels: LabelCell,
    /// Cancelled to end its open streams: a child of the server's closing
    /// token, replaced by a fresh one when a reload revokes the caller's
    /// credential (its later calls are refused at the gate).
    streams: Mutex<CancellationToken>,
    /// A reload revoked its credential: its streams end UNAUTHENTICATED.
    revoked: AtomicBool,
    /// The client certificate chain of its latest call, if any.
    chain: Mutex<Option<Arc<[rustls::pki_types::CertificateDer<'static>]>>>,
    /// Order of last activity, for evicting the longest-idle entry.
    last_active: AtomicU64,
    /// `delivered`, `acked` and `failed` as the store gave them at start:
    /// the metrics count from there (this process' work only).
    base: [u64; 3],
}

/// The budgets of one caller's log lines. Most callers never log one, and
/// the four took 224 bytes of every caller's entry: they are made at the
/// first line (a budget made then lets as many through as one made with the
/// entry).
#[derive(Debug)]
struct LogBudgets {
    /// Refused acks.
    ack_refusals: Budget,
    /// A second connection under its name.
    name_clashes: Budget,
    /// Claims a pin overrode.
    label_conflicts: Budget,
    /// Its refused calls that may reach the log (see
    /// [`Callers::admit_refusal`]).
    refusals: Budget,
}

impl Caller {
    /// A token for one of its streams: cancelled when the server closes or
    /// a reload revokes this caller's credential. A clone, not a child: no
    /// stream cancels its own, and a child cost every stream about 150 bytes
    /// in the token tree.
    pub fn stream_token(&self) -> CancellationToken {
        self.streams.lock().clone()
    }

    fn budgets(&self) -> &LogBudgets {
        self.budgets.get_or_init(|| {
            Box::new(LogBudgets {
                ack_refusals: Budget::every(WARN_EVERY),
                name_clashes: Budget::every(WARN_EVERY),
                label_conflicts: Budget::every(WARN_EVERY),
                refusals: Budget::new(REFUSALS_PER_CALLER, REFUSAL_WINDOW),
            })
        })
    }

    /// The client certificate chain its latest call came with.
    pub fn set_chain(&self, chain: Option<Arc<[rustls::pki_types::CertificateDer<'static>]>>) {
        *self.chain.lock() = chain;
    }

    /// The client certificate chain of its latest call, if any.
    pub fn chain(&self) -> Option<Arc<[rustls::pki_types::CertificateDer<'static>]>> {
        self.chain.lock().clone()
    }

    /// Whether a reload revoked its credential (so its streams ended).
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }

    /// The caller as the broker sees it.
    pub fn agent(&self) -> Agent {
        Agent {
            name: Arc::clone(&self.id),
            named: self.named,
            address: self.address(),
            labels: Arc::clone(&self.labels),
        }
    }

    /// Its labels in force.
    pub fn labels(&self) -> Arc<Labels> {
        self.labels.load_full()
    }

    /// Records the labels a named agent says it has (`claimed`) and puts
    /// in force what `resolve` makes of them (the server's pins over them);
    /// a claim a pin overrode is logged, at most every few seconds per
    /// agent.
    pub fn claim(
        &self,
        claimed: Arc<Labels>,
        resolve: impl Fn(&str, &Arc<Labels>) -> (Arc<Labels>, Vec<Conflict>),
    ) {
        *self.claimed.lock() = Arc::clone(&claimed);
        self.relabel(&resolve);
    }

    /// Puts in force what `resolve` makes of the labels last claimed (at a
    /// reload that changed the pins).
    pub fn relabel(&self, resolve: &impl Fn(&str, &Arc<Labels>) -> (Arc<Labels>, Vec<Conflict>)) {
        if !self.named {
            return;
        }
        let claimed = Arc::clone(&self.claimed.lock());
        let (labels, conflicts) = resolve(&self.id, &claimed);
        if !conflicts.is_empty() {
            self.budgets().label_conflicts.hit(|_| {
                for c in &conflicts {
                    tracing::warn!(
                        agent = %self.id,
                        label = %c.key,
                        claimed = %c.claimed,
                        pinned = %c.pinned,
                        "agent claims a label the server pins otherwise ([[server.agents]]): \
                         the pinned value is in force"
                    );
                }
            });
        }
        self.labels.store(labels);
    }

    /// `text` cut to what is kept of this caller's reports
    /// (`server.max_status_size`), on a character boundary.
    pub fn kept<'a>(&self, text: &'a str) -> &'a str {
        &text[..text.floor_char_boundary(self.max_status)]
    }

    /// Records a status report, truncated to the configured bound.
    pub fn record_status(&self, text: &str) {
        let text = self.kept(text);
        let now = SystemTime::now();
        // Reuses the kept text's buffer: no allocation per report.
        match &mut *self.status.lock() {
            Some((kept, at)) => {
                kept.clear();
                kept.push_str(text);
                *at = now;
            }
            status @ None => *status = Some((text.to_owned(), now)),
        }
    }

    /// The latest status and when it arrived.
    pub fn status(&self) -> Option<(String, SystemTime)> {
        self.status.lock().clone()
    }

    /// Whether the caller has a call open.
    pub fn connected(&self) -> bool {
        self.open_calls.load(Ordering::Relaxed) > 0
    }

    /// When the current connection period began.
    pub fn connected_since(&self) -> SystemTime {
        *self.connected_since.lock()
    }

    /// Peer address of its latest call.
    pub fn address(&self) -> Option<SocketAddr> {
        *self.address.lock()
    }

    /// When it was first seen (unix ms).
    pub fn first_seen_ms(&self) -> i64 {
        self.first_seen_ms
    }

    /// When it was last seen: now if connected, else when its last call
    /// ended (unix ms).
    pub fn last_seen_ms(&self) -> i64 {
        if self.connected() {
            now_ms()
        } else {
            self.last_seen_ms.load(Ordering::Relaxed)
        }
    }

    /// Counts `count` acks that changed nothing (the latest of them for
    /// `task_id`), and logs it now and then.
    pub fn refuse_acks(&self, count: u64, task_id: u64, reason: &str) {
        let total = self.refused_acks.fetch_add(count, Ordering::Relaxed) + count;
        let before = total - count;
        // The log budget (a clock read and a lock) is asked when the total
        // passes the 1st, 2nd, 4th … and then every 1024th refusal only: a
        // flood of forged acks costs a counter, and still makes at most a
        // line per window. (Asking it for every one was 10 % of the
        // server's CPU.)
        let passed = |mark: fn(u64) -> u64| mark(total) != mark(before);
        if count == 0 || !(before == 0 || passed(|n| u64::from(n.ilog2())) || passed(|n| n / 1024))
        {
            return;
        }
        self.budgets().ack_refusals.hit(|_| {
            tracing::warn!(
                caller = %self.id,
                task_id,
                refused_total = total,
                "ack refused: {reason} (acks are applied only for tasks delivered to the caller)"
            );
        });
    }
}

/// The registry of callers.
#[derive(Debug)]
pub struct Callers {
    /// The server's closing token: every caller's streams end with it.
    closing: CancellationToken,
    map: Mutex<HashMap<Arc<str>, Arc<Caller>>>,
    limits: Mutex<Limits>,
    clock: AtomicU64,
    warned_full: AtomicBool,
    /// Refusals of every caller that may reach the log (callers not
    /// remembered get a fresh entry, and so a fresh budget, per call).
    refusals: Budget,
    /// Every open call holds a token, so shutdown can tell when the last
    /// one has ended.
    calls: TaskTracker,
    /// Told when a named agent connects or its last call ends (several
    /// servers sharing one store: the fleet view).
    presence: std::sync::OnceLock<Presence>,
    /// Times a caller went from no open call to one: named, anonymous.
    connections: [AtomicU64; 2],
    /// The counts of entries no longer in the map (evicted, forgotten),
    /// changed and read under the map's lock, so that the totals the
    /// metrics read never go down.
    retired: Mutex<Counts>,
}

/// Per-task counts of one caller, or of many added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub delivered: u64,
    pub acked: u64,
    pub failed: u64,
    pub missed: u64,
    pub refused_acks: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.delivered += other.delivered;
        self.acked += other.acked;
        self.failed += other.failed;
        self.missed += other.missed;
        self.refused_acks += other.refused_acks;
    }
}

/// What the metrics read of the registry at a scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// Counts since the start, of every caller remembered now or before
    /// (a caller served but never remembered, with the registry full of
    /// connected ones, is not counted).
    pub counts: Counts,
    pub connected_named: u64,
    pub connected_anonymous: u64,
    /// Connections so far (calls, for anonymous callers): named, anonymous.
    pub connections: [u64; 2],
}

/// See [`Callers::set_presence`].
#[derive(Clone)]
pub struct Presence(pub Arc<PresenceFn>);

/// Told a named agent and whether it just connected (else disconnected).
pub type PresenceFn = dyn Fn(&Caller, bool) + Send + Sync;

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Presence")
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_callers: usize,
    max_status: usize,
}

/// Keeps a caller marked as connected while a call is open.
#[derive(Debug)]
pub struct CallGuard {
    caller: Arc<Caller>,
    _call: TaskTrackerToken,
    presence: Option<Presence>,
}

impl std::ops::Deref for CallGuard {
    type Target = Caller;
    fn deref(&self) -> &Caller {
        &self.caller
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let caller = &self.caller;
        caller.last_seen_ms.store(now_ms(), Ordering::Relaxed);
        if caller.open_calls.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        // Its last call ended: a fleet event (seed clients' at debug: each
        // of their calls is a connection).
        let connected = caller.connected_since().elapsed().unwrap_or_default();
        let connected_for = humantime::format_duration(Duration::from_secs(connected.as_secs()));
        let address = shown_address(caller.address());
        if caller.named {
            tracing::info!(agent = %caller.id, %address, %connected_for, "agent disconnected");
            if let Some(presence) = &self.presence {
                (presence.0)(caller, false);
            }
        } else {
            tracing::debug!(caller = %caller.id, %address, %connected_for, "seed client disconnected");
        }
    }
}

impl Callers {
    /// A registry keeping at most `max_callers` entries and `max_status`
    /// bytes of status per entry.
    pub fn new(max_callers: usize, max_status: usize, closing: CancellationToken) -> Callers {
        Callers {
            closing,
            map: Mutex::new(HashMap::new()),
            limits: Mutex::new(Limits {
                max_callers,
                max_status,
            }),
            clock: AtomicU64::new(0),
            warned_full: AtomicBool::new(false),
            refusals: Budget::new(REFUSALS_OVERALL, REFUSAL_WINDOW),
            calls: TaskTracker::new(),
            presence: std::sync::OnceLock::new(),
            connections: Default::default(),
            retired: Mutex::new(Counts::default()),
        }
    }

    /// Sets what is told of named agents' connects and disconnects (once).
    pub fn set_presence(&self, presence: Presence) {
        let _ = self.presence.set(presence);
    }

    /// Changes the bounds (on a config reload); they apply to new entries.
    pub fn set_limits(&self, max_callers: usize, max_status: usize) {
        *self.limits.lock() = Limits {
            max_callers,
            max_status,
        };
    }

    /// Marks the start of a call by `id`, creating its entry if needed.
    ///
    /// At the bound, the longest-idle disconnected entry makes room; if every
    /// entry is connected, the caller is served but not remembered.
    pub fn enter(&self, id: &str, named: bool, address: Option<SocketAddr>) -> CallGuard {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let limits = *self.limits.lock();
        let mut map = self.map.lock();
        let caller = match map.get(id) {
            Some(caller) => Arc::clone(caller),
            None => {
                let caller = Arc::new(Caller::new(
                    &self.closing,
                    id,
                    named,
                    address,
                    limits.max_status,
                    tick,
                ));
                if map.len() >= limits.max_callers && !self.evict_one(&mut map) {
                    if !self.warned_full.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            max_callers = limits.max_callers,
                            "caller registry full of connected callers; new callers are served \
                             but not remembered (raise server.max_callers)"
                        );
                    }
                } else {
                    map.insert(Arc::clone(&caller.id), Arc::clone(&caller));
                }
                caller
            }
        };
        drop(map);
        // Here again, through the gate: its credential is valid (again).
        caller.revoked.store(false, Ordering::Relaxed);
        let was_open = caller.open_calls.fetch_add(1, Ordering::Relaxed) > 0;
        let previous = match address {
            Some(_) => std::mem::replace(&mut *caller.address.lock(), address),
            None => None,
        };
        caller.last_active.store(tick, Ordering::Relaxed);
        if !was_open {
            self.connections[usize::from(!named)].fetch_add(1, Ordering::Relaxed);
            *caller.connected_since.lock() = SystemTime::now();
            caller.last_seen_ms.store(now_ms(), Ordering::Relaxed);
            let address = shown_address(address);
            if named {
                tracing::info!(agent = %caller.id, %address, "agent connected");
                if let Some(presence) = self.presence.get() {
                    (presence.0)(&caller, true);
                }
            } else {
                tracing::debug!(caller = %caller.id, %address, "seed client connected");
            }
        } else if named && previous.is_some() && address.is_some() && previous != address {
            // One agent's calls share its connection (one address): this
            // one came over another, while the first is open.
            caller.budgets().name_clashes.hit(|clashes| {
                tracing::warn!(
                    agent = %caller.id,
                    address = %shown_address(address),
                    other_address = %shown_address(previous),
                    clashes,
                    "a second connection uses the name of a connected agent: two agents share \
                     the name (their rows and counters merge), or it reconnected before its old \
                     connection was found dead"
                );
            });
        }
        CallGuard {
            caller,
            _call: self.calls.token(),
            presence: self.presence.get().cloned(),
        }
    }

    /// Whether a refusal of `caller`'s call may be logged: `Some(n)`, `n`
    /// being the refusals left out of the log before it.
    pub fn admit_refusal(&self, caller: &Caller) -> Option<u64> {
        let own = caller.budgets().refusals.admit()?;
        match self.refusals.admit() {
            Some(overall) => Some(own + overall),
            None => {
                // Counted again when this caller's next line is let through.
                caller.budgets().refusals.count_suppressed();
                None
            }
        }
    }

    /// Resolves once no call is open (meant for shutdown, once streams have
    /// been told to end).
    pub async fn no_open_calls(&self) {
        self.calls.close();
        self.calls.wait().await;
    }

    /// Counts and connections of all callers, for the metrics: a pass
    /// over the entries (the per-task counters are theirs; nothing is
    /// counted twice on the hot path).
    pub fn totals(&self) -> Totals {
        let map = self.map.lock();
        let mut totals = Totals {
            counts: *self.retired.lock(),
            connections: [
                self.connections[0].load(Ordering::Relaxed),
                self.connections[1].load(Ordering::Relaxed),
            ],
            ..Totals::default()
        };
        for caller in map.values() {
            totals.counts += caller.counts();
            if caller.connected() {
                if caller.named {
                    totals.connected_named += 1;
                } else {
                    totals.connected_anonymous += 1;
                }
            }
        }
        totals
    }

    /// Every remembered caller.
    pub fn list(&self) -> Vec<Arc<Caller>> {
        self.map.lock().values().cloned().collect()
    }

    /// The entry for `id`, if remembered.
    pub fn get(&self, id: &str) -> Option<Arc<Caller>> {
        self.map.lock().get(id).cloned()
    }

    /// Ends the open streams of the named agents in `names`, whose
    /// credentials a reload revoked; returns how many had streams open.
    pub fn revoke(&self, names: &[Arc<str>]) -> usize {
        let mut ended = 0;
        for name in names {
            let Some(caller) = self.get(name).filter(|c| c.named) else {
                continue;
            };
            caller.revoked.store(true, Ordering::Relaxed);
            let fresh = self.closing.child_token();
            std::mem::replace(&mut *caller.streams.lock(), fresh).cancel();
            if caller.connected() {
                ended += 1;
                tracing::warn!(
                    agent = %caller.id,
                    "credential revoked by a reload: its open streams are ended"
                );
            }
        }
        ended
    }
}

impl Caller {
    fn new(
        closing: &CancellationToken,
        id: &str,
        named: bool,
        address: Option<SocketAddr>,
        max_status: usize,
        tick: u64,
    ) -> Caller {
        let now = SystemTime::now();
        Caller {
            id: Arc::from(id),
            named,
            address: Mutex::new(address),
            missed: AtomicU64::new(0),
            connected_since: Mutex::new(now),
            open_calls: AtomicU32::new(0),
            first_seen_ms: unix_ms(now),
            last_seen_ms: AtomicI64::new(unix_ms(now)),
            saved: Mutex::new(None),
            status: Mutex::new(None),
            max_status,
            delivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            refused_acks: AtomicU64::new(0),
            budgets: OnceLock::new(),
            claimed: Mutex::new(Arc::default()),
            labels: LabelCell::default(),
            streams: Mutex::new(closing.child_token()),
            revoked: AtomicBool::new(false),
            chain: Mutex::new(None),
            last_active: AtomicU64::new(tick),
            base: [0; 3],
        }
    }

    /// Its counts since this process started, for the metrics.
    fn counts(&self) -> Counts {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        Counts {
            delivered: load(&self.delivered).saturating_sub(self.base[0]),
            acked: load(&self.acked).saturating_sub(self.base[1]),
            failed: load(&self.failed).saturating_sub(self.base[2]),
            missed: load(&self.missed),
            refused_acks: load(&self.refused_acks),
        }
    }

    /// Its roster entry as of now.
    fn roster_entry(&self) -> SavedAgent {
        SavedAgent {
            name: Arc::clone(&self.id),
            first_ms: self.first_seen_ms,
            last_ms: self.last_seen_ms.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

impl Callers {
    /// Adds the roster a store kept (most recently seen first), as
    /// disconnected agents, up to `server.max_callers`.
    pub fn restore(&self, agents: Vec<SavedAgent>) {
        let limits = *self.limits.lock();
        let mut map = self.map.lock();
        for saved in agents {
            if map.len() >= limits.max_callers {
                break;
            }
            let tick = self.clock.fetch_add(1, Ordering::Relaxed);
            let mut caller = Caller::new(
                &self.closing,
                &saved.name,
                true,
                None,
                limits.max_status,
                tick,
            );
            let last = std::time::UNIX_EPOCH
                + Duration::from_millis(u64::try_from(saved.last_ms).unwrap_or(0));
            *caller.connected_since.get_mut() = last;
            caller.first_seen_ms = saved.first_ms;
            *caller.last_seen_ms.get_mut() = saved.last_ms;
            *caller.delivered.get_mut() = saved.delivered;
            *caller.acked.get_mut() = saved.acked;
            *caller.failed.get_mut() = saved.failed;
            caller.base = [saved.delivered, saved.acked, saved.failed];
            *caller.saved.get_mut() = Some(saved);
            map.insert(Arc::clone(&caller.id), Arc::new(caller));
        }
    }

    /// Named agents whose roster entry changed since the last call (and
    /// connected ones not saved for a minute, for their last-seen time).
    pub fn roster_changes(&self) -> Vec<SavedAgent> {
        let now = now_ms();
        let mut changed = Vec::new();
        for caller in self.list() {
            if !caller.named {
                continue;
            }
            let mut entry = caller.roster_entry();
            let mut saved = caller.saved.lock();
            if caller.connected() {
                let last_saved = saved.as_ref().map_or(i64::MIN, |s| s.last_ms);
                entry.last_ms = if now.saturating_sub(last_saved) >= SEEN_EVERY_MS {
                    now
                } else {
                    last_saved.max(entry.last_ms)
                };
            }
            if saved.as_ref() != Some(&entry) {
                *saved = Some(entry.clone());
                changed.push(entry);
            }
        }
        changed
    }

    /// Forgets the disconnected agents last seen before `before_ms`;
    /// returns how many.
    pub fn forget_before(&self, before_ms: i64) -> usize {
        let mut map = self.map.lock();
        let len = map.len();
        let mut retired = self.retired.lock();
        map.retain(|_, c| {
            let keep = c.connected() || c.last_seen_ms.load(Ordering::Relaxed) >= before_ms;
            if !keep {
                *retired += c.counts();
            }
            keep
        });
        len - map.len()
    }

    /// Removes the longest-idle disconnected entry; false if all are connected.
    fn evict_one(&self, map: &mut HashMap<Arc<str>, Arc<Caller>>) -> bool {
        let oldest = map
            .values()
            .filter(|c| !c.connected())
            .min_by_key(|c| c.last_active.load(Ordering::Relaxed))
            .map(|c| Arc::clone(&c.id));
        match oldest.and_then(|id| map.remove(&id)) {
            Some(evicted) => {
                *self.retired.lock() += evicted.counts();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_is_bounded_and_evicts_idle_callers_first() {
        let callers = Callers::new(2, 8, CancellationToken::new());
        let a = callers.enter("a", true, None);
        drop(callers.enter("b", true, None));
        drop(callers.enter("c", true, None));
        let mut ids: Vec<_> = callers.list().iter().map(|c| c.id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "c"]);
        let d = callers.enter("d", true, None);
        let e = callers.enter("e", true, None);
        assert!(
            callers.get("e").is_none(),
            "all connected: e is served, not remembered"
        );
        drop((a, d, e));
    }

    #[test]
    fn totals_keep_what_evicted_and_forgotten_callers_counted() {
        let callers = Callers::new(1, 8, CancellationToken::new());
        let a = callers.enter("a", true, None);
        a.delivered.fetch_add(3, Ordering::Relaxed);
        a.acked.fetch_add(2, Ordering::Relaxed);
        drop(a);
        // b takes a's place: a's counts stay in the totals.
        let b = callers.enter("b", true, None);
        b.delivered.fetch_add(1, Ordering::Relaxed);
        let totals = callers.totals();
        assert_eq!((totals.counts.delivered, totals.counts.acked), (4, 2));
        assert_eq!((totals.connected_named, totals.connections), (1, [2, 0]));
        drop(b);
        assert_eq!(callers.forget_before(i64::MAX), 1);
        let totals = callers.totals();
        assert_eq!((totals.counts.delivered, totals.connected_named), (4, 0));
    }

    #[test]
    fn restored_counts_are_not_this_process_work() {
        let callers = Callers::new(4, 8, CancellationToken::new());
        callers.restore(vec![SavedAgent {
            name: Arc::from("a"),
            first_ms: 0,
            last_ms: 0,
            delivered: 100,
            acked: 90,
            failed: 10,
        }]);
        assert_eq!(callers.totals().counts, Counts::default());
        let a = callers.enter("a", true, None);
        a.acked.fetch_add(1, Ordering::Relaxed);
        assert_eq!(callers.totals().counts.acked, 1);
    }

    #[test]
    fn status_is_truncated_on_a_char_boundary() {
        let callers = Callers::new(10, 5, CancellationToken::new());
        let a = callers.enter("a", true, None);
        a.record_status("héllo wörld");
        assert_eq!(a.status().unwrap().0, "héll");
        assert!(a.connected());
        drop(a);
        assert!(!callers.get("a").unwrap().connected());
    }
}
