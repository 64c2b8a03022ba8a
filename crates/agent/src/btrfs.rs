//! What the agent asks btrfs directly, by ioctl on a held directory: the
//! committed generation of a subvolume (which proves "unchanged" without a
//! walk, see `scheduler::verify`), its child subvolumes, and the items a
//! subvolume's tree changed since a generation (as `btrfs subvolume
//! find-new` finds them; the btrfs consistency method's freeze uses them).
//!
//! Layouts are those of the kernel's uapi `linux/btrfs.h` and
//! `linux/btrfs_tree.h`; each ioctl number encodes its argument's size,
//! and the sizes are checked at compile time below.

use std::io;
use std::os::fd::RawFd;

/// `f_type` of a btrfs filesystem (statfs).
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// The inode number of every subvolume's root directory.
pub const FIRST_FREE_OBJECTID: u64 = 256;
const IOCTL_MAGIC: u64 = 0x94;

const fn ioc(dir: u64, nr: u64, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u64) << 16) | (IOCTL_MAGIC << 8) | nr) as libc::c_ulong
}
const IOC_READ: u64 = 2;
const IOC_WRITE: u64 = 1;

/// `struct btrfs_ioctl_get_subvol_info_args` (504 bytes).
#[repr(C)]
struct SubvolInfo {
    treeid: u64,
    name: [u8; 256],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    /// ctime, otime, stime, rtime: `struct btrfs_ioctl_timespec { u64 sec; u32 nsec; }`, padded to 16.
    times: [[u64; 2]; 4],
    reserved: [u64; 8],
}
const _: () = assert!(std::mem::size_of::<SubvolInfo>() == 504);
/// `_IOR(BTRFS_IOCTL_MAGIC, 60, struct btrfs_ioctl_get_subvol_info_args)`.
const IOC_GET_SUBVOL_INFO: libc::c_ulong = ioc(IOC_READ, 60, std::mem::size_of::<SubvolInfo>());

/// `struct btrfs_ioctl_get_subvol_rootref_args` (4096 bytes).
#[repr(C)]
struct RootRefs {
    min_treeid: u64,
    rootref: [[u64; 2]; 255],
    num_items: u8,
    align: [u8; 7],
}
const _: () = assert!(std::mem::size_of::<RootRefs>() == 4096);
/// `_IOWR(BTRFS_IOCTL_MAGIC, 61, struct btrfs_ioctl_get_subvol_rootref_args)`.
const IOC_GET_SUBVOL_ROOTREF: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, 61, std::mem::size_of::<RootRefs>());

const _: () = assert!(IOC_GET_SUBVOL_INFO == 0x81F8_943C && IOC_GET_SUBVOL_ROOTREF == 0xD000_943D);

/// One subvolume at one committed generation. The UUID tells a subvolume
/// from another made at the same path (a re-created volume, a snapshot
/// put in its place), whose generation numbers mean nothing against the
/// first one's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubvolumeGeneration {
    pub tree_id: u64,
    pub uuid: [u8; 16],
    pub generation: u64,
}

impl SubvolumeGeneration {
    /// `btrfs:<tree id>:<uuid hex>:<generation>`, as stored with a basis.
    pub fn encode(&self) -> String {
        let uuid: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!("btrfs:{}:{uuid}:{}", self.tree_id, self.generation)
    }

    pub fn parse(s: &str) -> Option<SubvolumeGeneration> {
        let mut it = s.strip_prefix("btrfs:")?.split(':');
        let tree_id = it.next()?.parse().ok()?;
        let hex = it.next()?;
        let generation = it.next()?.parse().ok()?;
        if it.next().is_some() || hex.len() != 32 {
            return None;
        }
        let mut uuid = [0u8; 16];
        for (i, b) in uuid.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(SubvolumeGeneration { tree_id, uuid, generation })
    }
}

