//! Defects put in on purpose, to prove that the soak checker
//! (`examples/soak/check.rs`) reports what it claims to on a real build
//! (`tests/it/defects.rs`): an ack dropped, a queue task handed out twice,
//! a few KiB leaked per accepted connection.
//!
//! Compiled only with the `test-defects` cargo feature, and only in builds
//! with debug assertions (the dev profile). `cargo test` turns the feature
//! on (Cargo.toml's dev-dependency on this package), and so does any build
//! of the examples; `cargo build` and `cargo run` never do, and no release
//! build has the hooks, whatever its features. A debug binary built by
//! `cargo test` has them, and CI packages that binary: so even then every
//! hook is inert unless the process was started with `CONTACTD_TEST_DEFECT`
//! naming one defect (`drop-ack`, `hand-out-twice` or `leak`). Each hook
//! sits at one place, marked `DEFECT`, behind
//! `#[cfg(all(feature = "test-defects", debug_assertions))]`.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering::Relaxed},
};

/// The variable that turns one defect on, read once per process.
pub const VAR: &str = "CONTACTD_TEST_DEFECT";

/// Bytes kept for ever per accepted connection by the `leak` defect.
pub const LEAK_BYTES: usize = 8 * 1024;

/// One defect in five acks or hand-outs: often enough for a short test to
/// see several, rarely enough that the rest of the workload runs as usual.
const EVERY: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defect {
    DropAck,
    HandOutTwice,
    Leak,
}

fn active() -> Option<Defect> {
    static ACTIVE: OnceLock<Option<Defect>> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let name = std::env::var(VAR).ok()?;
        let defect = match name.as_str() {
            "drop-ack" => Defect::DropAck,
            "hand-out-twice" => Defect::HandOutTwice,
            "leak" => Defect::Leak,
            _ => {
                tracing::warn!("{VAR}={name:?} names no defect: none is on");
                return None;
            }
        };
        tracing::warn!("a deliberate defect is on ({VAR}={name}): for tests only");
        Some(defect)
    })
}

/// Whether this is the fifth, tenth, ... call counted by `counter`.
fn one_in_five(counter: &AtomicU64) -> bool {
    counter.fetch_add(1, Relaxed) % EVERY == EVERY - 1
}

/// `drop-ack`: whether to drop this queue-mode ack (one in five): the
/// server records nothing, while the agent thinks it was delivered.
pub fn drop_ack() -> bool {
    static ACKS: AtomicU64 = AtomicU64::new(0);
    active() == Some(Defect::DropAck) && one_in_five(&ACKS)
}

/// `hand-out-twice`: whether to hand this queue task to a second agent as
/// well (one in five hand-outs).
pub fn hand_out_twice() -> bool {
    static HAND_OUTS: AtomicU64 = AtomicU64::new(0);
    active() == Some(Defect::HandOutTwice) && one_in_five(&HAND_OUTS)
}

/// `leak`: keeps [`LEAK_BYTES`] for ever, written to (so that they count in
/// the process's RSS), once per accepted connection.
pub fn leak_per_connection() {
    if active() == Some(Defect::Leak) {
        Box::leak(vec![0xa5_u8; LEAK_BYTES].into_boxed_slice());
    }
}
