//! Job schedules as pure values: when a job's runs are due. A [`Schedule`]
//! is parsed from a job's `every` or `cron` (+ `time_zone`) keys and answers
//! two questions with the time passed in as an argument (no clock reads, no
//! I/O): which nominal fire time comes next ([`Schedule::next_after`]), and
//! what to do now given the last one fired ([`Schedule::due`]).
//!
//! The rules, as operators will meet them:
//!
//! - **A run is identified by its nominal fire time** (unix milliseconds):
//!   the instant the schedule names, not the moment the run started. The
//!   caller persists the last nominal time fired and fires only nominal
//!   times greater than it; that is what makes "exactly once per period"
//!   hold across restarts, SIGKILLs and lease moves between servers. For a
//!   job that never fired, the caller passes the time the job was first
//!   scheduled instead. The persistence is the caller's: it records the run
//!   and the new last nominal time in one transaction (or keys the run by
//!   job and nominal time), so a crash before the commit leaves the period
//!   unfired, and it is fired once after the restart.
//! - **`every`** periods are anchored to the Unix epoch: the nominal times
//!   are the multiples of the period since 1970-01-01 00:00 UTC. A restart,
//!   a lease move or another server computes the same times, so the phase
//!   never drifts (`every = "1h"` fires on the hour, `"7d"` on Thursdays at
//!   00:00 UTC, the epoch's weekday). Time zones and DST do not apply. The
//!   period is at least 1 s (sub-second schedules flood the agents and the
//!   store) and at most 366 days (rarer runs read better as `cron`).
//! - **`cron`** patterns have five fields (minute, hour, day of month,
//!   month, day of week; `@daily` and friends too; a day of month and a day
//!   of week both restricted mean either, as in Vixie cron) and are read in
//!   the wall-clock time of `time_zone`, an IANA name (default `UTC`; the
//!   server's own zone never matters, so every server computes the same
//!   times). Each wall time the pattern names runs once, at one instant:
//!   - a wall time skipped by a spring-forward (02:30 on the night Berlin
//!     goes from 02:00 to 03:00) runs at the first instant after the gap
//!     (03:00 local). Several skipped wall times run once there, together
//!     with a run the pattern names at that instant itself: `0 * * * *`
//!     runs once for 02:00 and 03:00 that night, `*/15` once for 02:00 to
//!     03:00;
//!   - a wall time repeated by a fall-back (02:30 twice when Berlin goes
//!     from 03:00 back to 02:00) runs at its first occurrence only. The
//!     repeated hour's second pass fires nothing: `*/15 * * * *` runs at
//!     02:00, 02:15, 02:30 and 02:45 summer time, then next at 03:00 winter
//!     time, 75 minutes later.
//!
//!   croner (the parser and matcher) differs from this for patterns with a
//!   wildcard or a step in the time fields: it skips their wall times in a
//!   gap and fires them on both passes of a repeated hour. This module
//!   therefore matches the pattern on zone-less wall times and maps each
//!   wall time to its instant itself.
//! - **Missed runs** (the daemon was down, or no server held the lease,
//!   across one or more nominal times): [`Missed::Once`], the default, fires
//!   one catch-up run, for the latest nominal time that passed, and reports
//!   the earlier ones as skipped; [`Missed::Skip`] fires the latest one only
//!   if it is less than [`LATE_AFTER`] late, and otherwise skips them all and
//!   waits for the next nominal time. Never a burst. Skipped periods are
//!   reported as a count with the first and last nominal time, in bounded
//!   time and memory whatever the downtime.
//!
//! Time-zone data: the system's (`TZDIR`, else `/usr/share/zoneinfo`), so a
//! government's short-notice rule change arrives with the distribution's
//! tzdata update; on a box with no zoneinfo at all, the copy of the IANA
//! database compiled into the binary (jiff's `tzdb-bundle-always`), so a
//! minimal fleet box still works. Servers with different tzdata versions may
//! disagree on the instant of a run in a zone whose rules just changed, but
//! not on whether a period fired: that is the persisted nominal time's job.

use std::{fmt, time::Duration};

use croner::{
    CivilDate, CivilDateTime, CivilTime, Cron, CronDateTime, Resolution, Weekday,
    errors::CronError,
    parser::{CronParser, Seconds, Year},
};
use jiff::{
    SignedDuration, Timestamp,
    civil::DateTime,
    tz::{self, AmbiguousOffset, Offset, TimeZone},
};

/// The shortest `every`: shorter periods flood the agents and the store,
/// and a missed-run report at that rate is noise.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// The longest `every`: rarer runs are calendar events, clearer as `cron`.
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 24 * 3600);

/// Under [`Missed::Skip`], how late the latest nominal time may be and still
/// fire: beyond this it was missed. A minute covers a timer that wakes late
/// on a busy server, not an outage.
pub const LATE_AFTER: Duration = Duration::from_secs(60);

/// Skipped cron periods are counted one by one up to this many, then
/// reported as "at least" this many: a year of `* * * * *` is half a
/// million steps of the matcher, and the log line needs only the magnitude.
const COUNT_LIMIT: u64 = 10_000;

/// When a job's runs are due: a fixed period or a cron pattern in a zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// Every so often, at the multiples of the period since the Unix epoch.
    Every(Duration),
    /// A cron pattern read in a time zone's wall-clock time.
    Cron(CronSchedule),
}

/// A parsed cron pattern, the zone it is read in, and the text it came from.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    /// The pattern as the job wrote it (trimmed), for messages and equality.
    text: String,
    /// croner's parsed form, matched against zone-less wall times (boxed:
    /// its bit sets are a few hundred bytes, and most schedules are `every`).
    cron: Box<Cron>,
    /// The IANA name (as the database spells it), for messages and equality.
    zone_name: String,
    /// The zone's rules, mapping wall times to instants.
    zone: TimeZone,
}

