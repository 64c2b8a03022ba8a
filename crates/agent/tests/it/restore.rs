//! Restores and repository maintenance through the real binary and restic:
//! a tree with every kind of file comes back byte for byte with its
//! metadata; sub-path and in-place restores; refusals; policies sharing a
//! repository; prune alongside queued backups; and the repository-only
//! restore that needs no agent.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::servers::RcloneRest;
use crate::support::{count_state, fill, restic, AgentProc, BIN};

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr {}", path.display());
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: buffer and length match.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut val = vec![0u8; 4096];
        // SAFETY: as above.
        let len = unsafe { libc::lgetxattr(p.as_ptr(), cname.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if len >= 0 {
            val.truncate(len as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), val);
        }
    }
    out
}

fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let t = libc::timespec { tv_sec: secs, tv_nsec: nanos };
    let times = [t, t];
    // SAFETY: valid path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0);
}

/// A tree with every kind of entry a volume may hold.
pub(crate) fn build_tree(root: &Path) {
    std::fs::create_dir_all(root.join("dir/sub")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    fill(&root.join("dir/sub"), 5, 70_000);
    std::fs::write(root.join("small.txt"), "hello\n").unwrap();
    std::fs::write(root.join("zero"), "").unwrap();
    std::fs::write(root.join("dir/with space;and'quotes\""), "odd name").unwrap();
    std::os::unix::fs::symlink("dir/sub/f00000", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling-link")).unwrap();
    std::fs::hard_link(root.join("small.txt"), root.join("dir/hardlink.txt")).unwrap();
    std::fs::set_permissions(root.join("small.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(root.join("dir/sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(root.join("zero"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(root.join("rel-link"), Some(4321), Some(8765)).unwrap();
    set_xattr(&root.join("small.txt"), "user.origin", b"soda-syncer test");
    set_mtime(&root.join("zero"), 1_600_000_000, 123_456_789);
    set_mtime(&root.join("empty"), 1_500_000_000, 0);
}

#[derive(Debug, PartialEq)]
pub(crate) struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    content: Vec<u8>,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    nlink: u64,
}

/// Every entry below `root` (relative path → what it is), directories'
/// mtimes included except the root's own.
pub(crate) fn snapshot_tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = p.symlink_metadata().unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else {
                "file"
            };
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                Entry {
                    kind,
                    mode: m.mode(),
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime: if kind == "dir" && p.read_dir().map(|mut r| r.next().is_some()).unwrap_or(false) {
                        (0, 0)
                    } else {
                        (m.mtime(), m.mtime_nsec())
                    },
                    content: if kind == "file" { std::fs::read(&p).unwrap() } else { Vec::new() },
                    link: if kind == "symlink" { Some(std::fs::read_link(&p).unwrap()) } else { None },
                    xattrs: if kind == "symlink" { BTreeMap::new() } else { xattrs(&p) },
                    nlink: if kind == "file" { m.nlink() } else { 0 },
                },
            );
        }
    }
    out
}

async fn run_to_end(agent: &AgentProc, policy: &str, path: &str, body: Option<Value>) -> Value {
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

struct Setup {
    tmp: tempfile::TempDir,
    rest: RcloneRest,
    agent: AgentProc,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let rest = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    Setup { tmp, rest, agent }
}

async fn backed_up_policy(s: &Setup, name: &str, source: &Path, repo: &str, extra: Value) -> String {
    let mut body = json!({"name": name, "source": {"path": source}, "repository": {"url": repo, "password": "restore-pw"}, "schedule": {"intervalSeconds": 3600}});
    soda_syncer_domain::policy::merge_patch(&mut body, &extra);
    let p = s.agent.create_policy(body).await;
    let id = p["id"].as_str().unwrap().to_string();
    s.agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") >= 1).await;
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tree_with_every_file_kind_restores_byte_for_byte_with_its_metadata() {
    let s = setup();
    let src = s.tmp.path().join("volume");
    build_tree(&src);
    let id = backed_up_policy(&s, "tree", &src, &s.rest.url("tree"), json!({})).await;
    let target = s.tmp.path().join("restored");
    let run =
        run_to_end(&s.agent, &id, "restore", Some(json!({"snapshot": "latest", "target": target, "verify": true})))
            .await;
    assert_eq!(run["state"], "succeeded", "{run}\n{}", s.agent.log_text());
    assert_eq!(run["kind"], "restore");
    assert_eq!(run["progress"]["percentDone"], 1.0);
    let before = snapshot_tree(&src);
    let after = snapshot_tree(&target);
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    for (path, b) in &before {
        assert_eq!(Some(b), after.get(path), "{} differs", path.display());
    }
    let hl_a = std::fs::metadata(target.join("small.txt")).unwrap().ino();
    let hl_b = std::fs::metadata(target.join("dir/hardlink.txt")).unwrap().ino();
    assert_eq!(hl_a, hl_b, "hard links stay hard links");
    let root_mode = std::fs::metadata(&target).unwrap().mode();
    assert_eq!(root_mode, std::fs::metadata(&src).unwrap().mode(), "the volume root's mode");
}

#[tokio::test(flavor = "multi_thread")]
async fn include_restores_only_the_sub_path_and_a_full_target_is_refused() {
    let s = setup();
    let src = s.tmp.path().join("volume");
    build_tree(&src);
    let id = backed_up_policy(&s, "sub", &src, &s.rest.url("sub"), json!({})).await;
    let target = s.tmp.path().join("only-sub");
    let run = run_to_end(&s.agent, &id, "restore", Some(json!({"target": target, "include": ["dir/sub"]}))).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let mut names: Vec<String> = walk_names(&target);
    names.sort();
    assert_eq!(
        names,
        ["dir", "dir/sub", "dir/sub/f00000", "dir/sub/f00001", "dir/sub/f00002", "dir/sub/f00003", "dir/sub/f00004"]
    );

    let (st, v) = s.agent.call("POST", &format!("/v1/policies/{id}/restore"), Some(json!({"target": target}))).await;
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["error"]["code"], "target_not_empty");
    for (body, field) in [
        (json!({"snapshot": "nope!"}), "snapshot"),
        (json!({"include": ["../etc"]}), "include[0]"),
        (json!({"target": "relative"}), "target"),
        (json!({"inPlace": true, "target": "/elsewhere"}), "target"),
    ] {
        let (st, v) = s.agent.call("POST", &format!("/v1/policies/{id}/restore"), Some(body.clone())).await;
        assert_eq!(st, 422, "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{v}");
    }
}

fn walk_names(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            out.push(e.path().strip_prefix(root).unwrap().display().to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_place_restore_replaces_changed_and_missing_files() {
    let s = setup();
    let src = s.tmp.path().join("volume");
    build_tree(&src);
    let id = backed_up_policy(&s, "inplace", &src, &s.rest.url("inplace"), json!({})).await;
    let original = std::fs::read(src.join("dir/sub/f00001")).unwrap();
    std::fs::write(src.join("dir/sub/f00001"), "corrupted by the application").unwrap();
    std::fs::remove_file(src.join("small.txt")).unwrap();
    let run = run_to_end(&s.agent, &id, "restore", Some(json!({"inPlace": true}))).await;
    assert_eq!(run["state"], "succeeded", "{run}\n{}", s.agent.log_text());
    assert_eq!(std::fs::read(src.join("dir/sub/f00001")).unwrap(), original);
    assert_eq!(std::fs::read_to_string(src.join("small.txt")).unwrap(), "hello\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_policies_sharing_a_repository_keep_their_own_retention_and_prune_waits_for_backups() {
    let s = setup();
    let repo = s.rest.url("shared");
    let (a, b) = (s.tmp.path().join("a"), s.tmp.path().join("b"));
    fill(&a, 20, 10_000);
    fill(&b, 200, 512 * 1024);
    let pa = backed_up_policy(&s, "pa", &a, &repo, json!({"retention": {"keepLast": 1}})).await;
    let pb = backed_up_policy(&s, "pb", &b, &repo, json!({"retention": {"keepLast": 2}})).await;
    for _ in 0..2 {
        let run = run_to_end(&s.agent, &pa, "run", None).await;
        assert_eq!(run["state"], "succeeded");
        assert!(run["repositoryWaitMs"].is_u64(), "{run}");
        std::fs::write(b.join("change"), chrono::Utc::now().to_rfc3339()).unwrap();
        assert_eq!(run_to_end(&s.agent, &pb, "run", None).await["state"], "succeeded");
    }
    let out = restic(&repo, "restore-pw", &[], &["snapshots", "--json"]).unwrap();
    let snaps: Vec<Value> = serde_json::from_str(&out).unwrap();
    let count = |id: &str| snaps.iter().filter(|s| s["tags"].to_string().contains(&format!("policy={id}"))).count();
    assert_eq!((count(&pa), count(&pb)), (1, 2), "each policy's own keepLast");

    // A big backup of b, and a prune through a at the same time: the prune waits
    // for the backup (not fail on restic's lock), then runs alone.
    std::fs::write(b.join("f00000"), vec![7u8; 3_000_000]).unwrap();
    let (st, backup) = s.agent.call("POST", &format!("/v1/policies/{pb}/run"), None).await;
    assert_eq!(st, 202);
    let prune =
        run_to_end(&s.agent, &pa, "maintenance", Some(json!({"forget": true, "prune": true, "check": true}))).await;
    assert_eq!(prune["state"], "succeeded", "{prune}\n{}", s.agent.log_text());
    assert_eq!(prune["kind"], "prune");
    let runs = s
        .agent
        .wait_runs(&pb, 60, "b's backup", |r| r.iter().any(|r| r["id"] == backup["id"] && r["state"] == "succeeded"))
        .await;
    let b_run = runs.iter().find(|r| r["id"] == backup["id"]).unwrap();
    assert_eq!(b_run["error"], Value::Null, "the backup waited for the prune instead of failing on its lock");
    // Whichever took the repository second says how long it waited.
    let waits = (prune["repositoryWaitMs"].as_u64(), b_run["repositoryWaitMs"].as_u64());
    assert!(matches!(waits, (Some(p), Some(b)) if p > 0 || b > 0), "one of them waited: {waits:?}");
    assert!(s.agent.log_text().contains("waiting for this agent's"), "and the log says so");
    assert!(!s.agent.log_text().contains("removing stale locks"), "no restic lock conflict happened at all");
    restic(&repo, "restore-pw", &[], &["check"]).expect("restic check is clean");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_only_restore_works_after_the_state_directory_is_gone() {
    let mut s = setup();
    let src = s.tmp.path().join("volume");
    build_tree(&src);
    let repo = s.rest.url("lost");
    let id = backed_up_policy(&s, "lost", &src, &repo, json!({})).await;
    s.agent.kill9();
    std::fs::remove_dir_all(s.tmp.path().join("state")).unwrap();
    let pw = s.tmp.path().join("pw");
    std::fs::write(&pw, "restore-pw\n").unwrap();

    let out = Command::new(BIN)
        .args(["snapshots", "--repo", &repo, "--password-file"])
        .arg(&pw)
        .args(["--output", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["snapshots"][0]["policy"], id);
    assert_eq!(listed["snapshots"][0]["hostname"], "test-node");

    let target = s.tmp.path().join("recovered");
    let out = Command::new(BIN)
        .args(["restore", "--repo", &repo, "--password-file"])
        .arg(&pw)
        .args(["--snapshot", "latest", "--host", "test-node", "--target"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(snapshot_tree(&src), snapshot_tree(&target));
    // A non-empty target is refused, and nothing there is touched.
    let out = Command::new(BIN)
        .args(["restore", "--repo", &repo, "--password-file"])
        .arg(&pw)
        .args(["--target"])
        .arg(&target)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    s.rest.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_follows_a_run_and_prints_json_without_a_progress_bar() {
    let s = setup();
    let src = s.tmp.path().join("volume");
    fill(&src, 50, 100_000);
    let id = backed_up_policy(&s, "cli", &src, &s.rest.url("cli"), json!({})).await;
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["--server", &s.agent.url, "--agent-state-dir"])
            .arg(&s.agent.state_dir)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = cli(&["run", "cli", "--follow", "--output", "json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let run: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(run["state"], "succeeded");
    assert_eq!(run["policyId"], id.as_str());
    assert!(!stderr.contains('['), "no progress bar when stderr is not a terminal: {stderr:?}");

    let target = s.tmp.path().join("via-cli");
    let (code, stdout, stderr) =
        cli(&["restore", "cli", "--target", target.to_str().unwrap(), "--follow", "-o", "yaml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("state: succeeded"), "yaml: {stdout}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 50);

    let (code, stdout, _) = cli(&["snapshots", "cli"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("ID"), "{stdout}");
    let (code, _, stderr) = cli(&["run", "no-such-policy"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("policy_not_found"), "{stderr}");
    let (code, _, _) = cli(&["run"]);
    assert_eq!(code, Some(2), "bad usage");
    let (code, stdout, stderr) = cli(&[
        "policy",
        "create",
        "--name",
        "made-by-cli",
        "--source",
        src.to_str().unwrap(),
        "--interval",
        "600",
        "--keep-last",
        "3",
        "--paused",
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let made: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (made["schedule"]["intervalSeconds"].as_u64(), made["retention"]["keepLast"].as_u64()),
        (Some(600), Some(3))
    );
    let (code, stdout, stderr) = cli(&[
        "policy",
        "edit",
        "made-by-cli",
        "--cron",
        "0 */6 * * *",
        "--timezone",
        "UTC",
        "--keep-daily",
        "7",
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let edited: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(edited["schedule"], json!({"cron": "0 */6 * * *", "timezone": "UTC"}));
    assert_eq!(edited["retention"], json!({"keepLast": 3, "keepDaily": 7}));
    let (code, _, stderr) = cli(&["policy", "create", "--name", "bad", "--source", "/nonexistent", "--interval", "60"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("does not exist"), "{stderr}");
    let (code, stdout, _) = cli(&["completions", "bash"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("soda-syncer"));
}

#[tokio::test(flavor = "multi_thread")]
async fn restored_snapshots_come_from_the_run_records_unless_the_repository_holds_one_they_do_not_know() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rest = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    // restic through a wrapper that logs each command, to see which ran.
    let calls = tmp.path().join("calls");
    let wrapper = tmp.path().join("restic");
    let real = crate::servers::which("restic").unwrap();
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\necho \"$1\" >> '{}'\nexec '{}' \"$@\"\n", calls.display(), real.display()),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = AgentProc::start(&tmp.path().join("state"), &["--restic", wrapper.to_str().unwrap()]).unwrap();
    let src = tmp.path().join("volume");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), "one").unwrap();
    let repo = rest.url("latest");
    let p = agent
        .create_policy(json!({"name": "latest", "source": {"path": src}, "paused": true,
                              "repository": {"url": repo, "password": "restore-pw"},
                              "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let mut backups = Vec::new();
    for content in ["one", "two"] {
        std::fs::write(src.join("a.txt"), content).unwrap();
        let run = run_to_end(&agent, &id, "run", None).await;
        assert_eq!(run["state"], "succeeded", "{run}");
        backups.push(run["snapshotId"].as_str().unwrap().to_string());
    }
    let snapshots_calls = || std::fs::read_to_string(&calls).unwrap().lines().filter(|l| *l == "snapshots").count();

    // Every snapshot in the repository is one the agent recorded: no `restic snapshots`.
    let before = snapshots_calls();
    let target = tmp.path().join("t1");
    let run = run_to_end(&agent, &id, "restore", Some(json!({"target": target}))).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(run["snapshotId"], backups[1].as_str());
    assert_eq!(std::fs::read_to_string(target.join("a.txt")).unwrap(), "two");
    assert_eq!(snapshots_calls(), before, "latest came from the run records");
    // So does a snapshot named by (a prefix of) its id.
    let target = tmp.path().join("t0");
    let run = run_to_end(&agent, &id, "restore", Some(json!({"snapshot": &backups[0][..8], "target": target}))).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(run["snapshotId"], backups[0].as_str());
    assert_eq!(std::fs::read_to_string(target.join("a.txt")).unwrap(), "one");
    assert_eq!(snapshots_calls(), before, "the snapshot came from the run records");

    // A newer snapshot of the policy written elsewhere (another node, say):
    // the records no longer describe the repository, so restic is asked.
    std::fs::write(src.join("a.txt"), "three").unwrap();
    let out = restic(
        &repo,
        "restore-pw",
        &[],
        &["backup", "--host", "other-node", "--tag", &format!("policy={id}"), "--", src.to_str().unwrap()],
    )
    .unwrap();
    assert!(out.contains("snapshot"), "{out}");
    let target = tmp.path().join("t2");
    let run = run_to_end(&agent, &id, "restore", Some(json!({"target": target}))).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert!(!backups.contains(&run["snapshotId"].as_str().unwrap().to_string()), "{run}");
    assert_eq!(std::fs::read_to_string(target.join("a.txt")).unwrap(), "three");
    assert_eq!(snapshots_calls(), before + 1, "restic was asked for the latest snapshot");
    rest.stop();
}

/// The restic the agent will find (first on PATH): (minor, "0.x.y").
fn restic_on_path() -> (u32, String) {
    let out = Command::new("restic").arg("version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text.split_whitespace().nth(1).unwrap_or_default().to_string();
    let minor = version.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap_or(0);
    (minor, version)
}

/// restic 0.18+: the agent restores in place with restic's own restore.
fn restores_in_place_natively() -> bool {
    restic_on_path().0 >= 18
}

/// What an application does to its volume after the snapshot.
fn change_after_the_snapshot(src: &Path) {
    std::fs::write(src.join("dir/sub/f00001"), "corrupted by the application").unwrap();
    std::fs::remove_file(src.join("zero")).unwrap();
    std::fs::remove_dir(src.join("empty")).unwrap();
    std::fs::write(src.join("new-file"), "created after the snapshot").unwrap();
    std::fs::create_dir_all(src.join("new-dir/deeper")).unwrap();
    std::fs::write(src.join("new-dir/deeper/file"), "x").unwrap();
    std::os::unix::fs::symlink("elsewhere", src.join("new-link")).unwrap();
    std::fs::set_permissions(src.join("dir/sub"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(src.join("small.txt"), Some(42), Some(42)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_place_restore_with_delete_leaves_exactly_the_snapshot_or_names_the_restic_it_needs() {
    let s = setup();
    let src = s.tmp.path().join("volume");
    build_tree(&src);
    let id = backed_up_policy(&s, "exact", &src, &s.rest.url("exact"), json!({})).await;
    let snapshot = snapshot_tree(&src);
    change_after_the_snapshot(&src);
    let (_, version) = restic_on_path();
    if !restores_in_place_natively() {
        let (st, v) = s
            .agent
            .call("POST", &format!("/v1/policies/{id}/restore"), Some(json!({"inPlace": true, "delete": true})))
            .await;
        assert_eq!(st, 422, "{v}");
        assert_eq!(v["error"]["field"], "delete", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("0.17") && message.contains(&version), "names 0.17 and {version}: {message}");
        return;
    }
    let run = run_to_end(&s.agent, &id, "restore", Some(json!({"inPlace": true, "delete": true}))).await;
    assert_eq!(run["state"], "succeeded", "{run}\n{}", s.agent.log_text());
    let after = snapshot_tree(&src);
    assert_eq!(snapshot.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "the same entries");
    for (path, want) in &snapshot {
        assert_eq!(Some(want), after.get(path), "{} differs", path.display());
    }
    // And as diff sees it, against a plain restore of the same snapshot.
    let fresh = s.tmp.path().join("fresh");
    let plain = run_to_end(&s.agent, &id, "restore", Some(json!({"target": fresh}))).await;
    assert_eq!(plain["state"], "succeeded", "{plain}");
    let diff = Command::new("diff").args(["-r", "--no-dereference"]).arg(&src).arg(&fresh).output().unwrap();
    assert!(diff.status.success(), "{}", String::from_utf8_lossy(&diff.stdout));
    // restic's own counts (restore --json): something written, the four
    // entries made after the snapshot deleted.
    let summary = &run["summary"];
    assert!(summary["filesRestored"].as_u64().unwrap() >= 2, "{summary}");
    assert!(summary["filesDeleted"].as_u64().unwrap() >= 3, "{summary}");
    assert!(summary["filesSkipped"].as_u64().unwrap() >= 5, "unchanged files are not rewritten: {summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_lists_what_an_in_place_restore_would_change_and_the_cli_asks_before_deleting() {
    let s = setup();
    let src = s.tmp.path().join("volume");
    build_tree(&src);
    let id = backed_up_policy(&s, "preview", &src, &s.rest.url("preview"), json!({})).await;
    let snapshot = snapshot_tree(&src);
    change_after_the_snapshot(&src);
    let changed = crate::paths::fingerprint(&src);
    let (_, version) = restic_on_path();
    if !restores_in_place_natively() {
        let (st, v) = s
            .agent
            .call("POST", &format!("/v1/policies/{id}/restore"), Some(json!({"inPlace": true, "dryRun": true})))
            .await;
        assert_eq!(st, 422, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(&version), "{v}");
        return;
    }
    let run =
        run_to_end(&s.agent, &id, "restore", Some(json!({"inPlace": true, "delete": true, "dryRun": true}))).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let p = &run["summary"]["restorePreview"];
    let listed = |k: &str| p[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert!(listed("overwrite").contains(&"dir/sub/f00001".to_string()), "{p}");
    assert!(listed("restore").contains(&"zero".to_string()), "{p}");
    for gone in ["new-file", "new-dir", "new-link"] {
        assert!(listed("delete").iter().any(|d| d == gone), "{gone}: {p}");
    }
    assert!(p["bytesToWrite"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(crate::paths::fingerprint(&src), changed, "a dry run writes nothing");
    // Without delete, nothing is listed for deletion.
    let run = run_to_end(&s.agent, &id, "restore", Some(json!({"inPlace": true, "dryRun": true}))).await;
    assert_eq!(run["summary"]["restorePreview"]["filesToDelete"], 0, "{run}");
    let (st, v) = s.agent.call("POST", &format!("/v1/policies/{id}/restore"), Some(json!({"delete": true}))).await;
    assert_eq!((st, v["error"]["field"].as_str()), (422, Some("delete")), "delete goes with inPlace: {v}");

    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["--server", &s.agent.url, "--agent-state-dir"])
            .arg(&s.agent.state_dir)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = cli(&["restore", "preview", "--in-place", "--dry-run"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("overwrite") && stderr.contains("dir/sub/f00001"), "{stderr}");
    let (code, stderr) = cli(&["restore", "preview", "--in-place", "--delete", "--follow"]);
    assert_eq!(code, Some(1), "no terminal to ask on, no --yes: {stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");
    assert_eq!(crate::paths::fingerprint(&src), changed, "nothing was restored");
    let (code, stderr) = cli(&["restore", "preview", "--in-place", "--delete", "--yes", "--follow"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(snapshot_tree(&src), snapshot, "the volume is the snapshot again");
}

/// A small ext4 filesystem on a loop device, unmounted and detached on drop.
struct SmallFs {
    device: String,
    mnt: PathBuf,
}

impl SmallFs {
    fn new(image: &Path, mb: u64, mnt: &Path) -> SmallFs {
        std::fs::File::create(image).unwrap().set_len(mb << 20).unwrap();
        let out = Command::new("losetup").args(["--find", "--show"]).arg(image).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let fs = SmallFs { device: device.clone(), mnt: mnt.to_path_buf() };
        assert!(Command::new("mkfs.ext4").args(["-q", "-m", "0", &device]).status().unwrap().success());
        std::fs::create_dir_all(mnt).unwrap();
        assert!(Command::new("mount").arg(&device).arg(mnt).status().unwrap().success());
        fs
    }

    fn free(&self) -> u64 {
        let c = CString::new(self.mnt.as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs is plain old data; a valid path and out pointer.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bfree as u64 * st.f_frsize as u64
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount").arg(&self.mnt).output().is_ok_and(|o| o.status.success()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_place_restore_on_a_nearly_full_volume_writes_only_what_differs_or_is_refused_naming_the_device() {
    // The issue's case: 24 MB of data, 6 MB free, 5 of 25 files corrupted.
    let s = setup();
    let mnt = s.tmp.path().join("small");
    let fs = SmallFs::new(&s.tmp.path().join("small.img"), 40, &mnt);
    let src = mnt.join("data");
    fill(&src, 25, 960 * 1024);
    let ballast = fs.free().saturating_sub(6 << 20);
    std::fs::write(mnt.join("ballast"), vec![1u8; ballast as usize]).unwrap();
    let id = backed_up_policy(&s, "full", &src, &s.rest.url("full"), json!({})).await;
    let originals: Vec<Vec<u8>> = (0..5).map(|i| std::fs::read(src.join(format!("f{i:05}"))).unwrap()).collect();
    for i in 0..5 {
        std::fs::write(src.join(format!("f{i:05}")), vec![0xeeu8; 960 * 1024]).unwrap();
    }
    let run = run_to_end(&s.agent, &id, "restore", Some(json!({"inPlace": true}))).await;
    if restores_in_place_natively() {
        assert_eq!(run["state"], "succeeded", "{run}\n{}", s.agent.log_text());
        for (i, want) in originals.iter().enumerate() {
            assert_eq!(&std::fs::read(src.join(format!("f{i:05}"))).unwrap(), want, "f{i:05}");
        }
        let written = run["summary"]["bytesRestored"].as_u64().unwrap();
        assert_eq!(written, 5 * 960 * 1024, "only the corrupted files were written: {run}");
    } else {
        // The staging restore needs the whole snapshot beside the volume:
        // refused before writing, naming the device and the sizes.
        assert_eq!(run["state"], "failed", "{run}");
        assert_eq!(run["error"]["code"], "disk_full", "{run}");
        let message = run["error"]["message"].as_str().unwrap();
        assert!(message.contains(&fs.device) && message.contains("ext4"), "names the device: {message}");
        assert!(message.contains("nothing was written") && message.contains("MiB"), "{message}");
        assert!(message.contains("restic 0.18"), "says what would fit: {message}");
        assert_eq!(std::fs::read(src.join("f00000")).unwrap(), vec![0xeeu8; 960 * 1024], "untouched");
        let left: Vec<_> = std::fs::read_dir(&src)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".soda-syncer-restore"))
            .collect();
        assert!(left.is_empty(), "no staging directory left");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_that_runs_out_of_space_names_the_filesystem_that_filled_up() {
    // A sub-path restore is not measured beforehand: restic meets the full
    // disk, and the error says which filesystem it was (not the repository).
    let s = setup();
    let src = s.tmp.path().join("volume");
    fill(&src.join("big"), 12, 1 << 20);
    let id = backed_up_policy(&s, "enospc", &src, &s.rest.url("enospc"), json!({})).await;
    let mnt = s.tmp.path().join("small");
    let fs = SmallFs::new(&s.tmp.path().join("small.img"), 16, &mnt);
    let ballast = fs.free().saturating_sub(4 << 20);
    std::fs::write(mnt.join("ballast"), vec![1u8; ballast as usize]).unwrap();
    let target = mnt.join("restored");
    let run = run_to_end(&s.agent, &id, "restore", Some(json!({"target": target, "include": ["big"]}))).await;
    assert_eq!(run["state"], "failed", "{run}");
    assert_eq!(run["error"]["code"], "disk_full", "{run}");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(message.contains(&fs.device) && message.contains("the restore's target"), "{message}");
    assert!(!message.contains("the repository, or the cache"), "{message}");
}
