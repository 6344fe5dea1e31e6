//! A log file that rotates by size (like Python's RotatingFileHandler:
//! `contactd.log`, `.1`, `.2`, …) or by time (`contactd.log.2026-11-28`).
//!
//! Hand-written rather than a crate: tracing-appender rotates by time only
//! (tokio-rs/tracing#858), and the maintained size-rotating crates panic
//! when the log directory cannot be created, which would silently end
//! logging in the writer thread. This writer returns errors instead and
//! tries to reopen the file on the next line.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

/// When to rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// When the file reaches `max_bytes`; keep `backups` older files.
    Size { max_bytes: u64, backups: usize },
    /// When the UTC hour or day changes; keep `keep` older files.
    Time { period: Period, keep: usize },
}

/// A time-rotation period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Hourly,
    Daily,
}

impl Period {
    fn seconds(self) -> u64 {
        match self {
            Period::Hourly => 3600,
            Period::Daily => 86_400,
        }
    }

    /// The suffix of a file holding this period: `2026-11-28` or `2026-11-28T13`.
    fn suffix(self, index: u64) -> String {
        let start = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(index * self.seconds());
        let stamp = humantime::format_rfc3339_seconds(start).to_string();
        match self {
            Period::Hourly => stamp[..13].to_owned(),
            Period::Daily => stamp[..10].to_owned(),
        }
    }
}

fn period_of(time: SystemTime, period: Period) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        / period.seconds()
}

/// The rotating file. Each `write` call is one log line and goes whole into
/// one file, so a file exceeds `max_bytes` by at most one line.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    policy: Policy,
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
    /// Index of the period the current file belongs to (time policy).
    period: u64,
}

impl RotatingFile {
    /// Opens (creating it and its directory if needed) the file at `path`.
    ///
    /// # Errors
    /// When the directory or file cannot be created or opened for writing.
    pub fn open(path: &Path, policy: Policy) -> io::Result<RotatingFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let mut file = RotatingFile {
            path: path.to_owned(),
            policy,
            file: None,
            size: 0,
            period: 0,
        };
        file.reopen()?;
        Ok(file)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let meta = file.metadata()?;
        self.size = meta.len();
        if let Policy::Time { period, .. } = self.policy {
            // A file left by an earlier run belongs to the period it was last written in.
            let written = if meta.len() > 0 {
                meta.modified()?
            } else {
                SystemTime::now()
            };
            self.period = period_of(written, period);
        }
        self.file = Some(file);
        Ok(())
    }

    fn numbered(&self, n: usize) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        name.into()
    }

    fn rotate_by_size(&mut self, backups: usize) -> io::Result<()> {
        self.file = None;
        if backups == 0 {
            fs::remove_file(&self.path)?;
        } else {
            for n in (1..backups).rev() {
                let from = self.numbered(n);
                if from.exists() {
                    fs::rename(from, self.numbered(n + 1))?;
                }
            }
            fs::rename(&self.path, self.numbered(1))?;
        }
        self.reopen()
    }

    fn rotate_by_time(&mut self, period: Period, keep: usize, now: u64) -> io::Result<()> {
        self.file = None;
        let mut done = self.path.clone().into_os_string();
        done.push(format!(".{}", period.suffix(self.period)));
        if self.size > 0 {
            fs::rename(&self.path, PathBuf::from(done))?;
        }
        self.prune(keep)?;
        self.reopen()?;
        self.period = now;
        Ok(())
    }

    /// Removes time-rotated files beyond the `keep` newest.
    fn prune(&self, keep: usize) -> io::Result<()> {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return Ok(());
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let prefix = format!("{}.", name.to_string_lossy());
        let mut rotated: Vec<PathBuf> = fs::read_dir(dir)?
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                // Time suffixes start with a year: `.2026-…`.
                name.strip_prefix(&prefix)
                    .is_some_and(|s| s.len() >= 10 && s.as_bytes()[4] == b'-')
            })
            .map(|e| e.path())
            .collect();
        rotated.sort();
        let excess = rotated.len().saturating_sub(keep);
        for old in &rotated[..excess] {
            fs::remove_file(old)?;
        }
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if let Policy::Time { period, keep } = self.policy {
            let now = period_of(SystemTime::now(), period);
            if now != self.period {
                self.rotate_by_time(period, keep, now)?;
            }
        }
        if self.file.is_none() {
            self.reopen()?;
        }
        let file = self.file.as_mut().expect("opened above");
        if let Err(e) = file.write_all(line) {
            // Reopen on the next line: the file may have been removed or the disk freed.
            self.file = None;
            return Err(e);
        }
        self.size += line.len() as u64;
        if let Policy::Size { max_bytes, backups } = self.policy
            && self.size >= max_bytes
        {
            self.rotate_by_size(backups)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<(String, u64)> {
        let mut found: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        found.sort();
        found
    }

    #[test]
    fn size_rotation_keeps_backups_plus_one_files_within_a_line_of_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let policy = Policy::Size {
            max_bytes: 100,
            backups: 2,
        };
        let mut file = RotatingFile::open(&path, policy).unwrap();
        let line = b"0123456789012345678901234567890\n"; // 32 bytes
        for _ in 0..50 {
            file.write_all(line).unwrap();
        }
        let found = files(dir.path());
        let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["c.log", "c.log.1", "c.log.2"]);
        assert!(found.iter().all(|(_, len)| *len < 100 + 32), "{found:?}");
        assert_eq!(found[1].1, 128, "a rotated file holds whole lines");
    }

    #[test]
    fn time_rotation_names_files_by_period_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let policy = Policy::Time {
            period: Period::Daily,
            keep: 2,
        };
        let mut file = RotatingFile::open(&path, policy).unwrap();
        let today = file.period;
        for back in [5, 4, 3] {
            file.period = today - back;
            file.write_all(b"old\n").unwrap();
        }
        let names: Vec<_> = files(dir.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(names[0], "c.log");
        assert!(
            names[1].starts_with("c.log.20") && names[1].len() == "c.log.2026-11-28".len(),
            "{names:?}"
        );
        assert_eq!(Period::Hourly.suffix(0), "1970-01-01T00");
    }
}