impl PartialEq for CronSchedule {
    /// The same text in the same zone is the same schedule.
    fn eq(&self, other: &CronSchedule) -> bool {
        self.text == other.text && self.zone_name == other.zone_name
    }
}

impl Eq for CronSchedule {}

impl CronSchedule {
    /// The pattern as written in the job.
    #[must_use]
    pub fn pattern(&self) -> &str {
        &self.text
    }

    /// The IANA name of the zone the pattern is read in (`UTC` by default).
    #[must_use]
    pub fn time_zone(&self) -> &str {
        &self.zone_name
    }
}

/// What to do about nominal times that passed while nothing could fire
/// them (downtime, no lease holder).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Missed {
    /// One catch-up run, for the latest missed nominal time; the earlier
    /// ones are reported as skipped.
    #[default]
    Once,
    /// No catch-up: nominal times more than [`LATE_AFTER`] late are skipped.
    Skip,
}

/// The answer of [`Schedule::due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The nominal time to fire now, if any: the run's identity.
    pub fire: Option<i64>,
    /// Nominal times that passed without a run, for the log.
    pub skipped: Option<Skipped>,
    /// The last nominal time to persist once this answer is acted on:
    /// `fire`, else the last skipped one, else the `last_ms` given. Persist
    /// it with the run, in one transaction.
    pub last_ms: i64,
    /// When to ask again: the next nominal time after `last_ms` (and after
    /// now). `None` if there is none before the calendar ends.
    pub next_ms: Option<i64>,
}

/// Nominal times that passed without a run, without listing them (a year
/// of `every = "1s"` is 31 million).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// How many.
    pub count: Count,
    /// The earliest skipped nominal time.
    pub first_ms: i64,
    /// The latest skipped nominal time.
    pub last_ms: i64,
}

/// A count that is exact when cheap to know, and a lower bound otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Exactly this many.
    Exactly(u64),
    /// At least this many (cron periods are counted up to a limit).
    AtLeast(u64),
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Count::Exactly(n) => write!(f, "{n}"),
            Count::AtLeast(n) => write!(f, "at least {n}"),
        }
    }
}

/// Why a job's schedule keys do not make a schedule. Each message names the
/// key and value and says what would be accepted.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Neither `every` nor `cron` is set.
    #[error("the job has no schedule: set `every` (like \"30s\") or `cron` (like \"0 3 * * *\")")]
    Missing,
    /// Both `every` and `cron` are set.
    #[error("the job sets both `every` and `cron`: a job has one schedule, keep one of them")]
    Both,
    /// `time_zone` is set for an `every` schedule, where it means nothing.
    #[error(
        "`time_zone = \"{0}\"` is set without `cron`: an `every` period is counted in absolute \
         time from the Unix epoch, so remove `time_zone` or use `cron`"
    )]
    ZoneWithoutCron(String),
    /// `every` is not a duration.
    #[error(
        "`every = \"{text}\"` is not a duration (write it like \"30s\", \"5m\" or \"1h 30m\"): {source}"
    )]
    EveryUnreadable {
        /// The value as written.
        text: String,
        #[source]
        source: humantime::DurationError,
    },
    /// `every` is shorter than [`MIN_EVERY`] or longer than [`MAX_EVERY`].
    #[error(
        "`every = \"{0}\"` is out of range: it must be between 1s and 366days (for rarer runs \
         use `cron`)"
    )]
    EveryOutOfRange(String),
    /// `every` has a part finer than a millisecond, the unit of nominal times.
    #[error(
        "`every = \"{0}\"` is not a whole number of milliseconds, the unit nominal fire times \
         are counted in"
    )]
    EveryNotWholeMs(String),
    /// croner rejected the pattern.
    #[error(
        "`cron = \"{text}\"` is not a cron pattern (five fields: minute hour day-of-month \
         month day-of-week, like \"0 3 * * *\"): {source}"
    )]
    CronUnreadable {
        /// The value as written.
        text: String,
        #[source]
        source: CronError,
    },
    /// The pattern parses but names no date that exists (`0 0 30 2 *`).
    #[error("`cron = \"{0}\"` never fires: it names no date that exists (like February 30)")]
    CronNeverFires(String),
    /// The time zone is not in the time-zone database.
    #[error(
        "`time_zone = \"{zone}\"` is not a known time zone: use an IANA name like \
         \"Europe/Berlin\", \"America/New_York\" or \"UTC\"{}",
        suggestion.as_ref().map(|s| format!(" (did you mean \"{s}\"?)")).unwrap_or_default()
    )]
    UnknownZone {
        /// The value as written.
        zone: String,
        /// An IANA name ending in the given one (`Berlin` → `Europe/Berlin`).
        suggestion: Option<String>,
    },
}

impl Schedule {
    /// A schedule from a job's keys: exactly one of `every` and `cron`, and
    /// `time_zone` (an IANA name, default `UTC`) only with `cron`.
    ///
    /// # Errors
    ///
    /// [`ScheduleError`] when both or neither of `every` and `cron` are set,
    /// `time_zone` comes without `cron`, `every` is not a duration of whole
    /// milliseconds between [`MIN_EVERY`] and [`MAX_EVERY`], the pattern
    /// does not parse or names no existing date, or the zone is unknown.
    pub fn parse(
        every: Option<&str>,
        cron: Option<&str>,
        time_zone: Option<&str>,
    ) -> Result<Schedule, ScheduleError> {
        match (every, cron, time_zone) {
            (None, None, _) => Err(ScheduleError::Missing),
            (Some(_), Some(_), _) => Err(ScheduleError::Both),
            (Some(_), None, Some(zone)) => Err(ScheduleError::ZoneWithoutCron(zone.to_owned())),
            (Some(every), None, None) => parse_every(every).map(Schedule::Every),
            (None, Some(cron), zone) => parse_cron(cron, zone).map(Schedule::Cron),
        }
    }

