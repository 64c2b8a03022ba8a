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
pub fn mount_below(dir: &[u8]) -> io::Result<Option<String>> {
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

/// `struct btrfs_ioctl_search_key` (104 bytes).
#[repr(C)]
#[derive(Default)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: [u64; 4],
}
const _: () = assert!(std::mem::size_of::<SearchKey>() == 104);

/// `struct btrfs_ioctl_search_args`: the key, then items as
/// `struct btrfs_ioctl_search_header` (32 bytes) + data.
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; 4096 - 104],
}
/// `_IOWR(BTRFS_IOCTL_MAGIC, 17, struct btrfs_ioctl_search_args)`.
const IOC_TREE_SEARCH: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, 17, std::mem::size_of::<SearchArgs>());

/// `struct btrfs_ioctl_ino_lookup_args` (4096 bytes).
#[repr(C)]
struct InoLookup {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}
/// `_IOWR(BTRFS_IOCTL_MAGIC, 18, struct btrfs_ioctl_ino_lookup_args)`.
const IOC_INO_LOOKUP: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, 18, std::mem::size_of::<InoLookup>());
const _: () = assert!(IOC_TREE_SEARCH == 0xD000_9411 && IOC_INO_LOOKUP == 0xD000_9412);

/// The transaction a subvolume (a snapshot) was created in: its content is
/// its source's as that transaction committed.
pub fn created_in(fd: RawFd) -> io::Result<u64> {
    subvol_info(fd).map(|i| i.otransid).map_err(|e| match e {
        NoGeneration::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    })
}

/// The inodes of the subvolume `fd` is the root of that have any item
/// (inode, name, extended attribute, directory entry, file extent) in a
/// tree block written in transaction `since` or later: a superset of every
/// inode changed since then, as `btrfs subvolume find-new` searches.
/// `None` when more than `limit` (the caller walks instead). Needs
/// CAP_SYS_ADMIN.
pub fn changed_inodes(fd: RawFd, since: u64, limit: usize) -> io::Result<Option<std::collections::BTreeSet<u64>>> {
    let mut out = std::collections::BTreeSet::new();
    // SAFETY: plain old data; zeroed is valid.
    let mut args: SearchArgs = unsafe { std::mem::zeroed() };
    args.key = SearchKey {
        tree_id: 0, // the subvolume fd is in
        max_objectid: u64::MAX,
        max_offset: u64::MAX,
        min_transid: since,
        max_transid: u64::MAX,
        max_type: 255,
        ..Default::default()
    };
    loop {
        args.key.nr_items = 4096;
        // SAFETY: the ioctl reads and writes exactly size_of::<SearchArgs>() bytes.
        if unsafe { libc::ioctl(fd, IOC_TREE_SEARCH as _, &mut args as *mut SearchArgs) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = args.key.nr_items;
        if n == 0 {
            return Ok(Some(out));
        }
        let mut pos = 0usize;
        let mut last = (0u64, 0u32, 0u64);
        for _ in 0..n {
            let h = args.buf.get(pos..pos + 32).ok_or_else(|| io::Error::other("short search result"))?;
            let word = |i: usize| u64::from_ne_bytes(h[i..i + 8].try_into().expect("8 bytes"));
            let (objectid, offset) = (word(8), word(16));
            let kind = u32::from_ne_bytes(h[24..28].try_into().expect("4 bytes"));
            let len = u32::from_ne_bytes(h[28..32].try_into().expect("4 bytes")) as usize;
            pos += 32 + len;
            last = (objectid, kind, offset);
            // Inodes are 256 up to BTRFS_LAST_FREE_OBJECTID (-256); the
            // rest are the tree's own (the orphan list, the free-ino cache).
            if (FIRST_FREE_OBJECTID..=u64::MAX - 255).contains(&objectid) {
                out.insert(objectid);
                if out.len() > limit {
                    return Ok(None);
                }
            }
        }
        // Go on after the last key returned (objectid, type, offset order).
        let (o, t, off) = last;
        if off < u64::MAX {
            (args.key.min_objectid, args.key.min_type, args.key.min_offset) = (o, t, off + 1);
        } else if t < 255 {
            (args.key.min_objectid, args.key.min_type, args.key.min_offset) = (o, t + 1, 0);
        } else if o < u64::MAX {
            (args.key.min_objectid, args.key.min_type, args.key.min_offset) = (o + 1, 0, 0);
        } else {
            return Ok(Some(out));
        }
    }
}

/// The path of inode `ino` below the root of the subvolume `fd` is the
/// root of (one of its names, if it has several); `None` when it has no
/// name any more (removed).
pub fn inode_path(fd: RawFd, ino: u64) -> io::Result<Option<std::path::PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain old data; zeroed is valid.
    let mut args: InoLookup = unsafe { std::mem::zeroed() };
    args.objectid = ino;
    // SAFETY: the ioctl reads and writes exactly size_of::<InoLookup>() bytes.
    if unsafe { libc::ioctl(fd, IOC_INO_LOOKUP as _, &mut args as *mut InoLookup) } < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(e) };
    }
    let len = args.name.iter().position(|b| *b == 0).unwrap_or(args.name.len());
    // "a/b/" for a/b; "" for the root.
    let name = args.name[..len].strip_suffix(b"/").unwrap_or(&args.name[..len]);
    Ok(Some(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(name))))
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
