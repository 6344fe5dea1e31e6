//! The integration tests: one test binary, so a cold build (CI's) compiles
//! the shared helpers and links the tonic stack once, not once per file.
//! Each module talks to a real server (in-process on 127.0.0.1:0, or the
//! real binary) with real clients.

mod common;

mod agent;
mod claims;
mod cli;
mod cmd;
mod cmd_env;
mod contact;
mod ctl;
// The defect hooks exist in debug builds only (src/defects.rs).
#[cfg(debug_assertions)]
mod defects;
mod delivery;
mod fleet;
mod hostile;
mod jobs;
mod labels;
mod layers;
mod metrics;
mod operations;
mod postgres;
mod serve;
mod soak_check;
mod socket;
mod spool;
mod store;
mod store_files;
mod task_show;
mod trust;
mod web;