    /// The first nominal fire time strictly after `after_ms` (unix ms), or
    /// `None` past the end of the calendar (the year 9999, or croner's 5000).
    #[must_use]
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Schedule::Every(period) => {
                let period = period_ms(*period);
                after_ms
                    .div_euclid(period)
                    .checked_add(1)?
                    .checked_mul(period)
            }
            Schedule::Cron(cron) => cron.next_after(after_ms),
        }
    }

    /// The latest nominal fire time at or before `at_ms`, or `None` before
    /// the start of the calendar.
    #[must_use]
    pub fn at_or_before(&self, at_ms: i64) -> Option<i64> {
        match self {
            Schedule::Every(period) => {
                let period = period_ms(*period);
                at_ms.div_euclid(period).checked_mul(period)
            }
            Schedule::Cron(cron) => cron.at_or_before(at_ms),
        }
    }

    /// What to do at `now_ms`, given `last_ms`: the last nominal time fired,
    /// or, for a job that never fired, the time it was first scheduled (a
    /// period is due when its nominal time is after `last_ms` and not after
    /// now). At most one run is due, whatever the downtime; see [`Missed`].
    /// Bounded work: arithmetic for `every`, a few matcher searches for
    /// `cron` (counting skipped cron periods stops at a limit).
    #[must_use]
    pub fn due(&self, last_ms: i64, now_ms: i64, missed: Missed) -> Due {
        let idle = Due {
            fire: None,
            skipped: None,
            last_ms,
            next_ms: self.next_after(last_ms.max(now_ms)),
        };
        let (Some(latest), Some(first)) = (self.at_or_before(now_ms), self.next_after(last_ms))
        else {
            return idle;
        };
        if latest <= last_ms || first > latest {
            return idle;
        }
        let late = now_ms.saturating_sub(latest) >= duration_ms(LATE_AFTER);
        let (fire, skipped) = if missed == Missed::Skip && late {
            let skipped = Skipped {
                count: self.count(first, latest),
                first_ms: first,
                last_ms: latest,
            };
            (None, Some(skipped))
        } else {
            // The runs before the latest are skipped, whatever the policy:
            // catching up on each of them is the burst this module prevents.
            let before = self.at_or_before(latest - 1).filter(|&t| t >= first);
            let skipped = before.map(|last| Skipped {
                count: self.count(first, last),
                first_ms: first,
                last_ms: last,
            });
            (Some(latest), skipped)
        };
        Due {
            fire,
            skipped,
            last_ms: latest,
            next_ms: self.next_after(latest),
        }
    }

    /// How many nominal times lie in `[first, last]`, both nominal times.
    fn count(&self, first: i64, last: i64) -> Count {
        match self {
            Schedule::Every(period) => {
                let n = (last - first) / period_ms(*period) + 1;
                Count::Exactly(u64::try_from(n).unwrap_or(0))
            }
            Schedule::Cron(cron) => {
                let mut n = 1;
                let mut at = first;
                while at < last {
                    if n == COUNT_LIMIT {
                        return Count::AtLeast(n);
                    }
                    match cron.next_after(at) {
                        Some(next) if next <= last => {
                            n += 1;
                            at = next;
                        }
                        _ => break,
                    }
                }
                Count::Exactly(n)
            }
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every(period) => write!(f, "every {}", humantime::format_duration(*period)),
            Schedule::Cron(cron) => write!(f, "cron \"{}\" in {}", cron.text, cron.zone_name),
        }
    }
}

fn parse_every(text: &str) -> Result<Duration, ScheduleError> {
    let period =
        humantime::parse_duration(text).map_err(|source| ScheduleError::EveryUnreadable {
            text: text.to_owned(),
            source,
        })?;
    if !(MIN_EVERY..=MAX_EVERY).contains(&period) {
        return Err(ScheduleError::EveryOutOfRange(text.to_owned()));
    }
    if period.subsec_nanos() % 1_000_000 != 0 {
        return Err(ScheduleError::EveryNotWholeMs(text.to_owned()));
    }
    Ok(period)
}

fn parse_cron(text: &str, zone: Option<&str>) -> Result<CronSchedule, ScheduleError> {
    let text = text.trim();
    // Five fields: minutes are the finest unit (`every` covers seconds),
    // and no year field, so a pattern that fires at all fires forever.
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|source| ScheduleError::CronUnreadable {
            text: text.to_owned(),
            source,
        })?;
    let (zone, zone_name) = match zone {
        None => (TimeZone::UTC, "UTC".to_owned()),
        Some(name) => {
            let zone = tz::db().get(name).map_err(|_| ScheduleError::UnknownZone {
                zone: name.to_owned(),
                suggestion: suggest_zone(name),
            })?;
            let canonical = zone.iana_name().unwrap_or(name).to_owned();
            (zone, canonical)
        }
    };
    let schedule = CronSchedule {
        text: text.to_owned(),
        cron: Box::new(cron),
        zone_name,
        zone,
    };
    if never_fires(&schedule.cron) {
        return Err(ScheduleError::CronNeverFires(schedule.text));
    }
    Ok(schedule)
}

/// Whether a pattern matches no date that exists (`0 0 30 2 *`). Without a
/// year field a pattern repeats every 400 years (the Gregorian cycle, a
/// whole number of weeks), so searching 400 years is enough; croner walks
/// month by month up to its last year, so the search starts 400 years
/// before it rather than today (3000 years of walking took a second).
fn never_fires(cron: &Cron) -> bool {
    let start = i16::try_from(croner::YEAR_UPPER_LIMIT - 400)
        .ok()
        .and_then(|year| DateTime::new(year, 1, 1, 0, 0, 0, 0).ok());
    start.is_none_or(|start| cron.find_next_occurrence(&Wall(start), true).is_err())
}

/// An IANA name whose last part is the given name, whatever its case
/// (`berlin` → `Europe/Berlin`): the common mistake of a city alone.
fn suggest_zone(name: &str) -> Option<String> {
    let wanted = name.rsplit('/').next()?.replace(' ', "_");
    tz::db().available().find_map(|candidate| {
        let candidate = candidate.as_str();
        let last = candidate.rsplit('/').next()?;
        (last.eq_ignore_ascii_case(&wanted) && candidate != name).then(|| candidate.to_owned())
    })
}

