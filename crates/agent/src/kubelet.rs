//! The kubelet's volume directories: which CSI volumes are mounted on this
//! node right now. Read from disk (no API server needed), the way the
//! legacy route's "every CSI volume on this node" is defined:
//! `<root>/pods/<podUID>/volumes/kubernetes.io~csi/<pv>/mount`, with the
//! PV name and driver from the `vol_data.json` beside `mount`.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One CSI volume mounted for a pod on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsiVolume {
    /// The PV name (`specVolID`), or the directory name when vol_data.json is missing.
    pub pv: String,
    pub driver: Option<String>,
    pub pod_uid: String,
    pub mount: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolData {
    #[serde(default)]
    spec_vol_id: Option<String>,
    #[serde(default)]
    driver_name: Option<String>,
    #[serde(default)]
    volume_lifecycle_mode: Option<String>,
}

/// Kubelet roots of the common distributions, in the order they are tried.
/// Sources: Velero's file-system-backup docs (RKE, Nutanix, TKGI), the
/// MicroK8s and k0s docs; kubeadm, k3s and rke2 use the upstream default.
pub const KNOWN_ROOTS: [(&str, &str); 6] = [
    ("kubeadm, k3s, rke2, kind", "/var/lib/kubelet"),
    ("k0s", "/var/lib/k0s/kubelet"),
    ("microk8s", "/var/snap/microk8s/common/var/lib/kubelet"),
    ("rke", "/opt/rke/var/lib/kubelet"),
    ("nutanix", "/var/nutanix/var/lib/kubelet"),
    ("tkgi", "/var/vcap/data/kubelet"),
];

/// Where the kubelet root came from, for /readyz.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// `--kubelet-dir` (or the config file).
    Configured,
    /// Found on disk; the distribution it is typical of.
    Detected(&'static str),
    /// Nothing found: the upstream default, which may not exist.
    Default,
}

