//! Restores: the lines of `restic restore --json` (0.16+; `-vv` adds one
//! `verbose_status` line per item, `--dry-run` and `--delete` 0.17+), what
//! a dry run says an in-place restore would change, and whether a restore
//! fits on its target. Measured with restic 0.18.0 and 0.19.1: items are
//! named by their path inside the restored snapshot folder ("/a/f1"),
//! except deleted ones, which restic names by their path on the target.

use serde::{Deserialize, Serialize};

/// One line of `restic restore --json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "message_type", rename_all = "snake_case")]
pub enum RestoreMessage {
    Status(RestoreStatus),
    Summary(RestoreStatus),
    VerboseStatus(RestoreItem),
    /// restic 0.18+: why the command failed.
    ExitError(crate::restic_json::ExitError),
    #[serde(other)]
    Other,
}

/// A status line, and (the same fields) the summary at the end.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct RestoreStatus {
    pub seconds_elapsed: u64,
    pub seconds_remaining: Option<u64>,
    pub percent_done: f64,
    pub total_files: u64,
    pub files_restored: u64,
    pub files_skipped: u64,
    pub files_deleted: u64,
    pub total_bytes: u64,
    pub bytes_restored: u64,
    pub bytes_skipped: u64,
}

/// One item of `-vv`: `restored` (new), `updated` (replaced),
/// `unchanged`, or `deleted`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct RestoreItem {
    pub action: String,
    pub item: String,
    pub size: u64,
}

pub fn parse_restore_line(line: &str) -> Option<RestoreMessage> {
    let line = line.trim();
    if !line.starts_with('{') {
        return None;
    }
    serde_json::from_str(line).ok()
}

impl From<&RestoreStatus> for crate::run::Progress {
    fn from(s: &RestoreStatus) -> Self {
        // Skipped (unchanged) files count as done: they need no writing.
        let files_done = s.files_restored + s.files_skipped;
        let bytes_done = s.bytes_restored + s.bytes_skipped;
        let percent_done = if s.percent_done > 0.0 {
            s.percent_done.min(1.0)
        } else if s.total_bytes > 0 {
            (bytes_done as f64 / s.total_bytes as f64).min(1.0)
        } else {
            0.0
        };
        crate::run::Progress {
            percent_done,
            files_done,
            total_files: s.total_files,
            bytes_done,
            total_bytes: s.total_bytes,
            seconds_remaining: s.seconds_remaining,
        }
    }
}

/// At most this many paths of each kind are listed in a preview.
pub const PREVIEW_PATHS: usize = 200;

/// What an in-place restore would do, from `restore --dry-run -vv --json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestorePreview {
    /// Files and directories the snapshot has and the volume lacks.
    pub files_to_restore: u64,
    /// Files that differ from the snapshot and would be overwritten.
    pub files_to_overwrite: u64,
    /// Files and directories not in the snapshot that would be deleted
    /// (only with `delete`).
    pub files_to_delete: u64,
    pub files_unchanged: u64,
    /// What would be written.
    pub bytes_to_write: u64,
    /// The first paths of each kind, relative to the volume's root.
    pub overwrite: Vec<String>,
    pub delete: Vec<String>,
    pub restore: Vec<String>,
    /// More paths than listed.
    pub truncated: bool,
}

impl RestorePreview {
    /// Count one `verbose_status` item. `target` is the path restic was
    /// given as `--target` (deleted items are named below it).
    pub fn add(&mut self, item: &RestoreItem, target: &str) {
        let rel = |p: &str| {
            let p = p.strip_prefix(target.trim_end_matches('/')).unwrap_or(p);
            p.trim_start_matches('/').to_string()
        };
        let (count, list) = match item.action.as_str() {
            "restored" => (&mut self.files_to_restore, Some(&mut self.restore)),
            "updated" => (&mut self.files_to_overwrite, Some(&mut self.overwrite)),
            "deleted" => (&mut self.files_to_delete, Some(&mut self.delete)),
            "unchanged" => (&mut self.files_unchanged, None),
            _ => return,
        };
        *count += 1;
        if matches!(item.action.as_str(), "restored" | "updated") {
            self.bytes_to_write += item.size;
        }
        if let Some(list) = list {
            if list.len() < PREVIEW_PATHS {
                list.push(rel(&item.item));
            } else {
                self.truncated = true;
            }
        }
    }
}