/// Milliseconds of a validated period (1 s to 366 days, so it fits).
fn period_ms(period: Duration) -> i64 {
    duration_ms(period).max(1)
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl CronSchedule {
    /// The first nominal time strictly after `after_ms`.
    fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = Timestamp::from_millisecond(after_ms).ok()?;
        let wall = self.zone.to_datetime(after);
        // In the second pass of a repeated hour, the wall times still ahead
        // in it belong to the first pass, which is behind: search from the
        // end of the repeated range instead.
        let found = match self.second_pass_end(after, wall) {
            Some(end) => self.cron.find_next_occurrence(&Wall(end), true),
            None => self.cron.find_next_occurrence(&Wall(wall), false),
        };
        self.instant_of(found.ok()?.0)
    }

    /// The latest nominal time at or before `at_ms`.
    fn at_or_before(&self, at_ms: i64) -> Option<i64> {
        let at = Timestamp::from_millisecond(at_ms).ok()?;
        let wall = self.zone.to_datetime(at);
        // In the second pass of a repeated hour, the whole repeated range
        // has already passed (its first pass): search back from its end.
        let found = match self.second_pass_end(at, wall) {
            Some(end) => self.cron.find_previous_occurrence(&Wall(end), false),
            None => self.cron.find_previous_occurrence(&Wall(wall), true),
        };
        self.instant_of(found.ok()?.0)
    }

    /// If `at` (whose wall time is `wall`) lies in the second pass of a
    /// repeated range of wall times, the wall time where that range ends.
    fn second_pass_end(&self, at: Timestamp, wall: DateTime) -> Option<DateTime> {
        let AmbiguousOffset::Fold { before, after } =
            self.zone.to_ambiguous_timestamp(wall).offset()
        else {
            return None;
        };
        if self.zone.to_offset(at) != after {
            return None;
        }
        // The same wall time in the first pass is before the transition,
        // and the transition is the next one after it.
        let first_pass = before.to_timestamp(wall).ok()?;
        let transition = self.zone.following(first_pass).next()?.timestamp();
        Some(before.to_datetime(transition))
    }

    /// The instant a wall time runs at: itself when it happens once, its
    /// first occurrence when repeated, the first instant after the gap when
    /// skipped (the module's DST rules).
    fn instant_of(&self, wall: DateTime) -> Option<i64> {
        let instant = match self.zone.to_ambiguous_timestamp(wall).offset() {
            AmbiguousOffset::Unambiguous { offset } => to_instant(offset, wall)?,
            AmbiguousOffset::Fold { before, .. } => to_instant(before, wall)?,
            AmbiguousOffset::Gap { after, .. } => {
                // Read with the later offset, the wall time lands before the
                // gap; the gap's end is the transition that follows.
                let before_gap = to_instant(after, wall)?;
                self.zone.following(before_gap).next()?.timestamp()
            }
        };
        Some(instant.as_millisecond())
    }
}

fn to_instant(offset: Offset, wall: DateTime) -> Option<Timestamp> {
    offset.to_timestamp(wall).ok()
}

/// A wall-clock date and time with no zone, for croner to match the pattern
/// against: every wall time happens exactly once here, and the zone's gaps
/// and repeats are handled by [`CronSchedule::instant_of`] afterwards.
#[derive(Debug, Clone, Copy)]
struct Wall(DateTime);

impl CronDateTime for Wall {
    fn to_civil(&self) -> CivilDateTime {
        let d = self.0;
        CivilDateTime::new(
            CivilDate::from_parts_unchecked(
                i32::from(d.year()),
                u32::from(d.month().unsigned_abs()),
                u32::from(d.day().unsigned_abs()),
            ),
            CivilTime::from_parts_unchecked(
                u32::from(d.hour().unsigned_abs()),
                u32::from(d.minute().unsigned_abs()),
                u32::from(d.second().unsigned_abs()),
            ),
        )
    }

    fn civil_weekday(&self) -> Weekday {
        let days = self.0.weekday().to_sunday_zero_offset().unsigned_abs();
        Weekday::from_days_from_sunday(u32::from(days))
    }

    fn resolve_civil(&self, civil: CivilDateTime) -> Result<Resolution<Wall>, CronError> {
        let part = |n: u32| i8::try_from(n).map_err(|_| CronError::InvalidDate);
        let year = i16::try_from(civil.year()).map_err(|_| CronError::InvalidDate)?;
        let wall = DateTime::new(
            year,
            part(civil.month())?,
            part(civil.day())?,
            part(civil.hour())?,
            part(civil.minute())?,
            part(civil.second())?,
            0,
        )
        .map_err(|_| CronError::InvalidDate)?;
        Ok(Resolution::Single(Wall(wall)))
    }

    fn checked_add_seconds(&self, seconds: i64) -> Option<Wall> {
        self.0
            .checked_add(SignedDuration::from_secs(seconds))
            .ok()
            .map(Wall)
    }

    fn cmp_instant(&self, other: &Wall) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// Unix ms of an RFC 3339 instant (`2026-03-29T01:00:00Z`).
    fn ms(text: &str) -> i64 {
        text.parse::<Timestamp>()
            .expect("a test instant")
            .as_millisecond()
    }

    fn cron(pattern: &str, zone: &str) -> Schedule {
        Schedule::parse(None, Some(pattern), Some(zone)).expect("a test schedule")
    }

    fn every(text: &str) -> Schedule {
        Schedule::parse(Some(text), None, None).expect("a test schedule")
    }

    /// The nominal times in `(from, to]`, by chaining `next_after`.
    fn fires(schedule: &Schedule, from: &str, to: &str) -> Vec<i64> {
        let (mut at, to) = (ms(from), ms(to));
        let mut out = Vec::new();
        while let Some(next) = schedule.next_after(at).filter(|&n| n <= to) {
            out.push(next);
            at = next;
        }
        out
    }

