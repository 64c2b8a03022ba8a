//! restic's JSON output as the agent reads it: `backup --json` lines (stdout
//! and stderr), and the documents of `snapshots --json` and `forget --json`.
//! Property: no panic on any input, line by line or whole.

#![no_main]

use libfuzzer_sys::fuzz_target;
use soda_syncer_domain::restic_json::{parse_backup_line, BackupMessage, ForgetGroup, Snapshot};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        if let Some(BackupMessage::Summary(s)) = parse_backup_line(line) {
            let json = serde_json::to_string(&s).expect("a summary serialises");
            assert!(serde_json::from_str::<soda_syncer_domain::restic_json::BackupSummary>(&json).is_ok());
        }
    }
    if let Ok(snaps) = serde_json::from_slice::<Vec<Snapshot>>(data) {
        for s in &snaps {
            let _ = s.tag_value("policy");
            let _ = s.tag_value("");
        }
    }
    if let Ok(groups) = serde_json::from_slice::<Vec<ForgetGroup>>(data) {
        for g in &groups {
            let _ = (g.kept().len(), g.removed().len());
        }
    }
});
