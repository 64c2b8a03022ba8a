//! Point-in-time consistency, the decisions only: which method makes a
//! volume consistent (from facts the agent gathered about its mount), whether
//! a policy's hooks are allowed, how `/proc/self/mountinfo` reads, and what a
//! run records about it. The agent does the inspecting, freezing and
//! snapshotting; nothing here touches the disk.

use serde::{Deserialize, Serialize};

use crate::field::FieldError;
use crate::policy::{ConsistencyMode, Hooks};

/// Something a consistency method holds for a run (a freeze, a snapshot, a
/// clone, a loop device, a mount): recorded in the agent's database before
/// it exists, cleared once it is gone, so a crash leaves nothing behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldResource {
    pub id: String,
    pub run_id: String,
    /// `freeze`, `btrfs_snapshot`, `clone_tree`, `clone_file`, `loop`, `mount`, `lvm_snapshot`.
    pub kind: String,
    pub path: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The method a run actually used (`auto` resolves to one of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    None,
    Btrfs,
    Reflink,
    Blockclone,
    Fsfreeze,
    Lvm,
}

impl Method {
    pub const ALL: [Method; 6] =
        [Method::None, Method::Btrfs, Method::Reflink, Method::Blockclone, Method::Fsfreeze, Method::Lvm];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Btrfs => "btrfs",
            Method::Reflink => "reflink",
            Method::Blockclone => "blockclone",
            Method::Fsfreeze => "fsfreeze",
            Method::Lvm => "lvm",
        }
    }

    /// Whether this method freezes the source's filesystem at some point
    /// (LVM freezes too, inside lvcreate, out of the agent's sight).
    pub fn freezes(self) -> bool {
        matches!(self, Method::Btrfs | Method::Reflink | Method::Blockclone | Method::Fsfreeze)
    }
}

/// What a run records in `run.consistency`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyReport {
    /// What the policy asked for.
    pub mode: ConsistencyMode,
    /// What was used.
    pub method: Method,
    /// How long writers to the volume were blocked by the agent's freeze (0: none).
    pub freeze_ms: u64,
    /// How long making the point-in-time view took, freeze included.
    pub snapshot_ms: u64,
    /// The instant the backed-up data is from (RFC 3339); null for `none`.
    pub point_in_time: Option<String>,
}

/// One line of `/proc/self/mountinfo` (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u64,
    pub parent_id: u64,
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted here (`/` unless a bind or subvolume mount).
    pub root: String,
    pub mount_point: String,
    pub options: String,
    pub fs_type: String,
    /// The device or source (`/dev/loop0`, `tmpfs`, ...).
    pub source: String,
    pub super_options: String,
}

impl MountEntry {
    /// The filesystem (superblock) this mount shows: the same for every
    /// mount, bind or subvolume of one filesystem.
    pub fn fs_key(&self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse `/proc/self/mountinfo`; lines that do not fit are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    if l.len() < 6 || r.len() < 2 {
        return None;
    }
    let (major, minor) = l[2].split_once(':')?;
    Some(MountEntry {
        mount_id: l[0].parse().ok()?,
        parent_id: l[1].parse().ok()?,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: unescape(l[3]),
        mount_point: unescape(l[4]),
        options: l[5].to_string(),
        fs_type: r[0].to_string(),
        source: unescape(r[1]),
        super_options: r.get(2).map(|s| s.to_string()).unwrap_or_default(),
    })
}

/// The mount `path` (absolute, symlinks resolved) lies on: the one with
/// `mount_id` when the kernel told it (statx), else the longest mount point
/// that contains the path, the latest mounted winning over one it covers.
pub fn mount_of<'a>(entries: &'a [MountEntry], path: &str, mount_id: Option<u64>) -> Option<&'a MountEntry> {
    if let Some(id) = mount_id {
        if let Some(e) = entries.iter().find(|e| e.mount_id == id) {
            return Some(e);
        }
    }
    let contains =
        |mp: &str| mp == "/" || path == mp || (path.starts_with(mp) && path.as_bytes().get(mp.len()) == Some(&b'/'));
    let mut best: Option<&MountEntry> = None;
    for e in entries.iter().filter(|e| contains(&e.mount_point)) {
        if best.is_none_or(|b| e.mount_point.len() >= b.mount_point.len()) {
            best = Some(e);
        }
    }
    best
}