    fn all(texts: &[&str]) -> Vec<i64> {
        texts.iter().map(|t| ms(t)).collect()
    }

    #[test]
    fn a_daily_job_fires_once_on_each_dst_day_at_the_documented_instant() {
        // (zone, pattern, local day start and end as UTC, the one run).
        let cases = [
            // Berlin springs forward at 02:00 CET: 02:30 does not exist and
            // runs at the gap's end, 03:00 CEST.
            (
                "Europe/Berlin",
                "30 2 * * *",
                "2026-03-28T23:00:00Z",
                "2026-03-29T22:00:00Z",
                "2026-03-29T01:00:00Z",
            ),
            // Berlin falls back at 03:00 CEST: 02:30 happens twice; the first.
            (
                "Europe/Berlin",
                "30 2 * * *",
                "2026-10-24T22:00:00Z",
                "2026-10-25T23:00:00Z",
                "2026-10-25T00:30:00Z",
            ),
            // New York springs forward at 02:00 EST to 03:00 EDT.
            (
                "America/New_York",
                "30 2 * * *",
                "2026-03-08T05:00:00Z",
                "2026-03-09T04:00:00Z",
                "2026-03-08T07:00:00Z",
            ),
            // New York falls back at 02:00 EDT to 01:00 EST: 02:30 is not
            // repeated there, 01:30 is.
            (
                "America/New_York",
                "30 2 * * *",
                "2026-11-01T04:00:00Z",
                "2026-11-02T05:00:00Z",
                "2026-11-01T07:30:00Z",
            ),
            (
                "America/New_York",
                "30 1 * * *",
                "2026-11-01T04:00:00Z",
                "2026-11-02T05:00:00Z",
                "2026-11-01T05:30:00Z",
            ),
            // Lord Howe moves by 30 minutes: 02:00 +10:30 to 02:30 +11...
            (
                "Australia/Lord_Howe",
                "15 2 * * *",
                "2026-10-03T13:30:00Z",
                "2026-10-04T13:00:00Z",
                "2026-10-03T15:30:00Z",
            ),
            // ...and back from 02:00 +11 to 01:30 +10:30.
            (
                "Australia/Lord_Howe",
                "45 1 * * *",
                "2026-04-04T13:00:00Z",
                "2026-04-05T13:30:00Z",
                "2026-04-04T14:45:00Z",
            ),
        ];
        for (zone, pattern, from, to, run) in cases {
            let schedule = cron(pattern, zone);
            assert_eq!(
                fires(&schedule, from, to),
                all(&[run]),
                "{schedule} from {from}"
            );
        }
    }

    #[test]
    fn an_hourly_job_fires_once_per_distinct_wall_hour_around_each_transition() {
        // (zone, local day start and end as UTC, runs that day, the runs
        // around the transition).
        let cases: [(&str, &str, &str, usize, &[&str]); 4] = [
            // 02:00 and 03:00 CEST are both the gap's end: one run.
            (
                "Europe/Berlin",
                "2026-03-28T23:00:00Z",
                "2026-03-29T22:00:00Z",
                23,
                &[
                    "2026-03-29T00:00:00Z",
                    "2026-03-29T01:00:00Z",
                    "2026-03-29T02:00:00Z",
                ],
            ),
            // 02:00 runs in summer time only; 03:00 winter time is next.
            (
                "Europe/Berlin",
                "2026-10-24T22:00:00Z",
                "2026-10-25T23:00:00Z",
                24,
                &[
                    "2026-10-24T23:00:00Z",
                    "2026-10-25T00:00:00Z",
                    "2026-10-25T02:00:00Z",
                ],
            ),
            (
                "America/New_York",
                "2026-03-08T05:00:00Z",
                "2026-03-09T04:00:00Z",
                23,
                &[
                    "2026-03-08T06:00:00Z",
                    "2026-03-08T07:00:00Z",
                    "2026-03-08T08:00:00Z",
                ],
            ),
            (
                "America/New_York",
                "2026-11-01T04:00:00Z",
                "2026-11-02T05:00:00Z",
                24,
                &[
                    "2026-11-01T05:00:00Z",
                    "2026-11-01T07:00:00Z",
                    "2026-11-01T08:00:00Z",
                ],
            ),
        ];
        for (zone, from, to, per_day, around) in cases {
            let schedule = cron("0 * * * *", zone);
            let day = fires(&schedule, from, to);
            assert_eq!(day.len(), per_day, "{schedule} from {from}");
            let zone = tz::db().get(zone).expect("a test zone");
            let mut hours: Vec<i8> = day
                .iter()
                .map(|&t| {
                    zone.to_datetime(Timestamp::from_millisecond(t).expect("ms"))
                        .hour()
                })
                .collect();
            hours.dedup();
            assert_eq!(hours.len(), per_day, "a wall hour fired twice: {hours:?}");
            let first = all(around)[0];
            let at = day.iter().position(|&t| t == first);
            let at = at.unwrap_or_else(|| {
                panic!(
                    "{schedule}: {:?}",
                    day.iter()
                        .map(|&t| Timestamp::from_millisecond(t).unwrap().to_string())
                        .collect::<Vec<_>>()
                )
            });
            assert_eq!(
                day[at..at + 3],
                all(around)[..],
                "{schedule} around the transition"
            );
        }
    }

