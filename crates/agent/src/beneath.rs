//! Paths the agent acts on as root, resolved at the moment of use.
//!
//! Workloads control the content of their volumes, and with local volumes
//! and hostPath often their parents too, so every name below an allowed
//! root may be swapped for a symlink at any time. This module resolves such
//! a path once, from a held descriptor of its root, with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): a path that leads outside, or
//! through a symlink, is refused with an error naming the component. What
//! follows acts through the resulting descriptor ([`Dir`]), never through
//! the name again: creating, renaming and removing entries relative to held
//! directories, never following a link.
//!
//! restic itself only takes names. [`Pin`] gives a restic child a held
//! directory at a fixed path of a private mount namespace of its own,
//! mounted `nosymfollow` (the kernel refuses to follow any symlink on it, so
//! neither a planted link nor one swapped in while restic runs can lead it
//! out), `nodev` and `nosuid`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{path} is outside the allowed roots ({roots}); {hint}")]
    OutsideRoots { path: String, roots: String, hint: String },
    #[error("refusing {path}: {component} is a symbolic link, and the agent follows no link below {root} (one may have been planted there to redirect it); give the directory's real path, or remove the link")]
    Symlink { path: String, component: String, root: String },
    #[error("refusing {path}: {component} is not a directory")]
    NotDirectory { path: String, component: String },
    #[error("{path} does not exist ({component} is missing)")]
    Missing { path: String, component: String },
    #[error("refusing {path}: give it without '.' or '..' components")]
    NotNormal { path: String },
    #[error("refusing {path}: {component} leads out of {root}")]
    Escapes { path: String, component: String, root: String },
    #[error("refusing {path}: it is no longer the directory the agent checked (it was swapped)")]
    Swapped { path: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl PathError {
    /// A short stable code: the run's error code and the metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            PathError::OutsideRoots { .. } => "path_outside_roots",
            PathError::Symlink { .. } => "path_through_symlink",
            PathError::NotDirectory { .. } => "path_not_directory",
            PathError::Missing { .. } => "path_missing",
            PathError::NotNormal { .. } => "path_not_normal",
            PathError::Escapes { .. } => "path_escapes_root",
            PathError::Swapped { .. } => "path_swapped",
            PathError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => "disk_full",
            PathError::Io { .. } => "path_io_failed",
        }
    }

    fn io(op: &'static str, path: &Path, source: io::Error) -> PathError {
        PathError::Io { op, path: path.display().to_string(), source }
    }
}

/// What an entry of a directory is (never following a link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A FIFO, socket or device node: never opened.
    Special,
}

impl Kind {
    pub fn of(mode: libc::mode_t) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFREG => Kind::File,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Special,
        }
    }
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cstring(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// A directory held open: every operation is relative to it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// Where it was found, for messages only (never opened again by name).
    path: PathBuf,
    /// The root it was resolved beneath, for messages.
    root: PathBuf,
}

