//! Which restic the agent drives, and what that version lets it do. The
//! agent supports restic 0.14.0 (Debian 12) to 0.19.x (tested up to
//! [`NEWEST_TESTED`]); every feature newer than 0.14 is used only where the
//! detected version has it, so 0.14 keeps working unchanged.

use serde::Serialize;
use std::fmt;

/// A restic release, as `restic version` prints it ("restic 0.18.0 compiled
/// with ..."); a pre-release or dev suffix ("0.19.1-dev") is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResticVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

/// The oldest restic the agent runs with.
pub const OLDEST_SUPPORTED: ResticVersion = ResticVersion::new(0, 14, 0);
/// The newest restic the test suite runs against.
pub const NEWEST_TESTED: ResticVersion = ResticVersion::new(0, 19, 1);

impl ResticVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> ResticVersion {
        ResticVersion { major, minor, patch }
    }

    /// "0.18.0", "v0.18.0", "0.19.1-dev (compiled manually)".
    pub fn parse(s: &str) -> Option<ResticVersion> {
        let s = s.trim().trim_start_matches('v');
        let core = s.split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().flatten().unwrap_or(0);
        Some(ResticVersion { major, minor, patch })
    }

    /// From the whole output of `restic version`.
    pub fn from_version_output(out: &str) -> Option<ResticVersion> {
        let mut words = out.split_whitespace();
        (words.next()? == "restic").then_some(())?;
        ResticVersion::parse(words.next()?)
    }

    pub fn support(self) -> Support {
        if self < OLDEST_SUPPORTED {
            Support::TooOld
        } else if (self.major, self.minor) > (NEWEST_TESTED.major, NEWEST_TESTED.minor) {
            Support::NewerThanTested
        } else {
            Support::Supported
        }
    }

    pub fn features(self) -> Features {
        let at_least = |minor: u32| self >= ResticVersion::new(0, minor, 0);
        Features {
            full_snapshot_id_in_summary: at_least(15),
            retry_lock: at_least(16),
            restore_json: at_least(16),
            exit_codes: at_least(17),
            restore_delete: at_least(17),
            restore_dry_run: at_least(17),
            restore_overwrite: at_least(17),
            snapshot_summary: at_least(17),
            cleans_up_on_sigterm: at_least(17),
            exit_error_json: at_least(18),
        }
    }
}

impl fmt::Display for ResticVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Whether the agent runs with a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    Supported,
    /// Older than [`OLDEST_SUPPORTED`]: the agent is not ready.
    TooOld,
    /// Newer than the newest minor release tested: a warning, and it runs.
    NewerThanTested,
}

impl Support {
    /// Why the agent is not ready with this version, or what to be aware of.
    pub fn message(self, v: ResticVersion) -> Option<String> {
        match self {
            Support::Supported => None,
            Support::TooOld => Some(format!(
                "restic {v} is older than {OLDEST_SUPPORTED}, the oldest this agent supports: install restic {OLDEST_SUPPORTED} or newer (Debian 12's package is {OLDEST_SUPPORTED})"
            )),
            Support::NewerThanTested => Some(format!(
                "restic {v} is newer than {NEWEST_TESTED}, the newest this agent was tested with: it runs, but watch the first backups and report what differs"
            )),
        }
    }
}

/// What the detected restic offers that the agent uses. Each field names
/// the restic release that brought it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Features {
    /// 0.15: the backup summary carries the full snapshot id (0.14: 8 hex).
    pub full_snapshot_id_in_summary: bool,
    /// 0.16: `--retry-lock`, so restic itself waits for a lock held by a
    /// live process instead of failing at once.
    pub retry_lock: bool,
    /// 0.16: `restore --json` prints progress and a summary.
    pub restore_json: bool,
    /// 0.17: exit codes 10 (no repository), 11 (lock failed), 12 (wrong
    /// password), 130 (interrupted).
    pub exit_codes: bool,
    /// 0.17: `restore --delete` removes files that are not in the snapshot.
    pub restore_delete: bool,
    /// 0.17: `restore --dry-run`.
    pub restore_dry_run: bool,
    /// 0.17: `restore --overwrite if-changed`.
    pub restore_overwrite: bool,
    /// 0.17: `snapshots --json` carries each snapshot's backup summary.
    pub snapshot_summary: bool,
    /// 0.17: SIGTERM removes restic's locks (before: only SIGINT does).
    pub cleans_up_on_sigterm: bool,
    /// 0.18: a JSON `exit_error` message on stderr when a `--json` command fails.
    pub exit_error_json: bool,
}

impl Features {
    /// The names of the features in use, for status output.
    pub fn names(&self) -> Vec<&'static str> {
        let all = [
            (self.full_snapshot_id_in_summary, "fullSnapshotIdInSummary"),
            (self.retry_lock, "retryLock"),
            (self.restore_json, "restoreJson"),
            (self.exit_codes, "exitCodes"),
            (self.restore_delete, "restoreDelete"),
            (self.restore_dry_run, "restoreDryRun"),
            (self.restore_overwrite, "restoreOverwrite"),
            (self.snapshot_summary, "snapshotSummary"),
            (self.cleans_up_on_sigterm, "cleansUpOnSigterm"),
            (self.exit_error_json, "exitErrorJson"),
        ];
        all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_output_of_each_tested_release_parses() {
        let cases = [
            ("restic 0.14.0 compiled with go1.19.8 on linux/amd64\n", ResticVersion::new(0, 14, 0)),
            ("restic 0.18.0 compiled with go1.24.4 on linux/amd64", ResticVersion::new(0, 18, 0)),
            ("restic 0.19.1 compiled with go1.26.4 on linux/amd64", ResticVersion::new(0, 19, 1)),
            ("restic 0.19.1-dev (compiled manually) compiled with go1.26", ResticVersion::new(0, 19, 1)),
        ];
        for (out, want) in cases {
            assert_eq!(ResticVersion::from_version_output(out), Some(want), "{out}");
        }
        assert_eq!(ResticVersion::from_version_output("rustic 0.9.0"), None);
        assert_eq!(ResticVersion::from_version_output(""), None);
        assert_eq!(ResticVersion::parse("v0.16"), Some(ResticVersion::new(0, 16, 0)));
    }

    #[test]
    fn support_covers_0_14_to_0_19_and_warns_beyond() {
        assert_eq!(ResticVersion::new(0, 13, 1).support(), Support::TooOld);
        assert_eq!(ResticVersion::new(0, 14, 0).support(), Support::Supported);
        assert_eq!(ResticVersion::new(0, 19, 9).support(), Support::Supported);
        assert_eq!(ResticVersion::new(0, 20, 0).support(), Support::NewerThanTested);
        assert_eq!(ResticVersion::new(1, 0, 0).support(), Support::NewerThanTested);
        assert!(Support::TooOld.message(ResticVersion::new(0, 12, 0)).unwrap().contains("0.14.0"));
        assert!(Support::Supported.message(ResticVersion::new(0, 18, 0)).is_none());
    }

    #[test]
    fn features_follow_the_release_that_brought_them() {
        let f = |minor| ResticVersion::new(0, minor, 0).features();
        assert_eq!(f(14), Features::default());
        assert!(f(15).full_snapshot_id_in_summary && !f(15).retry_lock);
        assert!(f(16).retry_lock && f(16).restore_json && !f(16).restore_delete);
        assert!(f(17).restore_delete && f(17).cleans_up_on_sigterm && !f(17).exit_error_json);
        assert!(f(18).exit_error_json);
        assert_eq!(f(19).names().len(), 10);
    }
}