    #[test]
    fn every_quarter_hour_pauses_in_the_repeated_hour_and_joins_at_the_gap() {
        let cases: [(&str, &str, &str, &[&str]); 3] = [
            // The repeated 02:00-03:00: summer time only, then 03:00 CET.
            (
                "Europe/Berlin",
                "2026-10-24T23:50:00Z",
                "2026-10-25T02:00:00Z",
                &[
                    "2026-10-25T00:00:00Z",
                    "2026-10-25T00:15:00Z",
                    "2026-10-25T00:30:00Z",
                    "2026-10-25T00:45:00Z",
                    "2026-10-25T02:00:00Z",
                ],
            ),
            (
                "America/New_York",
                "2026-11-01T04:50:00Z",
                "2026-11-01T07:00:00Z",
                &[
                    "2026-11-01T05:00:00Z",
                    "2026-11-01T05:15:00Z",
                    "2026-11-01T05:30:00Z",
                    "2026-11-01T05:45:00Z",
                    "2026-11-01T07:00:00Z",
                ],
            ),
            // The missing 02:00-03:00: one run at the gap's end.
            (
                "Europe/Berlin",
                "2026-03-29T00:40:00Z",
                "2026-03-29T01:15:00Z",
                &[
                    "2026-03-29T00:45:00Z",
                    "2026-03-29T01:00:00Z",
                    "2026-03-29T01:15:00Z",
                ],
            ),
        ];
        for (zone, from, to, runs) in cases {
            let schedule = cron("*/15 * * * *", zone);
            assert_eq!(
                fires(&schedule, from, to),
                all(runs),
                "{schedule} from {from}"
            );
        }
    }

    /// The DST rules written out independently of the module's search: each
    /// wall minute the pattern matches, mapped to its instant by jiff's
    /// `earlier()` (repeats) or by scanning for the first instant past it
    /// (gaps).
    fn oracle(schedule: &Schedule, from: i64, to: i64) -> Vec<i64> {
        let Schedule::Cron(cron) = schedule else {
            unreachable!()
        };
        let zone = &cron.zone;
        let wall_at = |t: i64| zone.to_datetime(Timestamp::from_millisecond(t).expect("ms"));
        let minute = SignedDuration::from_mins(1);
        let mut wall = wall_at(from - 3 * 3_600_000)
            .with()
            .second(0)
            .build()
            .expect("wall");
        let end = wall_at(to + 3 * 3_600_000);
        let mut out = Vec::new();
        while wall <= end {
            if cron.cron.is_time_matching(&Wall(wall)).expect("a match") {
                let ambiguous = zone.to_ambiguous_timestamp(wall);
                let instant = match ambiguous.offset() {
                    AmbiguousOffset::Gap { .. } => {
                        let mut t = ambiguous.earlier().expect("ts").as_millisecond();
                        t -= t.rem_euclid(60_000);
                        while wall_at(t) < wall {
                            t += 60_000;
                        }
                        t
                    }
                    _ => ambiguous.earlier().expect("ts").as_millisecond(),
                };
                if instant > from && instant <= to && out.last() != Some(&instant) {
                    out.push(instant);
                }
            }
            wall = wall.checked_add(minute).expect("wall");
        }
        out
    }

    #[test]
    fn next_after_and_at_or_before_agree_with_the_rules_minute_by_minute() {
        let transitions = [
            ("Europe/Berlin", "2026-03-29T01:00:00Z"),
            ("Europe/Berlin", "2026-10-25T01:00:00Z"),
            ("America/New_York", "2026-03-08T07:00:00Z"),
            ("America/New_York", "2026-11-01T06:00:00Z"),
            ("Australia/Lord_Howe", "2026-04-04T15:00:00Z"),
            ("Australia/Lord_Howe", "2026-10-03T15:30:00Z"),
        ];
        let patterns = [
            "* * * * *",
            "*/15 * * * *",
            "0 * * * *",
            "30 2 * * *",
            "10,40 1-3 * * *",
        ];
        for (zone, transition) in transitions {
            let (from, to) = (
                ms(transition) - 4 * 3_600_000,
                ms(transition) + 4 * 3_600_000,
            );
            for pattern in patterns {
                let schedule = cron(pattern, zone);
                let expected = oracle(&schedule, from, to);
                let mut chained = Vec::new();
                let mut at = from;
                while let Some(next) = schedule.next_after(at).filter(|&n| n <= to) {
                    chained.push(next);
                    at = next;
                }
                assert_eq!(chained, expected, "{schedule} around {transition}");
                // From every half minute (and the millisecond before), the
                // neighbours are the oracle's.
                for t in (from + 30_000..=to)
                    .step_by(30_000)
                    .flat_map(|t| [t - 1, t])
                {
                    let before = expected.iter().rev().find(|&&e| e <= t).copied();
                    let after = expected.iter().find(|&&e| e > t).copied();
                    if let Some(before) = before {
                        assert_eq!(schedule.at_or_before(t), Some(before), "{schedule} at {t}");
                    }
                    if let Some(after) = after {
                        assert_eq!(schedule.next_after(t), Some(after), "{schedule} after {t}");
                    }
                }
            }
        }
    }

    /// A caller as the module expects one: the run and the new last nominal
    /// time are committed together, so what is "persisted" is both or
    /// neither.
    struct Persisted {
        last_ms: i64,
        runs: Vec<i64>,
    }

    impl Persisted {
        fn tick(&mut self, schedule: &Schedule, now_ms: i64) {
            let due = schedule.due(self.last_ms, now_ms, Missed::Once);
            assert!(due.skipped.is_none(), "no downtime in this run: {due:?}");
            self.runs.extend(due.fire);
            self.last_ms = due.last_ms;
        }
    }

    /// Drives `text`'s schedule from `start` in steps of `step_ms` for
    /// `steps`, restarting (only the persisted state survives) every 37
    /// steps and being killed before a commit every 53.
    fn exactly_once(parse: impl Fn() -> Schedule, start: i64, step_ms: i64, steps: i64) {
        let mut persisted = Persisted {
            last_ms: start,
            runs: Vec::new(),
        };
        let mut schedule = parse();
        let mut killed = 0;
        for i in 1..=steps {
            let now = start + i * step_ms;
            if i % 53 == 0 {
                // SIGKILL after deciding to fire, before the commit: the
                // decision is lost with the process.
                if schedule
                    .due(persisted.last_ms, now, Missed::Once)
                    .fire
                    .is_some()
                {
                    killed += 1;
                }
                schedule = parse();
                continue;
            }
            if i % 37 == 0 {
                schedule = parse();
            }
            persisted.tick(&schedule, now);
        }
        assert!(killed > 0, "the test killed no fire");
        let end = start + steps * step_ms;
        let mut expected = Vec::new();
        let mut at = start;
        while let Some(next) = schedule.next_after(at).filter(|&n| n <= end) {
            expected.push(next);
            at = next;
        }
        // Every period fired once: none twice, none lost to the kills.
        assert_eq!(persisted.runs, expected);
    }

