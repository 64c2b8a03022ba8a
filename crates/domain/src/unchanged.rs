//! "Unchanged since snapshot X": the rules that decide whether a scheduled
//! backup may be replaced by a walk of the volume's metadata, and restic's
//! exclude patterns, so that the walk covers exactly the files restic backs
//! up. The walk itself (and its digest) lives in the agent.
//!
//! restic decides that a file is unchanged from its metadata (path, type,
//! size, mtime, ctime, inode). The agent records a digest of that metadata
//! (and more: mode, owner, link target) over the backed-up files before each
//! real backup; a scheduled run whose walk gives the same digest is recorded
//! as `unchanged`, pointing to the previous snapshot, without running restic.
//! On btrfs an equal subvolume generation proves the same without a walk
//! (the agent's `btrfs` module); these rules decide whether either is tried.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::{RunState, RunTrigger};

/// What a clean real backup left behind for later runs to compare with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Basis {
    /// The agent process (a random id per start) that recorded it.
    pub agent_instance: String,
    /// The policy as it was (see `spec_fingerprint` in the agent).
    pub spec_fingerprint: String,
    /// When the real backup that wrote the snapshot started.
    pub backed_up_at: DateTime<Utc>,
}

/// On a run recorded as unchanged: the snapshot it points to and what
/// proved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnchangedRun {
    /// The snapshot the volume still matches (written by a real backup).
    pub snapshot_id: String,
    /// When that real backup started (RFC 3339).
    pub backed_up_at: String,
    /// When the walk found nothing changed (RFC 3339).
    pub verified_at: String,
    /// Files, directories and links the walk compared.
    pub entries: u64,
    /// How long the check took (the walk, or reading the generation).
    pub walk_ms: u64,
    /// What proved it (runs recorded before this field were walks).
    #[serde(default)]
    pub proof: UnchangedProof,
}

/// What proved a volume unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UnchangedProof {
    /// The metadata walk gave the digest taken before the last real backup.
    #[default]
    Walk,
    /// The volume is a btrfs subvolume whose committed generation (read
    /// after a syncfs) is the one read before the last real backup (or
    /// before a later walk proved it unchanged): its tree was not
    /// modified, so no walk was needed.
    BtrfsGeneration,
}

impl UnchangedProof {
    pub fn as_str(self) -> &'static str {
        match self {
            UnchangedProof::Walk => "walk",
            UnchangedProof::BtrfsGeneration => "btrfs-generation",
        }
    }
}

impl UnchangedRun {
    /// "unchanged since snapshot 1a2b3c4d, verified at T".
    pub fn describe(&self) -> String {
        let short: String = self.snapshot_id.chars().take(8).collect();
        format!("unchanged since snapshot {short}, verified at {}", self.verified_at)
    }
}

/// Everything the decision depends on, gathered by the caller.
#[derive(Debug, Clone)]
pub struct Situation<'a> {
    pub verify_unchanged: bool,
    pub trigger: RunTrigger,
    /// Pre or post commands (policy hooks or pod hooks) are set: they may
    /// flush state the walk cannot see, so they must run, and so must restic.
    pub has_hooks: bool,
    pub basis: Option<&'a Basis>,
    pub agent_instance: &'a str,
    pub spec_fingerprint: &'a str,
    /// The state of the policy's newest backup run before this one.
    pub previous_backup: Option<RunState>,
    pub now: DateTime<Utc>,
    /// `--full-backup-every`: the longest time without a real backup.
    pub full_backup_every: Duration,
}

/// Why a run must be a real backup (a short stable code, logged and shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealBackup {
    OptedOut,
    NotScheduled,
    Hooks,
    NoBasis,
    AgentRestarted,
    PolicyChanged,
    PreviousNotClean,
    FullBackupDue,
}

impl RealBackup {
    pub fn as_str(self) -> &'static str {
        match self {
            RealBackup::OptedOut => "verifyUnchanged is false",
            RealBackup::NotScheduled => "not a scheduled run",
            RealBackup::Hooks => "the policy or its pods have hooks",
            RealBackup::NoBasis => "no clean real backup recorded a digest",
            RealBackup::AgentRestarted => "the agent restarted since the last real backup",
            RealBackup::PolicyChanged => "the policy changed since the last real backup",
            RealBackup::PreviousNotClean => "the previous backup run was not a clean success",
            RealBackup::FullBackupDue => "--full-backup-every has passed since the last real backup",
        }
    }
}

