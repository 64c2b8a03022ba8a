//! What restic's failures mean: `ResticError` (one variant per cause
//! people can act on) and whether trying again can help (`Retry`), told
//! apart by exit code where restic has distinct ones and else by the texts
//! of its stderr (`classify_text`); the retries restic makes that no retry
//! can fix (`hopeless_retry`) and a refused delete (append-only).

use soda_syncer_domain::restic_json::{parse_backup_line, BackupMessage};

use super::{Repo, Restic};

#[derive(Debug, thiserror::Error)]
pub enum ResticError {
    #[error("restic was not found at {path}: install it (apt-get install restic) or point --restic at it")]
    NotInstalled { path: String },
    #[error("cannot start restic: {message}")]
    Spawn { message: String },
    #[error("{message}")]
    Unsupported { message: String },
    #[error("wrong password for the repository {repo}: check the policy's repository.password")]
    WrongPassword { repo: String },
    #[error("there is no restic repository at {repo}: {stderr}")]
    RepositoryNotFound { repo: String, stderr: String },
    #[error("the repository {repo} refused our credentials: check the access keys in repository.env (or the user and password in a REST URL): {stderr}")]
    AccessDenied { repo: String, stderr: String },
    #[error("the repository {repo} refuses this node's deletes (it is append-only): retention and prune are left to the maintainer that holds the delete rights (soda-syncer maintain): {stderr}")]
    DeletesRefused { repo: String, stderr: String },
    #[error("the repository {repo} is locked by another process; stale locks are removed automatically, this one is held by a live process: {stderr}")]
    RepositoryLocked { repo: String, stderr: String },
    #[error("cannot reach the repository {repo}: is the server up and the address right? {stderr}")]
    RepositoryUnreachable { repo: String, stderr: String },
    #[error("the source path {path} does not exist or is not a directory: restic would record an empty snapshot, so the run was refused; check that the volume is mounted")]
    SourceMissing { path: String },
    #[error(
        "no space left on a device restic writes to (the repository, or the cache under the state directory): {stderr}"
    )]
    DiskFull { stderr: String },
    #[error("the repository {repo} is in a format restic {version} no longer opens (the legacy index or the s3legacy layout): migrate it once with restic 0.17 (`restic migrate` / `restic repair index`) or run the agent with restic 0.17: {stderr}")]
    LegacyFormat { repo: String, version: String, stderr: String },
    #[error("restic {command} was interrupted by a signal the agent did not send (exit 130): {stderr}")]
    Interrupted { command: String, stderr: String },
    #[error("restic {command} was cancelled")]
    Cancelled { command: String },
    #[error("restic {command} was not run or was stopped: {reason}")]
    Fenced { command: String, reason: String },
    #[error("restic {command} ran longer than {seconds} s and was killed; raise --run-timeout-seconds if the volume is that large")]
    TimedOut { command: String, seconds: u64 },
    #[error("{0}")]
    Credentials(String),
    #[error("restic {command} failed with exit code {code}: {stderr}")]
    Failed { command: String, code: i32, stderr: String },
}

/// What a finished command left behind.
pub(super) struct Exec {
    pub(super) code: i32,
    pub(super) stderr_tail: String,
    pub(super) error_items: Vec<String>,
}