    #[test]
    fn every_fires_each_period_exactly_once_across_restarts_and_kills() {
        exactly_once(|| every("10s"), ms("2026-05-01T12:00:03Z"), 3_000, 500);
    }

    #[test]
    fn cron_fires_each_period_exactly_once_across_restarts_kills_and_dst() {
        // Through Berlin's repeated hour, in steps shorter than the period.
        let start = ms("2026-10-24T23:00:00Z");
        exactly_once(|| cron("*/5 * * * *", "Europe/Berlin"), start, 70_000, 300);
        // Through New York's missing hour.
        let start = ms("2026-03-08T05:00:00Z");
        exactly_once(
            || cron("*/5 * * * *", "America/New_York"),
            start,
            70_000,
            300,
        );
    }

    #[test]
    fn two_servers_reading_the_same_persisted_state_agree() {
        // A lease move: whoever holds the lease computes the same answer.
        let (a, b) = (
            cron("0 3 * * *", "Europe/Berlin"),
            cron("0 3 * * *", "Europe/Berlin"),
        );
        let (last, now) = (ms("2026-10-20T01:00:00Z"), ms("2026-10-23T09:00:00Z"));
        assert_eq!(
            a.due(last, now, Missed::Once),
            b.due(last, now, Missed::Once)
        );
    }

    #[test]
    fn missed_once_fires_one_catch_up_run_and_reports_the_rest() {
        let schedule = every("1h");
        let due = schedule.due(
            ms("2026-05-01T10:00:00Z"),
            ms("2026-05-01T15:20:00Z"),
            Missed::Once,
        );
        assert_eq!(
            due,
            Due {
                fire: Some(ms("2026-05-01T15:00:00Z")),
                skipped: Some(Skipped {
                    count: Count::Exactly(4),
                    first_ms: ms("2026-05-01T11:00:00Z"),
                    last_ms: ms("2026-05-01T14:00:00Z"),
                }),
                last_ms: ms("2026-05-01T15:00:00Z"),
                next_ms: Some(ms("2026-05-01T16:00:00Z")),
            }
        );
    }

    #[test]
    fn missed_skip_fires_nothing_late_and_waits_for_the_next_period() {
        let schedule = every("1h");
        let last = ms("2026-05-01T10:00:00Z");
        let due = schedule.due(last, ms("2026-05-01T15:20:00Z"), Missed::Skip);
        assert_eq!(
            due,
            Due {
                fire: None,
                skipped: Some(Skipped {
                    count: Count::Exactly(5),
                    first_ms: ms("2026-05-01T11:00:00Z"),
                    last_ms: ms("2026-05-01T15:00:00Z"),
                }),
                last_ms: ms("2026-05-01T15:00:00Z"),
                next_ms: Some(ms("2026-05-01T16:00:00Z")),
            }
        );
        // Back in time for the latest period: it fires, the rest are skipped.
        let due = schedule.due(last, ms("2026-05-01T15:00:30Z"), Missed::Skip);
        assert_eq!(due.fire, Some(ms("2026-05-01T15:00:00Z")));
        assert_eq!(due.skipped.map(|s| s.count), Some(Count::Exactly(4)));
        // One late period and no downtime before it is skipped too.
        let due = schedule.due(
            ms("2026-05-01T14:00:00Z"),
            ms("2026-05-01T15:05:00Z"),
            Missed::Skip,
        );
        assert_eq!(
            (due.fire, due.skipped.map(|s| s.count)),
            (None, Some(Count::Exactly(1)))
        );
    }

    #[test]
    fn on_time_runs_and_idle_calls_skip_nothing() {
        let schedule = every("1h");
        let last = ms("2026-05-01T10:00:00Z");
        for missed in [Missed::Once, Missed::Skip] {
            let due = schedule.due(last, ms("2026-05-01T11:00:00.004Z"), missed);
            assert_eq!(
                (due.fire, due.skipped),
                (Some(ms("2026-05-01T11:00:00Z")), None)
            );
            // Not yet, and a clock that went back: nothing, same last.
            for now in [ms("2026-05-01T10:59:59.999Z"), ms("2026-05-01T09:00:00Z")] {
                let due = schedule.due(last, now, missed);
                assert_eq!(
                    due,
                    Due {
                        fire: None,
                        skipped: None,
                        last_ms: last,
                        next_ms: Some(ms("2026-05-01T11:00:00Z")),
                    }
                );
            }
        }
    }

    #[test]
    fn a_new_job_waits_for_its_first_period_after_it_was_scheduled() {
        // `last_ms` is the creation time: the 03:00 of that morning is not owed.
        let schedule = cron("0 3 * * *", "UTC");
        let created = ms("2026-05-01T14:00:00Z");
        let due = schedule.due(created, ms("2026-05-01T14:00:01Z"), Missed::Once);
        assert_eq!(
            (due.fire, due.next_ms),
            (None, Some(ms("2026-05-02T03:00:00Z")))
        );
        let due = schedule.due(created, ms("2026-05-02T03:00:00Z"), Missed::Once);
        assert_eq!(due.fire, Some(ms("2026-05-02T03:00:00Z")));
    }

