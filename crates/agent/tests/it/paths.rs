//! Path safety at the moment of use (issue 22), with the real binary as
//! root and the real restic: a workload that controls its volume (and its
//! parents) swaps names for links, plants links, hard links, FIFOs and
//! device nodes, and the agent must neither write nor read outside its
//! allowed roots. Each test fingerprints a sentinel directory outside the
//! roots (`/var/tmp`, on the same filesystem as `/tmp`, so hard links to it
//! are possible) before and after.
//!
//! Runs with whatever restic is first on PATH; scripts/test runs this
//! module once per restic version.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{children_named, count_state, restic, AgentProc};

/// A directory outside the allowed roots, removed on drop.
pub struct Sentinel {
    pub dir: PathBuf,
}

impl Sentinel {
    pub fn new() -> Sentinel {
        let dir = PathBuf::from(format!("/var/tmp/soda-syncer-sentinel-{}", std::process::id()))
            .join(format!("{:x}", rand_u64()));
        std::fs::create_dir_all(dir.join("etc/ssh")).unwrap();
        std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        std::fs::write(dir.join("etc/ssh/sshd_config"), "PermitRootLogin no\n").unwrap();
        std::fs::write(dir.join("secret"), "host secret\n").unwrap();
        std::fs::create_dir_all(dir.join("empty")).unwrap();
        Sentinel { dir }
    }

    /// Everything below the directory: kind, mode, owner, size, times, content.
    pub fn fingerprint(&self) -> BTreeMap<PathBuf, String> {
        fingerprint(&self.dir)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).unwrap();
    u64::from_ne_bytes(b)
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

pub fn fingerprint(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = p.symlink_metadata().unwrap();
            let what = if m.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_file() {
                format!("file fnv={:016x}", fnv(&std::fs::read(&p).unwrap()))
            } else {
                "special".to_string()
            };
            // (Not the link count: removing a planted hard link from the
            // volume changes it, and rightly so.)
            let desc = format!(
                "{what} mode={:o} uid={} gid={} size={} mtime={}.{}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.mtime(),
                m.mtime_nsec()
            );
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), desc);
        }
    }
    out
}

pub async fn run_to_end(agent: &AgentProc, policy: &str, path: &str, body: Option<Value>) -> Value {
    let (st, run) = agent.call("POST", &format!("/v1/policies/{policy}/{path}"), body).await;
    assert_eq!(st, 202, "{run}\n{}", agent.log_text());
    let id = run["id"].as_str().unwrap().to_string();
    let runs = agent
        .wait_runs(policy, 120, &format!("the {path} run"), |r| {
            r.iter().any(|r| r["id"] == id.as_str() && r["state"] != "queued" && r["state"] != "running")
        })
        .await;
    runs.into_iter().find(|r| r["id"] == id.as_str()).unwrap()
}

