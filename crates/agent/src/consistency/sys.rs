//! The system calls the consistency methods need, each wrapped once:
//! FIFREEZE/FITHAW, FICLONE, syncfs, statx's mount id, the xfs geometry
//! (for its reflink flag), and extended attributes.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
/// `_IOR('X', 126, struct xfs_fsop_geom)`, the v5 geometry of 256 bytes.
const XFS_IOC_FSGEOMETRY: libc::c_ulong = 0x8100_587e;
const XFS_FSOP_GEOM_FLAGS_REFLINK: u32 = 1 << 20;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Open a directory (a mount point) for the freeze ioctls.
pub fn open_dir(p: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(p)
}

/// Block writers and flush the filesystem `dir` is on.
pub fn freeze(dir: &File) -> io::Result<()> {
    // SAFETY: FIFREEZE takes an int argument that the kernel ignores; the fd is valid for the call.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) })
}

/// Let writers go on. EINVAL means the filesystem was not frozen.
pub fn thaw(dir: &File) -> io::Result<()> {
    // SAFETY: as for FIFREEZE.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) })
}

/// Write back the whole filesystem `f` is on (so a freeze right after has
/// little left to flush while writers wait).
pub fn syncfs(f: &File) -> io::Result<()> {
    // SAFETY: syncfs only reads the fd.
    check(unsafe { libc::syncfs(f.as_raw_fd()) })
}

/// Make `dst` share `src`'s extents (the whole file).
pub fn ficlone(dst: &File, src: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are valid.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE as _, src.as_raw_fd()) })
}

/// The id of the mount `p` is on (statx STATX_MNT_ID, Linux 5.8+).
pub fn mount_id(p: &Path) -> io::Result<u64> {
    let c = cstr(p)?;
    // SAFETY: statx is plain old data; zeroed is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and stx is a valid out pointer.
    check(unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_MNT_ID, &mut stx) })?;
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    }
    Ok(stx.stx_mnt_id)
}

/// Whether the xfs filesystem `f` is on was made with reflink=1.
pub fn xfs_reflink(f: &File) -> io::Result<bool> {
    let mut geom = [0u8; 256];
    // SAFETY: the buffer has the size the ioctl number encodes.
    check(unsafe { libc::ioctl(f.as_raw_fd(), XFS_IOC_FSGEOMETRY as _, geom.as_mut_ptr()) })?;
    // struct xfs_fsop_geom: eight u32, four u64, a 16-byte uuid, sunit,
    // swidth, version, then flags at byte 92.
    let flags = u32::from_ne_bytes([geom[92], geom[93], geom[94], geom[95]]);
    Ok(flags & XFS_FSOP_GEOM_FLAGS_REFLINK != 0)
}

/// All extended attributes of `p` (not following a symlink).
pub fn xattrs(p: &Path) -> io::Result<Vec<(CString, Vec<u8>)>> {
    let c = cstr(p)?;
    // SAFETY: a null buffer with size 0 asks for the needed size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTSUP) { Ok(Vec::new()) } else { Err(e) };
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut names = vec![0u8; n as usize + 256];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = CString::new(name).expect("split at NUL");
        // SAFETY: as above, size query then read into a buffer of that size.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            continue; // removed meanwhile
        }
        let mut value = vec![0u8; len as usize];
        // SAFETY: the buffer is valid for its length.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if len >= 0 {
            value.truncate(len as usize);
            out.push((name, value));
        }
    }
    Ok(out)
}

/// Set extended attributes on `p` (not following a symlink).
pub fn set_xattrs(p: &Path, attrs: &[(CString, Vec<u8>)]) -> io::Result<()> {
    let c = cstr(p)?;
    for (name, value) in attrs {
        // SAFETY: valid path, name and value buffer.
        check(unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) })?;
    }
    Ok(())
}

pub fn remove_xattr(p: &Path, name: &CString) -> io::Result<()> {
    let c = cstr(p)?;
    // SAFETY: valid path and name.
    check(unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) })
}

/// Set owner, and (not for symlinks) mode, and the access and modification
/// times, of `p` without following a symlink.
pub fn set_meta(p: &Path, m: &std::fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let c = cstr(p)?;
    // SAFETY: valid path.
    check(unsafe { libc::lchown(c.as_ptr(), m.uid(), m.gid()) })?;
    if !m.file_type().is_symlink() {
        // SAFETY: valid path.
        check(unsafe { libc::chmod(c.as_ptr(), m.mode() & 0o7777) })?;
    }
    let times = [
        libc::timespec { tv_sec: m.atime() as _, tv_nsec: m.atime_nsec() as _ },
        libc::timespec { tv_sec: m.mtime() as _, tv_nsec: m.mtime_nsec() as _ },
    ];
    // SAFETY: valid path and a two-element times array.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

/// mknod for fifos, sockets and device nodes.
pub fn mknod(p: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(p)?;
    // SAFETY: valid path.
    check(unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