/// The volume is a filesystem image attached to a loop device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopBacking {
    pub device: String,
    /// The image file, on the outer filesystem.
    pub file: String,
    /// The outer filesystem's type.
    pub fs_type: String,
    /// The outer filesystem clones files (FICLONE).
    pub reflink: bool,
    /// The image starts at offset 0 and is used whole (no partition table).
    pub whole_file: bool,
}

/// The volume is an LVM logical volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LvmVolume {
    pub vg: String,
    pub lv: String,
    pub thin: bool,
}

/// What the agent found out about a source before choosing a method.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceFacts {
    pub path: String,
    pub fs_type: String,
    pub mount_point: String,
    /// The mount's device or source.
    pub device: String,
    /// The source directory is the root of a btrfs subvolume.
    pub btrfs_subvolume: bool,
    /// The source's filesystem clones files (FICLONE): xfs with reflink, btrfs.
    pub reflink: bool,
    pub loop_backing: Option<LoopBacking>,
    pub lvm: Option<LvmVolume>,
    /// The kernel has device-mapper (`/proc/misc`), which LVM snapshots need.
    pub device_mapper: bool,
    /// Why the source's filesystem must not be frozen (the root
    /// filesystem, the agent's own state, ...), if it must not.
    pub freeze_refusal: Option<String>,
}

/// Filesystems whose freeze (FIFREEZE) is known to work.
const FREEZABLE: [&str; 8] = ["ext4", "ext3", "ext2", "xfs", "btrfs", "f2fs", "jfs", "nilfs2"];

/// Filesystems a read-only clone of an image can be mounted from without
/// replaying a log (`ro,noload` / `ro,nouuid,norecovery`).
pub const CLONE_MOUNTABLE: [&str; 4] = ["ext4", "ext3", "ext2", "xfs"];

/// The method chosen for a run, and for `auto` falling back to `none`, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub method: Method,
    /// Set when `auto` found no point-in-time method: the run's warning.
    pub fallback: Option<String>,
}

impl SourceFacts {
    fn no_freeze(&self, what: &str) -> Result<(), String> {
        match &self.freeze_refusal {
            Some(why) => Err(format!("{what} freezes {} ({}), which {why}", self.mount_point, self.fs_type)),
            None => Ok(()),
        }
    }

    fn btrfs(&self) -> Result<(), String> {
        if self.fs_type != "btrfs" {
            return Err(format!("{} is on {}, not btrfs", self.path, self.fs_type));
        }
        if !self.btrfs_subvolume {
            return Err(format!(
                "{} is a directory on btrfs but not a subvolume (create the volume with `btrfs subvolume create`, or use reflink)",
                self.path
            ));
        }
        // The snapshot is made one instant under a short freeze.
        self.no_freeze("btrfs")
    }

    fn lvm_ok(&self) -> Result<(), String> {
        if !self.device_mapper {
            return Err("this kernel has no device-mapper (/proc/misc lists none), which LVM snapshots need".into());
        }
        if self.lvm.is_none() {
            return Err(format!("{} is on {}, not an LVM logical volume", self.path, self.device));
        }
        if !CLONE_MOUNTABLE.contains(&self.fs_type.as_str()) {
            return Err(format!("a snapshot of {} cannot be mounted read-only here", self.fs_type));
        }
        Ok(())
    }

    fn blockclone(&self) -> Result<(), String> {
        let Some(lb) = &self.loop_backing else {
            return Err(format!("{} is on {}, not a loop-mounted filesystem image", self.path, self.device));
        };
        if !lb.whole_file {
            return Err(format!("the loop device {} uses part of its file (offset or size limit)", lb.device));
        }
        if !lb.reflink {
            return Err(format!(
                "the image {} lies on {}, which cannot clone files (xfs with reflink or btrfs can)",
                lb.file, lb.fs_type
            ));
        }
        if !CLONE_MOUNTABLE.contains(&self.fs_type.as_str()) {
            return Err(format!("a clone of a {} image cannot be mounted read-only here", self.fs_type));
        }
        self.no_freeze("blockclone")
    }

