//! restic's output from every supported version, recorded by
//! `scripts/record-restic-fixtures` into `tests/fixtures/restic-<version>/`
//! (`<name>.stdout`, `.stderr`, `.code`), parsed as the agent parses it.

use soda_syncer_domain::restic_json::{exit_error, parse_backup_line, BackupMessage, ForgetGroup, Snapshot};
use soda_syncer_domain::restic_version::ResticVersion;

const VERSIONS: [&str; 3] = ["0.14.0", "0.18.0", "0.19.1"];

fn read(version: &str, name: &str) -> String {
    let p = format!("{}/tests/fixtures/restic-{version}/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn code(version: &str, name: &str) -> i32 {
    read(version, &format!("{name}.code")).trim().parse().unwrap()
}

#[test]
fn the_backup_summary_gives_the_full_snapshot_id_from_0_15_on() {
    for v in VERSIONS {
        let out = read(v, "backup.stdout");
        let summary = out
            .lines()
            .find_map(|l| match parse_backup_line(l) {
                Some(BackupMessage::Summary(s)) => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{v}: no summary"));
        assert_eq!(summary.total_files_processed, 2, "{v}");
        assert_eq!(summary.total_bytes_processed, 100_006, "{v}");
        let full = ResticVersion::parse(v).unwrap().features().full_snapshot_id_in_summary;
        assert_eq!(summary.full_snapshot_id().is_some(), full, "{v}: {}", summary.snapshot_id);
        let snaps: Vec<Snapshot> = serde_json::from_str(read(v, "snapshots.stdout").trim()).unwrap();
        assert!(snaps[0].id.starts_with(&summary.snapshot_id), "{v}");
    }
}

#[test]
fn snapshots_carry_their_backup_summary_from_0_17_on() {
    for v in VERSIONS {
        let snaps: Vec<Snapshot> = serde_json::from_str(read(v, "snapshots.stdout").trim()).unwrap();
        let has = ResticVersion::parse(v).unwrap().features().snapshot_summary;
        assert_eq!(snaps[0].summary.is_some(), has, "{v}");
        if let Some(s) = &snaps[0].summary {
            assert_eq!((s.total_files_processed, s.total_bytes_processed), (2, 100_006), "{v}");
        }
        assert_eq!(snaps[0].tag_value("policy"), Some("p1"), "{v}");
        let groups: Vec<ForgetGroup> = serde_json::from_str(read(v, "forget.stdout").trim()).unwrap();
        assert_eq!(groups[0].kept().len(), 1, "{v}");
    }
}

#[test]
fn failures_have_exit_codes_from_0_17_on_and_an_exit_error_message_from_0_18_on() {
    for v in VERSIONS {
        let f = ResticVersion::parse(v).unwrap().features();
        let (no_repo, wrong_pw, locked) = if f.exit_codes { (10, 12, 11) } else { (1, 1, 1) };
        assert_eq!(code(v, "no-repository"), no_repo, "{v}");
        assert_eq!(code(v, "wrong-password"), wrong_pw, "{v}");
        assert_eq!(code(v, "locked"), locked, "{v}");
        // The texts the agent falls back on are there in every version.
        assert!(read(v, "wrong-password.stderr").contains("wrong password or no key found"), "{v}");
        assert!(read(v, "locked.stderr").contains("repository is already locked"), "{v}");
        assert!(read(v, "no-repository.stderr").contains("unable to open config file"), "{v}");
        let e = exit_error(&read(v, "wrong-password.stderr"));
        assert_eq!(e.is_some(), f.exit_error_json, "{v}");
        if let Some(e) = e {
            assert_eq!((e.code, e.message.as_str()), (12, "Fatal: wrong password or no key found"), "{v}");
        }
        // A missing source fails the run (1) in every version: the agent
        // refuses it before restic runs anyway.
        assert_eq!(code(v, "backup-missing-source"), 1, "{v}");
    }
}

#[test]
fn sigint_leaves_no_lock_in_any_version_and_retry_lock_exists_from_0_16_on() {
    for v in VERSIONS {
        assert_eq!(read(v, "locks-after-sigint").trim(), "0", "{v}");
        let retry = read(v, "locked-retry.stderr");
        if ResticVersion::parse(v).unwrap().features().retry_lock {
            assert!(retry.contains("repository is already locked"), "{v}: {retry}");
        } else {
            assert!(retry.contains("unknown flag: --retry-lock"), "{v}: {retry}");
        }
    }
}
