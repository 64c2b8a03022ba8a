//! The walk behind "unchanged since snapshot X": one pass over a volume's
//! metadata that gives a digest of exactly what restic would back up (the
//! same excludes), so a scheduled run can tell "nothing changed" without
//! starting restic.
//!
//! Per entry the digest takes the path below the volume, type and mode,
//! owner, size, mtime, ctime, inode, link count, device numbers and a
//! symlink's target. ctime is the guard: every write, chmod, chown, rename,
//! link, setxattr and utimes sets it to the current time, and no
//! user-space call can set it back, so a change that restores size and
//! mtime (`touch -d`) still shows. Extended attributes themselves are not
//! read: setting one changes the ctime.
//!
//! Safe as root beside the workload that owns the volume: it starts from
//! the held directory the backup resolved (`beneath`), opens each
//! subdirectory relative to its parent's descriptor with
//! `O_NOFOLLOW | O_DIRECTORY` (and checks it is the entry it just stat'ed),
//! stats with `AT_SYMLINK_NOFOLLOW`, and never follows a link. A mount
//! point inside the volume ends the walk: restic's view (a non-recursive
//! bind mount) shows what lies beneath it, which the walk cannot see.
//! Fast: `getdents64` into a buffer per depth, `statx` per entry, names
//! hashed straight from the buffer; nothing is allocated per file.

use ring::digest;
use soda_syncer_domain::unchanged::ExcludeSet;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::beneath::Dir;

/// The digest of a volume's metadata and how many entries it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDigest {
    pub hex: String,
    pub entries: u64,
}

/// Why a walk could not prove anything: the run becomes a real backup.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("cannot {op} {path}: {source}")]
    Io { op: &'static str, path: String, source: io::Error },
    #[error("{path} is a mount point inside the volume; restic reads what lies beneath it, which the walk cannot see")]
    MountPoint { path: String },
    #[error("{path} changed while it was walked")]
    Raced { path: String },
    #[error("{path} is more than {MAX_DEPTH} directories deep; the walk stops there and restic runs")]
    TooDeep { path: String },
}

/// The deepest directory the walk enters. Each level holds a descriptor and
/// a stack frame: a workload that nests directories without end must not
/// exhaust either in the agent (it gets a real backup instead).
pub const MAX_DEPTH: usize = 256;

/// Walk the volume held by `root` (found at `root_path`, which restic's
/// exclude patterns are matched against) and digest its metadata.
pub fn digest_volume(root: &Dir, exclude: &ExcludeSet) -> Result<VolumeDigest, WalkError> {
    let root_path = root.path().as_os_str().as_encoded_bytes().to_vec();
    let mut w = Walker {
        ctx: digest::Context::new(&digest::SHA256),
        root_len: root_path.len(),
        path: root_path,
        exclude,
        levels: Vec::new(),
        entries: 0,
        link: vec![0u8; libc::PATH_MAX as usize + 1],
    };
    let fd = crate::beneath::open_dir_at(root.raw_fd(), c".").map_err(|e| w.io("open", e))?;
    let stx = statx(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH).map_err(|e| w.io("inspect", e))?;
    w.feed(&stx, None);
    w.walk_dir(&fd, 0)?;
    let hash = w.ctx.finish();
    let hex = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(VolumeDigest { hex, entries: w.entries })
}

#[derive(Default)]
struct Level {
    /// The directory's raw `linux_dirent64` records.
    buf: Vec<u8>,
    /// (offset of the name in `buf`, its length), sorted by name.
    names: Vec<(u32, u32)>,
}

struct Walker<'a> {
    ctx: digest::Context,
    /// The absolute path of the entry at hand (for excludes and messages).
    path: Vec<u8>,
    root_len: usize,
    exclude: &'a ExcludeSet,
    levels: Vec<Level>,
    entries: u64,
    link: Vec<u8>,
}

const CHUNK: usize = 64 * 1024;

