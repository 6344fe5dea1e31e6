//! `[[jobs]]`: named, scheduled tasks with a target and a way of running:
//! their keys, defaults and checks. What a job does when it fires is the
//! broker's (`tasks::jobs`); when it fires is `crate::schedule`'s.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Checks, TaskTemplate, units};
use crate::{
    schedule::{Missed, Schedule},
    selector::Selector,
};

/// Jobs one server schedules at most.
pub const MAX_JOBS: usize = 10_000;
/// A job name's longest.
pub const MAX_NAME: usize = 64;
/// `timeout`: from a second to a week.
pub const TIMEOUT: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(7 * 86_400);
/// `retries`.
pub const RETRIES: std::ops::RangeInclusive<u64> = 0..=100;
/// `rollout.batch` as a count.
pub const BATCH: std::ops::RangeInclusive<u64> = 1..=1_000_000;
/// `rollout.max_failed` as a count.
pub const MAX_FAILED: std::ops::RangeInclusive<u64> = 0..=1_000_000;
/// `rollout.wait`.
pub const WAIT: std::ops::RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(3600);

/// `[[jobs]]`: one named job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Its name: letters, digits, `.`, `_` and `-`, at most [`MAX_NAME`].
    pub name: String,
    /// The task's text, rendered when the run fires with the placeholders
    /// of `[tasks] template`, but `{seq}`, which is 0 here: a run's id is
    /// given as it is stored (the handler has it in `CONTACTD_TASK_ID`).
    pub text: TaskTemplate,
    /// A period anchored to the Unix epoch (`"30s"`, `"1h"`)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// ...or a five-field cron pattern, read in `time_zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// An IANA zone for `cron` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// The agents it is for (default: every agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Selector>,
    #[serde(default)]
    pub mode: JobMode,
    /// `each`: how many agents run it at once, and when the run halts.
    #[serde(default)]
    pub rollout: Rollout,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default, with = "missed")]
    pub missed: Missed,
    /// `each` and `any`: how long a run lasts at most; agents still owed it
    /// then are counted missed.
    #[serde(default = "default_timeout", with = "units::duration")]
    pub timeout: Duration,
    /// `each`: times an agent whose run failed is sent it again; `any`:
    /// other agents tried after a failure.
    #[serde(default)]
    pub retries: u32,
}

fn default_timeout() -> Duration {
    Duration::from_secs(3600)
}

/// How a job's run reaches agents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobMode {
    /// Every matching agent runs it once, through the rollout's window.
    #[default]
    Each,
    /// One matching agent runs it.
    Any,
    /// A task published as `[tasks]` publishes them: every matching agent
    /// gets it as it connects, through the server's delivery mode.
    Broadcast,
}

impl JobMode {
    pub fn as_str(self) -> &'static str {
        match self {
            JobMode::Each => "each",
            JobMode::Any => "any",
            JobMode::Broadcast => "broadcast",
        }
    }

    /// The mode with this name (as the store keeps it).
    pub fn parse(text: &str) -> Option<JobMode> {
        match text {
            "each" => Some(JobMode::Each),
            "any" => Some(JobMode::Any),
            "broadcast" => Some(JobMode::Broadcast),
            _ => None,
        }
    }
}

/// `overlap`: whether a run starts while the job's previous one runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// It does not: the period is skipped, and logged.
    #[default]
    Skip,
    Allow,
}

mod missed {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::schedule::Missed;

    pub fn serialize<S: Serializer>(value: &Missed, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match value {
            Missed::Once => "once",
            Missed::Skip => "skip",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Missed, D::Error> {
        match String::deserialize(d)?.as_str() {
            "once" => Ok(Missed::Once),
            "skip" => Ok(Missed::Skip),
            other => Err(serde::de::Error::custom(format!(
                "unknown value {other:?}: expected \"once\" (one catch-up run after downtime) \
                 or \"skip\""
            ))),
        }
    }
}

/// `rollout = { batch, max_failed, wait }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rollout {
    /// Agents running it at once: a count, or a share of the agents the
    /// run targets when it starts (rounded up, at least 1).
    pub batch: Amount,
    /// Failures the run tolerates: one more halts it.
    pub max_failed: Amount,
    /// After an agent finishes, how long before its slot is refilled.
    #[serde(with = "units::duration")]
    pub wait: Duration,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            batch: Amount::Percent(100),
            max_failed: Amount::Percent(100),
            wait: Duration::ZERO,
        }
    }
}

/// A count of agents, or a share of them (`"10%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(u64),
    Percent(u8),
}

