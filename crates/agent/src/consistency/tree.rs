//! The reflink method's point-in-time copy of a directory tree.
//!
//! Freezing a filesystem blocks every write to it, FICLONE included (it
//! waits in the kernel until the thaw: measured on xfs), so the copy cannot
//! be cloned while frozen. Instead:
//!
//! 1. Clone the tree file by file (FICLONE: extents are shared, nothing is
//!    copied) while the volume is live, noting each file's state right after
//!    its clone and whether it was quiet around it (its ctime older than the
//!    clone's start by more than a timestamp tick).
//! 2. Freeze. Walk the tree (stat and readdir work on a frozen filesystem).
//!    A file whose state is what step 1 saw, and was quiet then, has not
//!    changed since its clone: the clone is right. Every other file, every
//!    new entry and every directory's metadata is read into memory, as it is
//!    at this instant. Thaw.
//! 3. Write what was read into the copy, delete what is gone.
//!
//! The copy then holds every file as it was at the freeze: one instant. The
//! freeze lasts one walk plus reading the files that changed since their
//! clone; when that exceeds the limit (too many files, or too much changing
//! data), the copy is brought up to date live and the freeze is tried again.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::Metadata;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

use super::sys;

/// A write within this much of a clone may not have moved the ctime
/// (coarse timestamps move once per kernel tick, at most 10 ms).
const QUIET_MARGIN: Duration = Duration::from_millis(20);

/// What a file looked like; equal stamps with a quiet clone mean equal
/// content. No device number: a btrfs snapshot has its own.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    kind: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Stamp {
    fn of(m: &Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            kind: m.mode() & libc::S_IFMT,
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
        }
    }

    /// Unchanged since well before `t0`.
    fn quiet_before(&self, t0: SystemTime) -> bool {
        let ctime = SystemTime::UNIX_EPOCH
            + Duration::new(self.ctime.0.max(0) as u64, self.ctime.1.clamp(0, 999_999_999) as u32);
        ctime + QUIET_MARGIN < t0
    }
}

#[derive(Debug, Clone)]
struct Entry {
    stamp: Stamp,
    /// The copy's content is the source's as of `stamp`.
    clean: bool,
}

#[derive(Debug)]
enum Change {
    Remove(PathBuf),
    Dir { rel: PathBuf, meta: Metadata, xattrs: Option<Vec<(CString, Vec<u8>)>>, new: bool },
    File { rel: PathBuf, meta: Metadata, data: Option<Vec<u8>>, xattrs: Vec<(CString, Vec<u8>)> },
    Symlink { rel: PathBuf, meta: Metadata, target: PathBuf, xattrs: Vec<(CString, Vec<u8>)> },
    Special { rel: PathBuf, meta: Metadata },
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("the walk over the frozen tree did not finish within the freeze limit")]
    TooSlow,
    #[error("{bytes} bytes changed since they were cloned, more than the {budget} bytes read during a freeze")]
    TooDirty { bytes: u64, budget: u64 },
    #[error("cancelled")]
    Cancelled,
    #[error("{path} has several names; only one is known to btrfs's inode lookup")]
    Unscoped { path: String },
}

fn io_err(path: &Path, e: std::io::Error) -> TreeError {
    TreeError::Io { path: path.display().to_string(), message: e.to_string() }
}

fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

pub struct TreeCopy {
    src: PathBuf,
    dst: PathBuf,
    /// (dev, ino) of a directory inside the source not to copy (the scratch dir).
    skip: Option<(u64, u64)>,
    /// The source's filesystem (or btrfs subvolume): what lies on another
    /// (a mount, a nested subvolume) is not copied; its directory stays empty.
    root_dev: u64,
    entries: HashMap<PathBuf, Entry>,
}

/// How a pass treats what changed.
enum Pass {
    /// Live: clone changed files now.
    Live,
    /// Frozen: read changed files into memory, up to a budget, by a deadline.
    Frozen { deadline: Instant, budget: u64 },
}

impl TreeCopy {
    /// An empty copy of `src` at `dst` (which must not exist yet).
    pub fn create(src: &Path, dst: &Path, skip: Option<&Path>) -> Result<TreeCopy, TreeError> {
        std::fs::DirBuilder::new().mode(0o700).create(dst).map_err(|e| io_err(dst, e))?;
        TreeCopy::new(src, dst, skip)
    }

    fn new(src: &Path, dst: &Path, skip: Option<&Path>) -> Result<TreeCopy, TreeError> {
        let skip = skip.and_then(|p| std::fs::symlink_metadata(p).ok()).map(|m| (m.dev(), m.ino()));
        let root_dev = std::fs::metadata(src).map_err(|e| io_err(src, e))?.dev();
        Ok(TreeCopy { src: src.to_path_buf(), dst: dst.to_path_buf(), skip, root_dev, entries: HashMap::new() })
    }

