//! Finding out what a source is: its mount (by statx mount id in
//! `/proc/self/mountinfo`), filesystem, whether it is a btrfs subvolume, a
//! loop-mounted image (and where the image lies), an LVM volume, and whether
//! its filesystem may be frozen at all.

use soda_syncer_domain::consistency::{mount_of, parse_mountinfo, LoopBacking, LvmVolume, MountEntry, SourceFacts};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::command::{self, argv};
use super::sys;
use super::ConsistencyError;

/// btrfs gives the root directory of every subvolume this inode number.
const BTRFS_SUBVOLUME_ROOT_INO: u64 = 256;

/// The facts, and what the methods need beyond them.
#[derive(Debug, Clone)]
pub struct Inspected {
    pub facts: SourceFacts,
    /// The source with symlinks resolved.
    pub real_path: PathBuf,
    pub mount: MountEntry,
}

impl Inspected {
    /// The source's path relative to the root of its filesystem (for
    /// finding it inside a clone of that filesystem).
    pub fn path_in_fs(&self) -> PathBuf {
        let rel = self.real_path.strip_prefix(&self.mount.mount_point).unwrap_or(Path::new(""));
        Path::new(&self.mount.root).join(rel)
    }

    /// Where scratch snapshots and copies go: a hidden directory at the top
    /// of the source's mount, so on the source's filesystem.
    pub fn scratch_dir(&self) -> PathBuf {
        Path::new(&self.mount.mount_point).join(super::SCRATCH_DIR)
    }
}

pub fn mounts() -> Result<Vec<MountEntry>, ConsistencyError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| ConsistencyError::Inspect { path: "/proc/self/mountinfo".into(), message: e.to_string() })?;
    Ok(parse_mountinfo(&text))
}

/// The mount `path` lies on.
pub fn mount_for(entries: &[MountEntry], path: &Path) -> Option<MountEntry> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let id = sys::mount_id(&real).ok();
    mount_of(entries, &real.to_string_lossy(), id).cloned()
}

/// Whether the filesystem `path` is on clones files.
fn reflink_capable(fs_type: &str, path: &Path) -> bool {
    match fs_type {
        "btrfs" => true,
        "xfs" => std::fs::File::open(path).and_then(|f| sys::xfs_reflink(&f)).unwrap_or(false),
        _ => false,
    }
}

fn loop_backing(entries: &[MountEntry], device: &str) -> Option<LoopBacking> {
    let name = device.strip_prefix("/dev/")?;
    if !name.starts_with("loop") || !name[4..].chars().all(|c| c.is_ascii_digit()) || name.len() == 4 {
        return None;
    }
    let sys_dir = Path::new("/sys/block").join(name).join("loop");
    let file = std::fs::read_to_string(sys_dir.join("backing_file")).ok()?.trim_end_matches('\n').to_string();
    let num = |f: &str| std::fs::read_to_string(sys_dir.join(f)).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let whole_file = num("offset") == Some(0) && num("sizelimit").unwrap_or(0) == 0 && !file.ends_with(" (deleted)");
    let mount = mount_for(entries, Path::new(&file));
    let fs_type = mount.map(|m| m.fs_type).unwrap_or_default();
    let reflink = reflink_capable(&fs_type, Path::new(&file));
    Some(LoopBacking { device: device.to_string(), file, fs_type, reflink, whole_file })
}

pub fn device_mapper_available() -> bool {
    std::fs::read_to_string("/proc/misc").is_ok_and(|s| s.lines().any(|l| l.trim_end().ends_with(" device-mapper")))
}

fn lvm_volume(device: &str) -> Option<LvmVolume> {
    if !(device.starts_with("/dev/mapper/") || device.starts_with("/dev/dm-")) {
        return None;
    }
    let out = command::run(
        &argv(["lvs", "--noheadings", "--separator", "|", "-o", "vg_name,lv_name,lv_attr", device]),
        &[],
        Duration::from_secs(20),
        None,
    )
    .ok()?;
    let line = out.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut parts = line.split('|');
    let (vg, lv, attr) = (parts.next()?, parts.next()?, parts.next()?);
    Some(LvmVolume { vg: vg.to_string(), lv: lv.to_string(), thin: attr.starts_with('V') })
}

/// Paths whose filesystem the agent must never freeze: its state (the
/// database, restic's cache), its temporary files, its log if that is a
/// file, and a local repository restic writes to.
pub struct Protected {
    pub state_dir: PathBuf,
    pub repository: Option<PathBuf>,
}

fn freeze_refusal(entries: &[MountEntry], mount: &MountEntry, protected: &Protected) -> Option<String> {
    if mount.mount_point == "/" {
        return Some("is the root filesystem, which the agent never freezes".into());
    }
    let mut guarded: Vec<(PathBuf, &str)> = vec![
        (protected.state_dir.clone(), "holds the agent's state directory"),
        (std::env::temp_dir(), "holds the temporary directory"),
    ];
    if let Some(r) = &protected.repository {
        // The repository may not exist yet: its nearest existing ancestor.
        let existing = r.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/")).to_path_buf();
        guarded.push((existing, "holds the policy's repository"));
    }
    for fd in [1, 2] {
        if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
            if target.is_absolute() && std::fs::metadata(&target).is_ok_and(|m| m.is_file()) {
                guarded.push((target, "holds the agent's log"));
            }
        }
    }
    guarded.into_iter().find_map(|(path, why)| {
        let m = mount_for(entries, &path)?;
        (m.fs_key() == mount.fs_key()).then(|| why.to_string())
    })
}

/// Gather the facts about `source`.
pub fn inspect(source: &Path, protected: &Protected) -> Result<Inspected, ConsistencyError> {
    let inspect_err =
        |e: std::io::Error| ConsistencyError::Inspect { path: source.display().to_string(), message: e.to_string() };
    let real_path = std::fs::canonicalize(source).map_err(inspect_err)?;
    let meta = std::fs::metadata(&real_path).map_err(inspect_err)?;
    let entries = mounts()?;
    let mount = mount_for(&entries, &real_path).ok_or_else(|| ConsistencyError::Inspect {
        path: source.display().to_string(),
        message: "no mount in /proc/self/mountinfo contains it".into(),
    })?;
    let fs_type = mount.fs_type.clone();
    let facts = SourceFacts {
        path: source.display().to_string(),
        btrfs_subvolume: fs_type == "btrfs" && meta.ino() == BTRFS_SUBVOLUME_ROOT_INO,
        reflink: reflink_capable(&fs_type, &real_path),
        loop_backing: loop_backing(&entries, &mount.source),
        lvm: lvm_volume(&mount.source),
        device_mapper: device_mapper_available(),
        freeze_refusal: freeze_refusal(&entries, &mount, protected),
        fs_type,
        mount_point: mount.mount_point.clone(),
        device: mount.source.clone(),
    };
    Ok(Inspected { facts, real_path, mount })
}