impl Amount {
    /// The count out of `total` agents: a share rounds up.
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Amount::Percent(p) => (total * usize::from(p)).div_ceil(100),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for Amount {
    type Err = String;

    fn from_str(text: &str) -> Result<Amount, String> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            return match percent.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Amount::Percent(p)),
                _ => Err(format!(
                    "{text:?} is not a share: write a whole percentage from 0% to 100%"
                )),
            };
        }
        text.parse::<u64>().map(Amount::Count).map_err(|_| {
            format!("{text:?} is neither a count (like 10) nor a share (like \"10%\")")
        })
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Count(n) => s.serialize_u64(*n),
            Amount::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Amount, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a count (like 10) or a share (like \"10%\")")
        })? {
            Raw::Count(n) => Ok(Amount::Count(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl JobConfig {
    /// The job's schedule (`check` proved it parses).
    ///
    /// # Errors
    /// The schedule keys do not make one.
    pub fn schedule(&self) -> Result<Schedule, crate::schedule::ScheduleError> {
        Schedule::parse(
            self.every.as_deref(),
            self.cron.as_deref(),
            self.time_zone.as_deref(),
        )
    }

    /// Its target, every agent when none is set.
    pub fn selector(&self) -> Selector {
        self.target.clone().unwrap_or_else(Selector::everything)
    }

    /// The schedule as `contactd jobs` shows it.
    pub fn schedule_text(&self) -> String {
        match (&self.every, &self.cron) {
            (Some(every), _) => format!("every {every}"),
            (None, Some(cron)) => {
                format!("cron {cron} {}", self.time_zone.as_deref().unwrap_or("UTC"))
            }
            (None, None) => String::new(),
        }
    }

    fn check(&self, c: &mut Checks) {
        let key = |k: &str| format!("jobs.{}.{k}", self.name);
        c.check(
            is_name(&self.name),
            "jobs.name",
            format!(
                "{:?} is not a job name: 1 to {MAX_NAME} letters, digits, '.', '_' or '-', \
                 not digits only (`contactd job resume 42` means run 42)",
                crate::untrusted::shown(&self.name)
            ),
        );
        if let Err(e) = self.schedule() {
            c.check(false, &key("schedule"), e.to_string());
        }
        c.count(
            &key("text"),
            self.text.to_string().len() as u64,
            super::ranges::TEMPLATE_BYTES,
        );
        c.duration(&key("timeout"), self.timeout, TIMEOUT);
        c.count(&key("retries"), self.retries.into(), RETRIES);
        match self.rollout.batch {
            Amount::Count(n) => c.count(&key("rollout.batch"), n, BATCH),
            Amount::Percent(p) => c.check(
                p > 0,
                &key("rollout.batch"),
                "is 0%: at least one agent must run at a time",
            ),
        }
        if let Amount::Count(n) = self.rollout.max_failed {
            c.count(&key("rollout.max_failed"), n, MAX_FAILED);
        }
        c.duration(&key("rollout.wait"), self.rollout.wait, WAIT);
        if self.mode != JobMode::Each {
            c.check(
                self.rollout == Rollout::default(),
                &key("rollout"),
                format!(
                    "is set for a job of mode \"{}\": a rollout applies to mode \"each\" only",
                    self.mode.as_str()
                ),
            );
        }
    }
}

/// Whether `name` is a job name (not all digits: those are run ids).
pub fn is_name(name: &str) -> bool {
    !name.is_empty()
        && !name.bytes().all(|b| b.is_ascii_digit())
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The checks of every job, and of the list: names unique, at most
/// [`MAX_JOBS`].
pub(crate) fn check(jobs: &[JobConfig], queue_mode: bool, c: &mut Checks) {
    c.count("jobs", jobs.len() as u64, 0..=MAX_JOBS as u64);
    let mut seen = std::collections::HashSet::new();
    for job in jobs {
        job.check(c);
        c.check(
            seen.insert(job.name.as_str()),
            "jobs.name",
            format!("{:?} names two jobs: each job needs its own name", job.name),
        );
        if queue_mode && job.mode == JobMode::Broadcast && job.target.is_some() {
            c.check(
                false,
                &format!("jobs.{}.target", job.name),
                "a broadcast job has a target, but tasks.mode = \"queue\" hands each task to \
                 one agent, whoever it is: use mode = \"any\" for one matching agent, or \
                 \"each\" for every one",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigFile, parse};

    #[test]
    fn a_job_reads_with_its_defaults_and_round_trips() {
        let config: Config = parse(
            "[[jobs]]\nname = \"apt\"\ntext = \"apt-get update\"\ncron = \"0 3 * * *\"\n\
             time_zone = \"Europe/Berlin\"\ntarget = \"role=web\"\n\
             rollout = { batch = \"10%\", max_failed = 2 }\n",
        )
        .unwrap();
        let job = &config.jobs[0];
        assert_eq!(job.mode, JobMode::Each);
        assert_eq!(job.rollout.batch, Amount::Percent(10));
        assert_eq!(job.rollout.max_failed, Amount::Count(2));
        assert_eq!(job.timeout, Duration::from_secs(3600));
        assert_eq!(job.schedule_text(), "cron 0 3 * * * Europe/Berlin");
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let again: Config = parse(&crate::config::to_toml(&config)).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn bad_jobs_are_refused_naming_the_key() {
        let problems = parse::<Config>(
            "[[jobs]]\nname = \"a b\"\ntext = \"x\"\nevery = \"1s\"\n\
             [[jobs]]\nname = \"x\"\ntext = \"x\"\ncron = \"0 3 * * *\"\ntime_zone = \"Mars/Base\"\n\
             [[jobs]]\nname = \"x\"\ntext = \"x\"\nevery = \"1s\"\nmode = \"any\"\n\
             rollout = { batch = 2 }\nretries = 1000\n\
             [[jobs]]\nname = \"42\"\ntext = \"x\"\nevery = \"1s\"\n",
        )
        .unwrap_err();
        let keys: Vec<String> = problems.iter().filter_map(|p| p.key.clone()).collect();
        assert_eq!(
            keys,
            [
                "jobs.name",
                "jobs.x.schedule",
                "jobs.x.retries",
                "jobs.x.rollout",
                "jobs.name",
                "jobs.name"
            ],
            "{problems:#?}"
        );
        assert!(
            format!("{problems:?}").contains("Mars/Base"),
            "{problems:?}"
        );
        let problems = parse::<Config>(
            "[[jobs]]\nname = \"a\"\ntext = \"x\"\nevery = \"1s\"\nrollout = { batch = \"150%\" }\n",
        )
        .unwrap_err();
        assert!(
            format!("{problems:?}").contains("0% to 100%"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_share_rounds_up() {
        assert_eq!(Amount::Percent(10).of(200), 20);
        assert_eq!(Amount::Percent(10).of(5), 1);
        assert_eq!(Amount::Percent(5).of(0), 0);
        assert_eq!(Amount::Count(3).of(1), 3);
    }
}
