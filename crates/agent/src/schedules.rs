//! The parsed schedules of every policy, as admission attached them: the
//! run engine (due times, catch-up, drills), the metrics and the claims'
//! deadlines read them here instead of parsing the stored spec again.
//!
//! A policy stored before this start was admitted by an earlier agent: its
//! schedules are parsed once, the first time they are asked for. Each entry
//! keeps the specs it was parsed from and is used only while the policy's
//! spec still says the same, so a reader never gets a stale schedule.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use soda_syncer_domain::field::FieldError;
use soda_syncer_domain::schedule::{ScheduleSpec, Schedules};
use soda_syncer_domain::PolicySpec;

#[derive(Clone, Default)]
pub struct ScheduleBook {
    entries: Arc<Mutex<HashMap<String, Arc<Entry>>>>,
}

struct Entry {
    backup: ScheduleSpec,
    drill: Option<ScheduleSpec>,
    parsed: Arc<Schedules>,
}

impl Entry {
    fn of(spec: &PolicySpec, parsed: Schedules) -> Entry {
        Entry {
            backup: spec.schedule.clone(),
            drill: spec.drill.as_ref().map(|d| d.schedule.clone()),
            parsed: Arc::new(parsed),
        }
    }

    fn matches(&self, spec: &PolicySpec) -> bool {
        self.backup == spec.schedule && self.drill.as_ref() == spec.drill.as_ref().map(|d| &d.schedule)
    }
}

impl ScheduleBook {
    /// Admission parsed `spec`'s schedules: keep them for policy `id`.
    pub fn admitted(&self, id: &str, spec: &PolicySpec, parsed: Schedules) {
        self.lock().insert(id.to_string(), Arc::new(Entry::of(spec, parsed)));
    }

    /// Policy `id`'s schedules, which `spec` (its stored spec) describes.
    /// Err only for a stored spec that no longer parses (a corrupt database).
    pub fn of(&self, id: &str, spec: &PolicySpec) -> Result<Arc<Schedules>, FieldError> {
        if let Some(e) = self.lock().get(id).filter(|e| e.matches(spec)) {
            return Ok(e.parsed.clone());
        }
        let entry = Arc::new(Entry::of(spec, spec.schedules()?));
        self.lock().insert(id.to_string(), entry.clone());
        Ok(entry.parsed.clone())
    }

    /// The policy is gone.
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use soda_syncer_domain::schedule::Schedule;

    fn spec(interval: u64) -> PolicySpec {
        PolicySpec::with_defaults(
            "p".into(),
            "/data",
            ScheduleSpec { interval_seconds: Some(interval), ..Default::default() },
        )
    }

    fn interval(s: &Schedules) -> i64 {
        match &s.backup {
            Schedule::Interval(d) => d.num_seconds(),
            Schedule::Cron { .. } => panic!("an interval"),
        }
    }

    #[test]
    fn the_admitted_schedule_is_used_as_it_is_while_the_stored_spec_says_the_same() {
        let book = ScheduleBook::default();
        let s = spec(60);
        book.admitted("a", &s, s.validate(chrono::Utc::now()).unwrap());
        let first = book.of("a", &s).unwrap();
        assert!(Arc::ptr_eq(&first, &book.of("a", &s).unwrap()), "not parsed again");
        assert_eq!(interval(&first), 60);
    }

    #[test]
    fn a_changed_spec_or_a_policy_from_before_the_start_is_parsed_once() {
        let book = ScheduleBook::default();
        let old = spec(60);
        book.admitted("a", &old, old.validate(chrono::Utc::now()).unwrap());
        let new = spec(120);
        let got = book.of("a", &new).unwrap();
        assert_eq!(interval(&got), 120, "never the stale schedule");
        assert!(Arc::ptr_eq(&got, &book.of("a", &new).unwrap()));
        let stored = spec(30);
        assert_eq!(interval(&book.of("b", &stored).unwrap()), 30);
        book.forget("b");
        assert_eq!(book.lock().len(), 1);
    }
}
