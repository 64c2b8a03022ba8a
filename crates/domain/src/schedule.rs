//! When a policy runs: interval or cron schedules, deterministic jitter,
//! catch-up after downtime and retry backoff. All pure functions of `now`.

use chrono::{DateTime, Duration, Utc};
use croner::Cron;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

use crate::field::FieldError;

/// Shortest and longest interval a policy may have.
pub const MIN_INTERVAL_SECONDS: u64 = 1;
pub const MAX_INTERVAL_SECONDS: u64 = 31 * 24 * 3600;

/// The schedule as the API carries it (`schedule` in a policy): either
/// `intervalSeconds`, or `cron` with an optional IANA `timezone` (UTC when
/// absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Run every this many seconds (1 s to 31 days). Give either this or `cron`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 2678400, example = 3600)]
    pub interval_seconds: Option<u64>,
    /// Five fields: minute hour day-of-month month day-of-week.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "0 */6 * * *")]
    pub cron: Option<String>,
    /// IANA name for `cron` (UTC when absent); only with `cron`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "UTC")]
    pub timezone: Option<String>,
}

/// A policy's parsed schedules: its backups' and, with a drill, its drills'.
#[derive(Debug, Clone)]
pub struct Schedules {
    pub backup: Schedule,
    pub drill: Option<Schedule>,
}

/// A validated schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    Interval(Duration),
    Cron { cron: Box<Cron>, tz: chrono_tz::Tz },
}

impl Schedule {
    pub fn parse(spec: &ScheduleSpec) -> Result<Schedule, FieldError> {
        match (&spec.interval_seconds, &spec.cron) {
            (Some(_), Some(_)) => Err(FieldError::new(
                "schedule",
                "give either schedule.intervalSeconds or schedule.cron, not both",
            )),
            (None, None) => Err(FieldError::new(
                "schedule",
                "a schedule is required: {\"intervalSeconds\": 3600} or {\"cron\": \"0 */6 * * *\", \"timezone\": \"UTC\"}",
            )),
            (Some(secs), None) => {
                if spec.timezone.is_some() {
                    return Err(FieldError::new(
                        "schedule.timezone",
                        "a timezone only applies to a cron schedule; remove it or use schedule.cron",
                    ));
                }
                if !(MIN_INTERVAL_SECONDS..=MAX_INTERVAL_SECONDS).contains(secs) {
                    return Err(FieldError::new(
                        "schedule.intervalSeconds",
                        format!(
                            "interval must be between {MIN_INTERVAL_SECONDS} second and {MAX_INTERVAL_SECONDS} seconds (31 days); got {secs}"
                        ),
                    ));
                }
                Ok(Schedule::Interval(Duration::seconds(*secs as i64)))
            }
            (None, Some(expr)) => {
                let tz_name = spec.timezone.as_deref().unwrap_or("UTC");
                let tz = chrono_tz::Tz::from_str(tz_name).map_err(|_| {
                    FieldError::new(
                        "schedule.timezone",
                        format!("unknown timezone {tz_name:?}: use an IANA name such as \"UTC\" or \"Europe/Berlin\""),
                    )
                })?;
                // An empty list item (",", "1,,2") makes croner match nothing, and
                // proving that took seconds per request (found by cargo fuzz).
                if expr.split_whitespace().any(|field| field.split(',').any(str::is_empty)) {
                    return Err(FieldError::new(
                        "schedule.cron",
                        format!("invalid cron expression {expr:?}: a list has an empty item; use e.g. \"0,30 * * * *\""),
                    ));
                }
                let cron = Cron::from_str(expr.trim()).map_err(|e| {
                    FieldError::new(
                        "schedule.cron",
                        format!("invalid cron expression {expr:?} ({e}); use five fields: minute hour day-of-month month day-of-week, e.g. \"0 */6 * * *\""),
                    )
                })?;
                let schedule = Schedule::Cron { cron: Box::new(cron), tz };
                // A pattern that can never fire (e.g. 30 February) is an error now, not a silent never.
                let probe = DateTime::<Utc>::from_timestamp(0, 0).expect("epoch");
                if schedule.fire_after(probe).is_none() {
                    return Err(FieldError::new("schedule.cron", format!("cron expression {expr:?} never fires")));
                }
                Ok(schedule)
            }
        }
    }