    /// A copy that exists already (a writable btrfs snapshot of `src`,
    /// taken after a sync that began at `synced_at`): an entry counts as
    /// right if it had not changed for a tick before that sync, so its data
    /// was written out and is in the snapshot.
    pub fn existing(src: &Path, dst: &Path, skip: Option<&Path>, synced_at: SystemTime) -> Result<TreeCopy, TreeError> {
        let mut copy = TreeCopy::new(src, dst, skip)?;
        let dst_dev = std::fs::metadata(dst).map_err(|e| io_err(dst, e))?.dev();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let p = dst.join(&rel);
            let meta = std::fs::symlink_metadata(&p).map_err(|e| io_err(&p, e))?;
            let stamp = Stamp::of(&meta);
            copy.entries.insert(rel.clone(), Entry { clean: stamp.quiet_before(synced_at), stamp });
            if meta.is_dir() && meta.dev() == dst_dev {
                for e in std::fs::read_dir(&p).map_err(|e| io_err(&p, e))? {
                    stack.push(rel.join(e.map_err(|e| io_err(&p, e))?.file_name()));
                }
            }
        }
        Ok(copy)
    }

    /// Where the copy is.
    pub fn dst(&self) -> &Path {
        &self.dst
    }

    /// Bring the copy up to date while the source is live (FICLONE).
    pub fn sync_live(&mut self, cancel: &CancellationToken) -> Result<usize, TreeError> {
        let changes = self.diff(&Pass::Live, Some(cancel), None)?;
        let n = changes.len();
        self.apply(changes, None)?;
        Ok(n)
    }

    /// While the source's filesystem is frozen: read what differs from the
    /// copy. Returns the changes to `apply_frozen` after the thaw.
    pub fn scan_frozen(&self, deadline: Instant, budget: u64) -> Result<FrozenChanges, TreeError> {
        // Any time within the freeze: a write after the thaw moves a ctime past it.
        let during = SystemTime::now();
        self.diff(&Pass::Frozen { deadline, budget }, None, None).map(|c| FrozenChanges(c, during))
    }

    /// [`scan_frozen`](Self::scan_frozen) for a copy that is a btrfs
    /// snapshot of the source subvolume, made in transaction `since`:
    /// btrfs names the inodes changed since (see `crate::btrfs::changed_inodes`,
    /// at most `limit`), and only those paths, and the entries that were
    /// not quiet when the snapshot was made, are looked at instead of the
    /// whole tree. Whenever that cannot be trusted (too many changes, an
    /// inode without a path, a name with several links, a mount inside)
    /// it walks the whole tree, as `scan_frozen`. Returns the changes and,
    /// when scoped, how many paths it looked at.
    pub fn scan_frozen_btrfs(
        &self,
        since: u64,
        limit: usize,
        deadline: Instant,
        budget: u64,
    ) -> Result<(FrozenChanges, Option<usize>), TreeError> {
        let during = SystemTime::now();
        let pass = Pass::Frozen { deadline, budget };
        match self.btrfs_scope(since, limit) {
            Ok(scope) => match self.diff(&pass, None, Some(&scope)) {
                Ok(c) => return Ok((FrozenChanges(c, during), Some(scope.len()))),
                Err(TreeError::Unscoped { path }) => {
                    tracing::debug!(%path, "btrfs's changed inodes cannot be trusted here: walking the tree")
                }
                Err(e) => return Err(e),
            },
            Err(why) => tracing::debug!(reason = %why, "no list of changed inodes from btrfs: walking the tree"),
        }
        self.diff(&pass, None, None).map(|c| (FrozenChanges(c, during), None))
    }

    /// The paths btrfs says changed since `since`, sorted (parents first).
    fn btrfs_scope(&self, since: u64, limit: usize) -> Result<Vec<PathBuf>, String> {
        use std::os::fd::AsRawFd;
        let dir = sys::open_dir(&self.src).map_err(|e| e.to_string())?;
        let fd = dir.as_raw_fd();
        let st = dir.metadata().map_err(|e| e.to_string())?;
        if st.ino() != crate::btrfs::FIRST_FREE_OBJECTID {
            return Err("the source is not the root of its subvolume".into());
        }
        // A mount inside is not in the subvolume's tree.
        if crate::btrfs::mount_below(self.src.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?.is_some() {
            return Err("something is mounted inside the source".into());
        }
        let inodes = crate::btrfs::changed_inodes(fd, since, limit)
            .map_err(|e| format!("tree search: {e}"))?
            .ok_or_else(|| format!("more than {limit} inodes changed"))?;
        let mut paths: Vec<PathBuf> = Vec::with_capacity(inodes.len());
        for ino in inodes {
            // None: removed, and its directory changed too.
            if let Some(p) = crate::btrfs::inode_path(fd, ino).map_err(|e| format!("inode {ino}: {e}"))? {
                paths.push(p);
            }
        }
        // Written around the snapshot: its stamp cannot tell (see `existing`).
        paths.extend(self.entries.iter().filter(|(_, e)| !e.clean).map(|(k, _)| k.clone()));
        paths.sort();
        paths.dedup();
        Ok(paths)
    }

    /// After the thaw: write what was read during the freeze.
    pub fn apply_frozen(&mut self, changes: FrozenChanges) -> Result<usize, TreeError> {
        let n = changes.0.len();
        self.apply(changes.0, Some(changes.1))?;
        Ok(n)
    }

    /// What differs between the source and the copy. With a `scope` (the
    /// paths btrfs says changed, sorted: parents first), only those are
    /// looked at: each is read again whatever its stamp says, a directory's
    /// entries are compared with the copy's, and what is new below is read
    /// whole; everything else is the copy's already. A name with several
    /// links ends a scoped pass ([`TreeError::Unscoped`]): only one of
    /// its names is known.
    fn diff(
        &self,
        pass: &Pass,
        cancel: Option<&CancellationToken>,
        scope: Option<&[PathBuf]>,
    ) -> Result<Vec<Change>, TreeError> {
        let mut changes = Vec::new();
        let mut seen: HashSet<PathBuf> = HashSet::with_capacity(self.entries.len());
        let mut dirty_bytes = 0u64;
        let mut visited = 0usize;
        let root = [PathBuf::new()];
        let seeds = scope.unwrap_or(&root);
        let scoped: HashSet<&PathBuf> = scope.map(|s| s.iter().collect()).unwrap_or_default();
        // Scoped: the directories listed, and what they hold now.
        let mut listed: HashSet<PathBuf> = HashSet::new();
        let mut present: HashSet<PathBuf> = HashSet::new();
        for seed in seeds {
            let mut stack = vec![seed.clone()];
            while let Some(rel) = stack.pop() {
                if scope.is_some() && seen.contains(&rel) {
                    continue;
                }
                let path = self.src.join(&rel);
                let meta = match std::fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(e) if gone(&e) && !rel.as_os_str().is_empty() => continue,
                    Err(e) => return Err(io_err(&path, e)),
                };
                visited += 1;
                if visited & 255 == 0 {
                    if let Pass::Frozen { deadline, .. } = pass {
                        if Instant::now() > *deadline {
                            return Err(TreeError::TooSlow);
                        }
                    }
                    if cancel.is_some_and(|c| c.is_cancelled()) {
                        return Err(TreeError::Cancelled);
                    }
                }
                if self.skip == Some((meta.dev(), meta.ino())) {
                    continue;
                }
                let stamp = Stamp::of(&meta);
                let known = self.entries.get(&rel);
                let same_kind = known.is_some_and(|e| e.stamp.kind == stamp.kind);
                let unchanged = known.is_some_and(|e| e.clean && e.stamp == stamp) && !scoped.contains(&rel);
                seen.insert(rel.clone());
                let ft = meta.file_type();
                let elsewhere = meta.dev() != self.root_dev;
                if ft.is_dir() && elsewhere {
                    // A mount or nested subvolume: an empty directory in the copy.
                    changes.push(Change::Dir { rel: rel.clone(), meta, xattrs: Some(Vec::new()), new: !same_kind });
                    continue;
                }
                if elsewhere {
                    tracing::debug!(path = %path.display(), "not copied: on another filesystem");
                    continue;
                }
                if ft.is_dir() {
                    let entries = match std::fs::read_dir(&path) {
                        Ok(d) => d,
                        Err(e) if gone(&e) => continue,
                        Err(e) => return Err(io_err(&path, e)),
                    };
                    let mut names: Vec<PathBuf> = Vec::new();
                    for e in entries {
                        let e = e.map_err(|e| io_err(&path, e))?;
                        names.push(rel.join(e.file_name()));
                    }
                    if scope.is_some() {
                        // Known entries are the copy's already unless in scope
                        // themselves; new ones are read whole.
                        listed.insert(rel.clone());
                        present.extend(names.iter().cloned());
                        names.retain(|n| !self.entries.contains_key(n));
                    }
                    // Pre-order: a directory's change comes before its children's.
                    let xattrs = if unchanged { None } else { Some(sys::xattrs(&path).unwrap_or_default()) };
                    changes.push(Change::Dir { rel: rel.clone(), meta, xattrs, new: !same_kind });
                    names.sort();
                    stack.extend(names.into_iter().rev());
                    continue;
                }
                if unchanged {
                    continue;
                }
                if !same_kind && known.is_some() {
                    changes.push(Change::Remove(rel.clone()));
                }
                let live = matches!(pass, Pass::Live);
                // A live clone reads the file's attributes itself, after cloning.
                let xattrs = if live && ft.is_file() { Vec::new() } else { sys::xattrs(&path).unwrap_or_default() };
                if scope.is_some() && ft.is_file() && meta.nlink() > 1 {
                    return Err(TreeError::Unscoped { path: path.display().to_string() });
                }
                if ft.is_file() {
                    let data = match pass {
                        Pass::Live => None,
                        Pass::Frozen { budget, .. } => {
                            dirty_bytes += meta.size();
                            if dirty_bytes > *budget {
                                return Err(TreeError::TooDirty { bytes: dirty_bytes, budget: *budget });
                            }
                            match std::fs::read(&path) {
                                Ok(d) => Some(d),
                                Err(e) if gone(&e) => continue,
                                Err(e) => return Err(io_err(&path, e)),
                            }
                        }
                    };
                    changes.push(Change::File { rel, meta, data, xattrs });
                } else if ft.is_symlink() {
                    let target = match std::fs::read_link(&path) {
                        Ok(t) => t,
                        Err(e) if gone(&e) => continue,
                        Err(e) => return Err(io_err(&path, e)),
                    };
                    changes.push(Change::Symlink { rel, meta, target, xattrs });
                } else {
                    changes.push(Change::Special { rel, meta });
                }
            }
        }
        // Whatever the copy has and the source no longer has (scoped: in
        // the directories listed).
        let mut removed: Vec<&PathBuf> = match scope {
            None => self.entries.keys().filter(|k| !seen.contains(*k)).collect(),
            Some(_) => self
                .entries
                .keys()
                .filter(|k| {
                    !k.as_os_str().is_empty() && k.parent().is_some_and(|p| listed.contains(p)) && !present.contains(*k)
                })
                .collect(),
        };
        removed.sort();
        let mut last: Option<&PathBuf> = None;
        let mut all = Vec::with_capacity(changes.len() + removed.len());
        for r in removed {
            if last.is_some_and(|l| r.starts_with(l)) {
                continue; // inside a directory removed already
            }
            all.push(Change::Remove(r.clone()));
            last = Some(r);
        }
        // Removals first: a name may come back as another kind.
        all.extend(changes);
        Ok(all)
    }

    fn remove(&mut self, rel: &Path) -> Result<(), TreeError> {
        let p = self.dst.join(rel);
        let r = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {}
            Err(e) if gone(&e) => {}
            Err(e) => return Err(io_err(&p, e)),
        }
        self.entries.retain(|k, _| !k.starts_with(rel));
        Ok(())
    }

    /// `frozen_at`: a moment of the freeze the changes were read in (None:
    /// a live pass). An entry is clean (its stamp alone tells whether it
    /// changed later) when it was quiet for a tick before that moment, or
    /// for a live pass before now.
    fn apply(&mut self, changes: Vec<Change>, frozen_at: Option<SystemTime>) -> Result<(), TreeError> {
        let clean = |stamp: &Stamp| stamp.quiet_before(frozen_at.unwrap_or_else(SystemTime::now));
        let mut dirs: Vec<(PathBuf, Metadata, bool)> = Vec::new();
        // Directories whose entries this pass adds, removes or rewrites: their
        // times must be set again. Others keep theirs (and their ctime, so
        // restic sees the same tree as at the last backup of a kept copy).
        let mut touched: HashSet<PathBuf> = HashSet::new();
        let mut touch = |rel: &Path| {
            touched.insert(rel.parent().map(Path::to_path_buf).unwrap_or_default());
        };
        // Names of one inode become hard links in the copy too.
        let mut by_ino: HashMap<u64, PathBuf> = HashMap::new();
        for change in changes {
            match change {
                Change::Remove(rel) => {
                    touch(&rel);
                    self.remove(&rel)?
                }
                Change::Dir { rel, meta, xattrs, new } => {
                    let p = self.dst.join(&rel);
                    if new && !rel.as_os_str().is_empty() {
                        touch(&rel);
                        self.remove(&rel)?;
                        std::fs::DirBuilder::new().mode(0o700).create(&p).map_err(|e| io_err(&p, e))?;
                    }
                    // None: unchanged since the last pass (see `diff`).
                    let changed = new || xattrs.is_some();
                    if let Some(x) = xattrs {
                        replace_xattrs(&p, &x)?;
                    }
                    let stamp = Stamp::of(&meta);
                    self.entries.insert(rel.clone(), Entry { clean: clean(&stamp), stamp });
                    dirs.push((rel, meta, changed));
                }
                Change::File { rel, meta, data, xattrs } => {
                    touch(&rel);
                    let p = self.dst.join(&rel);
                    if meta.nlink() > 1 {
                        if let Some(first) = by_ino.get(&meta.ino()) {
                            let _ = std::fs::remove_file(&p);
                            std::fs::hard_link(self.dst.join(first), &p).map_err(|e| io_err(&p, e))?;
                            if let Some(entry) = self.entries.get(first).cloned() {
                                self.entries.insert(rel, entry);
                            }
                            continue;
                        }
                        by_ino.insert(meta.ino(), rel.clone());
                    }
                    match data {
                        // Read during the freeze: the final content.
                        Some(data) => {
                            write_file(&p, &data)?;
                            self.finish(&p, &meta, &xattrs)?;
                            let stamp = Stamp::of(&meta);
                            self.entries.insert(rel, Entry { clean: clean(&stamp), stamp });
                        }
                        None => match clone_file(&self.src.join(&rel), &p)? {
                            Some(c) => {
                                self.finish(&p, &c.meta, &c.xattrs)?;
                                self.entries.insert(rel, Entry { stamp: Stamp::of(&c.meta), clean: c.clean });
                            }
                            None => self.remove(&rel)?,
                        },
                    }
                }
                Change::Symlink { rel, meta, target, xattrs } => {
                    touch(&rel);
                    let p = self.dst.join(&rel);
                    let _ = std::fs::remove_file(&p);
                    std::os::unix::fs::symlink(&target, &p).map_err(|e| io_err(&p, e))?;
                    self.finish(&p, &meta, &xattrs)?;
                    let stamp = Stamp::of(&meta);
                    self.entries.insert(rel, Entry { clean: clean(&stamp), stamp });
                }
                Change::Special { rel, meta } => {
                    touch(&rel);
                    let p = self.dst.join(&rel);
                    let _ = std::fs::remove_file(&p);
                    match sys::mknod(&p, meta.mode(), meta.rdev()) {
                        Ok(()) => self.finish(&p, &meta, &[])?,
                        // Sockets and devices the copy cannot hold are left out.
                        Err(e) => tracing::debug!(path = %p.display(), error = %e, "special file not copied"),
                    }
                    let stamp = Stamp::of(&meta);
                    self.entries.insert(rel, Entry { clean: clean(&stamp), stamp });
                }
            }
        }
        // Directories last and deepest first, so adding their entries does
        // not move their times again.
        for (rel, meta, changed) in dirs.iter().rev() {
            if *changed || touched.contains(rel) {
                let p = self.dst.join(rel);
                sys::set_meta(&p, meta).map_err(|e| io_err(&p, e))?;
            }
        }
        Ok(())
    }

    fn finish(&self, p: &Path, meta: &Metadata, xattrs: &[(CString, Vec<u8>)]) -> Result<(), TreeError> {
        replace_xattrs(p, xattrs)?;
        sys::set_meta(p, meta).map_err(|e| io_err(p, e))
    }
}