impl ResticError {
    /// A short stable code: the API error code and the metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ResticError::NotInstalled { .. } => "restic_missing",
            ResticError::Spawn { .. } => "restic_spawn_failed",
            ResticError::Unsupported { .. } => "restic_unsupported",
            ResticError::WrongPassword { .. } => "wrong_password",
            ResticError::RepositoryNotFound { .. } => "repository_not_found",
            ResticError::AccessDenied { .. } => "repository_access_denied",
            ResticError::DeletesRefused { .. } => "repository_append_only",
            ResticError::RepositoryLocked { .. } => "repository_locked",
            ResticError::RepositoryUnreachable { .. } => "repository_unreachable",
            ResticError::SourceMissing { .. } => "source_missing",
            ResticError::DiskFull { .. } => "disk_full",
            ResticError::LegacyFormat { .. } => "repository_format_unsupported",
            ResticError::Interrupted { .. } => "restic_interrupted",
            ResticError::Cancelled { .. } => "cancelled",
            ResticError::Fenced { .. } => "node_fenced",
            ResticError::TimedOut { .. } => "timed_out",
            ResticError::Failed { .. } => "restic_failed",
            ResticError::Credentials(_) => "secrets_unavailable",
        }
    }

    /// Whether trying again can help, and when (as rustic_core's errors
    /// say): the one place that retries (`LockRule`) asks
    /// this, nothing else decides it.
    pub fn retry(&self) -> Retry {
        match self {
            ResticError::RepositoryLocked { .. } => Retry::WhenUnlocked,
            ResticError::RepositoryUnreachable { .. }
            | ResticError::DiskFull { .. }
            | ResticError::Interrupted { .. }
            | ResticError::TimedOut { .. }
            | ResticError::Fenced { .. }
            | ResticError::Spawn { .. }
            | ResticError::Failed { .. } => Retry::Later,
            ResticError::NotInstalled { .. }
            | ResticError::Unsupported { .. }
            | ResticError::WrongPassword { .. }
            | ResticError::RepositoryNotFound { .. }
            | ResticError::AccessDenied { .. }
            | ResticError::DeletesRefused { .. }
            | ResticError::SourceMissing { .. }
            | ResticError::LegacyFormat { .. }
            | ResticError::Cancelled { .. }
            | ResticError::Credentials(_) => Retry::Never,
        }
    }
}

/// Whether a failed command is worth trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Not until someone changes something (a password, the source, the
    /// installed restic, the repository's rights); a repository that does
    /// not exist yet is made once by `backup`, which is not a retry.
    Never,
    /// Another process holds the repository's lock: remove it if its holder
    /// is provably gone, else wait for it (`LockWait`, up to `--lock-wait`).
    WhenUnlocked,
    /// The server, the disk or the process may be fine at the next
    /// scheduled run; trying again at once would only fail the same way.
    Later,
}

impl Restic {
    /// Map a failed command to an error: by restic's exit code where the
    /// version has distinct ones (0.17+: 10 no repository, 11 lock failed,
    /// 12 wrong password, 130 interrupted), else by its stderr (0.14 exits 1
    /// for nearly everything; TESTING.md lists the texts). restic 0.18+
    /// states the reason as a JSON `exit_error` message; it is shown as text.
    pub(super) fn classify(&self, repo: &Repo, command: &str, exec: Exec) -> ResticError {
        let s = readable_stderr(&exec.stderr_tail);
        let repo_s = repo.display();
        if self.features().exit_codes {
            match exec.code {
                10 => return ResticError::RepositoryNotFound { repo: repo_s, stderr: s },
                11 => return ResticError::RepositoryLocked { repo: repo_s, stderr: s },
                12 => return ResticError::WrongPassword { repo: repo_s },
                130 => return ResticError::Interrupted { command: command.to_string(), stderr: s },
                _ => {}
            }
        }
        let version = self.detected_version().map(|v| v.to_string()).unwrap_or_default();
        classify_text(repo_s, command, exec.code, s, &version)
    }
}

