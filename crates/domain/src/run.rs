//! Runs: what kind of work, why it started, and the states it moves through.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    Backup,
    Restore,
    Forget,
    Prune,
    Check,
    Drill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunTrigger {
    Schedule,
    Manual,
    Legacy,
    Startup,
    Kubernetes,
    /// A retry after a failed run, sooner than the next slot (backoff).
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Queued,
    Running,
    Succeeded,
    /// restic wrote a snapshot but could not read some files (exit 3).
    Partial,
    /// restic succeeded but the snapshot is implausible next to the previous one.
    Suspicious,
    Failed,
    Cancelled,
    /// The agent stopped or died while the run was queued or running.
    Interrupted,
}

impl RunState {
    pub const ALL: [RunState; 8] = [
        RunState::Queued,
        RunState::Running,
        RunState::Succeeded,
        RunState::Partial,
        RunState::Suspicious,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Interrupted,
    ];

    pub fn is_terminal(self) -> bool {
        !matches!(self, RunState::Queued | RunState::Running)
    }

    /// A run that produced a snapshot nobody should worry about.
    pub fn is_clean_success(self) -> bool {
        self == RunState::Succeeded
    }

    /// Whether the next consecutive-failure count resets after this state.
    /// Partial and suspicious runs wrote a snapshot, so they do not back off,
    /// but they are not clean either (see `is_clean_success`).
    pub fn counts_as_failure(self) -> bool {
        matches!(self, RunState::Failed | RunState::Interrupted)
    }

    pub fn can_become(self, next: RunState) -> bool {
        use RunState::*;
        match self {
            Queued => matches!(next, Running | Cancelled | Interrupted | Failed),
            Running => next.is_terminal(),
            _ => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        use RunState::*;
        match self {
            Queued => "queued",
            Running => "running",
            Succeeded => "succeeded",
            Partial => "partial",
            Suspicious => "suspicious",
            Failed => "failed",
            Cancelled => "cancelled",
            Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        RunState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

macro_rules! str_enum {
    ($t:ty, $($v:ident => $s:literal),+) => {
        impl $t {
            pub fn as_str(self) -> &'static str { match self { $(<$t>::$v => $s),+ } }
            pub fn parse(s: &str) -> Option<$t> { match s { $($s => Some(<$t>::$v),)+ _ => None } }
        }
    };
}
str_enum!(RunKind, Backup => "backup", Restore => "restore", Forget => "forget", Prune => "prune", Check => "check", Drill => "drill");
str_enum!(RunTrigger, Schedule => "schedule", Manual => "manual", Legacy => "legacy", Startup => "startup", Kubernetes => "kubernetes", Retry => "retry");

/// What a backup's numbers say about it, beside restic's exit code.
/// `previous` is the summary of the last clean backup of the same policy.
/// A snapshot with no files, or with far fewer files or bytes than the last
/// good one, is `Suspicious`: restic is happy with an empty directory (an
/// unmounted volume looks exactly like that), we are not.
pub fn judge_backup(
    restic_partial: bool,
    files: u64,
    bytes: u64,
    previous: Option<(u64, u64)>,
    max_drop_fraction: f64,
) -> (RunState, Option<String>) {
    if restic_partial {
        return (
            RunState::Partial,
            Some("restic could not read some files; the snapshot was written without them".into()),
        );
    }
    if files == 0 {
        return (
            RunState::Suspicious,
            Some("the snapshot holds no files: is the volume mounted and populated?".into()),
        );
    }
    if let Some((pf, pb)) = previous {
        let dropped = |now: u64, before: u64| before > 0 && (now as f64) < (before as f64) * (1.0 - max_drop_fraction);
        if dropped(files, pf) {
            return (
                RunState::Suspicious,
                Some(format!("file count fell from {pf} to {files} since the last good backup")),
            );
        }
        if dropped(bytes, pb) {
            return (
                RunState::Suspicious,
                Some(format!("size fell from {pb} to {bytes} bytes since the last good backup")),
            );
        }
    }
    (RunState::Succeeded, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_change() {
        for s in RunState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for n in RunState::ALL {
                assert!(!s.can_become(n), "{s:?} -> {n:?}");
            }
        }
        assert!(RunState::Queued.can_become(RunState::Running));
        assert!(RunState::Running.can_become(RunState::Interrupted));
        assert!(!RunState::Running.can_become(RunState::Queued));
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for s in RunState::ALL {
            assert_eq!(RunState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", s.as_str()));
        }
        assert_eq!(RunKind::parse("drill"), Some(RunKind::Drill));
        assert_eq!(RunTrigger::parse("legacy"), Some(RunTrigger::Legacy));
        assert_eq!(RunKind::parse("nope"), None);
    }

    #[test]
    fn empty_or_shrunken_snapshots_are_suspicious() {
        assert_eq!(judge_backup(false, 0, 0, None, 0.5).0, RunState::Suspicious);
        assert_eq!(judge_backup(false, 10, 100, Some((100, 100)), 0.5).0, RunState::Suspicious);
        assert_eq!(judge_backup(false, 100, 10, Some((100, 100)), 0.5).0, RunState::Suspicious);
        assert_eq!(judge_backup(false, 60, 60, Some((100, 100)), 0.5).0, RunState::Succeeded);
        assert_eq!(judge_backup(true, 60, 60, None, 0.5).0, RunState::Partial);
        assert_eq!(judge_backup(false, 1, 1, None, 0.5).0, RunState::Succeeded);
    }
}

/// Live progress of a run, as the API shows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub percent_done: f64,
    pub files_done: u64,
    pub total_files: u64,
    pub bytes_done: u64,
    pub total_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_remaining: Option<u64>,
}

impl From<&crate::restic_json::BackupStatus> for Progress {
    fn from(s: &crate::restic_json::BackupStatus) -> Self {
        Progress {
            percent_done: s.percent_done,
            files_done: s.files_done,
            total_files: s.total_files,
            bytes_done: s.bytes_done,
            total_bytes: s.total_bytes,
            seconds_remaining: s.seconds_remaining,
        }
    }
}

/// What a finished backup did, as the API shows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub data_added: u64,
    pub total_files_processed: u64,
    pub total_bytes_processed: u64,
    pub total_duration: f64,
    /// Files restic could not read (a partial backup).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
    /// Snapshots removed by retention at the end of the run.
    #[serde(default)]
    pub snapshots_forgotten: u64,
    /// Drills: files and bytes restored and checked, and what did not match.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub files_checked: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_checked: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatches: Vec<String>,
    /// Restores with restic 0.16+ (`restore --json`): files and bytes
    /// written, files left as they were (unchanged, in place), files
    /// deleted (`delete`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub files_restored: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub files_skipped: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub files_deleted: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_restored: u64,
    /// A restore with `dryRun`: what it would change (nothing was written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_preview: Option<crate::restore::RestorePreview>,
    /// Set when retention (or a prune) was not run here because the
    /// repository refuses this node's deletes: `delegated` (to the
    /// maintainer that holds the delete rights; see "Immutable backups").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl From<&crate::restic_json::BackupSummary> for RunSummary {
    fn from(s: &crate::restic_json::BackupSummary) -> Self {
        RunSummary {
            files_new: s.files_new,
            files_changed: s.files_changed,
            files_unmodified: s.files_unmodified,
            data_added: s.data_added,
            total_files_processed: s.total_files_processed,
            total_bytes_processed: s.total_bytes_processed,
            total_duration: s.total_duration,
            ..Default::default()
        }
    }
}

/// Why a run did not succeed: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunError {
    pub code: String,
    pub message: String,
}