    fn reflink_ok(&self) -> Result<(), String> {
        if !self.reflink {
            return Err(format!(
                "{} is on {}, which cannot clone files (xfs with reflink=1, or btrfs, can)",
                self.path, self.fs_type
            ));
        }
        self.no_freeze("reflink")
    }

    fn fsfreeze(&self) -> Result<(), String> {
        if !FREEZABLE.contains(&self.fs_type.as_str()) {
            return Err(format!("{} cannot be frozen", self.fs_type));
        }
        self.no_freeze("fsfreeze")
    }
}

/// Choose the method for a run. An explicit mode that cannot apply to this
/// source is an error (with the reason); `auto` takes the best that applies
/// (a btrfs snapshot, then an LVM snapshot, then a clone of the volume's
/// image, then a reflink copy of its files) and otherwise falls back to
/// `none` with the reasons, which the caller turns into a warning or, when
/// consistency is required, a failure.
pub fn choose(mode: ConsistencyMode, facts: &SourceFacts) -> Result<Decision, String> {
    let pick = |method| Ok(Decision { method, fallback: None });
    match mode {
        ConsistencyMode::None => pick(Method::None),
        ConsistencyMode::Btrfs => facts.btrfs().and(pick(Method::Btrfs)),
        ConsistencyMode::Lvm => facts.lvm_ok().and(pick(Method::Lvm)),
        ConsistencyMode::Blockclone => facts.blockclone().and(pick(Method::Blockclone)),
        ConsistencyMode::Reflink => facts.reflink_ok().and(pick(Method::Reflink)),
        ConsistencyMode::Fsfreeze => facts.fsfreeze().and(pick(Method::Fsfreeze)),
        ConsistencyMode::Auto => {
            let candidates: [(Method, Result<(), String>); 4] = [
                (Method::Btrfs, facts.btrfs()),
                (Method::Lvm, facts.lvm_ok()),
                (Method::Blockclone, facts.blockclone()),
                (Method::Reflink, facts.reflink_ok()),
            ];
            let mut reasons = Vec::new();
            for (method, ok) in candidates {
                match ok {
                    Ok(()) => return pick(method),
                    Err(why) => reasons.push(format!("{}: {why}", method.as_str())),
                }
            }
            Ok(Decision {
                method: Method::None,
                fallback: Some(format!(
                    "no point-in-time method applies to {}, so it was backed up live and files may come from different moments ({})",
                    facts.path,
                    reasons.join("; ")
                )),
            })
        }
    }
}

/// At most this many hooks in each of `pre` and `post`.
pub const MAX_HOOKS: usize = 8;

