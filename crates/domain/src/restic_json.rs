//! restic's JSON output (0.14 to 0.19): `backup --json` lines, `snapshots
//! --json`, `forget --json`, and the `exit_error` message restic 0.18+
//! prints on stderr when a `--json` command fails. Fields restic leaves out
//! (early in a run, or in an older version) default to zero or None. The
//! fixtures under `tests/fixtures/restic-<version>/` are recorded from each
//! version by `scripts/record-restic-fixtures`.

use serde::{Deserialize, Serialize};

/// One line of `restic backup --json` (stdout), or an `error` line (stderr).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "message_type", rename_all = "snake_case")]
pub enum BackupMessage {
    Status(BackupStatus),
    Summary(BackupSummary),
    Error(BackupErrorLine),
    /// restic 0.18+: why the command failed, with its exit code.
    ExitError(ExitError),
    /// `verbose_status` and anything a later restic adds.
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct BackupStatus {
    pub percent_done: f64,
    pub total_files: u64,
    pub files_done: u64,
    pub total_bytes: u64,
    pub bytes_done: u64,
    pub seconds_elapsed: u64,
    pub seconds_remaining: Option<u64>,
    pub error_count: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct BackupSummary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub dirs_new: u64,
    pub dirs_changed: u64,
    pub dirs_unmodified: u64,
    pub data_added: u64,
    pub total_files_processed: u64,
    pub total_bytes_processed: u64,
    pub total_duration: f64,
    /// In 0.14 the 8-hex short id; the full id from 0.15 on.
    pub snapshot_id: String,
}

impl BackupSummary {
    /// The snapshot's full id, when this restic printed it (0.15+).
    pub fn full_snapshot_id(&self) -> Option<&str> {
        let id = self.snapshot_id.as_str();
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }
}

/// restic 0.18+ `{"message_type":"exit_error","code":12,"message":"Fatal: ..."}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct ExitError {
    pub code: i32,
    pub message: String,
}

/// The `exit_error` message among a failed command's stderr lines, if this
/// restic printed one (0.18+ with `--json`).
pub fn exit_error(stderr: &str) -> Option<ExitError> {
    stderr.lines().rev().find_map(|l| match parse_backup_line(l)? {
        BackupMessage::ExitError(e) => Some(e),
        _ => None,
    })
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BackupErrorLine {
    #[serde(default)]
    pub error: serde_json::Value,
    #[serde(default)]
    pub during: String,
    #[serde(default)]
    pub item: String,
}

/// Parse one output line; `None` for lines that are not JSON (restic mixes
/// plain warnings into stderr).
pub fn parse_backup_line(line: &str) -> Option<BackupMessage> {
    let line = line.trim();
    if !line.starts_with('{') {
        return None;
    }
    serde_json::from_str(line).ok()
}

/// One snapshot from `snapshots --json` or inside `forget --json`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct Snapshot {
    pub id: String,
    #[serde(default)]
    pub short_id: String,
    pub time: String,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub tree: String,
    /// restic 0.17+: the backup's own summary, stored with the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<SnapshotSummary>,
}

/// What restic 0.17+ stores with each snapshot about the backup that made it.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct SnapshotSummary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub data_added: u64,
    pub total_files_processed: u64,
    pub total_bytes_processed: u64,
}

impl Snapshot {
    pub fn tag_value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.tags.as_ref()?.iter().find_map(|t| t.strip_prefix(&prefix))
    }
}

/// One group of `forget --json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ForgetGroup {
    #[serde(default)]
    pub keep: Option<Vec<Snapshot>>,
    #[serde(default)]
    pub remove: Option<Vec<Snapshot>>,
}

impl ForgetGroup {
    pub fn kept(&self) -> &[Snapshot] {
        self.keep.as_deref().unwrap_or(&[])
    }
    pub fn removed(&self) -> &[Snapshot] {
        self.remove.as_deref().unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/restic-0.14.0/");
    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIX}{name}")).unwrap()
    }

    #[test]
    fn backup_lines_from_restic_0_14_parse() {
        let msgs: Vec<_> = fixture("backup.jsonl").lines().map(|l| parse_backup_line(l).unwrap()).collect();
        let BackupMessage::Status(first) = &msgs[0] else { panic!() };
        assert_eq!((first.files_done, first.total_files), (0, 1), "missing fields default to zero");
        let BackupMessage::Status(later) = &msgs[2] else { panic!() };
        assert_eq!(later.files_done, 16);
        assert_eq!(later.seconds_remaining, Some(1));
        let BackupMessage::Summary(sum) = msgs.last().unwrap() else { panic!() };
        assert_eq!(sum.files_new, 40);
        assert_eq!(sum.total_bytes_processed, 400_000_000);
        assert_eq!(sum.snapshot_id, "6c685373");
    }

    #[test]
    fn an_unreadable_file_is_an_error_line_on_stderr() {
        let err = fixture("backup-partial.stderr");
        let msgs: Vec<_> = err.lines().filter_map(parse_backup_line).collect();
        assert_eq!(msgs.len(), 1, "the plain warning line is not JSON");
        let BackupMessage::Error(e) = &msgs[0] else { panic!() };
        assert_eq!(e.item, "/tmp/rfx/data2/secret");
        assert_eq!(e.during, "archival");
    }

    #[test]
    fn snapshots_and_forget_output_parse() {
        let snaps: Vec<Snapshot> = serde_json::from_str(&fixture("snapshots.json")).unwrap();
        assert_eq!(snaps[0].short_id, "1c71a7c9");
        assert_eq!(snaps[0].id.len(), 64);
        assert_eq!(snaps[0].tag_value("policy"), Some("p1"));
        let groups: Vec<ForgetGroup> = serde_json::from_str(&fixture("forget.json")).unwrap();
        assert_eq!(groups[0].kept().len(), 1);
        assert!(groups[0].removed().is_empty());
    }

    #[test]
    fn garbage_lines_are_ignored() {
        assert_eq!(parse_backup_line("Warning: at least one source file could not be read"), None);
        assert_eq!(parse_backup_line("{not json"), None);
        assert_eq!(
            parse_backup_line(r#"{"message_type":"verbose_status","action":"new"}"#),
            Some(BackupMessage::Other)
        );
    }
}

/// One entry of `restic ls --json`: a file, directory or link of a
/// snapshot, at its path inside the snapshot (the backed-up path: absolute
/// for the agent's snapshots; the fixture was recorded from a relative
/// one), which is also what `restore --include` matches.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LsNode {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub size: u64,
    /// Go's FileMode: permission bits plus type bits.
    #[serde(default)]
    pub mode: u32,
}

/// The nodes of `ls --json` output (the first line, the snapshot, and
/// anything unparsable are skipped).
pub fn parse_ls(out: &str) -> Vec<LsNode> {
    out.lines()
        .filter(|l| l.contains("\"struct_type\":\"node\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod ls_tests {
    #[test]
    fn ls_output_of_restic_0_14_parses() {
        let text = include_str!("../tests/fixtures/restic-0.14.0/ls.jsonl");
        let nodes = super::parse_ls(text);
        let file = nodes.iter().find(|n| n.name == "b.bin").unwrap();
        assert_eq!((file.kind.as_str(), file.path.as_str(), file.size), ("file", "/src/sub/b.bin", 100000));
        assert_eq!(nodes.iter().find(|n| n.name == "a.txt").unwrap().mode & 0o777, 0o644);
        assert!(nodes.iter().any(|n| n.kind == "symlink"));
        assert_eq!(nodes.len(), 5);
    }
}