/// Changes read while frozen, to be written after the thaw.
pub struct FrozenChanges(Vec<Change>, SystemTime);

struct Cloned {
    /// The source right after the clone.
    meta: Metadata,
    xattrs: Vec<(CString, Vec<u8>)>,
    /// Nothing changed it from a tick before the clone to `meta`.
    clean: bool,
}

/// FICLONE `src` to `dst` (replacing its content). None if `src` vanished.
fn clone_file(src: &Path, dst: &Path) -> Result<Option<Cloned>, TreeError> {
    let t0 = SystemTime::now();
    let s = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME).open(src) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
            .map_err(|e| io_err(src, e))?,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(io_err(src, e)),
    };
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| io_err(dst, e))?;
    sys::ficlone(&d, &s).map_err(|e| io_err(src, e))?;
    // Read after the clone, before the stat: a later change moves the ctime.
    let xattrs = sys::xattrs(src).unwrap_or_default();
    let meta = s.metadata().map_err(|e| io_err(src, e))?;
    let clean = Stamp::of(&meta).quiet_before(t0);
    Ok(Some(Cloned { meta, xattrs, clean }))
}

fn write_file(p: &Path, data: &[u8]) -> Result<(), TreeError> {
    // In place (O_TRUNC), so hard links inside the copy stay linked.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .map_err(|e| io_err(p, e))?;
    f.write_all(data).map_err(|e| io_err(p, e))
}

