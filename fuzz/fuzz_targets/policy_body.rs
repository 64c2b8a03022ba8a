//! The policy body (`POST`/`PUT /v1/policies`): `PolicySpec` from JSON, its
//! validation, and what the scheduler computes from a valid one.
//! Properties: no panic; a valid policy serialises and parses back to the
//! same policy, which is valid again; its schedule gives due times that are
//! never before its slot and within the jitter.

#![no_main]

use chrono::{DateTime, Duration, Utc};
use libfuzzer_sys::fuzz_target;
use soda_syncer_domain::schedule::next_due;
use soda_syncer_domain::PolicySpec;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<PolicySpec>(data) else {
        return;
    };
    // A fixed, plausible "now" keeps runs reproducible.
    let now = DateTime::<Utc>::from_timestamp(1_750_000_000, 0).unwrap();
    let Ok(schedules) = spec.validate(now) else {
        return;
    };
    // (The read-only fields a GET adds are ignored on input: compare what is written.)
    let json = serde_json::to_value(&spec).expect("a valid policy serialises");
    let back: PolicySpec = serde_json::from_value(json.clone()).expect("and parses back");
    assert_eq!(serde_json::to_value(&back).unwrap(), json);
    back.validate(now).expect("and is still valid");
    let _ = spec.retention.forget_args();

    // What the scheduler does with it: first run, next slot, a retry.
    let jitter = Duration::seconds(spec.jitter_seconds as i64);
    if let Some((slot, due)) = next_due("policy-id", &schedules.backup, spec.jitter_seconds, None, None, now) {
        assert!(due >= slot && due - slot <= jitter, "slot {slot} due {due}");
    }
    if let Some((slot, due)) =
        next_due("policy-id", &schedules.backup, spec.jitter_seconds, Some(now), Some((now, 7)), now)
    {
        assert!(slot >= now && due >= now, "slot {slot} due {due}");
    }
});