/// Why a directory's subvolume generation proves nothing about it.
#[derive(Debug, thiserror::Error)]
pub enum NoGeneration {
    #[error("not on btrfs")]
    NotBtrfs,
    #[error("not the root directory of a btrfs subvolume")]
    NotSubvolumeRoot,
    #[error("it holds {0} nested subvolume(s), whose changes do not move its generation")]
    NestedSubvolumes(usize),
    #[error("{0} is mounted inside it, and a mount does not move its generation")]
    MountInside(String),
    #[error("cannot {op}: {source}")]
    Io { op: &'static str, source: io::Error },
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> NoGeneration {
    move |source| NoGeneration::Io { op, source }
}

/// The committed generation of the subvolume whose root directory `fd`
/// is, after a `syncfs` (data written but not committed does not move it
/// yet), provided nothing inside can change without moving it: no nested
/// subvolume and no mount below `real_path` (the directory's path in the
/// agent's mount namespace).
pub fn committed_generation(fd: RawFd, real_path: &[u8]) -> Result<SubvolumeGeneration, NoGeneration> {
    // SAFETY: fstatfs and statx fill plain structs; zeroed values are valid.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and an out pointer.
    if unsafe { libc::fstatfs(fd, &mut sfs) } != 0 {
        return Err(io_err("statfs")(io::Error::last_os_error()));
    }
    if sfs.f_type as i64 != BTRFS_SUPER_MAGIC {
        return Err(NoGeneration::NotBtrfs);
    }
    // SAFETY: as above.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and an out pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io_err("stat")(io::Error::last_os_error()));
    }
    if st.st_ino != FIRST_FREE_OBJECTID {
        return Err(NoGeneration::NotSubvolumeRoot);
    }
    // Commits the running transaction: every write made before this call
    // is then in a generation at most the one read below, and every later
    // one lands in a later generation.
    // SAFETY: syncfs only reads the fd.
    if unsafe { libc::syncfs(fd) } != 0 {
        return Err(io_err("syncfs")(io::Error::last_os_error()));
    }
    let info = subvol_info(fd)?;
    let nested = child_subvolumes(fd)?;
    if nested > 0 {
        return Err(NoGeneration::NestedSubvolumes(nested));
    }
    if let Some(m) = mount_below(real_path).map_err(io_err("read /proc/self/mountinfo"))? {
        return Err(NoGeneration::MountInside(m));
    }
    Ok(SubvolumeGeneration { tree_id: info.treeid, uuid: info.uuid, generation: info.generation })
}

fn subvol_info(fd: RawFd) -> Result<SubvolInfo, NoGeneration> {
    // SAFETY: plain old data; zeroed is valid.
    let mut info: SubvolInfo = unsafe { std::mem::zeroed() };
    // Success is any rc >= 0: some kernels return a leftover positive
    // value of an internal search (measured here: rc 1, errno 0), so only
    // a negative rc is an error; errno means nothing otherwise.
    // SAFETY: the ioctl writes exactly size_of::<SubvolInfo>() bytes, which its number encodes.
    if unsafe { libc::ioctl(fd, IOC_GET_SUBVOL_INFO as _, &mut info as *mut SubvolInfo) } < 0 {
        return Err(io_err("read the subvolume's generation (BTRFS_IOC_GET_SUBVOL_INFO)")(io::Error::last_os_error()));
    }
    Ok(info)
}

/// How many subvolumes sit directly inside the subvolume `fd` is on
/// (anywhere in its tree).
fn child_subvolumes(fd: RawFd) -> Result<usize, NoGeneration> {
    // SAFETY: plain old data; zeroed is valid (min_treeid 0: from the first).
    let mut refs: RootRefs = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl reads and writes exactly size_of::<RootRefs>() bytes.
    let rc = unsafe { libc::ioctl(fd, IOC_GET_SUBVOL_ROOTREF as _, &mut refs as *mut RootRefs) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // More than fit in one call: many, which is all that matters here.
        if e.raw_os_error() == Some(libc::EOVERFLOW) {
            return Ok(refs.rootref.len());
        }
        return Err(io_err("list nested subvolumes (BTRFS_IOC_GET_SUBVOL_ROOTREF)")(e));
    }
    Ok(refs.num_items as usize)
}

/// The first mount point strictly below `dir`, from /proc/self/mountinfo.
fn mount_below(dir: &[u8]) -> io::Result<Option<String>> {
    let text = std::fs::read("/proc/self/mountinfo")?;
    let dir = dir.strip_suffix(b"/").unwrap_or(dir);
    for line in text.split(|b| *b == b'\n') {
        let Some(field) = line.split(|b| *b == b' ').nth(4) else { continue };
        let point = unescape(field);
        if point.len() > dir.len() && point.starts_with(dir) && point[dir.len()] == b'/' {
            return Ok(Some(String::from_utf8_lossy(&point).into_owned()));
        }
    }
    Ok(None)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 3 < s.len() && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_generation_round_trips_and_garbage_is_none() {
        let g = SubvolumeGeneration { tree_id: 256, uuid: [0xab; 16], generation: 4711 };
        assert_eq!(SubvolumeGeneration::parse(&g.encode()), Some(g));
        for bad in ["", "btrfs:", "btrfs:256:abab:1", "zfs:256:abababababababababababababababab:1", "btrfs:x:ab:1"] {
            assert_eq!(SubvolumeGeneration::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(br"/a\040b\134c"), b"/a b\\c");
        assert_eq!(unescape(br"/a\04"), br"/a\04");
    }
}