impl Walker<'_> {
    fn shown(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }

    fn io(&self, op: &'static str, source: io::Error) -> WalkError {
        WalkError::Io { op, path: self.shown(), source }
    }

    fn walk_dir(&mut self, dir: &OwnedFd, depth: usize) -> Result<(), WalkError> {
        if depth >= MAX_DEPTH {
            return Err(WalkError::TooDeep { path: self.shown() });
        }
        if self.levels.len() <= depth {
            self.levels.push(Level::default());
        }
        // Taken out while the subdirectories below use the deeper levels.
        let mut level = std::mem::take(&mut self.levels[depth]);
        let result = self.walk_entries(dir, depth, &mut level);
        self.levels[depth] = level;
        result
    }

    fn walk_entries(&mut self, dir: &OwnedFd, depth: usize, level: &mut Level) -> Result<(), WalkError> {
        read_entries(dir.as_raw_fd(), level).map_err(|e| self.io("list", e))?;
        let Level { buf, names } = level;
        // The kernel's order may change without any change of content (a
        // rehashed directory): the digest must not depend on it.
        names.sort_unstable_by(|a, b| name_at(buf, *a).cmp(name_at(buf, *b)));
        for &(off, len) in names.iter() {
            let name = name_at(buf, (off, len));
            let keep = self.path.len();
            self.path.push(b'/');
            self.path.extend_from_slice(name);
            let r = self.entry(dir, &buf[off as usize..=(off + len) as usize], depth);
            self.path.truncate(keep);
            r?;
        }
        Ok(())
    }

    fn entry(&mut self, dir: &OwnedFd, name_nul: &[u8], depth: usize) -> Result<(), WalkError> {
        if self.exclude.excludes(&self.path) {
            return Ok(());
        }
        let name = CStr::from_bytes_with_nul(name_nul).map_err(|_| WalkError::Raced { path: self.shown() })?;
        let stx = match statx(dir.as_raw_fd(), name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(s) => s,
            // Removed since it was listed: a change, and restic must look.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(WalkError::Raced { path: self.shown() }),
            Err(e) => return Err(self.io("inspect", e)),
        };
        let kind = u32::from(stx.stx_mode) & libc::S_IFMT;
        let target = if kind == libc::S_IFLNK {
            // SAFETY: a valid dirfd, a NUL-terminated name, and a buffer of the length given.
            let n = unsafe {
                libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), self.link.as_mut_ptr().cast(), self.link.len())
            };
            if n < 0 {
                return Err(self.io("read the link", io::Error::last_os_error()));
            }
            Some(n as usize)
        } else {
            None
        };
        self.feed(&stx, target);
        if kind != libc::S_IFDIR {
            return Ok(());
        }
        if stx.stx_attributes_mask & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0
            && stx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0
        {
            return Err(WalkError::MountPoint { path: self.shown() });
        }
        let sub = crate::beneath::open_dir_at(dir.as_raw_fd(), name).map_err(|e| match e.raw_os_error() {
            // Swapped for a link or a file since the statx.
            Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::ENOENT) => WalkError::Raced { path: self.shown() },
            _ => self.io("open", e),
        })?;
        let opened = statx(sub.as_raw_fd(), c"", libc::AT_EMPTY_PATH).map_err(|e| self.io("inspect", e))?;
        if (opened.stx_ino, opened.stx_dev_major, opened.stx_dev_minor)
            != (stx.stx_ino, stx.stx_dev_major, stx.stx_dev_minor)
        {
            return Err(WalkError::Raced { path: self.shown() });
        }
        self.walk_dir(&sub, depth + 1)
    }

    /// One entry into the digest: a fixed-size record, then its path
    /// below the root and a link's target, each with its length first.
    fn feed(&mut self, s: &libc::statx, link_len: Option<usize>) {
        self.entries += 1;
        let mut rec = [0u8; 96];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            rec[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&u32::from(s.stx_mode).to_le_bytes());
        put(&s.stx_uid.to_le_bytes());
        put(&s.stx_gid.to_le_bytes());
        put(&s.stx_nlink.to_le_bytes());
        put(&s.stx_size.to_le_bytes());
        put(&s.stx_mtime.tv_sec.to_le_bytes());
        put(&s.stx_mtime.tv_nsec.to_le_bytes());
        put(&s.stx_ctime.tv_sec.to_le_bytes());
        put(&s.stx_ctime.tv_nsec.to_le_bytes());
        put(&s.stx_ino.to_le_bytes());
        put(&s.stx_dev_major.to_le_bytes());
        put(&s.stx_dev_minor.to_le_bytes());
        put(&s.stx_rdev_major.to_le_bytes());
        put(&s.stx_rdev_minor.to_le_bytes());
        let rel = &self.path[self.root_len..];
        put(&(rel.len() as u64).to_le_bytes());
        self.ctx.update(&rec[..at]);
        self.ctx.update(rel);
        if let Some(n) = link_len {
            self.ctx.update(&(n as u64).to_le_bytes());
            self.ctx.update(&self.link[..n]);
        }
    }
}

fn name_at(buf: &[u8], (off, len): (u32, u32)) -> &[u8] {
    &buf[off as usize..(off + len) as usize]
}