    /// The first fire time strictly after `after`, or `None` if the
    /// schedule never fires again.
    pub fn fire_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Interval(d) => after.checked_add_signed(*d),
            Schedule::Cron { cron, tz } => {
                let local = after.with_timezone(tz);
                cron.find_next_occurrence(&local, false).ok().map(|t| t.with_timezone(&Utc))
            }
        }
    }

    /// The smallest gap between two consecutive fire times, looking at the
    /// next few fires after `now` (for cron; exact for intervals). Jitter
    /// may not exceed it, or a jittered run would slide past the next slot.
    pub fn min_gap(&self, now: DateTime<Utc>) -> Duration {
        match self {
            Schedule::Interval(d) => *d,
            Schedule::Cron { .. } => {
                let mut gap = Duration::days(366);
                let mut t = now;
                let mut prev: Option<DateTime<Utc>> = None;
                for _ in 0..64 {
                    let Some(next) = self.fire_after(t) else {
                        break;
                    };
                    if let Some(p) = prev {
                        gap = gap.min(next - p);
                    }
                    prev = Some(next);
                    t = next;
                }
                gap
            }
        }
    }
}

/// The next slot of a schedule, given the slot the policy last ran for.
/// A slot that was missed (it lies before `now`, e.g. the node was down)
/// becomes one catch-up run at `now`, never one run per missed slot.
pub fn next_slot(schedule: &Schedule, last_slot: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let candidate = schedule.fire_after(last_slot)?;
    Some(if candidate < now { now } else { candidate })
}

/// A deterministic jitter for one policy's slot, in `[0, jitter_seconds]`:
/// the same inputs always give the same offset (so a restart does not move a
/// run), different policies spread out.
pub fn jitter_offset(policy_id: &str, slot: DateTime<Utc>, jitter_seconds: u64) -> Duration {
    if jitter_seconds == 0 {
        return Duration::zero();
    }
    // FNV-1a over the id and the slot's second.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in policy_id.bytes().chain(slot.timestamp().to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    Duration::seconds((h % (jitter_seconds + 1)) as i64)
}

/// How long to wait before retrying after `consecutive_failures` failed runs
/// in a row: 30 s, 60 s, 120 s, ... capped at one hour. The scheduler uses
/// the earlier of this and the next regular slot.
pub fn retry_delay(consecutive_failures: u32) -> Duration {
    if consecutive_failures == 0 {
        return Duration::zero();
    }
    let exp = (consecutive_failures - 1).min(10);
    Duration::seconds((30i64 << exp).min(3600))
}