impl Dir {
    /// Open a directory the operator or the agent chose (an allowed root,
    /// the state directory): symlinks in its own path are followed, since
    /// no workload controls it.
    pub fn open_trusted(path: &Path) -> Result<Dir, PathError> {
        let c = cstring(path.as_os_str()).map_err(|e| PathError::io("open", path, e))?;
        // SAFETY: a valid NUL-terminated path; the fd returned is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        let fd = cvt(fd).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => {
                PathError::Missing { path: path.display().to_string(), component: path.display().to_string() }
            }
            Some(libc::ENOTDIR) => {
                PathError::NotDirectory { path: path.display().to_string(), component: path.display().to_string() }
            }
            _ => PathError::io("open", path, e),
        })?;
        // SAFETY: open returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Dir { fd, path: path.to_path_buf(), root: path.to_path_buf() })
    }

    /// Where this directory was found (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `/proc/self/fd/N`: this directory by its descriptor, for code that
    /// needs a path but must not resolve the name again.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn try_clone(&self) -> Result<Dir, PathError> {
        let fd = self.fd.try_clone().map_err(|e| PathError::io("duplicate the descriptor of", &self.path, e))?;
        Ok(Dir { fd, path: self.path.clone(), root: self.root.clone() })
    }

    fn child_path(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.path.clone()
        } else {
            self.path.join(rel)
        }
    }

    /// Open the directory `rel` below this one: no symlink followed, no
    /// `..`, nothing outside. The error names the component at fault.
    pub fn open(&self, rel: &Path) -> Result<Dir, PathError> {
        let full = self.child_path(rel);
        let rel = normal_relative(rel, &full)?;
        if rel.as_os_str().is_empty() {
            return self.try_clone().map(|d| Dir { path: full, ..d });
        }
        let c = cstring(rel.as_os_str()).map_err(|e| PathError::io("open", &full, e))?;
        let how = OpenHow {
            flags: DIR_FLAGS as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
        };
        let mut tries = 0;
        loop {
            // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and a
            // correctly sized open_how; the fd returned is owned below.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            };
            if fd >= 0 {
                // SAFETY: a new descriptor that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
                return Ok(Dir { fd, path: full, root: self.root.clone() });
            }
            let e = io::Error::last_os_error();
            // EAGAIN: a rename or mount raced the lookup; try again.
            if e.raw_os_error() == Some(libc::EAGAIN) && tries < 10 {
                tries += 1;
                continue;
            }
            return Err(self.diagnose(&rel, &full, e));
        }
    }

    /// Why `rel` could not be opened: walk it one component at a time
    /// (without following anything) to name the one at fault.
    fn diagnose(&self, rel: &Path, full: &Path, original: io::Error) -> PathError {
        let mut cur = match self.fd.try_clone() {
            Ok(fd) => fd,
            Err(_) => return PathError::io("open", full, original),
        };
        let mut so_far = self.path.clone();
        for comp in rel.components() {
            so_far.push(comp);
            let shown = so_far.display().to_string();
            let st = match fstatat(cur.as_raw_fd(), comp.as_os_str()) {
                Ok(Some(st)) => st,
                Ok(None) => return PathError::Missing { path: full.display().to_string(), component: shown },
                Err(e) => return PathError::io("inspect", &so_far, e),
            };
            match Kind::of(st.st_mode) {
                Kind::Symlink => {
                    return PathError::Symlink {
                        path: full.display().to_string(),
                        component: shown,
                        root: self.root.display().to_string(),
                    }
                }
                Kind::Dir => {}
                _ => return PathError::NotDirectory { path: full.display().to_string(), component: shown },
            }
            match openat(cur.as_raw_fd(), comp.as_os_str(), DIR_FLAGS, 0) {
                Ok(fd) => cur = fd,
                Err(_) => break,
            }
        }
        match original.raw_os_error() {
            Some(libc::EXDEV) => PathError::Escapes {
                path: full.display().to_string(),
                component: so_far.display().to_string(),
                root: self.root.display().to_string(),
            },
            Some(libc::ELOOP) => PathError::Symlink {
                path: full.display().to_string(),
                component: full.display().to_string(),
                root: self.root.display().to_string(),
            },
            _ => PathError::io("open", full, original),
        }
    }

    /// Open `rel` below this directory, creating what is missing (with
    /// `mode`), never following a link.
    pub fn create(&self, rel: &Path, mode: u32) -> Result<Dir, PathError> {
        let full = self.child_path(rel);
        let rel = normal_relative(rel, &full)?;
        let mut cur = self.try_clone()?;
        for comp in rel.components() {
            let name = comp.as_os_str();
            match mkdirat(cur.fd.as_raw_fd(), name, mode) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(PathError::io("create the directory", &cur.path.join(name), e)),
            }
            cur = cur.open(Path::new(name)).map_err(|e| retarget(e, &full))?;
        }
        Ok(Dir { path: full, ..cur })
    }

    /// Create the directory `name` here, which must not exist yet, and open it.
    pub fn create_new(&self, name: &OsStr, mode: u32) -> Result<Dir, PathError> {
        let path = self.path.join(name);
        mkdirat(self.fd.as_raw_fd(), name, mode).map_err(|e| PathError::io("create the directory", &path, e))?;
        self.open(Path::new(name))
    }

    /// The entries of this directory with what each is (not following links).
    pub fn entries(&self) -> Result<Vec<(OsString, Kind)>, PathError> {
        let fd = openat(self.fd.as_raw_fd(), OsStr::new("."), DIR_FLAGS, 0)
            .map_err(|e| PathError::io("list", &self.path, e))?;
        let raw = fd.as_raw_fd();
        // SAFETY: fdopendir takes over the descriptor (released from OwnedFd).
        let dir = unsafe { libc::fdopendir(raw) };
        if dir.is_null() {
            return Err(PathError::io("list", &self.path, io::Error::last_os_error()));
        }
        std::mem::forget(fd);
        let mut out = Vec::new();
        let result = loop {
            // SAFETY: errno is thread-local; readdir on an open DIR*.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: dir is a valid DIR* until closedir below.
            let ent = unsafe { libc::readdir64(dir) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break if e.raw_os_error().unwrap_or(0) == 0 { Ok(()) } else { Err(e) };
            }
            // SAFETY: d_name is NUL-terminated within the entry.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            out.push(OsString::from_vec(name.to_vec()));
        };
        // SAFETY: closes the DIR* and its descriptor, once.
        unsafe { libc::closedir(dir) };
        result.map_err(|e| PathError::io("list", &self.path, e))?;
        let mut typed = Vec::with_capacity(out.len());
        for name in out {
            match self.kind_of(&name)? {
                Some(k) => typed.push((name, k)),
                None => continue, // removed meanwhile
            }
        }
        Ok(typed)
    }

    /// Every FIFO, socket and device node below this directory (paths
    /// relative to it), found through held directories.
    pub fn specials(&self) -> Result<Vec<PathBuf>, PathError> {
        let mut out = Vec::new();
        let mut stack = vec![(self.try_clone()?, PathBuf::new())];
        while let Some((dir, rel)) = stack.pop() {
            for (name, kind) in dir.entries()? {
                match kind {
                    Kind::Special => out.push(rel.join(&name)),
                    Kind::Dir => match dir.open(Path::new(&name)) {
                        Ok(sub) => stack.push((sub, rel.join(&name))),
                        // Swapped meanwhile: not a directory any more.
                        Err(PathError::Symlink { .. } | PathError::NotDirectory { .. } | PathError::Missing { .. }) => {
                        }
                        Err(e) => return Err(e),
                    },
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// What `name` here is (None: it does not exist).
    pub fn kind_of(&self, name: &OsStr) -> Result<Option<Kind>, PathError> {
        Ok(self.lstat(name)?.map(|st| Kind::of(st.st_mode)))
    }

    /// lstat of `name` here (None: it does not exist).
    pub fn lstat(&self, name: &OsStr) -> Result<Option<libc::stat>, PathError> {
        fstatat(self.fd.as_raw_fd(), name).map_err(|e| PathError::io("inspect", &self.path.join(name), e))
    }

    /// fstat of this directory.
    pub fn stat(&self) -> Result<libc::stat, PathError> {
        fstat(self.fd.as_raw_fd()).map_err(|e| PathError::io("inspect", &self.path, e))
    }

    pub fn is_empty(&self) -> Result<bool, PathError> {
        Ok(self.entries()?.is_empty())
    }

    /// Bytes available to root and the filesystem's size, from fstatvfs.
    pub fn space(&self) -> Result<(u64, u64), PathError> {
        // SAFETY: statvfs is plain old data; zeroed is a valid value.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and out pointer.
        cvt(unsafe { libc::fstatvfs(self.fd.as_raw_fd(), &mut s) })
            .map_err(|e| PathError::io("measure the free space of", &self.path, e))?;
        Ok((s.f_bfree as u64 * s.f_frsize as u64, s.f_blocks as u64 * s.f_frsize as u64))
    }

    /// Remove `name` here, and everything below it if it is a directory,
    /// never following a link (a link is removed, not what it points to).
    pub fn remove(&self, name: &OsStr) -> Result<(), PathError> {
        let path = self.path.join(name);
        match self.kind_of(name)? {
            None => Ok(()),
            Some(Kind::Dir) => {
                match self.open(Path::new(name)) {
                    Ok(sub) => {
                        for (child, _) in sub.entries()? {
                            sub.remove(&child)?;
                        }
                    }
                    // Swapped for something else meanwhile: removed as it is now.
                    Err(PathError::Symlink { .. } | PathError::NotDirectory { .. }) => {
                        return unlinkat(self.fd.as_raw_fd(), name, 0).map_err(|e| PathError::io("remove", &path, e))
                    }
                    Err(PathError::Missing { .. }) => return Ok(()),
                    Err(e) => return Err(e),
                }
                unlinkat(self.fd.as_raw_fd(), name, libc::AT_REMOVEDIR).map_err(|e| PathError::io("remove", &path, e))
            }
            Some(_) => match unlinkat(self.fd.as_raw_fd(), name, 0) {
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) => self.remove(name),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                other => other.map_err(|e| PathError::io("remove", &path, e)),
            },
        }
    }

    /// Rename `name` here to `to_name` in `to`, replacing a non-directory
    /// there (rename never follows a link on either side).
    pub fn rename(&self, name: &OsStr, to: &Dir, to_name: &OsStr) -> Result<(), PathError> {
        let (a, b) = (cstring(name), cstring(to_name));
        let (a, b) = match (a, b) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Err(PathError::io("move", &self.path.join(name), e)),
        };
        // SAFETY: valid dirfds and NUL-terminated names.
        cvt(unsafe { libc::renameat(self.fd.as_raw_fd(), a.as_ptr(), to.fd.as_raw_fd(), b.as_ptr()) }).map_err(
            |e| PathError::Io {
                op: "move",
                path: format!("{} to {}", self.path.join(name).display(), to.path.join(to_name).display()),
                source: e,
            },
        )?;
        Ok(())
    }

    /// Give this directory the owner, mode and times of `from` (through
    /// both descriptors).
    pub fn copy_metadata_from(&self, from: &Dir) -> Result<(), PathError> {
        let st = from.stat()?;
        let fd = self.fd.as_raw_fd();
        let err = |e| PathError::io("set the owner, mode and times of", &self.path, e);
        // SAFETY: a valid fd; plain system calls.
        cvt(unsafe { libc::fchown(fd, st.st_uid, st.st_gid) }).map_err(err)?;
        // SAFETY: as above.
        cvt(unsafe { libc::fchmod(fd, st.st_mode & 0o7777) }).map_err(err)?;
        let times = [
            libc::timespec { tv_sec: st.st_atime, tv_nsec: st.st_atime_nsec },
            libc::timespec { tv_sec: st.st_mtime, tv_nsec: st.st_mtime_nsec },
        ];
        // SAFETY: a valid fd and a two-element array.
        cvt(unsafe { libc::futimens(fd, times.as_ptr()) }).map_err(err)?;
        Ok(())
    }
}

/// An error about a component, restated for the whole path asked for.
fn retarget(e: PathError, full: &Path) -> PathError {
    let path = full.display().to_string();
    match e {
        PathError::Symlink { component, root, .. } => PathError::Symlink { path, component, root },
        PathError::NotDirectory { component, .. } => PathError::NotDirectory { path, component },
        PathError::Missing { component, .. } => PathError::Missing { path, component },
        other => other,
    }
}

/// `rel` as plain names only: no root, no `.`, no `..`.
fn normal_relative(rel: &Path, full: &Path) -> Result<PathBuf, PathError> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir if out.as_os_str().is_empty() && rel.as_os_str() == "." => {}
            _ => return Err(PathError::NotNormal { path: full.display().to_string() }),
        }
    }
    Ok(out)
}