/// Whether this run may try the walk instead of restic. `Ok(())` means
/// walk and compare; the walk itself can still demand a real backup.
pub fn may_verify(s: &Situation<'_>) -> Result<(), RealBackup> {
    if !s.verify_unchanged {
        return Err(RealBackup::OptedOut);
    }
    // Manual runs ("back up now"), catch-ups after a start, retries and
    // requests from Kubernetes run restic: whoever asked expects a backup.
    if !matches!(s.trigger, RunTrigger::Schedule | RunTrigger::Legacy) {
        return Err(RealBackup::NotScheduled);
    }
    if s.has_hooks {
        return Err(RealBackup::Hooks);
    }
    let Some(b) = s.basis else { return Err(RealBackup::NoBasis) };
    if b.agent_instance != s.agent_instance {
        return Err(RealBackup::AgentRestarted);
    }
    if b.spec_fingerprint != s.spec_fingerprint {
        return Err(RealBackup::PolicyChanged);
    }
    if s.previous_backup != Some(RunState::Succeeded) {
        return Err(RealBackup::PreviousNotClean);
    }
    if s.now - b.backed_up_at >= s.full_backup_every {
        return Err(RealBackup::FullBackupDue);
    }
    Ok(())
}

/// restic's `--exclude` patterns, matched the way restic 0.14 to 0.19
/// match them (`internal/filter`): against the absolute path, component by
/// component, with Go's `filepath.Match` per component and `**` for any
/// number of components; a pattern without a leading `/` matches at any
/// depth. Where restic's meaning cannot be reproduced exactly (`$VAR`
/// expansion, `!` negation, `..`, a malformed class) the set excludes
/// nothing, so the walk covers more than restic and errs towards a real
/// backup, never towards a missed change.
#[derive(Debug, Clone, Default)]
pub struct ExcludeSet {
    patterns: Vec<Vec<Vec<u8>>>,
}

impl ExcludeSet {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> ExcludeSet {
        let mut out = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            if p.starts_with('!') {
                // A negation can bring back what an earlier pattern excluded.
                return ExcludeSet::default();
            }
            match parse_pattern(p) {
                Some(parts) => out.push(parts),
                None => continue, // conservative: this pattern excludes nothing
            }
        }
        ExcludeSet { patterns: out }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether restic would exclude this absolute path (`/a/b/c`).
    pub fn excludes(&self, path: &[u8]) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        // Up to 256 components on the stack; deeper paths fall back to a Vec.
        let mut small: [(u32, u32); 256] = [(0, 0); 256];
        let mut n = 0usize;
        let mut big: Vec<(u32, u32)> = Vec::new();
        let mut start = 0usize;
        for i in 0..=path.len() {
            if i == path.len() || path[i] == b'/' {
                let c = (start as u32, i as u32);
                if n < small.len() {
                    small[n] = c;
                } else {
                    if big.is_empty() {
                        big.extend_from_slice(&small);
                    }
                    big.push(c);
                }
                n += 1;
                start = i + 1;
            }
        }
        let comps: &[(u32, u32)] = if n <= small.len() { &small[..n] } else { &big };
        let strs = Comps { path, comps };
        self.patterns.iter().any(|parts| {
            if parts.first().is_some_and(|p| p.is_empty()) {
                // Absolute: from the root ("" is the component before the first '/').
                match_prefix(parts, &strs, 0)
            } else {
                // Relative: at any depth, but never on the root marker.
                (1..strs.comps.len()).any(|off| match_prefix(parts, &strs, off))
            }
        })
    }
}

struct Comps<'a> {
    path: &'a [u8],
    comps: &'a [(u32, u32)],
}

impl Comps<'_> {
    fn get(&self, i: usize) -> &[u8] {
        let (a, b) = self.comps[i];
        &self.path[a as usize..b as usize]
    }
}

/// Whether `parts` match the components from `off` on (a window: the path
/// may go on below, as restic excludes a directory's whole subtree).
fn match_prefix(parts: &[Vec<u8>], strs: &Comps<'_>, off: usize) -> bool {
    let Some((first, rest)) = parts.split_first() else { return true };
    if first.as_slice() == b"**" {
        return (off..=strs.comps.len()).any(|o| match_prefix(rest, strs, o));
    }
    if off >= strs.comps.len() {
        return false;
    }
    glob_component(first, strs.get(off)) && match_prefix(rest, strs, off + 1)
}