/// When the next run of a policy is due.
/// - `last_slot`: the slot the last (or current) run was for; `None` for a
///   policy that never ran, which is due at once (plus jitter).
/// - `last_failed_at` with `consecutive_failures`: a retry is due after the
///   backoff, or at the next slot if that comes first.
pub fn next_due(
    policy_id: &str,
    schedule: &Schedule,
    jitter_seconds: u64,
    last_slot: Option<DateTime<Utc>>,
    retry: Option<(DateTime<Utc>, u32)>,
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let slot = match last_slot {
        None => now,
        Some(last) => next_slot(schedule, last, now)?,
    };
    let due = slot + jitter_offset(policy_id, slot, jitter_seconds);
    if let Some((failed_at, n)) = retry {
        if n > 0 {
            let retry_at = failed_at + retry_delay(n);
            if retry_at < due {
                // The retry stands in for a slot of its own, so the next
                // regular run counts from it.
                return Some((retry_at, retry_at));
            }
        }
    }
    Some((slot, due))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }
    fn interval(secs: u64) -> Schedule {
        Schedule::parse(&ScheduleSpec { interval_seconds: Some(secs), ..Default::default() }).unwrap()
    }
    fn cron(expr: &str, tz: Option<&str>) -> Result<Schedule, FieldError> {
        Schedule::parse(&ScheduleSpec { cron: Some(expr.into()), timezone: tz.map(Into::into), ..Default::default() })
    }

    #[test]
    fn policy_with_zero_interval_is_rejected() {
        let e = Schedule::parse(&ScheduleSpec { interval_seconds: Some(0), ..Default::default() }).unwrap_err();
        assert_eq!(e.field, "schedule.intervalSeconds");
        assert!(e.message.contains("between 1 second"), "{}", e.message);
    }

    #[test]
    fn intervals_longer_than_31_days_are_rejected() {
        assert!(Schedule::parse(&ScheduleSpec {
            interval_seconds: Some(MAX_INTERVAL_SECONDS + 1),
            ..Default::default()
        })
        .is_err());
        assert!(Schedule::parse(&ScheduleSpec { interval_seconds: Some(MAX_INTERVAL_SECONDS), ..Default::default() })
            .is_ok());
    }

    #[test]
    fn both_or_neither_schedule_kind_is_rejected() {
        assert!(Schedule::parse(&ScheduleSpec::default()).is_err());
        let both = ScheduleSpec { interval_seconds: Some(5), cron: Some("* * * * *".into()), timezone: None };
        assert!(Schedule::parse(&both).is_err());
    }

    #[test]
    fn bad_cron_and_bad_timezone_name_the_field() {
        assert_eq!(cron("61 * * * *", None).unwrap_err().field, "schedule.cron");
        assert_eq!(cron("nonsense", None).unwrap_err().field, "schedule.cron");
        assert_eq!(cron("0 * * * *", Some("Mars/Olympus")).unwrap_err().field, "schedule.timezone");
    }

    #[test]
    fn cron_fires_in_its_timezone() {
        let s = cron("0 2 * * *", Some("Europe/Berlin")).unwrap();
        // 02:00 in Berlin in winter is 01:00 UTC.
        assert_eq!(s.fire_after(t("2026-01-10T12:00:00Z")), Some(t("2026-01-11T01:00:00Z")));
        let utc = cron("0 */6 * * *", None).unwrap();
        assert_eq!(utc.fire_after(t("2026-01-10T06:00:00Z")), Some(t("2026-01-10T12:00:00Z")));
    }

    #[test]
    fn a_missed_slot_runs_once_at_now() {
        let s = interval(3600);
        let last = t("2026-01-01T00:00:00Z");
        let now = t("2026-01-03T10:30:00Z"); // 58 slots missed
        assert_eq!(next_slot(&s, last, now), Some(now));
        // After the catch-up run (slot = now), the next slot is one interval later.
        assert_eq!(next_slot(&s, now, now), Some(now + Duration::hours(1)));
    }

    #[test]
    fn a_new_policy_is_due_at_once() {
        let now = t("2026-01-01T00:00:00Z");
        let (slot, due) = next_due("p1", &interval(3600), 0, None, None, now).unwrap();
        assert_eq!((slot, due), (now, now));
    }

    #[test]
    fn failures_retry_with_capped_backoff_before_the_next_slot() {
        assert_eq!(retry_delay(1), Duration::seconds(30));
        assert_eq!(retry_delay(2), Duration::seconds(60));
        assert_eq!(retry_delay(7), Duration::seconds(1920));
        assert_eq!(retry_delay(8), Duration::seconds(3600));
        assert_eq!(retry_delay(40), Duration::seconds(3600));
        let now = t("2026-01-01T00:00:10Z");
        let last = t("2026-01-01T00:00:00Z");
        let (_, due) = next_due("p", &interval(86400), 0, Some(last), Some((now, 1)), now).unwrap();
        assert_eq!(due, now + Duration::seconds(30));
        // The next slot wins when it is earlier than the backoff.
        let (_, due) = next_due("p", &interval(5), 0, Some(last), Some((now, 5)), now).unwrap();
        assert_eq!(due, now);
    }

    proptest! {
        #[test]
        fn jitter_stays_within_bounds_and_is_stable(id in "[a-z0-9]{1,12}", secs in 0i64..4_000_000_000, j in 0u64..100_000) {
            let slot = DateTime::<Utc>::from_timestamp(secs, 0).unwrap();
            let a = jitter_offset(&id, slot, j);
            prop_assert!(a >= Duration::zero() && a <= Duration::seconds(j as i64));
            prop_assert_eq!(a, jitter_offset(&id, slot, j));
        }

        #[test]
        fn next_slot_is_never_in_the_past_and_always_after_last(
            every in 1u64..MAX_INTERVAL_SECONDS, last in 0i64..4_000_000_000, gap in 0i64..100_000_000
        ) {
            let s = interval(every);
            let last = DateTime::<Utc>::from_timestamp(last, 0).unwrap();
            let now = last + Duration::seconds(gap);
            let next = next_slot(&s, last, now).unwrap();
            prop_assert!(next >= now);
            prop_assert!(next > last);
            prop_assert!(next <= std::cmp::max(now, last + Duration::seconds(every as i64)));
        }

        #[test]
        fn cron_fires_are_strictly_increasing(start in 0i64..4_000_000_000, minute in 0u32..60, hour_step in 1u32..12) {
            let s = cron(&format!("{minute} */{hour_step} * * *"), Some("America/New_York")).unwrap();
            let mut t0 = DateTime::<Utc>::from_timestamp(start, 0).unwrap();
            for _ in 0..5 {
                let next = s.fire_after(t0).unwrap();
                prop_assert!(next > t0);
                t0 = next;
            }
        }
    }
}