fn openat(dir: RawFd, name: &OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = cstring(name)?;
    // SAFETY: a valid dirfd and NUL-terminated name; the fd returned is owned below.
    let fd = cvt(unsafe { libc::openat(dir, c.as_ptr(), flags, mode as libc::c_uint) })?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open the directory `name` in `dir` without following a link (the walk
/// of `unchanged`, which holds names as C strings already).
pub(crate) fn open_dir_at(dir: RawFd, name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: a valid dirfd and NUL-terminated name; the fd returned is owned below.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), DIR_FLAGS, 0) })?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdirat(dir: RawFd, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstring(name)?;
    // SAFETY: a valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir, c.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

fn unlinkat(dir: RawFd, name: &OsStr, flags: libc::c_int) -> io::Result<()> {
    let c = cstring(name)?;
    // SAFETY: a valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }).map(|_| ())
}

fn fstatat(dir: RawFd, name: &OsStr) -> io::Result<Option<libc::stat>> {
    let c = cstring(name)?;
    // SAFETY: stat is plain old data; zeroed is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid dirfd, NUL-terminated name and out pointer.
    match cvt(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data; zeroed is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and out pointer.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// Normalise an absolute path lexically: no `.`; `..` refused.
fn normal_absolute(path: &Path) -> Result<PathBuf, PathError> {
    if !path.is_absolute() {
        return Err(PathError::NotNormal { path: path.display().to_string() });
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            _ => return Err(PathError::NotNormal { path: path.display().to_string() }),
        }
    }
    Ok(out)
}

/// A directory below one of `roots`, resolved now: the root is opened as
/// the operator gave it, the rest beneath it with no symlink followed.
/// Returns the root and the directory.
pub fn open_under(roots: &[PathBuf], path: &Path, hint: &str) -> Result<(Dir, Dir), PathError> {
    let (root, rel) = split_root(roots, path, hint)?;
    let root = Dir::open_trusted(&root)?;
    let dir = root.open(&rel)?;
    Ok((root, dir))
}

/// As [`open_under`], creating the missing directories (with `mode`).
pub fn create_under(roots: &[PathBuf], path: &Path, mode: u32, hint: &str) -> Result<(Dir, Dir), PathError> {
    let (root, rel) = split_root(roots, path, hint)?;
    let root = Dir::open_trusted(&root)?;
    let dir = root.create(&rel, mode)?;
    Ok((root, dir))
}

/// The longest part of `path` below one of `roots` that exists, opened
/// without following a link, and the rest (which does not exist yet).
pub fn open_existing_under(roots: &[PathBuf], path: &Path, hint: &str) -> Result<(Dir, PathBuf), PathError> {
    let (root, rel) = split_root(roots, path, hint)?;
    let mut cur = Dir::open_trusted(&root)?;
    let mut comps = rel.components();
    while let Some(c) = comps.next() {
        let name = c.as_os_str();
        match cur.kind_of(name)? {
            None => {
                let mut rest = PathBuf::from(name);
                rest.extend(comps);
                return Ok((cur, rest));
            }
            Some(_) => cur = cur.open(Path::new(name)).map_err(|e| retarget(e, &root.join(&rel)))?,
        }
    }
    Ok((cur, PathBuf::new()))
}

/// The root `path` lies below (the longest that matches, as given or
/// with its own symlinks resolved) and the rest of the path.
pub fn split_root(roots: &[PathBuf], path: &Path, hint: &str) -> Result<(PathBuf, PathBuf), PathError> {
    let path = normal_absolute(path)?;
    let mut best: Option<(PathBuf, PathBuf)> = None;
    for root in roots {
        let Ok(given) = normal_absolute(root) else { continue };
        let real = std::fs::canonicalize(&given).ok();
        for candidate in std::iter::once(given.clone()).chain(real) {
            if let Ok(rest) = path.strip_prefix(&candidate) {
                let longer = best.as_ref().is_none_or(|(r, _)| candidate.as_os_str().len() > r.as_os_str().len());
                if longer {
                    best = Some((candidate.clone(), rest.to_path_buf()));
                }
            }
        }
    }
    best.ok_or_else(|| PathError::OutsideRoots {
        path: path.display().to_string(),
        roots: roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "),
        hint: hint.to_string(),
    })
}

/// Move everything inside `from` into `to`, replacing what is there: a
/// file, link or special file is replaced by a rename, a directory is
/// merged, a directory in the way of a file is removed (never following a
/// link). Then `to` gets the owner, mode and times of `from`. Every step is
/// relative to held directories, so a link planted or swapped in anywhere
/// in `to` is replaced, never followed, and a hard link to a file outside
/// loses its name here while the outside file stays as it is.
pub fn merge_into(from: &Dir, to: &Dir) -> Result<(), PathError> {
    for (name, kind) in from.entries()? {
        let dest = to.kind_of(&name)?;
        match (kind, dest) {
            (Kind::Dir, Some(Kind::Dir)) => {
                let src = from.open(Path::new(&name))?;
                match to.open(Path::new(&name)) {
                    Ok(dst) => {
                        merge_into(&src, &dst)?;
                        continue;
                    }
                    // Swapped meanwhile for a link or a file: replaced below.
                    Err(PathError::Symlink { .. } | PathError::NotDirectory { .. }) => to.remove(&name)?,
                    Err(PathError::Missing { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            (_, Some(Kind::Dir)) | (Kind::Dir, Some(_)) => to.remove(&name)?,
            _ => {}
        }
        from.rename(&name, to, &name)?;
    }
    to.copy_metadata_from(from)
}

/// A checked directory as a restic child sees it: mounted at a fixed path
/// of a private mount namespace of the child, `nosymfollow`, `nodev` and
/// `nosuid` (and read-only for backups). A pin holds no descriptor (a held
/// directory would keep its volume busy, and kubelet could not unmount it
/// while restic talks to the repository): right before each restic child
/// is started, [`Pin::open`] resolves the directory again from its trusted
/// base without following a link and checks it is still the one checked
/// (device and inode); the descriptors live only until the child has made
/// its mounts, and the child checks that the path restic will use leads to
/// that mount.
pub struct Pin {
    base: PathBuf,
    rel: PathBuf,
    expect: (u64, u64),
    at: CString,
    at_shown: PathBuf,
    attrs: u64,
    /// For backups at the volume's own path: the allowed root it lies
    /// below, mounted over itself `nosymfollow` in the child first, so no
    /// component between the root and the volume can be a link either.
    root: Option<PathBuf>,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin").field("dir", &self.base.join(&self.rel)).field("at", &self.at_shown).finish()
    }
}

/// The mount attributes every pin gets.
const PIN_ATTRS: u64 = libc::MOUNT_ATTR_NOSYMFOLLOW | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOSUID;

impl Pin {
    /// restic writes into `dir`, which it sees at `at` (a directory of the
    /// agent's own, which no workload can reach).
    pub fn writable(dir: &Dir, at: &Path) -> Result<Pin, PathError> {
        Pin::new(dir, at, PIN_ATTRS, None)
    }

    /// restic reads `view` (the volume itself or a point-in-time view of
    /// it) at the volume's path `at`, below `root`, read-only.
    pub fn read_only(view: &Dir, root: &Dir, at: &Path) -> Result<Pin, PathError> {
        Pin::new(view, at, PIN_ATTRS | libc::MOUNT_ATTR_RDONLY, Some(root.path.clone()))
    }

    fn new(dir: &Dir, at: &Path, attrs: u64, root: Option<PathBuf>) -> Result<Pin, PathError> {
        let st = dir.stat()?;
        let at_c = cstring(at.as_os_str()).map_err(|e| PathError::io("pin", at, e))?;
        let rel = dir.path.strip_prefix(&dir.root).unwrap_or(Path::new("")).to_path_buf();
        Ok(Pin {
            base: dir.root.clone(),
            rel,
            expect: (st.st_dev, st.st_ino),
            at: at_c,
            at_shown: at.to_path_buf(),
            attrs,
            root,
        })
    }

    /// The path restic uses.
    pub fn at(&self) -> &Path {
        &self.at_shown
    }

    /// Resolve the directory again, now, and hold it for one child.
    pub fn open(&self) -> Result<OpenPin, PathError> {
        let dir = Dir::open_trusted(&self.base)?.open(&self.rel)?;
        let st = dir.stat()?;
        if (st.st_dev, st.st_ino) != self.expect {
            return Err(PathError::Swapped { path: dir.path.display().to_string() });
        }
        let root = match &self.root {
            Some(r) => {
                let c = cstring(r.as_os_str()).map_err(|e| PathError::io("pin", r, e))?;
                Some((Dir::open_trusted(r)?.fd, c))
            }
            None => None,
        };
        Ok(OpenPin { what: dir.fd, at: self.at.clone(), attrs: self.attrs, root, expect: self.expect })
    }
}

/// A pin's directories, held from just before a child is forked until it
/// has made its mounts.
pub struct OpenPin {
    what: OwnedFd,
    at: CString,
    attrs: u64,
    root: Option<(OwnedFd, CString)>,
    expect: (u64, u64),
}

impl OpenPin {
    /// Make the mounts in the child, between fork and exec. Only system
    /// calls here (async-signal-safe); everything was allocated before.
    ///
    /// # Safety
    /// Called only in a freshly forked child (`Command::pre_exec`).
    pub unsafe fn enter(&self) -> io::Result<()> {
        let empty = c"".as_ptr();
        let clone_flags = (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC) as libc::c_long
            | (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_long;
        // Detached copies first, while still in the agent's namespace (a
        // copy can only be made of a mount of one's own namespace).
        let tree = libc::syscall(libc::SYS_open_tree, self.what.as_raw_fd(), empty, clone_flags);
        if tree < 0 {
            return Err(io::Error::last_os_error());
        }
        let root_tree = match &self.root {
            Some((fd, _)) => {
                let t = libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), empty, clone_flags);
                if t < 0 {
                    return Err(io::Error::last_os_error());
                }
                Some(t)
            }
            None => None,
        };
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        let none = std::ptr::null::<libc::c_char>();
        if libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Private: nothing mounted or unmounted here reaches the agent's
        // namespace, nor the other way round.
        let set = |fd: libc::c_long, attrs: u64| -> io::Result<()> {
            let attr = MountAttr { attr_set: attrs, attr_clr: 0, propagation: libc::MS_PRIVATE, userns_fd: 0 };
            let rc = libc::syscall(
                libc::SYS_mount_setattr,
                fd,
                empty,
                (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        let attach = |fd: libc::c_long, at: &CStr| -> io::Result<()> {
            // No MOVE_MOUNT_T_SYMLINKS: a link as the last component is not followed.
            let rc = libc::syscall(
                libc::SYS_move_mount,
                fd,
                empty,
                libc::AT_FDCWD,
                at.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH as libc::c_uint,
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        if let (Some(t), Some((_, path))) = (root_tree, &self.root) {
            set(t, libc::MOUNT_ATTR_NOSYMFOLLOW)?;
            attach(t, path)?;
            libc::close(t as libc::c_int);
        }
        set(tree, self.attrs)?;
        attach(tree, &self.at)?;
        libc::close(tree as libc::c_int);
        // The path restic will use must lead to what is held.
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(libc::AT_FDCWD, self.at.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(io::Error::last_os_error());
        }
        if (st.st_dev, st.st_ino) != self.expect {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::create_dir_all(t.path().join("outside")).unwrap();
        std::fs::write(t.path().join("outside/secret"), "host file").unwrap();
        (t, root)
    }

    #[test]
    fn a_plain_directory_below_the_root_opens() {
        let (_t, root) = tree();
        let (_, dir) = open_under(std::slice::from_ref(&root), &root.join("a/b/c"), "").unwrap();
        assert_eq!(dir.path(), root.join("a/b/c"));
        assert!(dir.is_empty().unwrap());
    }

    #[test]
    fn a_symlink_at_any_depth_is_refused_and_named() {
        let (t, root) = tree();
        for (link, asked) in [("a/b/c", "a/b/c"), ("a/b", "a/b/c"), ("a", "a/b/c")] {
            let _ = std::fs::remove_dir_all(root.join("a"));
            std::fs::create_dir_all(root.join("a/b/c")).unwrap();
            std::fs::remove_dir_all(root.join(link)).unwrap();
            symlink(t.path().join("outside"), root.join(link)).unwrap();
            let e = open_under(std::slice::from_ref(&root), &root.join(asked), "").unwrap_err();
            match &e {
                PathError::Symlink { component, .. } => assert_eq!(component, &root.join(link).display().to_string()),
                other => panic!("{link}: {other}"),
            }
            assert!(e.to_string().contains("symbolic link"), "{e}");
            assert_eq!(e.kind(), "path_through_symlink");
        }
    }

    #[test]
    fn a_symlink_pointing_inside_the_root_is_refused_too() {
        let (_t, root) = tree();
        symlink("a/b", root.join("inner")).unwrap();
        let e = open_under(std::slice::from_ref(&root), &root.join("inner/c"), "").unwrap_err();
        assert!(matches!(e, PathError::Symlink { .. }), "{e}");
    }

    #[test]
    fn dot_dot_and_paths_outside_the_roots_are_refused() {
        let (t, root) = tree();
        let e = open_under(std::slice::from_ref(&root), &root.join("a/../../outside"), "").unwrap_err();
        assert!(matches!(e, PathError::NotNormal { .. }), "{e}");
        let e = open_under(std::slice::from_ref(&root), &t.path().join("outside"), "say where").unwrap_err();
        assert!(matches!(e, PathError::OutsideRoots { .. }), "{e}");
        assert!(e.to_string().contains("say where"), "{e}");
        let e = root_dir(&root).open(Path::new("../outside")).unwrap_err();
        assert!(matches!(e, PathError::NotNormal { .. }), "{e}");
    }

    fn root_dir(root: &Path) -> Dir {
        Dir::open_trusted(root).unwrap()
    }

    #[test]
    fn missing_and_non_directory_components_are_named() {
        let (_t, root) = tree();
        std::fs::write(root.join("a/file"), "x").unwrap();
        let r = root_dir(&root);
        match r.open(Path::new("a/nope/x")).unwrap_err() {
            PathError::Missing { component, .. } => assert!(component.ends_with("a/nope"), "{component}"),
            other => panic!("{other}"),
        }
        match r.open(Path::new("a/file/x")).unwrap_err() {
            PathError::NotDirectory { component, .. } => assert!(component.ends_with("a/file"), "{component}"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn create_makes_what_is_missing_but_never_goes_through_a_link() {
        let (t, root) = tree();
        let r = root_dir(&root);
        let d = r.create(Path::new("new/deeper"), 0o700).unwrap();
        assert!(root.join("new/deeper").is_dir());
        assert!(d.is_empty().unwrap());
        symlink(t.path().join("outside"), root.join("trap")).unwrap();
        let e = r.create(Path::new("trap/x"), 0o700).unwrap_err();
        assert!(matches!(e, PathError::Symlink { .. }), "{e}");
        assert!(!t.path().join("outside/x").exists(), "nothing was created through the link");
    }

    #[test]
    fn remove_takes_a_link_away_and_leaves_its_target() {
        let (t, root) = tree();
        symlink(t.path().join("outside"), root.join("a/b/c/link")).unwrap();
        root_dir(&root).remove(OsStr::new("a")).unwrap();
        assert!(!root.join("a").exists());
        assert_eq!(std::fs::read_to_string(t.path().join("outside/secret")).unwrap(), "host file");
    }

    #[test]
    fn merge_replaces_planted_links_fifos_and_hard_links_without_touching_outside() {
        let (t, root) = tree();
        let outside = t.path().join("outside");
        let from = t.path().join("from");
        std::fs::create_dir_all(from.join("d/e")).unwrap();
        std::fs::write(from.join("d/e/f"), "restored").unwrap();
        std::fs::write(from.join("file"), "restored file").unwrap();
        std::fs::write(from.join("hard"), "restored hard").unwrap();
        std::fs::write(from.join("fifo"), "restored fifo").unwrap();
        std::fs::create_dir_all(from.join("was-file")).unwrap();
        // The target: a link where a directory goes, a link where a file
        // goes, a hard link to an outside file, a FIFO, a file where a
        // directory goes.
        let to = root.join("a");
        symlink(&outside, to.join("d")).unwrap();
        symlink(outside.join("secret"), to.join("file")).unwrap();
        std::fs::hard_link(outside.join("secret"), to.join("hard")).unwrap();
        let fifo = CString::new(to.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::fs::write(to.join("was-file"), "x").unwrap();
        let before: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();

        merge_into(&Dir::open_trusted(&from).unwrap(), &root_dir(&root).open(Path::new("a")).unwrap()).unwrap();

        assert_eq!(std::fs::read_to_string(to.join("d/e/f")).unwrap(), "restored");
        assert!(to.join("d").symlink_metadata().unwrap().is_dir());
        assert_eq!(std::fs::read_to_string(to.join("file")).unwrap(), "restored file");
        assert_eq!(std::fs::read_to_string(to.join("hard")).unwrap(), "restored hard");
        assert_eq!(std::fs::read_to_string(to.join("fifo")).unwrap(), "restored fifo");
        assert!(to.join("was-file").is_dir());
        assert!(to.join("b/c").is_dir(), "what the restore does not hold stays");
        assert_eq!(std::fs::read_to_string(outside.join("secret")).unwrap(), "host file");
        let after: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(before, after, "nothing appeared outside");
    }

    #[test]
    fn a_child_sees_the_pinned_directory_at_the_fixed_path_and_follows_no_link_there() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // mounts need root
        }
        let (t, root) = tree();
        std::fs::write(root.join("a/b/inside"), "held").unwrap();
        symlink(t.path().join("outside"), root.join("a/b/link")).unwrap();
        let at = t.path().join("pin-point");
        std::fs::create_dir_all(&at).unwrap();
        let held = root_dir(&root).open(Path::new("a/b")).unwrap();
        let pin = std::sync::Arc::new(Pin::writable(&held, &at).unwrap().open().unwrap());
        // Each probe is its own process in the pinned namespace: no shell.
        let pinned = |program: &str, arg: std::path::PathBuf, input: Option<&str>| {
            let mut cmd = std::process::Command::new(program);
            cmd.arg(arg).stdin(if input.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            });
            cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            let p = pin.clone();
            // SAFETY: `enter` makes only system calls on memory allocated before the fork.
            unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || p.enter()) };
            let mut child = cmd.spawn().unwrap();
            if let Some(text) = input {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            }
            let out = child.wait_with_output().unwrap();
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        };
        let stdout = [
            pinned("cat", at.join("inside"), None),
            pinned("cat", at.join("link/secret"), None),
            pinned("tee", at.join("made-here"), Some("new\n")),
        ]
        .concat();
        assert!(stdout.starts_with("held"), "{stdout}");
        assert!(stdout.contains("Too many levels of symbolic links"), "{stdout}");
        assert!(!stdout.contains("host file"), "{stdout}");
        assert_eq!(
            std::fs::read_to_string(root.join("a/b/made-here")).unwrap(),
            "new\n",
            "written into the held directory"
        );
        assert!(std::fs::read_dir(&at).unwrap().next().is_none(), "nothing visible at the pin point outside the child");
    }

    #[test]
    fn space_reports_the_filesystem_of_the_held_directory() {
        let (_t, root) = tree();
        let (free, size) = root_dir(&root).space().unwrap();
        assert!(size > 0 && free <= size);
    }
}