/// A pattern cleaned the way restic cleans it (`filepath.Clean`), split
/// into components; `None` when restic's meaning is not reproduced here.
fn parse_pattern(p: &str) -> Option<Vec<Vec<u8>>> {
    if p.is_empty() || p.contains('$') || p.contains('\0') {
        return None;
    }
    let absolute = p.starts_with('/');
    let mut parts: Vec<Vec<u8>> = Vec::new();
    if absolute {
        parts.push(Vec::new());
    }
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => {
                if !valid_glob(c.as_bytes()) {
                    return None;
                }
                parts.push(c.as_bytes().to_vec());
            }
        }
    }
    if parts.iter().all(|p| p.is_empty()) {
        return None; // "/" or "." : restic's meaning differs between versions
    }
    Some(parts)
}

fn valid_glob(p: &[u8]) -> bool {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'\\' => {
                if i + 1 >= p.len() {
                    return false;
                }
                i += 2;
            }
            b'[' => match class_end(p, i + 1) {
                Some(e) => i = e + 1,
                None => return false,
            },
            _ => i += 1,
        }
    }
    true
}

/// The index of the `]` closing a class that starts at `i` (after `[`).
fn class_end(p: &[u8], mut i: usize) -> Option<usize> {
    if p.get(i) == Some(&b'^') {
        i += 1;
    }
    let mut first = true;
    while i < p.len() {
        match p[i] {
            b']' if !first => return Some(i),
            b'\\' => i += 2,
            _ => i += 1,
        }
        first = false;
    }
    None
}