/// Hooks run as the agent (root on a node), so each must name, by absolute
/// path, an executable the operator allowed (`--hook-allow`); with none
/// allowed, hooks are refused.
pub fn validate_hooks(hooks: &Hooks, allowed: &[String]) -> Result<(), FieldError> {
    for (phase, list) in [("pre", &hooks.pre), ("post", &hooks.post)] {
        if list.len() > MAX_HOOKS {
            return Err(FieldError::new(
                format!("consistency.hooks.{phase}"),
                format!("at most {MAX_HOOKS} hooks per phase; got {}", list.len()),
            ));
        }
        for (i, argv) in list.iter().enumerate() {
            let field = format!("consistency.hooks.{phase}[{i}]");
            let Some(exe) = argv.first().filter(|a| !a.is_empty()) else {
                return Err(FieldError::new(
                    field,
                    "a hook is a non-empty argv array, e.g. [\"/usr/local/bin/db-flush\"]",
                ));
            };
            if argv.iter().any(|a| a.contains('\0')) || argv.iter().map(String::len).sum::<usize>() > 16 * 1024 {
                return Err(FieldError::new(field, "hook arguments may not contain NUL and must stay under 16 KiB"));
            }
            if !exe.starts_with('/') {
                return Err(FieldError::new(
                    field,
                    format!("{exe:?} must be an absolute path: hooks are run directly, without a shell or PATH"),
                ));
            }
            if !allowed.iter().any(|a| a == exe) {
                let now = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
                return Err(FieldError::new(
                    field,
                    format!(
                        "{exe} is not an allowed hook executable: the agent's operator allows them with --hook-allow (allowed now: {now})"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The `p`-th percentile (0..=100) of `values`, nearest-rank; for reports.
pub fn percentile(values: &[u64], p: u32) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = (p.min(100) as usize * v.len()).div_ceil(100).max(1);
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
42 27 7:0 / /tmp/x rw,relatime - xfs /dev/loop0 rw,inode64
43 42 7:1 / /tmp/x/inner\\040dir rw,relatime - ext4 /dev/loop1 rw
44 27 0:45 /vol /srv/vol rw,relatime - btrfs /dev/loop2 rw,subvolid=256,subvol=/vol
45 42 7:0 /data /tmp/x rw,relatime - xfs /dev/loop0 rw
garbage line
";

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 5);
        assert_eq!(m[2].mount_point, "/tmp/x/inner dir");
        assert_eq!(m[2].fs_type, "ext4");
        assert_eq!(m[2].source, "/dev/loop1");
        assert_eq!((m[3].major, m[3].minor), (0, 45));
        assert_eq!(m[3].root, "/vol");
        assert_eq!(m[1].super_options, "rw,inode64");
    }

    #[test]
    fn the_mount_of_a_path_is_found_by_id_or_by_the_longest_latest_prefix() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(mount_of(&m, "/tmp/x/inner dir/a", None).unwrap().mount_id, 43);
        // 45 is mounted over 42 at the same point: the later one is seen.
        assert_eq!(mount_of(&m, "/tmp/x/b", None).unwrap().mount_id, 45);
        assert_eq!(mount_of(&m, "/tmp/xy", None).unwrap().mount_id, 27);
        assert_eq!(mount_of(&m, "/tmp/x/b", Some(42)).unwrap().mount_id, 42);
        assert_eq!(mount_of(&m, "/srv/vol", None).unwrap().fs_type, "btrfs");
    }

    fn facts(fs: &str) -> SourceFacts {
        SourceFacts {
            path: "/v".into(),
            fs_type: fs.into(),
            mount_point: "/v".into(),
            device: "/dev/vdb".into(),
            ..Default::default()
        }
    }

    fn auto(f: &SourceFacts) -> Method {
        choose(ConsistencyMode::Auto, f).unwrap().method
    }

    #[test]
    fn auto_prefers_btrfs_then_lvm_then_blockclone_then_reflink() {
        let mut f = facts("btrfs");
        f.reflink = true;
        assert_eq!(auto(&f), Method::Reflink, "a plain directory on btrfs");
        f.btrfs_subvolume = true;
        assert_eq!(auto(&f), Method::Btrfs);

        let mut f = facts("ext4");
        f.loop_backing = Some(LoopBacking {
            device: "/dev/loop1".into(),
            file: "/img/v.img".into(),
            fs_type: "xfs".into(),
            reflink: true,
            whole_file: true,
        });
        assert_eq!(auto(&f), Method::Blockclone);
        f.lvm = Some(LvmVolume { vg: "vg".into(), lv: "lv".into(), thin: false });
        assert_eq!(auto(&f), Method::Blockclone, "no device-mapper: no LVM");
        f.device_mapper = true;
        assert_eq!(auto(&f), Method::Lvm);

        let mut f = facts("xfs");
        f.reflink = true;
        assert_eq!(auto(&f), Method::Reflink);
    }

    #[test]
    fn auto_falls_back_to_none_with_every_reason() {
        let mut f = facts("ext4");
        f.loop_backing = Some(LoopBacking {
            device: "/dev/loop1".into(),
            file: "/img/v.img".into(),
            fs_type: "ext4".into(),
            reflink: false,
            whole_file: true,
        });
        let d = choose(ConsistencyMode::Auto, &f).unwrap();
        assert_eq!(d.method, Method::None);
        let why = d.fallback.unwrap();
        assert!(why.contains("backed up live"), "{why}");
        assert!(why.contains("btrfs: /v is on ext4") && why.contains("cannot clone files"), "{why}");
    }

    #[test]
    fn a_filesystem_that_must_not_be_frozen_rules_out_freezing_methods() {
        let mut f = facts("xfs");
        f.reflink = true;
        f.freeze_refusal = Some("holds the agent's state directory".into());
        let err = choose(ConsistencyMode::Fsfreeze, &f).unwrap_err();
        assert!(err.contains("holds the agent's state directory"), "{err}");
        assert!(choose(ConsistencyMode::Reflink, &f).is_err());
        assert_eq!(auto(&f), Method::None);
        // A btrfs snapshot is made one instant under a short freeze, too.
        let mut f = facts("btrfs");
        f.btrfs_subvolume = true;
        f.freeze_refusal = Some("is the root filesystem".into());
        assert!(choose(ConsistencyMode::Btrfs, &f).unwrap_err().contains("root filesystem"));
    }

    #[test]
    fn explicit_modes_say_why_they_do_not_apply() {
        let f = facts("ext4");
        assert!(choose(ConsistencyMode::Btrfs, &f).unwrap_err().contains("not btrfs"));
        assert!(choose(ConsistencyMode::Reflink, &f).unwrap_err().contains("cannot clone files"));
        assert!(choose(ConsistencyMode::Blockclone, &f).unwrap_err().contains("not a loop-mounted"));
        assert!(choose(ConsistencyMode::Lvm, &f).unwrap_err().contains("device-mapper"));
        assert_eq!(choose(ConsistencyMode::Fsfreeze, &f).unwrap().method, Method::Fsfreeze);
        assert!(choose(ConsistencyMode::Fsfreeze, &facts("tmpfs")).unwrap_err().contains("cannot be frozen"));
        assert_eq!(choose(ConsistencyMode::None, &f).unwrap().method, Method::None);
    }

    #[test]
    fn hooks_must_be_allowed_absolute_executables() {
        let allowed = vec!["/usr/bin/sync".to_string()];
        let ok = Hooks { pre: vec![vec!["/usr/bin/sync".into()]], post: vec![] };
        assert!(validate_hooks(&ok, &allowed).is_ok());
        let cases = [
            (Hooks { pre: vec![vec!["/usr/bin/sync".into()]], post: vec![] }, vec![], "consistency.hooks.pre[0]"),
            (Hooks { pre: vec![], post: vec![vec!["sync".into()]] }, allowed.clone(), "consistency.hooks.post[0]"),
            (Hooks { pre: vec![], post: vec![vec![]] }, allowed.clone(), "consistency.hooks.post[0]"),
            (
                Hooks { pre: vec![vec!["/usr/bin/sync".into()], vec!["/bin/sh".into(), "-c".into()]], post: vec![] },
                allowed.clone(),
                "consistency.hooks.pre[1]",
            ),
            (
                Hooks { pre: vec![vec!["/usr/bin/sync".into()]; 9], post: vec![] },
                allowed.clone(),
                "consistency.hooks.pre",
            ),
        ];
        for (hooks, allow, field) in cases {
            let err = validate_hooks(&hooks, &allow).unwrap_err();
            assert_eq!(err.field, field, "{hooks:?}");
        }
        let err = validate_hooks(&ok, &[]).unwrap_err();
        assert!(err.message.contains("--hook-allow") && err.message.contains("allowed now: none"), "{err}");
    }

    #[test]
    fn the_report_has_the_documented_json_shape() {
        let r = ConsistencyReport {
            mode: ConsistencyMode::Auto,
            method: Method::Btrfs,
            freeze_ms: 0,
            snapshot_ms: 12,
            point_in_time: Some("2026-01-01T00:00:00Z".into()),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"mode": "auto", "method": "btrfs", "freezeMs": 0, "snapshotMs": 12, "pointInTime": "2026-01-01T00:00:00Z"})
        );
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), Some(50));
        assert_eq!(percentile(&v, 99), Some(99));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[], 50), None);
    }
}