    #[test]
    fn ten_years_of_downtime_is_constant_work_for_every() {
        let schedule = every("1s");
        let last = ms("2016-05-01T00:00:00Z");
        let now = ms("2026-05-01T00:00:00.500Z");
        let started = Instant::now();
        let due = schedule.due(last, now, Missed::Once);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        let periods = u64::try_from((now - 500 - last) / 1000).expect("positive");
        assert_eq!(due.fire, Some(now - 500));
        assert_eq!(
            due.skipped.map(|s| s.count),
            Some(Count::Exactly(periods - 1))
        );
    }

    #[test]
    fn cron_downtime_counts_exactly_when_few_and_bounds_the_work_when_many() {
        let daily = cron("0 3 * * *", "Europe/Berlin");
        let due = daily.due(
            ms("2026-10-01T01:00:00Z"),
            ms("2026-11-01T12:00:00Z"),
            Missed::Once,
        );
        assert_eq!(due.fire, Some(ms("2026-11-01T02:00:00Z")));
        assert_eq!(
            due.skipped,
            Some(Skipped {
                count: Count::Exactly(30),
                first_ms: ms("2026-10-02T01:00:00Z"),
                last_ms: ms("2026-10-31T02:00:00Z"),
            })
        );
        let minutely = cron("* * * * *", "UTC");
        let started = Instant::now();
        let due = minutely.due(
            ms("2025-05-01T00:00:00Z"),
            ms("2026-05-01T00:00:30Z"),
            Missed::Once,
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(due.fire, Some(ms("2026-05-01T00:00:00Z")));
        assert_eq!(
            due.skipped.map(|s| s.count),
            Some(Count::AtLeast(COUNT_LIMIT))
        );
    }

    #[test]
    fn patterns_that_never_fire_are_refused_quickly() {
        for pattern in ["0 0 30 2 *", "0 0 31 4 *", "0 0 31 2,4,6,9,11 *"] {
            let started = Instant::now();
            let err = Schedule::parse(None, Some(pattern), None).expect_err(pattern);
            assert!(
                matches!(err, ScheduleError::CronNeverFires(_)),
                "{pattern}: {err}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
        }
        // February 29 is rare, not impossible.
        assert!(Schedule::parse(None, Some("0 0 29 2 *"), None).is_ok());
    }

    #[test]
    fn parse_errors_name_the_key_and_the_fix() {
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, &'a str);
        let cases: &[Case] = &[
            (None, None, None, "has no schedule"),
            (None, None, Some("UTC"), "has no schedule"),
            (
                Some("30s"),
                Some("* * * * *"),
                None,
                "both `every` and `cron`",
            ),
            (
                Some("30s"),
                None,
                Some("Europe/Berlin"),
                "`time_zone = \"Europe/Berlin\"` is set without `cron`",
            ),
            (
                Some("soon"),
                None,
                None,
                "`every = \"soon\"` is not a duration",
            ),
            (Some(""), None, None, "`every = \"\"` is not a duration"),
            (Some("500ms"), None, None, "between 1s and 366days"),
            (Some("0s"), None, None, "between 1s and 366days"),
            (Some("367days"), None, None, "between 1s and 366days"),
            (Some("1s 500us"), None, None, "whole number of milliseconds"),
            (
                None,
                Some("0 3 * *"),
                None,
                "`cron = \"0 3 * *\"` is not a cron pattern",
            ),
            (None, Some("0 0 3 * * *"), None, "5 fields"),
            (None, Some("61 * * * *"), None, "is not a cron pattern"),
            (None, Some(""), None, "is not a cron pattern"),
            (None, Some("0 0 30 2 *"), None, "never fires"),
            (
                None,
                Some("0 3 * * *"),
                Some("Berlin"),
                "did you mean \"Europe/Berlin\"",
            ),
            (
                None,
                Some("0 3 * * *"),
                Some("new york"),
                "did you mean \"America/New_York\"",
            ),
            (
                None,
                Some("0 3 * * *"),
                Some("CEST"),
                "not a known time zone: use an IANA name",
            ),
            (
                None,
                Some("0 3 * * *"),
                Some("Mars/Olympus"),
                "`time_zone = \"Mars/Olympus\"`",
            ),
        ];
        for &(every, cron, zone, wanted) in cases {
            let err = Schedule::parse(every, cron, zone).expect_err(wanted);
            let text = crate::error_chain(&err);
            assert!(text.contains(wanted), "{every:?} {cron:?} {zone:?}: {text}");
        }
    }

    #[test]
    fn schedules_display_as_operators_write_them() {
        assert_eq!(every("30s").to_string(), "every 30s");
        assert_eq!(every("90m").to_string(), "every 1h 30m");
        assert_eq!(
            cron(" 0 3 * * * ", "Europe/Berlin").to_string(),
            "cron \"0 3 * * *\" in Europe/Berlin"
        );
        let utc = Schedule::parse(None, Some("@daily"), None).expect("a schedule");
        assert_eq!(utc.to_string(), "cron \"@daily\" in UTC");
        assert_eq!(
            utc.next_after(ms("2026-05-01T12:00:00Z")),
            Some(ms("2026-05-02T00:00:00Z"))
        );
    }

    #[test]
    fn every_is_anchored_to_the_epoch_not_to_the_last_run() {
        let schedule = every("7m");
        // A run that fired late does not move the phase.
        let late = ms("2026-05-01T12:03:17Z");
        let next = schedule.next_after(late).expect("next");
        assert_eq!(next % 420_000, 0);
        assert_eq!(schedule.at_or_before(next - 1), Some(next - 420_000));
        assert!(next > late && next - late <= 420_000);
    }

    #[test]
    fn the_compiled_in_zone_data_knows_the_zones() {
        // What a box without /usr/share/zoneinfo falls back to.
        let bundled = tz::TimeZoneDatabase::bundled();
        for zone in [
            "Europe/Berlin",
            "America/New_York",
            "Australia/Lord_Howe",
            "UTC",
        ] {
            assert!(bundled.get(zone).is_ok(), "{zone}");
        }
    }
}
