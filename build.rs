//! Stamps the binary with the git commit and the build date, for
//! `contactd --version` (issue 14). Hand-written: two environment variables
//! do not need a crate (vergen and friends pull in git libraries).
//!
//! `CONTACTD_COMMIT`: `git rev-parse --short=12 HEAD`, or `unknown`
//! outside a git checkout (a source tarball). `CONTACTD_BUILD_DATE`: the UTC date of `SOURCE_DATE_EPOCH` when
//! set (reproducible builds), else of now.

use std::process::Command;

fn main() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=CONTACTD_COMMIT={commit}");
    println!("cargo:rustc-env=CONTACTD_BUILD_DATE={}", civil_date(secs));
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // Again when HEAD moves: HEAD itself (a checkout), the branch it names
    // (a commit) and packed-refs, wherever git keeps them (a worktree's
    // .git is a file). Only paths that exist: cargo reruns a script whose
    // watched path is missing at every build.
    let dirs = [
        git(&["rev-parse", "--git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ];
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for dir in dirs.iter().flatten() {
        let mut paths = vec![format!("{dir}/HEAD"), format!("{dir}/packed-refs")];
        if let Some(branch) = &branch {
            paths.push(format!("{dir}/{branch}"));
        }
        for path in paths {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}

/// `YYYY-MM-DD` of a Unix time (days to a proleptic Gregorian date, Howard
/// Hinnant's algorithm).
fn civil_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
