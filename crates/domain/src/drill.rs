//! Restore drills: which files of a snapshot to restore and check. A drill
//! proves a backup can be restored without waiting for the day it must be:
//! a sample of files (or all of them) is restored from the newest snapshot
//! into a scratch directory, checked by restic against the repository's
//! content hashes (`restore --verify`), and compared with the snapshot's
//! own listing (type, size, permissions), never with the live volume,
//! which has moved on since.

use crate::restic_json::LsNode;

/// Whether `restore --include` can name this path literally: restic's
/// include patterns are globs, so paths with glob characters are left out
/// of samples (and counted as skipped).
pub fn includable(path: &str) -> bool {
    !path.contains(['*', '?', '[', ']', '\\']) && !path.contains('\n')
}

/// Up to `count` regular files (0: all), chosen pseudo-randomly from
/// `seed` (the run's id, so a drill can be replayed), whose sizes add up to
/// at most `max_bytes`. Returns the chosen files and how many files were
/// left out only because of their names.
pub fn sample(nodes: &[LsNode], count: usize, max_bytes: u64, seed: &str) -> (Vec<LsNode>, usize) {
    let mut files: Vec<&LsNode> = nodes.iter().filter(|n| n.kind == "file").collect();
    let before = files.len();
    files.retain(|n| includable(&n.path));
    let skipped = before - files.len();
    // A deterministic shuffle: rank each path by a hash of seed and path.
    let rank = |p: &str| {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in seed.bytes().chain([0]).chain(p.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h
    };
    files.sort_by_key(|n| rank(&n.path));
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for n in files {
        if count != 0 && out.len() >= count {
            break;
        }
        if bytes + n.size > max_bytes {
            continue; // a smaller file may still fit
        }
        bytes += n.size;
        out.push(n.clone());
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> LsNode {
        LsNode {
            name: path.rsplit('/').next().unwrap().into(),
            kind: "file".into(),
            path: path.into(),
            size,
            mode: 0o644,
        }
    }

    #[test]
    fn samples_are_capped_repeatable_and_differ_by_seed() {
        let nodes: Vec<LsNode> = (0..100).map(|i| file(&format!("/v/f{i}"), 10)).collect();
        let (a, _) = sample(&nodes, 10, u64::MAX, "run-1");
        let (b, _) = sample(&nodes, 10, u64::MAX, "run-1");
        let (c, _) = sample(&nodes, 10, u64::MAX, "run-2");
        assert_eq!(a.len(), 10);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let (all, _) = sample(&nodes, 0, 55, "x");
        assert_eq!(all.len(), 5, "the byte cap holds");
    }

    #[test]
    fn glob_characters_and_non_files_are_left_out() {
        let mut nodes = vec![file("/v/ok", 1), file("/v/a[1]", 1), file("/v/*", 1)];
        nodes.push(LsNode { kind: "dir".into(), ..file("/v/d", 0) });
        let (s, skipped) = sample(&nodes, 0, u64::MAX, "x");
        assert_eq!(s.len(), 1);
        assert_eq!(skipped, 2);
    }
}