/// Whether `needed` bytes fit in `free` bytes, keeping a margin for the
/// directories and metadata restic writes besides the files' data: 1 % of
/// the data and at least 1 MiB.
pub fn fits(needed: u64, free: u64) -> bool {
    let margin = (needed / 100).max(1 << 20);
    needed.saturating_add(margin) <= free
}

/// Bytes in a human unit, for messages ("6.0 MiB").
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from restic 0.19.1 (0.18.0 prints the same): an in-place
    /// dry run with `--overwrite if-changed --delete -vv --json` over a
    /// volume where `x` changed and `new` appeared.
    const DRY_RUN_0_19: &str = r#"{"message_type":"verbose_status","action":"unchanged","item":"/a/f1","size":100000}
{"message_type":"verbose_status","action":"unchanged","item":"/a/f2","size":100000}
{"message_type":"verbose_status","action":"updated","item":"/x","size":3}
{"message_type":"verbose_status","action":"restored","item":"/a","size":0}
{"message_type":"verbose_status","action":"deleted","item":"/tmp/probe/t2/new","size":0}
{"message_type":"summary","total_files":2,"files_restored":2,"files_skipped":3,"files_deleted":1,"total_bytes":3,"bytes_restored":3,"bytes_skipped":300000}"#;

    #[test]
    fn a_dry_run_becomes_a_preview_with_paths_relative_to_the_volume() {
        let mut p = RestorePreview::default();
        let mut summary = None;
        for line in DRY_RUN_0_19.lines() {
            match parse_restore_line(line) {
                Some(RestoreMessage::VerboseStatus(i)) => p.add(&i, "/tmp/probe/t2"),
                Some(RestoreMessage::Summary(s)) => summary = Some(s),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((p.files_to_overwrite, p.files_to_delete, p.files_to_restore, p.files_unchanged), (1, 1, 1, 2));
        assert_eq!(p.overwrite, ["x"]);
        assert_eq!(p.delete, ["new"]);
        assert_eq!(p.bytes_to_write, 3);
        let s = summary.unwrap();
        assert_eq!((s.files_deleted, s.bytes_skipped), (1, 300000));
    }

    #[test]
    fn status_lines_become_progress_counting_skipped_files_as_done() {
        let line = r#"{"message_type":"status","seconds_elapsed":1,"percent_done":0.5,"total_files":10,"files_restored":3,"files_skipped":2,"total_bytes":1000,"bytes_restored":300,"bytes_skipped":200}"#;
        let Some(RestoreMessage::Status(s)) = parse_restore_line(line) else { panic!() };
        let p = crate::run::Progress::from(&s);
        assert_eq!((p.files_done, p.bytes_done, p.percent_done), (5, 500, 0.5));
        assert!(parse_restore_line("restoring <Snapshot ...>").is_none());
        assert_eq!(parse_restore_line(r#"{"message_type":"something_new"}"#), Some(RestoreMessage::Other));
    }

    #[test]
    fn a_preview_lists_a_bounded_number_of_paths() {
        let mut p = RestorePreview::default();
        for i in 0..(PREVIEW_PATHS + 5) {
            p.add(&RestoreItem { action: "updated".into(), item: format!("/f{i}"), size: 1 }, "/t");
        }
        assert_eq!(p.overwrite.len(), PREVIEW_PATHS);
        assert!(p.truncated);
        assert_eq!(p.files_to_overwrite as usize, PREVIEW_PATHS + 5);
    }

    #[test]
    fn space_checks_keep_a_margin() {
        assert!(fits(5 << 20, 6 << 20));
        assert!(!fits(11 << 19, 6 << 20), "5.5 MiB plus the 1 MiB margin do not fit in 6 MiB");
        assert!(!fits(1 << 30, (1 << 30) + (5 << 20)), "1 % of 1 GiB is more than 5 MiB");
        assert_eq!(human_bytes(6 << 20), "6.0 MiB");
        assert_eq!(human_bytes(512), "512 B");
    }
}