/// A failed command's stderr for people: restic 0.18+'s JSON `exit_error`
/// line becomes its message; other lines stay as they are.
fn readable_stderr(tail: &str) -> String {
    tail.lines()
        .map(|l| match parse_backup_line(l) {
            Some(BackupMessage::ExitError(e)) => e.message,
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The error restic's stderr text names (every version prints these texts;
/// restic 0.14 has no other way to tell its failures apart).
fn classify_text(repo: String, command: &str, code: i32, s: String, version: &str) -> ResticError {
    let lower = s.to_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    if has(&["wrong password or no key found"]) {
        ResticError::WrongPassword { repo }
    } else if has(&["repository is already locked"]) {
        ResticError::RepositoryLocked { repo, stderr: s }
    } else if has(&["no space left on device", "disk quota exceeded"]) {
        ResticError::DiskFull { stderr: s }
    } else if has(&["s3 legacy layout", "s3legacy", "legacy index", "to migrate if necessary"]) {
        ResticError::LegacyFormat { repo, version: version.to_string(), stderr: s }
    } else if has(&ACCESS_DENIED) {
        ResticError::AccessDenied { repo, stderr: s }
    } else if has(&[
        "connection refused",
        "dial tcp",
        "no such host",
        "i/o timeout",
        "context deadline exceeded",
        "network is unreachable",
        "connection reset",
        "tls handshake",
        "server misbehaving",
        "unexpected eof",
        ": eof",
    ]) {
        ResticError::RepositoryUnreachable { repo, stderr: s }
    } else if has(&[
        "unable to open config file",
        "is there a repository at the following location",
        "repository does not exist",
        "nosuchbucket",
        "the specified bucket does not exist",
    ]) {
        ResticError::RepositoryNotFound { repo, stderr: s }
    } else {
        ResticError::Failed { command: command.to_string(), code, stderr: s }
    }
}

/// Whether restic's stderr shows a refused removal of a repository file
/// other than a lock: `Remove(<snapshot/…>) returned error, retrying after
/// …: … 403 Forbidden` (0.14's retries, stopped as hopeless) or
/// `Remove(<snapshot/…>) failed: unexpected HTTP response (403)` (0.19), and
/// S3's `Access Denied` for the same call.
pub(super) fn refused_a_delete(stderr: &str) -> bool {
    let lower = stderr.to_lowercase();
    lower
        .lines()
        .any(|l| l.contains("remove(<") && !l.contains("remove(<lock/") && ACCESS_DENIED.iter().any(|n| l.contains(n)))
}

/// Texts of a refused login, in restic's errors from S3 and REST servers.
const ACCESS_DENIED: [&str; 9] = [
    "401 unauthorized",
    "403 forbidden",
    "(401)",
    "(403)",
    "accessdenied",
    "access denied",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "unauthorized",
];

/// What restic keeps retrying (0.18+ retries a missing bucket and a refused
/// login with backoff for many minutes) although no retry can help: the
/// command is stopped at once and the error returned, so a new bucket gets
/// its `init` and a wrong key fails loudly instead of a run that hangs.
pub(super) fn hopeless_retry(line: &str) -> Option<HopelessRetry> {
    if !line.contains("retrying after") {
        return None;
    }
    let lower = line.to_lowercase();
    if ["the specified bucket does not exist", "nosuchbucket", "bucket does not exist"]
        .iter()
        .any(|n| lower.contains(n))
    {
        Some(HopelessRetry::NoBucket)
    } else if ACCESS_DENIED.iter().any(|n| lower.contains(n)) {
        Some(HopelessRetry::Refused)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HopelessRetry {
    NoBucket,
    Refused,
}

#[cfg(test)]
mod tests {
    use super::*;
    use soda_syncer_domain::restic_version::ResticVersion;
    use soda_syncer_domain::Secret;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn fixture(version: &str, name: &str) -> String {
        let p = format!("{}/../domain/tests/fixtures/restic-{version}/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    fn restic_of(version: Option<&str>) -> Restic {
        let r = Restic::new("restic".into(), "/nonexistent".into(), "h".into(), Duration::from_secs(1));
        if let Some(v) = version {
            r.detected.set(ResticVersion::parse(v).unwrap()).unwrap();
        }
        r
    }

    fn repo() -> Repo {
        Repo { url: "/tmp/fixture/repo".into(), password: Secret::new("fixture-pw"), env: BTreeMap::new() }
    }

    fn classify(version: &str, name: &str) -> ResticError {
        let code = fixture(version, &format!("{name}.code")).trim().parse().unwrap();
        let exec = Exec { code, stderr_tail: fixture(version, &format!("{name}.stderr")), error_items: Vec::new() };
        restic_of(Some(version)).classify(&repo(), "snapshots", exec)
    }

    #[test]
    fn every_version_s_failures_map_to_the_same_errors() {
        for v in ["0.14.0", "0.18.0", "0.19.1"] {
            assert_eq!(classify(v, "wrong-password").kind(), "wrong_password", "{v}");
            assert_eq!(classify(v, "no-repository").kind(), "repository_not_found", "{v}");
            assert_eq!(classify(v, "locked").kind(), "repository_locked", "{v}");
            // 0.18's JSON exit_error is shown as its message, not as JSON.
            let e = classify(v, "no-repository").to_string();
            assert!(!e.contains("message_type"), "{v}: {e}");
            assert!(e.contains("unable to open config file"), "{v}: {e}");
        }
    }

    #[test]
    fn exit_codes_decide_before_the_text_where_restic_has_them() {
        let exec = |code| Exec { code, stderr_tail: "Fatal: something new".into(), error_items: Vec::new() };
        let new = restic_of(Some("0.19.1"));
        assert_eq!(new.classify(&repo(), "backup", exec(10)).kind(), "repository_not_found");
        assert_eq!(new.classify(&repo(), "backup", exec(11)).kind(), "repository_locked");
        assert_eq!(new.classify(&repo(), "backup", exec(12)).kind(), "wrong_password");
        assert_eq!(new.classify(&repo(), "backup", exec(130)).kind(), "restic_interrupted");
        assert_eq!(new.classify(&repo(), "backup", exec(1)).kind(), "restic_failed");
        // 0.14 has no such codes: an exit 10 there means nothing special.
        assert_eq!(restic_of(Some("0.14.0")).classify(&repo(), "backup", exec(10)).kind(), "restic_failed");
    }

    #[test]
    fn a_repository_in_a_format_newer_restic_dropped_gets_its_own_error() {
        let exec = Exec {
            code: 1,
            stderr_tail: r#"{"message_type":"exit_error","code":1,"message":"Fatal: S3 legacy layout is no longer supported. Use restic 0.17.3 to migrate if necessary."}"#.into(),
            error_items: Vec::new(),
        };
        let e = restic_of(Some("0.18.0")).classify(&repo(), "backup", exec);
        assert_eq!(e.kind(), "repository_format_unsupported");
        assert!(e.to_string().contains("restic 0.18.0 no longer opens"), "{e}");
    }

    #[test]
    fn retries_that_cannot_help_are_recognised() {
        let bucket =
            "Stat(<config/>) returned error, retrying after 1.310531967s: Stat: The specified bucket does not exist";
        assert_eq!(hopeless_retry(bucket), Some(HopelessRetry::NoBucket));
        let denied = "Load(<lock/12ab>, 0, 0) returned error, retrying after 552ms: Access Denied.";
        assert_eq!(hopeless_retry(denied), Some(HopelessRetry::Refused));
        let network =
            "Save(<data/12ab>) returned error, retrying after 720ms: dial tcp 127.0.0.1:9: connection refused";
        assert_eq!(hopeless_retry(network), None, "a network error may heal: the unreachable timer decides");
        assert_eq!(hopeless_retry("Fatal: the specified bucket does not exist"), None, "not a retry");
    }

    #[test]
    fn a_refused_removal_of_a_snapshot_or_pack_means_append_only_and_a_refused_lock_removal_does_not() {
        // Recorded against `rclone serve restic --append-only` and rest-server --append-only.
        let v014 = "Remove(<snapshot/3be0aef49b>) returned error, retrying after 4.506218855s: blob not removed, server response: 403 Forbidden (403)";
        let v019 = "Remove(<snapshot/3be0aef49b>) failed: unexpected HTTP response (403): 403 Forbidden";
        // S3 (minio-go's message for a DeleteObject the bucket policy denies).
        let s3 = "Remove(<data/12ab34cd56>) returned error, retrying after 552ms: Access Denied.";
        for text in [v014, v019, s3] {
            assert!(refused_a_delete(&format!("some context\n{text}\nmore")), "{text}");
        }
        let lock = "Remove(<lock/12ab34cd56>) failed: unexpected HTTP response (403): 403 Forbidden";
        assert!(!refused_a_delete(lock), "a refused lock removal is not append-only, the repository is unusable");
        assert!(!refused_a_delete("Load(<config/>) failed: 403 Forbidden"), "a refused read is a wrong key");
    }
}