/// Whether a repository's due prune or check starts now. It waits for a
/// gap: no backup of the repository running or queued on this node, and
/// none due within `gap`. A repository whose backups never leave such a
/// gap is maintained anyway once its maintenance has waited `max_wait`
/// (its backups then wait on restic's lock instead): maintenance is never
/// starved into silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaintenanceStart {
    /// In a gap.
    Now,
    /// No gap came within `max_wait`: now, with a warning.
    NowWithoutGap,
    /// Wait for a gap.
    Wait,
}

pub fn maintenance_start(
    now: DateTime<Utc>,
    due_since: DateTime<Utc>,
    backup_busy: bool,
    next_backup: Option<DateTime<Utc>>,
    gap: Duration,
    max_wait: Duration,
) -> MaintenanceStart {
    let in_gap = !backup_busy && next_backup.is_none_or(|t| t > now + gap);
    if in_gap {
        MaintenanceStart::Now
    } else if now - due_since >= max_wait {
        MaintenanceStart::NowWithoutGap
    } else {
        MaintenanceStart::Wait
    }
}

#[cfg(test)]
mod maintenance_tests {
    use super::*;

    #[test]
    fn maintenance_starts_in_a_gap_waits_otherwise_and_never_forever() {
        let now = Utc::now();
        let (gap, max) = (Duration::seconds(300), Duration::hours(6));
        let mins = Duration::minutes;
        assert_eq!(maintenance_start(now, now, false, None, gap, max), MaintenanceStart::Now);
        assert_eq!(maintenance_start(now, now, false, Some(now + mins(10)), gap, max), MaintenanceStart::Now);
        assert_eq!(maintenance_start(now, now, false, Some(now + mins(4)), gap, max), MaintenanceStart::Wait);
        assert_eq!(maintenance_start(now, now, true, None, gap, max), MaintenanceStart::Wait);
        assert_eq!(maintenance_start(now, now - mins(359), true, None, gap, max), MaintenanceStart::Wait);
        assert_eq!(maintenance_start(now, now - mins(360), true, None, gap, max), MaintenanceStart::NowWithoutGap);
        assert_eq!(
            maintenance_start(now, now - mins(400), false, Some(now + mins(1)), gap, max),
            MaintenanceStart::NowWithoutGap
        );
    }
}
