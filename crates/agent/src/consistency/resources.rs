//! What the methods make and must undo (a freeze, a btrfs snapshot, a
//! reflink copy, an image clone, a loop device, a mount, an LVM snapshot):
//! each is written to the database before it exists and cleared once it is
//! gone, so that the agent's next start undoes whatever a crash left.

use chrono::Utc;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::command::{self, argv};
use super::{freeze, inspect, Deps, SCRATCH_DIR};
use soda_syncer_domain::consistency::HeldResource;

/// Where the held resources are journaled, and what else consistency reads
/// of the agent's state: a port, so this adapter knows no database (the
/// agent's store implements it: `scheduler/records.rs`). Errors are the
/// store's own, as text.
pub trait Records: Send + Sync {
    fn record_held(&self, r: &HeldResource) -> Result<(), String>;
    fn clear_held(&self, id: &str) -> Result<(), String>;
    fn all_held(&self) -> Result<Vec<HeldResource>, String>;
    /// Whether the policy still exists (a reflink copy is kept only for one that does).
    fn policy_exists(&self, id: &str) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Freeze,
    Mount,
    Loop,
    CloneFile,
    CloneTree,
    BtrfsSnapshot,
    LvmSnapshot,
}

impl Kind {
    /// In the order they are undone: thaw first (nothing else can be
    /// removed from a frozen filesystem), then mounts, then what they use.
    const UNDO_ORDER: [Kind; 7] = [
        Kind::Freeze,
        Kind::Mount,
        Kind::Loop,
        Kind::CloneFile,
        Kind::CloneTree,
        Kind::BtrfsSnapshot,
        Kind::LvmSnapshot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Freeze => "freeze",
            Kind::Mount => "mount",
            Kind::Loop => "loop",
            Kind::CloneFile => "clone_file",
            Kind::CloneTree => "clone_tree",
            Kind::BtrfsSnapshot => "btrfs_snapshot",
            Kind::LvmSnapshot => "lvm_snapshot",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::UNDO_ORDER.into_iter().find(|k| k.as_str() == s)
    }
}

/// One thing held, with its record in the database.
#[derive(Debug, Clone)]
pub struct Held {
    pub kind: Kind,
    pub path: PathBuf,
    pub record: String,
}

/// Record that `kind` at `path` is about to exist.
pub fn hold(deps: &Deps, run_id: &str, kind: Kind, path: &Path) -> Result<Held, super::ConsistencyError> {
    let record = crate::ids::new_id();
    deps.records
        .record_held(&HeldResource {
            id: record.clone(),
            run_id: run_id.to_string(),
            kind: kind.as_str().into(),
            path: path.display().to_string(),
            created_at: Utc::now(),
        })
        .map_err(|message| super::ConsistencyError::Store { message })?;
    Ok(Held { kind, path: path.to_path_buf(), record })
}

const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn is_mount_point(p: &Path) -> bool {
    let Ok(mounts) = inspect::mounts() else { return false };
    let s = p.to_string_lossy();
    mounts.iter().any(|m| m.mount_point == s)
}

fn tool(args: &[&str], path: &Path) -> Result<(), String> {
    let mut a = argv(args.iter().copied());
    a.push(path.as_os_str().to_owned());
    command::run(&a, &[], TOOL_TIMEOUT, None)
        .map(|_| ())
        .map_err(|f| format!("{} {}", args.join(" "), f.describe(TOOL_TIMEOUT)))
}