/// A restic wrapper: `script` (sh) runs first, with $1.. as restic's
/// arguments, then the real restic.
pub fn restic_wrapper(dir: &Path, script: &str) -> PathBuf {
    let real = crate::servers::which("restic").unwrap();
    let wrapper = dir.join("restic-wrapper");
    std::fs::write(&wrapper, format!("#!/bin/sh\n{script}\nexec '{}' \"$@\"\n", real.display())).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

pub struct Case {
    _tmp: tempfile::TempDir,
    pub agent: AgentProc,
    pub sentinel: Sentinel,
    pub srv: PathBuf,
    pub repo: PathBuf,
}

pub fn case(wrapper_script: Option<&str>) -> Case {
    case_with(|_, _| wrapper_script.map(str::to_string))
}

/// As `case`, with a restic wrapper script made from the paths of the
/// case (the volumes' parent directory and the sentinel).
pub fn case_with(script: impl FnOnce(&Path, &Path) -> Option<String>) -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let sentinel = Sentinel::new();
    let srv = tmp.path().join("srv");
    std::fs::create_dir_all(&srv).unwrap();
    let mut args: Vec<String> = Vec::new();
    if let Some(script) = script(&srv, &sentinel.dir) {
        args.push("--restic".into());
        args.push(restic_wrapper(tmp.path(), &script).display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = AgentProc::start(&tmp.path().join("state"), &args).unwrap();
    let repo = tmp.path().join("repo");
    Case { sentinel, srv, repo, agent, _tmp: tmp }
}

/// A volume with a few files at some depth.
pub fn volume(dir: &Path) {
    std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
    std::fs::write(dir.join("top.txt"), "top").unwrap();
    std::fs::write(dir.join("a/one.txt"), "one").unwrap();
    std::fs::write(dir.join("a/b/two.txt"), "two").unwrap();
    std::fs::write(dir.join("a/b/c/three.txt"), "three").unwrap();
    std::fs::write(dir.join("passwd"), "the volume's own passwd").unwrap();
    std::fs::write(dir.join("secret"), "the volume's own secret").unwrap();
    std::fs::write(dir.join("data.bin"), "the volume's own data").unwrap();
}

pub async fn backed_up_policy(c: &Case, name: &str, source: &Path) -> String {
    let p = c
        .agent
        .create_policy(json!({"name": name, "source": {"path": source},
            "repository": {"url": c.repo, "password": "paths-pw"}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let runs = c
        .agent
        .wait_runs(&id, 60, "the first backup", |r| r.iter().any(|r| r["state"] != "queued" && r["state"] != "running"))
        .await;
    assert_eq!(count_state(&runs, "succeeded"), 1, "{runs:?}\n{}", c.agent.log_text());
    id
}

fn swap_for_link(path: &Path, to: &Path) {
    std::fs::rename(path, path.with_extension("moved")).unwrap();
    symlink(to, path).unwrap();
}

fn error_of(run: &Value) -> (String, String) {
    (
        run["error"]["code"].as_str().unwrap_or_default().to_string(),
        run["error"]["message"].as_str().unwrap_or_default().to_string(),
    )
}

/// The names every snapshot of the repository holds.
fn names_in_latest(c: &Case) -> String {
    restic(c.repo.to_str().unwrap(), "paths-pw", &[], &["ls", "latest"]).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_place_restore_of_a_volume_swapped_for_a_link_is_refused_and_writes_nothing() {
    let c = case(None);
    let vol = c.srv.join("vol");
    volume(&vol);
    let id = backed_up_policy(&c, "swapped", &vol).await;
    // The issue's probe: the volume replaced by a link to a host directory.
    swap_for_link(&vol, &c.sentinel.dir.join("etc"));
    let before = c.sentinel.fingerprint();

    let run = run_to_end(&c.agent, &id, "restore", Some(json!({"inPlace": true}))).await;
    assert_eq!(run["state"], "failed", "{run}");
    let (code, message) = error_of(&run);
    assert_eq!(code, "target_not_allowed", "{run}");
    assert!(message.contains(&vol.display().to_string()) && message.contains("symbolic link"), "{message}");
    assert!(message.contains("nothing was written"), "{message}");
    assert_eq!(c.sentinel.fingerprint(), before, "nothing changed outside the allowed roots");

    // A backup in the same situation is refused too, naming the link.
    let run = run_to_end(&c.agent, &id, "run", None).await;
    assert_eq!(run["state"], "failed", "{run}");
    let (code, message) = error_of(&run);
    assert_eq!(code, "source_not_allowed", "{run}");
    assert!(message.contains("symbolic link") && message.contains(&vol.display().to_string()), "{message}");
    assert_eq!(c.sentinel.fingerprint(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parent_of_the_volume_swapped_for_a_link_is_refused_for_backups_and_restores() {
    let c = case(None);
    let pods = c.srv.join("pods");
    let vol = pods.join("passwd-vol");
    volume(&vol);
    let id = backed_up_policy(&c, "parent", &vol).await;
    // The parent now leads to a host directory that has a directory of the
    // volume's name, so the name still resolves to a directory.
    std::fs::create_dir_all(c.sentinel.dir.join("passwd-vol")).unwrap();
    std::fs::write(c.sentinel.dir.join("passwd-vol/host-file"), "host").unwrap();
    swap_for_link(&pods, &c.sentinel.dir);
    let before = c.sentinel.fingerprint();

    let run = run_to_end(&c.agent, &id, "restore", Some(json!({"inPlace": true}))).await;
    let (code, message) = error_of(&run);
    assert_eq!((run["state"].as_str(), code.as_str()), (Some("failed"), "target_not_allowed"), "{run}");
    assert!(message.contains(&format!("{} is a symbolic link", pods.display())), "{message}");
    let run = run_to_end(&c.agent, &id, "run", None).await;
    let (code, message) = error_of(&run);
    assert_eq!((run["state"].as_str(), code.as_str()), (Some("failed"), "source_not_allowed"), "{run}");
    assert!(message.contains(&format!("{} is a symbolic link", pods.display())), "{message}");
    assert_eq!(c.sentinel.fingerprint(), before);
    assert!(!names_in_latest(&c).contains("host-file"), "no host file was read");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_target_swapped_for_a_link_after_the_request_is_refused() {
    // Two policies on one repository: b's prune holds the repository (restic
    // is slowed down for it), so a's restore waits, and meanwhile its empty
    // target is swapped for a link to a host directory.
    let c = case(Some(r#"if [ "$1" = prune ]; then sleep 3; fi"#));
    let (va, vb) = (c.srv.join("a"), c.srv.join("b"));
    volume(&va);
    volume(&vb);
    let a = backed_up_policy(&c, "a", &va).await;
    let b = backed_up_policy(&c, "b", &vb).await;
    let target = c.srv.join("restored");
    std::fs::create_dir_all(&target).unwrap();
    let (st, prune) =
        c.agent.call("POST", &format!("/v1/policies/{b}/maintenance"), Some(json!({"prune": true}))).await;
    assert_eq!(st, 202, "{prune}");
    c.agent
        .wait_runs(&b, 30, "the prune to start", |r| {
            r.iter().any(|r| r["id"] == prune["id"] && r["state"] == "running")
        })
        .await;
    // Running is set before the prune holds the repository: wait for its
    // restic, which runs only while it does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !children_named(c.agent.pid(), "restic-wrapper").iter().any(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| cmd.split(|b| *b == 0).any(|a| a == b"prune"))
    }) {
        assert!(std::time::Instant::now() < deadline, "the prune's restic did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (st, restore) =
        c.agent.call("POST", &format!("/v1/policies/{a}/restore"), Some(json!({"target": target}))).await;
    assert_eq!(st, 202, "the target is fine when asked: {restore}");
    swap_for_link(&target, &c.sentinel.dir.join("empty"));
    let before = c.sentinel.fingerprint();
    let runs = c
        .agent
        .wait_runs(&a, 60, "the restore", |r| r.iter().any(|r| r["id"] == restore["id"] && r["state"] == "failed"))
        .await;
    let run = runs.iter().find(|r| r["id"] == restore["id"]).unwrap();
    let (code, message) = error_of(run);
    assert_eq!(code, "target_not_allowed", "{run}");
    assert!(message.contains(&format!("{} is a symbolic link", target.display())), "{message}");
    assert_eq!(c.sentinel.fingerprint(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_volume_swapped_while_restic_starts_is_harmless_and_restic_follows_no_link_inside() {
    // The wrapper runs where restic would, after the agent's check: it
    // records what it sees through the volume's path (a link inside the
    // volume, to the sentinel), then swaps the volume for a link to the
    // sentinel in the agent's own mount namespace, then starts restic.
    let c = case_with(|srv, sentinel| {
        let vol = srv.join("vol");
        Some(format!(
            r#"if [ "$1" = backup ] && [ ! -e '{srv}/seen' ]; then
  cat '{vol}/inner-link/secret' > '{srv}/seen' 2>&1
  nsenter -t "$PPID" -m -- sh -c "mv '{vol}' '{vol}.moved' && ln -s '{sentinel}' '{vol}'" >>'{srv}/seen' 2>&1
fi"#,
            srv = srv.display(),
            vol = vol.display(),
            sentinel = sentinel.display()
        ))
    });
    let vol = c.srv.join("vol");
    let sentinel = c.sentinel.dir.clone();
    volume(&vol);
    symlink(&sentinel, vol.join("inner-link")).unwrap();
    let before = c.sentinel.fingerprint();
    let p = c
        .agent
        .create_policy(json!({"name": "race", "source": {"path": vol},
            "repository": {"url": c.repo, "password": "paths-pw"}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let runs = c
        .agent
        .wait_runs(&id, 60, "the backup", |r| r.iter().any(|r| r["state"] != "queued" && r["state"] != "running"))
        .await;
    let seen = std::fs::read_to_string(c.srv.join("seen")).unwrap();
    assert!(seen.contains("Too many levels of symbolic links"), "restic's view follows no link: {seen}");
    assert!(!seen.contains("host secret"), "{seen}");
    assert!(vol.is_symlink(), "the swap happened: {seen}");
    // Whatever the run says, the snapshot holds no host file.
    if let Ok(listing) = restic(c.repo.to_str().unwrap(), "paths-pw", &[], &["ls", "latest"]) {
        assert!(!listing.contains("sshd_config"), "no host file was read: {listing}\n{runs:?}");
    }
    assert_eq!(c.sentinel.fingerprint(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_dot_in_include_paths_is_refused() {
    let c = case(None);
    let vol = c.srv.join("vol");
    volume(&vol);
    let id = backed_up_policy(&c, "dots", &vol).await;
    for inc in ["../etc", "a/../../etc", "a/./b", "/etc", "a/..", ".."] {
        let (st, v) = c
            .agent
            .call("POST", &format!("/v1/policies/{id}/restore"), Some(json!({"inPlace": true, "include": [inc]})))
            .await;
        assert_eq!(st, 422, "{inc}: {v}");
        assert_eq!(v["error"]["field"], "include[0]", "{v}");
    }
    // What a name with dots in it, but no '..' component, does is fine.
    std::fs::write(vol.join("a/..hidden"), "x").unwrap();
    let run = run_to_end(&c.agent, &id, "restore", Some(json!({"inPlace": true, "include": ["a/b"]}))).await;
    assert_eq!(run["state"], "succeeded", "{run}");
}

/// Make `target` hostile: links at several depths to the sentinel, a hard
/// link to a sentinel file, a FIFO and a device node.
fn plant(target: &Path, sentinel: &Path, device: Option<(u32, u32)>) {
    // depth 1: a directory of the snapshot replaced by a link
    std::fs::remove_dir_all(target.join("a")).unwrap();
    symlink(sentinel.join("etc"), target.join("a")).unwrap();
    // a file of the snapshot replaced by a link to a host file
    std::fs::remove_file(target.join("top.txt")).unwrap();
    symlink(sentinel.join("secret"), target.join("top.txt")).unwrap();
    // a hard link to a host file where the snapshot has a file
    std::fs::remove_file(target.join("secret")).unwrap();
    std::fs::hard_link(sentinel.join("secret"), target.join("secret")).unwrap();
    // a FIFO where the snapshot has a file
    std::fs::remove_file(target.join("passwd")).unwrap();
    let st = Command::new("mkfifo").arg(target.join("passwd")).status().unwrap();
    assert!(st.success());
    if let Some((major, minor)) = device {
        // a device node of a host disk: beside the snapshot's files, and
        // where the snapshot has a file
        std::fs::create_dir_all(target.join("dev")).unwrap();
        std::fs::remove_file(target.join("data.bin")).unwrap();
        for node in ["dev/disk", "data.bin"] {
            let st = Command::new("mknod")
                .arg(target.join(node))
                .args(["b", &major.to_string(), &minor.to_string()])
                .status()
                .unwrap();
            assert!(st.success());
        }
    }
}

/// A loop device over a file in the sentinel: writing through a device
/// node of it would change the sentinel.
pub struct LoopDev {
    pub device: String,
    pub major_minor: (u32, u32),
}

impl LoopDev {
    pub fn new(image: &Path) -> LoopDev {
        std::fs::write(image, vec![0x5au8; 1 << 20]).unwrap();
        let out = Command::new("losetup").args(["-f", "--show"]).arg(image).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let rdev = std::fs::metadata(&device).unwrap().rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        LoopDev { device, major_minor: (major, minor) }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_place_restore_replaces_planted_links_hard_links_fifos_and_device_nodes_without_following_them() {
    let c = case(None);
    let vol = c.srv.join("vol");
    volume(&vol);
    let id = backed_up_policy(&c, "planted", &vol).await;
    let disk = LoopDev::new(&c.sentinel.dir.join("disk.img"));
    plant(&vol, &c.sentinel.dir, Some(disk.major_minor));
    let before = c.sentinel.fingerprint();

    let run = run_to_end(&c.agent, &id, "restore", Some(json!({"inPlace": true}))).await;
    assert_eq!(run["state"], "succeeded", "{run}\n{}", c.agent.log_text());
    assert_eq!(c.sentinel.fingerprint(), before, "nothing outside changed");
    for (rel, content) in [
        ("top.txt", "top"),
        ("a/one.txt", "one"),
        ("a/b/two.txt", "two"),
        ("a/b/c/three.txt", "three"),
        ("secret", "the volume's own secret"),
        ("passwd", "the volume's own passwd"),
        ("data.bin", "the volume's own data"),
    ] {
        let m = vol.join(rel).symlink_metadata().unwrap();
        assert!(m.is_file(), "{rel} is a regular file again");
        assert_eq!(m.nlink(), 1, "{rel} is no longer a hard link to a host file");
        assert_eq!(std::fs::read_to_string(vol.join(rel)).unwrap(), content, "{rel}");
    }
    assert!(vol.join("a").symlink_metadata().unwrap().is_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn links_planted_at_every_depth_of_an_in_place_target_are_replaced_not_followed() {
    let c = case(None);
    let vol = c.srv.join("vol");
    volume(&vol);
    let id = backed_up_policy(&c, "depths", &vol).await;
    for depth in ["a", "a/b", "a/b/c"] {
        let _ = std::fs::remove_dir_all(vol.join("a"));
        let _ = std::fs::remove_file(vol.join("a"));
        std::fs::create_dir_all(vol.join("a/b/c")).unwrap();
        std::fs::remove_dir_all(vol.join(depth)).unwrap();
        symlink(c.sentinel.dir.join("etc"), vol.join(depth)).unwrap();
        let before = c.sentinel.fingerprint();
        let run = run_to_end(&c.agent, &id, "restore", Some(json!({"inPlace": true}))).await;
        assert_eq!(run["state"], "succeeded", "{depth}: {run}");
        assert_eq!(c.sentinel.fingerprint(), before, "{depth}: nothing outside changed");
        assert!(vol.join(depth).symlink_metadata().unwrap().is_dir(), "{depth}");
        assert_eq!(std::fs::read_to_string(vol.join("a/b/c/three.txt")).unwrap(), "three", "{depth}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drill_whose_scratch_directory_is_a_planted_link_is_refused() {
    let c = case(None);
    let vol = c.srv.join("vol");
    volume(&vol);
    let id = backed_up_policy(&c, "drill-link", &vol).await;
    let drills = c.agent.state_dir.join("drills");
    let _ = std::fs::remove_dir_all(&drills);
    symlink(&c.sentinel.dir, &drills).unwrap();
    let before = c.sentinel.fingerprint();
    let run = run_to_end(&c.agent, &id, "drill", None).await;
    assert_eq!(run["state"], "failed", "{run}");
    let (_, message) = error_of(&run);
    assert!(message.contains(&format!("{} is a symbolic link", drills.display())), "{message}");
    assert_eq!(c.sentinel.fingerprint(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drill_of_a_snapshot_holding_fifos_device_nodes_and_links_is_harmless() {
    let c = case(None);
    let vol = c.srv.join("vol");
    volume(&vol);
    let disk = LoopDev::new(&c.sentinel.dir.join("disk.img"));
    std::fs::create_dir_all(vol.join("dev")).unwrap();
    let (major, minor) = disk.major_minor;
    let st = Command::new("mknod")
        .arg(vol.join("dev/disk"))
        .args(["b", &major.to_string(), &minor.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(Command::new("mkfifo").arg(vol.join("fifo")).status().unwrap().success());
    symlink(c.sentinel.dir.join("secret"), vol.join("link-to-host")).unwrap();
    let id = backed_up_policy(&c, "drill-special", &vol).await;
    let before = c.sentinel.fingerprint();
    let run = run_to_end(&c.agent, &id, "drill", None).await;
    assert_eq!(run["state"], "succeeded", "{run}\n{}", c.agent.log_text());
    assert_eq!(c.sentinel.fingerprint(), before);
    assert!(!c.agent.state_dir.join("drills").join(run["id"].as_str().unwrap()).exists(), "scratch removed");
}