fn replace_xattrs(p: &Path, attrs: &[(CString, Vec<u8>)]) -> Result<(), TreeError> {
    let current = sys::xattrs(p).unwrap_or_default();
    if current.is_empty() && attrs.is_empty() {
        return Ok(());
    }
    for (name, _) in current.iter().filter(|(n, _)| !attrs.iter().any(|(a, _)| a == n)) {
        let _ = sys::remove_xattr(p, name);
    }
    sys::set_xattrs(p, attrs).map_err(|e| io_err(p, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consistency::testfs::LoopFs;
    use std::collections::BTreeMap;

    /// Everything restic would record of a tree, by relative path.
    /// What [`change_every_kind`] changes (beside `a/f*` and `a/b`).
    fn make_what_changes(src: &Path) {
        std::fs::write(src.join("a/b/big"), vec![7u8; 1 << 20]).unwrap();
        std::fs::write(src.join("gone"), "x").unwrap();
        std::fs::create_dir_all(src.join("gone-dir/sub")).unwrap();
        std::fs::write(src.join("gone-dir/sub/x"), "x").unwrap();
        std::os::unix::fs::symlink("a/f1", src.join("link")).unwrap();
        sys::set_xattrs(&src.join("a/f3"), &[(CString::new("user.k").unwrap(), b"v1".to_vec())]).unwrap();
    }

    /// Every kind of change the copy must bring over, made after it:
    /// content (same size, same second), removals of a file and a tree,
    /// new file and directory, a link retargeted, mode, xattr, a file that
    /// became a directory.
    fn change_every_kind(src: &Path) {
        std::fs::write(src.join("a/f5"), "new 5").unwrap(); // same size, same second
        std::fs::remove_file(src.join("gone")).unwrap();
        std::fs::remove_dir_all(src.join("gone-dir")).unwrap();
        std::fs::write(src.join("a/b/new"), "fresh").unwrap();
        std::fs::create_dir(src.join("newdir")).unwrap();
        std::fs::write(src.join("newdir/n"), "n").unwrap();
        std::fs::remove_file(src.join("link")).unwrap();
        std::os::unix::fs::symlink("a/f9", src.join("link")).unwrap();
        std::fs::set_permissions(src.join("a/f7"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        sys::set_xattrs(&src.join("a/f3"), &[(CString::new("user.k").unwrap(), b"v2".to_vec())]).unwrap();
        std::fs::remove_file(src.join("a/f8")).unwrap();
        std::fs::create_dir(src.join("a/f8")).unwrap(); // a file became a directory
    }

    fn describe(root: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut inodes: HashMap<u64, PathBuf> = HashMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let p = root.join(&rel);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mut d =
                format!("mode {:o} uid {} gid {} mtime {}.{}", m.mode(), m.uid(), m.gid(), m.mtime(), m.mtime_nsec());
            if m.is_dir() {
                d = format!("dir {}", d.split(" mtime").next().unwrap()); // a directory's mtime moves as the copy is made; set last
                let mut names: Vec<_> =
                    std::fs::read_dir(&p).unwrap().flatten().map(|e| rel.join(e.file_name())).collect();
                names.retain(|n| !n.starts_with(".soda"));
                stack.extend(names);
            } else if m.file_type().is_symlink() {
                d.push_str(&format!(" -> {}", std::fs::read_link(&p).unwrap().display()));
            } else if m.is_file() {
                let data = std::fs::read(&p).unwrap();
                let sum = data.iter().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(*b as u64));
                d.push_str(&format!(" {} bytes, sum {sum:x}", data.len()));
                if m.nlink() > 1 {
                    let first = inodes.entry(m.ino()).or_insert(rel.clone());
                    d.push_str(&format!(" linked with {}", first.display()));
                }
            }
            let x = sys::xattrs(&p).unwrap_or_default();
            if !x.is_empty() {
                d.push_str(&format!(" xattrs {x:?}"));
            }
            out.insert(rel, d);
        }
        out
    }

    fn same(want: &BTreeMap<PathBuf, String>, got: &BTreeMap<PathBuf, String>) {
        let keys: std::collections::BTreeSet<&PathBuf> = want.keys().chain(got.keys()).collect();
        let diffs: Vec<String> = keys
            .into_iter()
            .filter(|k| want.get(*k) != got.get(*k))
            .map(|k| format!("{}: want {:?}, got {:?}", k.display(), want.get(k), got.get(k)))
            .collect();
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    }

    #[test]
    fn a_copy_cloned_live_and_fixed_while_frozen_is_the_tree_at_the_freeze() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = LoopFs::new(dir.path(), &["mkfs.xfs", "-q", "-m", "reflink=1"]) else { return };
        let src = fs.mnt.join("vol");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        for i in 0..50 {
            std::fs::write(src.join(format!("a/f{i}")), format!("old {i}")).unwrap();
        }
        make_what_changes(&src);
        std::fs::hard_link(src.join("a/f2"), src.join("hard")).unwrap();
        sys::mknod(&src.join("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
        std::thread::sleep(QUIET_MARGIN * 2);

        let dst = fs.mnt.join(".soda-copy");
        let mut copy = TreeCopy::create(&src, &dst, None).unwrap();
        copy.sync_live(&CancellationToken::new()).unwrap();
        same(&describe(&src), &describe(&dst));

        // Changes after the clone, some within the same instant as it.
        change_every_kind(&src);
        std::fs::write(src.join("hard"), "new hard").unwrap(); // through the other link

        let root = sys::open_dir(&fs.mnt).unwrap();
        sys::freeze(&root).unwrap();
        let at_freeze = describe(&src);
        let scanned = copy.scan_frozen(Instant::now() + Duration::from_secs(5), 1 << 30);
        sys::thaw(&root).unwrap();
        copy.apply_frozen(scanned.unwrap()).unwrap();
        std::fs::write(src.join("a/f6"), "after the thaw").unwrap(); // not in the copy
        same(&at_freeze, &describe(&dst));
    }

    /// Inode and ctime of everything in a tree: what restic's tree blobs
    /// record besides content and the times the copy sets.
    fn identities(root: &Path) -> BTreeMap<PathBuf, (u64, i64, i64)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let m = std::fs::symlink_metadata(root.join(&rel)).unwrap();
            if m.is_dir() {
                stack.extend(std::fs::read_dir(root.join(&rel)).unwrap().flatten().map(|e| rel.join(e.file_name())));
            }
            out.insert(rel, (m.ino(), m.ctime(), m.ctime_nsec()));
        }
        out
    }

    #[test]
    fn a_kept_copy_brought_up_to_date_again_rewrites_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = LoopFs::new(dir.path(), &["mkfs.xfs", "-q", "-m", "reflink=1"]) else { return };
        let src = fs.mnt.join("vol");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        for i in 0..20 {
            std::fs::write(src.join(format!("a/f{i}")), format!("old {i}")).unwrap();
        }
        std::fs::write(src.join("a/b/g"), "g").unwrap();
        std::fs::write(src.join("top"), "t").unwrap();
        let root = sys::open_dir(&fs.mnt).unwrap();
        // One backup's worth: clone live, fix up under a freeze.
        let cycle = |copy: &mut TreeCopy| {
            std::thread::sleep(QUIET_MARGIN * 2);
            copy.sync_live(&CancellationToken::new()).unwrap();
            sys::freeze(&root).unwrap();
            let scanned = copy.scan_frozen(Instant::now() + Duration::from_secs(5), 1 << 30);
            sys::thaw(&root).unwrap();
            copy.apply_frozen(scanned.unwrap()).unwrap();
        };
        let dst = fs.mnt.join(".soda-copy");
        let mut copy = TreeCopy::create(&src, &dst, None).unwrap();
        cycle(&mut copy);
        let first = identities(&dst);

        cycle(&mut copy);
        assert_eq!(first, identities(&dst), "nothing changed: the kept copy is left as it was");
        same(&describe(&src), &describe(&dst));

        std::fs::write(src.join("a/f3"), "new 3, longer").unwrap();
        cycle(&mut copy);
        let third = identities(&dst);
        let moved: Vec<&PathBuf> = first.keys().filter(|k| first.get(*k) != third.get(*k)).collect();
        assert!(moved.contains(&&PathBuf::from("a/f3")), "{moved:?}");
        assert!(
            moved.iter().all(|p| *p == Path::new("a/f3") || *p == Path::new("a")),
            "only the changed file and its directory are rewritten: {moved:?}"
        );
        same(&describe(&src), &describe(&dst));
    }

    #[test]
    fn a_freeze_scan_past_its_budget_or_deadline_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = LoopFs::new(dir.path(), &["mkfs.xfs", "-q", "-m", "reflink=1"]) else { return };
        let src = fs.mnt.join("vol");
        std::fs::create_dir_all(&src).unwrap();
        for i in 0..600 {
            std::fs::write(src.join(format!("f{i}")), "x").unwrap();
        }
        let copy = TreeCopy::create(&src, &fs.mnt.join("copy"), None).unwrap();
        // Nothing cloned yet: everything is new and must be read.
        assert!(matches!(
            copy.scan_frozen(Instant::now() + Duration::from_secs(5), 100),
            Err(TreeError::TooDirty { .. })
        ));
        assert!(matches!(copy.scan_frozen(Instant::now(), 1 << 30), Err(TreeError::TooSlow)));
    }

    /// A writable btrfs snapshot of `src` at `snap`, as the btrfs method
    /// makes it (sync, then snapshot), and the copy over it.
    fn btrfs_snapshot(src: &Path, snap: &Path) -> (TreeCopy, u64) {
        let synced_at = SystemTime::now();
        sys::syncfs(&sys::open_dir(src).unwrap()).unwrap();
        let out = std::process::Command::new("btrfs")
            .args(["subvolume", "snapshot", "--"])
            .args([src, snap])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        use std::os::fd::AsRawFd;
        let since = crate::btrfs::created_in(sys::open_dir(snap).unwrap().as_raw_fd()).unwrap();
        (TreeCopy::existing(src, snap, None, synced_at).unwrap(), since)
    }

    fn btrfs_volume(fs: &LoopFs) -> PathBuf {
        let src = fs.mnt.join("vol");
        let out = std::process::Command::new("btrfs").args(["subvolume", "create"]).arg(&src).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        src
    }

    #[test]
    fn btrfs_changed_inodes_bring_the_snapshot_to_the_freeze_without_walking_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = LoopFs::new(dir.path(), &["mkfs.btrfs", "-q"]) else { return };
        let src = btrfs_volume(&fs);
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::create_dir(src.join("moved")).unwrap();
        for i in 0..300 {
            std::fs::write(src.join(format!("a/f{i}")), format!("old {i}")).unwrap();
        }
        // Inode numbers far from `moved`'s, with untouched ones after them,
        // so their tree leaf is not rewritten when `moved` is renamed: only
        // reading the renamed directory whole finds them.
        std::fs::create_dir(src.join("moved/deep")).unwrap();
        std::fs::write(src.join("moved/deep/x"), "x").unwrap();
        std::fs::create_dir(src.join("z")).unwrap();
        for i in 0..300 {
            std::fs::write(src.join(format!("z/f{i}")), format!("z {i}")).unwrap();
        }
        make_what_changes(&src);
        std::thread::sleep(QUIET_MARGIN * 2);
        let snap = fs.mnt.join("snap");
        let (mut copy, since) = btrfs_snapshot(&src, &snap);
        // (Not compared with the source here: reading its files would move
        // their access times, a change btrfs would then list.)

        // Changes after the snapshot; none is committed before the freeze.
        change_every_kind(&src);
        std::fs::OpenOptions::new().append(true).open(src.join("a/b/big")).unwrap().write_all(b"tail").unwrap();
        std::fs::rename(src.join("moved"), src.join("a/b/moved-here")).unwrap(); // its subtree is unchanged

        let root = sys::open_dir(&fs.mnt).unwrap();
        sys::freeze(&root).unwrap();
        let at_freeze = describe(&src);
        let scanned = copy.scan_frozen_btrfs(since, 4096, Instant::now() + Duration::from_secs(5), 1 << 30);
        sys::thaw(&root).unwrap();
        let (changes, scoped) = scanned.unwrap();
        let looked_at = scoped.expect("btrfs's list was used, not a walk");
        // Leaf by leaf: the other inodes in a changed leaf come along.
        assert!(looked_at < 300, "only what changed is looked at, not the 600+ entries: {looked_at}");
        copy.apply_frozen(changes).unwrap();
        std::fs::write(src.join("a/f6"), "after the thaw").unwrap(); // not in the copy
        same(&at_freeze, &describe(&snap));
    }

    #[test]
    fn btrfs_changed_inodes_with_several_names_fall_back_to_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = LoopFs::new(dir.path(), &["mkfs.btrfs", "-q"]) else { return };
        let src = btrfs_volume(&fs);
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("f"), "one").unwrap();
        std::fs::hard_link(src.join("f"), src.join("d/also-f")).unwrap();
        std::thread::sleep(QUIET_MARGIN * 2);
        let snap = fs.mnt.join("snap");
        let (mut copy, since) = btrfs_snapshot(&src, &snap);
        std::fs::write(src.join("d/also-f"), "two, through the other name").unwrap();
        let root = sys::open_dir(&fs.mnt).unwrap();
        sys::freeze(&root).unwrap();
        let at_freeze = describe(&src);
        let scanned = copy.scan_frozen_btrfs(since, 4096, Instant::now() + Duration::from_secs(5), 1 << 30);
        sys::thaw(&root).unwrap();
        let (changes, scoped) = scanned.unwrap();
        assert_eq!(scoped, None, "a hard-linked file changed: the whole tree is walked");
        copy.apply_frozen(changes).unwrap();
        same(&at_freeze, &describe(&snap));
    }

    #[test]
    fn a_stamp_is_quiet_only_well_before_the_clone() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        let s = Stamp::of(&std::fs::metadata(&f).unwrap());
        assert!(!s.quiet_before(SystemTime::now()), "just written");
        assert!(s.quiet_before(SystemTime::now() + Duration::from_secs(1)));
    }
}