/// The directory holding `path` (a scratch directory, whose own parent
/// the agent trusts: a mount point or the state directory), opened without
/// following a link, and `path`'s name in it. None when it is gone.
fn scratch_parent(path: &Path) -> Result<Option<(crate::beneath::Dir, &std::ffi::OsStr)>, String> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(format!("{} has no parent directory", path.display()));
    };
    let (Some(base), Some(scratch)) = (parent.parent(), parent.file_name()) else {
        return Err(format!("{} has no parent directory", parent.display()));
    };
    let base = match crate::beneath::Dir::open_trusted(base) {
        Ok(b) => b,
        Err(crate::beneath::PathError::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    match base.open(Path::new(scratch)) {
        Ok(dir) => Ok(Some((dir, name))),
        Err(crate::beneath::PathError::Missing { .. }) => Ok(None),
        Err(e) => Err(format!("left {} in place: {e}", path.display())),
    }
}

fn rmdir_scratch(p: &Path) {
    if let Some(parent) = p.parent().filter(|d| d.file_name().is_some_and(|n| n == SCRATCH_DIR)) {
        let _ = std::fs::remove_dir(parent); // only when empty
    }
}

/// The loop devices attached to `file`.
fn loop_devices_of(file: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    let want = file.to_string_lossy();
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            (name.starts_with("loop") && backing.trim_end_matches('\n') == want).then(|| format!("/dev/{name}"))
        })
        .collect()
}

/// Undo one thing; absent counts as undone.
pub fn undo(kind: Kind, path: &Path) -> Result<(), String> {
    match kind {
        Kind::Freeze => {
            if is_mount_point(path) {
                freeze::thaw_left_over(path).map_err(|e| format!("cannot thaw {}: {e}", path.display()))?;
            }
            Ok(())
        }
        Kind::Mount => {
            // The restic child's mount namespace may hold it a moment longer.
            let mut last = Ok(());
            for attempt in 0..20 {
                if !is_mount_point(path) {
                    last = Ok(());
                    break;
                }
                last = tool(&["umount", "--"], path);
                if last.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
            }
            if last.is_err() && is_mount_point(path) {
                tracing::warn!(mount = %path.display(), "unmount keeps failing: detaching it lazily");
                last = tool(&["umount", "--lazy", "--"], path);
            }
            last?;
            match std::fs::remove_dir(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::debug!(dir = %path.display(), error = %e, "mount point left in place")
                }
                _ => {}
            }
            Ok(())
        }
        Kind::Loop => {
            for dev in loop_devices_of(path) {
                // A device still open elsewhere is detached when closed (autoclear).
                tool(&["losetup", "--detach"], Path::new(&dev))?;
            }
            Ok(())
        }
        Kind::CloneFile => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
        },
        Kind::CloneTree => {
            // Through held directories, following no link: the scratch
            // directory may lie where a workload can plant one.
            let r = match scratch_parent(path) {
                Ok(Some((dir, name))) => dir.remove(name).map_err(|e| e.to_string()),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            rmdir_scratch(path);
            r
        }
        Kind::BtrfsSnapshot => {
            // Only a snapshot reached without a link is deleted by name.
            if let Some((dir, name)) = scratch_parent(path)? {
                if dir.kind_of(name).map_err(|e| e.to_string())? == Some(crate::beneath::Kind::Dir) {
                    tool(&["btrfs", "subvolume", "delete", "--"], path)?;
                }
            }
            rmdir_scratch(path);
            Ok(())
        }
        Kind::LvmSnapshot => {
            if inspect::device_mapper_available() {
                tool(&["lvremove", "--yes", "--"], path)?;
            }
            Ok(())
        }
    }
}

/// Undo a held thing and clear its record; on failure the record stays
/// for the next start.
pub fn release(deps: &Deps, held: &Held) -> bool {
    match undo(held.kind, &held.path) {
        Ok(()) => {
            if let Err(e) = deps.records.clear_held(&held.record) {
                tracing::warn!(error = %e, "cannot clear a consistency record; the next start tries again, harmlessly");
            }
            true
        }
        Err(e) => {
            tracing::error!(kind = held.kind.as_str(), path = %held.path.display(), error = %e, "cannot undo; the next start tries again");
            false
        }
    }
}