/// The first candidate root with a `pods` directory holding pods; failing
/// that, the first with a `pods` directory at all.
pub fn detect_root(candidates: &[(&'static str, &str)]) -> Option<(PathBuf, &'static str)> {
    let pods = |root: &str| std::fs::read_dir(Path::new(root).join("pods")).ok().map(|d| d.count());
    candidates
        .iter()
        .find(|(_, r)| pods(r).is_some_and(|n| n > 0))
        .or_else(|| candidates.iter().find(|(_, r)| pods(r).is_some()))
        .map(|(name, r)| (PathBuf::from(r), *name))
}

/// Mount points of this process's mount namespace, from /proc/self/mountinfo.
pub fn mount_points() -> std::collections::HashSet<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape_mountinfo(p))).collect()
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every persistent CSI volume mounted under `kubelet_root`, one entry per
/// PV (a volume used by two pods on this node is listed once, at the first
/// pod's path in sorted order). With `require_mountpoints`, a `mount`
/// directory that is not a mount point (the kubelet left it behind, or the
/// volume is being torn down) does not count: backing it up would record an
/// empty snapshot.
pub fn scan_csi_volumes(kubelet_root: &Path, require_mountpoints: bool) -> Vec<CsiVolume> {
    let mounts = if require_mountpoints { Some(mount_points()) } else { None };
    let mut by_pv: BTreeMap<String, CsiVolume> = BTreeMap::new();
    let Ok(pods) = std::fs::read_dir(kubelet_root.join("pods")) else {
        return Vec::new();
    };
    let mut pods: Vec<_> = pods.flatten().map(|e| e.path()).collect();
    pods.sort();
    for pod in pods {
        let pod_uid = pod.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Ok(vols) = std::fs::read_dir(pod.join("volumes").join("kubernetes.io~csi")) else {
            continue;
        };
        let mut vols: Vec<_> = vols.flatten().map(|e| e.path()).collect();
        vols.sort();
        for dir in vols {
            let mount = dir.join("mount");
            if !mount.is_dir() {
                continue;
            }
            if let Some(m) = &mounts {
                let canonical = std::fs::canonicalize(&mount).unwrap_or_else(|_| mount.clone());
                if !m.contains(&canonical) {
                    continue;
                }
            }
            let data: Option<VolData> =
                std::fs::read(dir.join("vol_data.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
            if data.as_ref().and_then(|d| d.volume_lifecycle_mode.as_deref()) == Some("Ephemeral") {
                // Inline ephemeral volumes live and die with their pod: not a PV to protect.
                continue;
            }
            let pv = data
                .as_ref()
                .and_then(|d| d.spec_vol_id.clone())
                .unwrap_or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            by_pv.entry(pv.clone()).or_insert(CsiVolume {
                pv,
                driver: data.and_then(|d| d.driver_name),
                pod_uid: pod_uid.clone(),
                mount,
            });
        }
    }
    by_pv.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(root: &Path, pod: &str, pv: &str, vol_data: Option<&str>) -> PathBuf {
        let dir = root.join("pods").join(pod).join("volumes/kubernetes.io~csi").join(pv);
        std::fs::create_dir_all(dir.join("mount")).unwrap();
        if let Some(v) = vol_data {
            std::fs::write(dir.join("vol_data.json"), v).unwrap();
        }
        dir.join("mount")
    }

    #[test]
    fn csi_volumes_are_found_with_their_pv_and_driver() {
        let root = tempfile::tempdir().unwrap();
        volume(
            root.path(),
            "uid-1",
            "pvc-a",
            Some(r#"{"specVolID":"pvc-a","driverName":"hostpath.csi.k8s.io","volumeLifecycleMode":"Persistent"}"#),
        );
        volume(root.path(), "uid-2", "pvc-b", None);
        volume(root.path(), "uid-3", "inline", Some(r#"{"specVolID":"inline","volumeLifecycleMode":"Ephemeral"}"#));
        // The same PV used by a second pod on this node is listed once.
        volume(root.path(), "uid-4", "pvc-a", Some(r#"{"specVolID":"pvc-a","driverName":"hostpath.csi.k8s.io"}"#));
        std::fs::create_dir_all(root.path().join("pods/uid-5/volumes/kubernetes.io~empty-dir/cache")).unwrap();
        let vols = scan_csi_volumes(root.path(), false);
        let names: Vec<_> = vols.iter().map(|v| (v.pv.as_str(), v.pod_uid.as_str(), v.driver.as_deref())).collect();
        assert_eq!(names, vec![("pvc-a", "uid-1", Some("hostpath.csi.k8s.io")), ("pvc-b", "uid-2", None)]);
    }

    #[test]
    fn directories_that_are_not_mount_points_do_not_count_when_required() {
        let root = tempfile::tempdir().unwrap();
        volume(root.path(), "uid-1", "pvc-a", None);
        assert!(scan_csi_volumes(root.path(), true).is_empty());
    }

    #[test]
    fn a_missing_kubelet_root_means_no_volumes() {
        assert!(scan_csi_volumes(Path::new("/nonexistent/kubelet"), false).is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
    }
}

#[cfg(test)]
mod root_tests {
    use super::*;

    #[test]
    fn the_root_with_pods_wins_and_nothing_found_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(a.join("pods")).unwrap();
        std::fs::create_dir_all(b.join("pods/uid-1")).unwrap();
        let (a, b) = (a.display().to_string(), b.display().to_string());
        let missing = dir.path().join("none").display().to_string();
        let found = detect_root(&[("x", &missing), ("a", &a), ("b", &b)]).unwrap();
        assert_eq!(found, (PathBuf::from(&b), "b"));
        let found = detect_root(&[("x", &missing), ("a", &a)]).unwrap();
        assert_eq!(found.1, "a");
        assert!(detect_root(&[("x", &missing)]).is_none());
    }
}
