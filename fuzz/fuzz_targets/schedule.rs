//! Schedules: a cron expression and timezone (or a JSON `schedule`), parsed
//! as the API does, then the fire times the scheduler asks for.
//! Properties: no panic; a schedule that parses fires again after any
//! plausible time, strictly later; the minimal gap is positive.

#![no_main]

use chrono::DateTime;
use libfuzzer_sys::fuzz_target;
use soda_syncer_domain::schedule::{next_slot, ScheduleSpec};
use soda_syncer_domain::Schedule;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let spec = if text.starts_with('{') {
        match serde_json::from_str::<ScheduleSpec>(text) {
            Ok(s) => s,
            Err(_) => return,
        }
    } else {
        // "cron expression\ntimezone"
        let mut lines = text.splitn(2, '\n');
        let cron = lines.next().unwrap_or("").to_string();
        let timezone = lines.next().map(str::to_string);
        ScheduleSpec { cron: Some(cron), timezone, interval_seconds: None }
    };
    let Ok(schedule) = Schedule::parse(&spec) else {
        return;
    };
    // Times from 2001 to 2100, picked by the input.
    let seed = data.iter().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(*b as u64));
    for k in 0..4u64 {
        let secs = 1_000_000_000 + ((seed.wrapping_add(k * 7_919_000)) % 3_100_000_000) as i64;
        let now = DateTime::from_timestamp(secs, 0).unwrap();
        if let Some(next) = schedule.fire_after(now) {
            assert!(next > now, "fire_after({now}) = {next}");
            let slot = next_slot(&schedule, now, now).expect("fires after now");
            assert!(slot > now);
        }
        let gap = schedule.min_gap(now);
        assert!(gap > chrono::Duration::zero(), "min_gap {gap}");
    }
});