/// All of a directory's entries (but `.` and `..`) into `level`.
fn read_entries(fd: RawFd, level: &mut Level) -> io::Result<()> {
    level.buf.clear();
    level.names.clear();
    loop {
        let filled = level.buf.len();
        level.buf.resize(filled + CHUNK, 0);
        // SAFETY: getdents64 writes at most CHUNK bytes into the buffer's tail.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, level.buf.as_mut_ptr().add(filled), CHUNK) };
        if n < 0 {
            level.buf.truncate(filled);
            return Err(io::Error::last_os_error());
        }
        level.buf.truncate(filled + n as usize);
        if n == 0 {
            break;
        }
    }
    // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    let buf = &level.buf;
    let mut pos = 0usize;
    while pos + 19 < buf.len() {
        let reclen = u16::from_ne_bytes([buf[pos + 16], buf[pos + 17]]) as usize;
        if reclen == 0 || pos + reclen > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed directory record"));
        }
        let name = &buf[pos + 19..pos + reclen];
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        if !matches!(&name[..len], b"." | b"..") {
            level.names.push(((pos + 19) as u32, len as u32));
        }
        pos += reclen;
    }
    Ok(())
}

fn statx(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<libc::statx> {
    // SAFETY: statx is plain old data; zeroed is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid dirfd, a NUL-terminated name and an out pointer.
    let rc =
        unsafe { libc::statx(dir, name.as_ptr(), flags | libc::AT_NO_AUTOMOUNT, libc::STATX_BASIC_STATS, &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::Path;

    fn digest(dir: &Path, exclude: &[&str]) -> Result<VolumeDigest, WalkError> {
        let root = Dir::open_trusted(dir).unwrap();
        digest_volume(&root, &ExcludeSet::new(exclude))
    }

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::fs::write(t.path().join("a/b/f"), b"data").unwrap();
        std::fs::write(t.path().join("g.tmp"), b"scratch").unwrap();
        symlink("a/b/f", t.path().join("l")).unwrap();
        t
    }

    #[test]
    fn an_untouched_tree_gives_the_same_digest_twice() {
        let t = tree();
        let a = digest(t.path(), &[]).unwrap();
        assert_eq!(a, digest(t.path(), &[]).unwrap());
        assert_eq!(a.entries, 6, "root, a, a/b, a/b/f, g.tmp, l");
    }

    #[test]
    fn changes_change_the_digest_and_excluded_ones_do_not() {
        let t = tree();
        let before = digest(t.path(), &["*.tmp"]).unwrap();
        std::fs::write(t.path().join("g.tmp"), b"other scratch").unwrap();
        assert_eq!(before, digest(t.path(), &["*.tmp"]).unwrap(), "an excluded file changed");
        std::fs::set_permissions(t.path().join("a/b/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(before, digest(t.path(), &["*.tmp"]).unwrap(), "a chmod");
    }

    #[test]
    fn a_symlink_is_digested_not_followed() {
        let t = tree();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        symlink(outside.path(), t.path().join("out")).unwrap();
        let before = digest(t.path(), &[]).unwrap();
        std::fs::write(outside.path().join("secret2"), b"y").unwrap();
        assert_eq!(before, digest(t.path(), &[]).unwrap(), "what a link points to is not the volume's");
    }

    #[test]
    fn a_tree_deeper_than_the_limit_stops_the_walk() {
        let t = tempfile::tempdir().unwrap();
        let mut p = t.path().to_path_buf();
        for _ in 0..=MAX_DEPTH {
            p.push("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        assert!(matches!(digest(t.path(), &[]), Err(WalkError::TooDeep { .. })));
    }

    /// Root reads every directory; this test drops the capabilities that
    /// let it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) on its own thread
    /// only (capset is per thread), so a mode-000 directory really fails.
    #[test]
    fn an_unreadable_directory_fails_the_walk() {
        let t = tree();
        std::fs::create_dir(t.path().join("locked")).unwrap();
        std::fs::write(t.path().join("locked/f"), b"x").unwrap();
        std::fs::set_permissions(t.path().join("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
        let path = t.path().to_path_buf();
        let result = std::thread::spawn(move || {
            drop_dac_capabilities();
            digest(&path, &[])
        })
        .join()
        .unwrap();
        std::fs::set_permissions(t.path().join("locked"), std::fs::Permissions::from_mode(0o755)).unwrap();
        match result {
            Err(WalkError::Io { op: "open", path, .. }) => assert!(path.ends_with("/locked"), "{path}"),
            other => panic!("expected the walk to fail on the locked directory, got {other:?}"),
        }
    }

    fn drop_dac_capabilities() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const V3: u32 = 0x2008_0522;
        let mut h = Header { version: V3, pid: 0 };
        let mut d = [Data::default(); 2];
        // SAFETY: capget/capset with a v3 header and two data words, on this thread.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()), 0);
            // CAP_DAC_OVERRIDE is 1, CAP_DAC_READ_SEARCH 2 (linux/capability.h).
            let drop = (1u32 << 1) | (1u32 << 2);
            d[0].effective &= !drop;
            assert_eq!(libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()), 0);
        }
    }
}
