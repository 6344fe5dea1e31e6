//! Where PostgreSQL's server programs are and whom they run as: shared by
//! the tests' throwaway clusters (`common/postgres.rs`) and the soak
//! harness's (`examples/soak/postgres.rs`, which includes this file).

use std::path::PathBuf;

use nix::unistd::User;

/// Where PostgreSQL's server programs are: `$CONTACTD_TEST_PG_BIN`, else
/// the newest /usr/lib/postgresql/N/bin (Debian's), else `$PATH`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CONTACTD_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
}

/// PostgreSQL refuses to run as root: as root, the cluster belongs to
/// `postgres` (Debian's package makes it) or else `nobody`.
pub fn run_as() -> Option<User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    ["postgres", "nobody"]
        .into_iter()
        .find_map(|name| User::from_name(name).ok().flatten())
}