/// Go's `filepath.Match` for one component (no `/` on either side).
pub fn glob_component(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    star = Some((p, n));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    n += 1;
                    continue;
                }
                b'[' => {
                    if let Some((true, next)) = match_class(pat, p + 1, name[n]) {
                        p = next;
                        n += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pat.len() && pat[p + 1] == name[n] => {
                    p += 2;
                    n += 1;
                    continue;
                }
                // An escape whose character differs: no match here.
                b'\\' if p + 1 < pat.len() => {}
                c if c == name[n] => {
                    p += 1;
                    n += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                p = sp + 1;
                n = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

/// Match one byte against the class starting at `i` (after `[`): whether
/// it matched and where the pattern goes on.
fn match_class(pat: &[u8], mut i: usize, c: u8) -> Option<(bool, usize)> {
    let negated = pat.get(i) == Some(&b'^');
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let &b = pat.get(i)?;
        if b == b']' && !first {
            return Some((matched != negated, i + 1));
        }
        first = false;
        let lo = if b == b'\\' {
            i += 1;
            *pat.get(i)?
        } else {
            b
        };
        i += 1;
        let mut hi = lo;
        if pat.get(i) == Some(&b'-') && pat.get(i + 1).is_some_and(|&x| x != b']') {
            i += 1;
            hi = if pat[i] == b'\\' {
                i += 1;
                *pat.get(i)?
            } else {
                pat[i]
            };
            i += 1;
        }
        if lo <= c && c <= hi {
            matched = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basis() -> Basis {
        Basis {
            agent_instance: "a1".into(),
            spec_fingerprint: "f1".into(),
            backed_up_at: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().into(),
        }
    }

    fn situation(b: &Basis) -> Situation<'_> {
        Situation {
            verify_unchanged: true,
            trigger: RunTrigger::Schedule,
            has_hooks: false,
            basis: Some(b),
            agent_instance: "a1",
            spec_fingerprint: "f1",
            previous_backup: Some(RunState::Succeeded),
            now: b.backed_up_at + Duration::hours(1),
            full_backup_every: Duration::hours(24),
        }
    }

    #[test]
    fn a_marker_recorded_before_the_proof_field_reads_as_a_walk() {
        let old = r#"{"snapshotId":"s","backedUpAt":"a","verifiedAt":"v","entries":3,"walkMs":1}"#;
        let m: UnchangedRun = serde_json::from_str(old).unwrap();
        assert_eq!(m.proof, UnchangedProof::Walk);
        let new = UnchangedRun { proof: UnchangedProof::BtrfsGeneration, ..m };
        let json = serde_json::to_value(&new).unwrap();
        assert_eq!(json["proof"], "btrfs-generation");
        assert_eq!(json["proof"], UnchangedProof::BtrfsGeneration.as_str());
    }

    #[test]
    fn a_scheduled_run_with_a_fresh_basis_may_verify() {
        let b = basis();
        assert_eq!(may_verify(&situation(&b)), Ok(()));
        let legacy = Situation { trigger: RunTrigger::Legacy, ..situation(&b) };
        assert_eq!(may_verify(&legacy), Ok(()));
    }

    #[test]
    fn every_reason_for_a_real_backup_is_honoured() {
        let b = basis();
        let s = situation(&b);
        let cases: Vec<(Situation<'_>, RealBackup)> = vec![
            (Situation { verify_unchanged: false, ..s.clone() }, RealBackup::OptedOut),
            (Situation { trigger: RunTrigger::Manual, ..s.clone() }, RealBackup::NotScheduled),
            (Situation { trigger: RunTrigger::Startup, ..s.clone() }, RealBackup::NotScheduled),
            (Situation { trigger: RunTrigger::Retry, ..s.clone() }, RealBackup::NotScheduled),
            (Situation { trigger: RunTrigger::Kubernetes, ..s.clone() }, RealBackup::NotScheduled),
            (Situation { has_hooks: true, ..s.clone() }, RealBackup::Hooks),
            (Situation { basis: None, ..s.clone() }, RealBackup::NoBasis),
            (Situation { agent_instance: "a2", ..s.clone() }, RealBackup::AgentRestarted),
            (Situation { spec_fingerprint: "f2", ..s.clone() }, RealBackup::PolicyChanged),
            (Situation { previous_backup: None, ..s.clone() }, RealBackup::PreviousNotClean),
            (Situation { previous_backup: Some(RunState::Partial), ..s.clone() }, RealBackup::PreviousNotClean),
            (Situation { previous_backup: Some(RunState::Failed), ..s.clone() }, RealBackup::PreviousNotClean),
            (Situation { previous_backup: Some(RunState::Interrupted), ..s.clone() }, RealBackup::PreviousNotClean),
            (Situation { now: b.backed_up_at + Duration::hours(24), ..s.clone() }, RealBackup::FullBackupDue),
        ];
        for (situation, why) in cases {
            assert_eq!(may_verify(&situation), Err(why), "{situation:?}");
        }
    }

    #[test]
    fn go_globs_match_one_component() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.tmp", "a.tmp", true),
            ("*.tmp", "a.tmpx", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[a-c]x", "bx", true),
            ("[^a-c]x", "bx", false),
            ("[^a-c]x", "dx", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob_component(p.as_bytes(), n.as_bytes()), *want, "{p} vs {n}");
        }
    }

    #[test]
    fn excludes_follow_restics_rules() {
        let set = ExcludeSet::new(&["*.tmp", "cache/", "/vol/abs", "logs/**/old", ".soda-syncer-restore-*"]);
        let cases: &[(&str, bool)] = &[
            ("/vol/a.tmp", true),
            ("/vol/sub/deep/a.tmp", true),
            ("/vol/a.tmpx", false),
            ("/vol/cache", true),
            ("/vol/x/cache/f", true),
            ("/vol/cachex", false),
            ("/vol/abs", true),
            ("/vol/abs/f", true),
            ("/vol/x/abs", false),
            ("/vol/logs/old", true),
            ("/vol/logs/a/b/old", true),
            ("/vol/logs/a/b/new", false),
            ("/vol/.soda-syncer-restore-123", true),
            ("/vol/data", false),
        ];
        for (path, want) in cases {
            assert_eq!(set.excludes(path.as_bytes()), *want, "{path}");
        }
    }

    #[test]
    fn patterns_whose_meaning_is_not_reproduced_exclude_nothing() {
        assert!(ExcludeSet::new(&["*.tmp", "!keep.tmp"]).is_empty());
        assert!(!ExcludeSet::new(&["$HOME/x"]).excludes(b"/root/x"));
        assert!(!ExcludeSet::new(&["[abc"]).excludes(b"/vol/[abc"));
        assert!(!ExcludeSet::new(&["../x"]).excludes(b"/vol/x"));
    }
}