/// At start: thaw what a previous process left frozen, and remove its
/// mounts, loop devices, clones and snapshots. Returns how many were undone.
pub fn recover_at_start(deps: &Deps) -> usize {
    let records = match deps.records.all_held() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read what the last run of the agent held; frozen filesystems may stay frozen");
            return 0;
        }
    };
    let mut done = 0;
    for kind in Kind::UNDO_ORDER {
        for r in records.iter().rev().filter(|r| Kind::parse(&r.kind) == Some(kind)) {
            let held = Held { kind, path: PathBuf::from(&r.path), record: r.id.clone() };
            if release(deps, &held) {
                done += 1;
                tracing::warn!(kind = kind.as_str(), path = %r.path, run = %r.run_id, "undid what an interrupted backup left behind");
            }
        }
    }
    for r in records.iter().filter(|r| Kind::parse(&r.kind).is_none()) {
        tracing::warn!(kind = %r.kind, "unknown consistency record dropped");
        let _ = deps.records.clear_held(&r.id);
    }
    deps.metrics.recovered(done as u64);
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consistency::testfs::{writable_within, LoopFs};

    #[test]
    fn a_scratch_directory_planted_as_a_link_is_neither_created_through_nor_cleaned_through() {
        let dir = tempfile::tempdir().unwrap();
        let (mount, host) = (dir.path().join("volume-fs"), dir.path().join("host"));
        std::fs::create_dir_all(host.join("policy-x/keep")).unwrap();
        std::fs::write(host.join("policy-x/keep/file"), "host data").unwrap();
        std::fs::create_dir_all(&mount).unwrap();
        let scratch = mount.join(SCRATCH_DIR);
        std::os::unix::fs::symlink(&host, &scratch).unwrap();

        let e = super::super::create_private_dir(&scratch).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = undo(Kind::CloneTree, &scratch.join("policy-x")).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(host.join("policy-x/keep/file")).unwrap(), "host data");

        // A real scratch directory is cleaned through held directories, a link inside it removed, not followed.
        std::fs::remove_file(&scratch).unwrap();
        super::super::create_private_dir(&scratch).unwrap();
        std::fs::create_dir(scratch.join("policy-y")).unwrap();
        std::os::unix::fs::symlink(&host, scratch.join("policy-y/link")).unwrap();
        undo(Kind::CloneTree, &scratch.join("policy-y")).unwrap();
        assert!(!scratch.exists(), "the emptied scratch directory goes too");
        assert_eq!(std::fs::read_to_string(host.join("policy-x/keep/file")).unwrap(), "host data");
    }

    #[test]
    fn the_next_start_thaws_and_removes_what_a_crash_left() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = LoopFs::new(dir.path(), &["mkfs.xfs", "-q"]) else { return };
        let store = crate::store::Store::open(&dir.path().join("state.db")).unwrap();
        let deps = Deps::new(std::sync::Arc::new(store.clone()));
        let tree = fs.mnt.join(SCRATCH_DIR).join("run1");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/f"), "x").unwrap();
        let clone = fs.mnt.join(".soda-syncer-clone-run1.img");
        std::fs::write(&clone, "img").unwrap();
        for (kind, path) in [(Kind::CloneTree, &tree), (Kind::CloneFile, &clone), (Kind::Freeze, &fs.mnt)] {
            hold(&deps, "run1", kind, path).unwrap();
        }
        // A record of something already gone is simply cleared.
        hold(&deps, "run0", Kind::Mount, &dir.path().join("never-mounted")).unwrap();
        store
            .record_resource(&HeldResource {
                id: "x".into(),
                run_id: "run0".into(),
                kind: "from_the_future".into(),
                path: "/".into(),
                created_at: Utc::now(),
            })
            .unwrap();
        let root = crate::consistency::sys::open_dir(&fs.mnt).unwrap();
        crate::consistency::sys::freeze(&root).unwrap();
        assert!(!writable_within(&fs.mnt, Duration::from_millis(200)));

        assert_eq!(recover_at_start(&deps), 4);
        assert!(writable_within(&fs.mnt, Duration::from_secs(2)));
        assert!(!tree.exists() && !clone.exists());
        assert!(!fs.mnt.join(SCRATCH_DIR).exists(), "the empty scratch directory goes too");
        assert!(store.held_resources().unwrap().is_empty());
        // Nothing left: a second start has nothing to do.
        assert_eq!(recover_at_start(&deps), 0);
    }
}
