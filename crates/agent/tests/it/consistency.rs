//! Point-in-time consistency on real filesystems on loop devices, with the
//! real agent binary and the real restic.
//!
//! A writer keeps an invariant across an SQLite database and 50 plain files
//! (each transaction moves money between accounts, logs the transfer and
//! bumps a generation; then the 50 files are overwritten with that
//! generation, in order), without pause, while the agent backs up every
//! second. Every snapshot is restored and must show a state a crash could
//! have left: `integrity_check` passes, the money adds up, and the files
//! read as "generation g up to some file, g-1 after it" where g is the
//! database's. The same writer backed up with mode `none` shows that the
//! check can fail. Then the safety paths: kill -9 during a freeze, a failing
//! hook, a freeze past maxFreezeMs, cancellation: the filesystem is writable
//! afterwards and nothing is left behind.

use rusqlite::Connection;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{children_named, count_state, fill, restic, AgentProc};

// ---------------------------------------------------------------- helpers

pub(crate) fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn is_mount_point(p: &Path) -> bool {
    let s = p.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(s.as_str()))
}

/// A filesystem on a loop device, mounted; unmounted, detached and removed
/// on drop (declare inner ones after outer ones: they drop first).
pub(crate) struct LoopFs {
    image: PathBuf,
    device: String,
    mnt: PathBuf,
}

impl LoopFs {
    pub(crate) fn new(image: &Path, size: &str, mkfs: &[&str], mnt: &Path) -> LoopFs {
        sh(&["truncate", "-s", size, image.to_str().unwrap()]);
        let device = sh(&["losetup", "--find", "--show", image.to_str().unwrap()]);
        let fs = LoopFs { image: image.to_path_buf(), device: device.clone(), mnt: mnt.to_path_buf() };
        let mut args = mkfs.to_vec();
        args.push(&device);
        sh(&args);
        std::fs::create_dir_all(mnt).unwrap();
        sh(&["mount", &device, mnt.to_str().unwrap()]);
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Never leave a test filesystem frozen (EINVAL when it is not).
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mnt).output();
        for _ in 0..50 {
            if !is_mount_point(&self.mnt) {
                break;
            }
            if Command::new("umount").arg(&self.mnt).output().is_ok_and(|o| o.status.success()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if is_mount_point(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
        let _ = std::fs::remove_file(&self.image);
    }
}

const FILES: usize = 50;
const ACCOUNTS: i64 = 100;
const TOTAL: i64 = ACCOUNTS * 1000;

/// The writer: transactions and files, without pause, until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        std::fs::create_dir_all(dir).unwrap();
        let db = Connection::open(dir.join("bank.db")).unwrap();
        db.pragma_update(None, "journal_mode", "WAL").unwrap();
        db.pragma_update(None, "synchronous", "NORMAL").unwrap();
        db.execute_batch(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
             CREATE TABLE transfers (gen INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER);
             CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
             INSERT INTO meta VALUES ('gen', 0);",
        )
        .unwrap();
        for id in 0..ACCOUNTS {
            db.execute("INSERT INTO accounts VALUES (?1, 1000)", [id]).unwrap();
        }
        let files: Vec<std::fs::File> = (0..FILES)
            .map(|i| {
                let f = std::fs::File::create(dir.join(format!("f{i:03}"))).unwrap();
                f.write_all_at(format!("{:020}\n", 0).as_bytes(), 0).unwrap();
                f
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut db = db;
            let mut gen: i64 = 0;
            let mut x: u64 = 0x2545F4914F6CDD1D;
            while !stop2.load(Ordering::Relaxed) {
                gen += 1;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (a, b, amount) =
                    ((x % ACCOUNTS as u64) as i64, ((x >> 20) % ACCOUNTS as u64) as i64, (x >> 40) % 50);
                let tx = db.transaction().unwrap();
                tx.execute("UPDATE accounts SET balance = balance - ?2 WHERE id = ?1", (a, amount)).unwrap();
                tx.execute("UPDATE accounts SET balance = balance + ?2 WHERE id = ?1", (b, amount)).unwrap();
                tx.execute("INSERT INTO transfers VALUES (?1, ?2, ?3, ?4)", (gen, a, b, amount)).unwrap();
                tx.execute("UPDATE meta SET v = ?1 WHERE k = 'gen'", [gen]).unwrap();
                tx.commit().unwrap();
                // After the commit: the files say this generation, in order.
                let line = format!("{gen:020}\n");
                for f in &files {
                    f.write_all_at(line.as_bytes(), 0).unwrap();
                }
            }
            gen as u64
        });
        Writer { stop, handle: Some(handle) }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().map(|h| h.join().unwrap()).unwrap_or(0)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Whether a restored directory holds a state a crash could have left.
/// Returns the database's generation.
fn check_state(dir: &Path) -> Result<i64, String> {
    let db = Connection::open(dir.join("bank.db")).map_err(|e| format!("open: {e}"))?;
    let integrity: String =
        db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(|e| format!("integrity_check: {e}"))?;
    if integrity != "ok" {
        return Err(format!("integrity_check: {integrity}"));
    }
    let sum: i64 = db.query_row("SELECT sum(balance) FROM accounts", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    let gen: i64 = db.query_row("SELECT v FROM meta WHERE k = 'gen'", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    let transfers: i64 = db.query_row("SELECT count(*) FROM transfers", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    if sum != TOTAL || transfers != gen {
        return Err(format!(
            "database invariant broken: sum {sum} (want {TOTAL}), {transfers} transfers at generation {gen}"
        ));
    }
    let files: Vec<i64> = (0..FILES)
        .map(|i| {
            let s = std::fs::read_to_string(dir.join(format!("f{i:03}"))).unwrap_or_default();
            s.trim().parse::<i64>().unwrap_or(-1)
        })
        .collect();
    // Generation g (the database's) up to some file, g-1 after it.
    let k = files.iter().take_while(|v| **v == gen).count();
    let ok = files[k..].iter().all(|v| *v == gen - 1 && gen > 0) || k == FILES;
    if !ok {
        return Err(format!("files torn against the database (generation {gen}): {files:?}"));
    }
    Ok(gen)
}

/// Restore each snapshot (two at a time) and check it.
fn verify_snapshots(
    repo: &str,
    password: &str,
    ids: &[String],
    source: &Path,
    scratch: &Path,
) -> Vec<Result<i64, String>> {
    let chunks: Vec<Vec<(usize, String)>> = {
        let indexed: Vec<(usize, String)> = ids.iter().cloned().enumerate().collect();
        let mid = indexed.len().div_ceil(2);
        vec![indexed[..mid].to_vec(), indexed[mid..].to_vec()]
    };
    let mut results: Vec<(usize, Result<i64, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|(i, id)| {
                            let target = scratch.join(format!("r{i}"));
                            let r =
                                restic(repo, password, &[], &["restore", &id, "--target", target.to_str().unwrap()])
                                    .map_err(|e| e.to_string())
                                    .and_then(|_| check_state(&target.join(source.strip_prefix("/").unwrap())));
                            let _ = std::fs::remove_dir_all(&target);
                            (i, r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

fn local_repo(agent: &AgentProc) -> (String, String) {
    let repo = agent.state_dir.join("repository").display().to_string();
    let pw = std::fs::read_to_string(agent.state_dir.join("repository.password")).unwrap().trim().to_string();
    (repo, pw)
}

fn percentile(v: &[u64], p: usize) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((p * v.len()).div_ceil(100)).max(1) - 1]
}

/// Back up `source` (written to by the writer) every second with `mode`
/// until `n` backups succeeded; restore and check every snapshot.
/// Returns the runs, the check results and the agent's log.
async fn back_up_under_writes(
    tmp: &Path,
    source: &Path,
    consistency: Value,
    n: usize,
) -> (Vec<Value>, Vec<Result<i64, String>>, String) {
    let agent = AgentProc::start(&tmp.join("state"), &[]).unwrap();
    let mut writer = Writer::start(source);
    std::thread::sleep(Duration::from_millis(200));
    let p = agent
        .create_policy(json!({
            "name": "bank", "source": {"path": source},
            "schedule": {"intervalSeconds": 1},
            "consistency": consistency,
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let runs = agent
        .wait_runs(&id, 240, &format!("{n} backups"), |r| {
            count_state(r, "succeeded") >= n || count_state(r, "failed") > 2
        })
        .await;
    agent.call("POST", &format!("/v1/policies/{id}/pause"), None).await;
    assert!(count_state(&runs, "failed") <= 2, "{}", serde_json::to_string_pretty(&runs).unwrap());
    // A run in flight at the pause ends on its own (under writes, too).
    let runs = agent
        .wait_runs(&id, 60, "the last run to end", |r| {
            r.iter().all(|r| r["state"] != "running" && r["state"] != "queued")
        })
        .await;
    let generations = writer.stop();
    let mut agent = agent;
    agent.terminate();
    let done: Vec<Value> = runs.into_iter().filter(|r| r["state"] == "succeeded").collect();
    assert!(generations > 100, "the writer made only {generations} transactions");
    let (repo, pw) = local_repo(&agent);
    let ids: Vec<String> = done.iter().map(|r| r["snapshotId"].as_str().unwrap().to_string()).collect();
    let scratch = tmp.join("restores");
    std::fs::create_dir_all(&scratch).unwrap();
    let results = verify_snapshots(&repo, &pw, &ids, source, &scratch);
    (done, results, agent.log_text())
}

fn report(method: &str, runs: &[Value]) {
    let freeze: Vec<u64> = runs.iter().filter_map(|r| r["consistency"]["freezeMs"].as_u64()).collect();
    let snap: Vec<u64> = runs.iter().filter_map(|r| r["consistency"]["snapshotMs"].as_u64()).collect();
    let secs: Vec<u64> =
        runs.iter().filter_map(|r| r["summary"]["totalDuration"].as_f64()).map(|s| (s * 1000.0) as u64).collect();
    eprintln!(
        "{method}: {} snapshots; freezeMs p50 {} p99 {}; snapshotMs p50 {} p99 {}; restic ms p50 {}",
        runs.len(),
        percentile(&freeze, 50),
        percentile(&freeze, 99),
        percentile(&snap, 50),
        percentile(&snap, 99),
        percentile(&secs, 50)
    );
}

async fn every_snapshot_is_consistent(tmp: &Path, source: &Path, method: &str) {
    let (runs, results, log) = back_up_under_writes(tmp, source, json!({"mode": "auto"}), 20).await;
    for r in &runs {
        assert_eq!(r["consistency"]["method"], method, "auto chose another method: {r}");
        assert!(r["consistency"]["pointInTime"].is_string(), "{r}");
        assert!(r["warning"].is_null(), "{r}");
    }
    report(method, &runs);
    let bad: Vec<(usize, &String)> =
        results.iter().enumerate().filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e))).collect();
    assert!(bad.is_empty(), "{} of {} snapshots are not consistent: {bad:?}", bad.len(), results.len());
    assert!(results.len() >= 20);
    if method == "btrfs" {
        // The freezes looked only at the inodes btrfs named as changed
        // (logged with how many), not at the whole tree: these snapshots
        // are what that path made.
        let scoped = log.lines().filter(|l| l.contains("changed_inodes_looked_at=")).count();
        eprintln!("btrfs: {scoped} of {} freezes used btrfs's changed inodes", runs.len());
        assert!(scoped * 2 >= runs.len(), "only {scoped} of {} freezes used btrfs's list:\n{log}", runs.len());
    }
}

// ---------------------------------------------------------------- consistency

#[tokio::test(flavor = "multi_thread")]
async fn auto_on_a_btrfs_subvolume_takes_snapshots_that_all_restore_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("btrfs");
    let _fs = LoopFs::new(&tmp.path().join("btrfs.img"), "512M", &["mkfs.btrfs", "-q"], &mnt);
    let source = mnt.join("vol");
    sh(&["btrfs", "subvolume", "create", source.to_str().unwrap()]);
    every_snapshot_is_consistent(tmp.path(), &source, "btrfs").await;
    // Nothing is left of the snapshots.
    let left: Vec<_> = std::fs::read_dir(&mnt).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("vol")], "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_on_an_xfs_directory_makes_reflink_copies_that_all_restore_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("xfs");
    let _fs = LoopFs::new(&tmp.path().join("xfs.img"), "512M", &["mkfs.xfs", "-q", "-m", "reflink=1"], &mnt);
    let source = mnt.join("vol");
    every_snapshot_is_consistent(tmp.path(), &source, "reflink").await;
    let left: Vec<_> = std::fs::read_dir(&mnt).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("vol")], "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_on_an_ext4_image_on_xfs_clones_the_image_and_all_restore_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let outer = tmp.path().join("outer");
    let _outer = LoopFs::new(&tmp.path().join("outer.img"), "1G", &["mkfs.xfs", "-q", "-m", "reflink=1"], &outer);
    let inner = tmp.path().join("inner");
    let _inner = LoopFs::new(&outer.join("volume.img"), "256M", &["mkfs.ext4", "-q"], &inner);
    // A directory inside the image's filesystem: the view must find it in the clone.
    let source = inner.join("data");
    every_snapshot_is_consistent(tmp.path(), &source, "blockclone").await;
    let left: Vec<_> = std::fs::read_dir(&outer).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("volume.img")], "clones left behind: {left:?}");
    let loops = sh(&["losetup", "--list", "--noheadings", "--output", "BACK-FILE"]);
    assert!(!loops.contains(".soda-syncer-clone-"), "a clone is still attached: {loops}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mode_none_under_the_same_writer_restores_torn_states() {
    // The negative control: the check above can fail.
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("live");
    let (runs, results, _) = back_up_under_writes(tmp.path(), &source, json!({"mode": "none"}), 8).await;
    assert!(runs.iter().all(|r| r["consistency"]["method"] == "none"));
    let torn = results.iter().filter(|r| r.is_err()).count();
    eprintln!(
        "none: {torn} of {} live backups are torn: {:?}",
        results.len(),
        results.iter().filter_map(|r| r.as_ref().err()).next()
    );
    assert!(torn > 0, "no live backup was torn, so the consistency checks prove nothing: {results:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_without_a_method_backs_up_live_with_a_warning_or_is_refused_when_required() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 5, 1000);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "live", "source": {"path": data}, "schedule": {"intervalSeconds": 3600},
            "consistency": {"mode": "auto"}
        }))
        .await;
    let id = p["id"].as_str().unwrap();
    let runs = agent.wait_runs(id, 60, "the backup", |r| count_state(r, "succeeded") == 1).await;
    assert_eq!(runs[0]["consistency"]["method"], "none", "{}", runs[0]);
    assert_eq!(runs[0]["consistency"]["mode"], "auto");
    assert!(runs[0]["consistency"]["pointInTime"].is_null());
    let warning = runs[0]["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("backed up live"), "{warning}");
    assert!(agent.log_text().contains("no point-in-time method applies"));

    let (st, v) = agent
        .call(
            "POST",
            "/v1/policies",
            Some(json!({
                "name": "must", "source": {"path": data}, "schedule": {"intervalSeconds": 3600},
                "consistency": {"mode": "auto", "required": true}
            })),
        )
        .await;
    assert_eq!(st, 422, "{v}");
    assert_eq!(v["error"]["field"], "consistency.required", "{v}");
    // Explicit modes that cannot apply, and freezing the root filesystem.
    for (mode, needle) in [("btrfs", "not btrfs"), ("fsfreeze", "root filesystem"), ("blockclone", "loop")] {
        let (st, v) = agent
            .call(
                "POST",
                "/v1/policies",
                Some(json!({"name": format!("m-{mode}"), "source": {"path": data},
                            "schedule": {"intervalSeconds": 3600}, "consistency": {"mode": mode}})),
            )
            .await;
        assert_eq!(st, 422, "{mode}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{mode}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_filesystem_holding_the_agents_state_is_never_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("xfs");
    let _fs = LoopFs::new(&tmp.path().join("xfs.img"), "300M", &["mkfs.xfs", "-q"], &mnt);
    let data = mnt.join("data");
    fill(&data, 3, 100);
    let agent = AgentProc::start(&mnt.join("state"), &[]).unwrap();
    for mode in ["fsfreeze", "reflink"] {
        let (st, v) = agent
            .call(
                "POST",
                "/v1/policies",
                Some(json!({"name": mode, "source": {"path": data}, "schedule": {"intervalSeconds": 3600},
                            "consistency": {"mode": mode}})),
            )
            .await;
        assert_eq!(st, 422, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("holds the agent's state directory"), "{v}");
    }
}

// ---------------------------------------------------------------- safety

fn held(agent: &AgentProc) -> Vec<(String, String)> {
    let db = Connection::open_with_flags(agent.state_dir.join("state.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut stmt = db.prepare("SELECT kind, path FROM consistency_resources").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(|r| r.unwrap()).collect()
}

async fn wait_held(agent: &AgentProc, kind: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !held(agent).iter().any(|(k, _)| k == kind) {
        assert!(Instant::now() < deadline, "no {kind} recorded within {secs} s; log:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The freeze is recorded before FIFREEZE; the log says when it took effect.
async fn wait_frozen(agent: &AgentProc, secs: u64) {
    wait_held(agent, "freeze", secs).await;
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !agent.log_text().contains("filesystem frozen") {
        assert!(Instant::now() < deadline, "the freeze was recorded but not made; log:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A write to `dir` from another thread finishes within `within`.
fn writable_within(dir: &Path, within: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let f = dir.join(format!("probe-{}", rand_suffix()));
    // The thread may block on a frozen filesystem; it is left to finish.
    std::thread::spawn(move || {
        let r = std::fs::write(&f, b"x").and_then(|_| std::fs::File::open(&f)?.sync_all());
        let _ = tx.send(r.is_ok());
    });
    rx.recv_timeout(within).unwrap_or(false)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_freeze_is_thawed_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("xfs");
    let _fs = LoopFs::new(&tmp.path().join("xfs.img"), "600M", &["mkfs.xfs", "-q"], &mnt);
    let data = mnt.join("data");
    fill(&data, 300, 512 * 1024); // 150 MB: restic reads for seconds while frozen
    let mut agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "frozen", "source": {"path": data}, "schedule": {"intervalSeconds": 3600},
            "consistency": {"mode": "fsfreeze", "maxFreezeMs": 600000}
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    wait_frozen(&agent, 30).await;
    assert!(!writable_within(&mnt, Duration::from_millis(300)), "the filesystem should be frozen now");
    agent.kill9();
    assert!(!writable_within(&mnt, Duration::from_millis(300)), "still frozen after the agent died");
    agent.restart().unwrap();
    assert!(writable_within(&mnt, Duration::from_secs(30)), "not thawed after the restart; log:\n{}", agent.log_text());
    assert!(agent.log_text().contains("undid what an interrupted backup left behind"));
    let runs = agent.wait_runs(&id, 90, "the catch-up backup", |r| count_state(r, "succeeded") == 1).await;
    assert_eq!(count_state(&runs, "interrupted"), 1);
    assert!(held(&agent).is_empty(), "{:?}", held(&agent));
    assert!(writable_within(&mnt, Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_blockclone_backup_leaves_no_clone_loop_or_mount_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let outer = tmp.path().join("outer");
    let _outer = LoopFs::new(&tmp.path().join("outer.img"), "800M", &["mkfs.xfs", "-q"], &outer);
    let inner = tmp.path().join("inner");
    let _inner = LoopFs::new(&outer.join("volume.img"), "400M", &["mkfs.ext4", "-q"], &inner);
    fill(&inner.join("data"), 300, 512 * 1024);
    let mut agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "img", "source": {"path": inner.join("data")}, "schedule": {"intervalSeconds": 3600},
            "consistency": {"mode": "blockclone"}
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    wait_held(&agent, "mount", 30).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while children_named(agent.pid(), "restic").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = held(&agent);
    let run_mount = PathBuf::from(&before.iter().find(|(k, _)| k == "mount").unwrap().1);
    let clone = PathBuf::from(&before.iter().find(|(k, _)| k == "clone_file").unwrap().1);
    agent.kill9();
    assert!(is_mount_point(&run_mount) && clone.exists(), "the snapshot should be left by the kill: {before:?}");
    agent.restart().unwrap();
    agent.wait_runs(&id, 90, "the catch-up backup", |r| count_state(r, "succeeded") == 1).await;
    assert!(!is_mount_point(&run_mount), "{} is still mounted", run_mount.display());
    assert!(!clone.exists(), "{} is still there", clone.display());
    let loops = sh(&["losetup", "--list", "--noheadings", "--output", "BACK-FILE"]);
    assert!(!loops.contains(".soda-syncer-clone-"), "a clone is still attached: {loops}");
    assert!(held(&agent).is_empty(), "{:?}", held(&agent));
}

const PYTHON: &str = "/usr/bin/python3";
/// A hook that writes its environment to the file named by its argument.
const RECORD_ENV: &str = "import os, sys; open(sys.argv[1], 'w').write('|'.join(os.environ.get(k, '') for k in ['SODA_SYNCER_HOOK', 'SODA_SYNCER_POLICY_NAME', 'SODA_SYNCER_SOURCE', 'SODA_SYNCER_POLICY_ID']))";

#[tokio::test(flavor = "multi_thread")]
async fn hooks_run_around_the_freeze_and_a_failing_one_fails_the_run_with_the_filesystem_thawed() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("xfs");
    let _fs = LoopFs::new(&tmp.path().join("xfs.img"), "300M", &["mkfs.xfs", "-q"], &mnt);
    let data = mnt.join("data");
    fill(&data, 10, 1000);
    let agent =
        AgentProc::start(&tmp.path().join("state"), &["--hook-allow", "/usr/bin/false", "--hook-allow", PYTHON])
            .unwrap();
    // Only allowed executables, by absolute path.
    let (st, v) = agent
        .call(
            "POST",
            "/v1/policies",
            Some(json!({"name": "x", "source": {"path": data}, "schedule": {"intervalSeconds": 3600},
                        "consistency": {"mode": "fsfreeze", "hooks": {"pre": [["/bin/sh", "-c", "true"]]}}})),
        )
        .await;
    assert_eq!(st, 422, "{v}");
    assert_eq!(v["error"]["field"], "consistency.hooks.pre[0]", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--hook-allow"), "{v}");

    let post_marker = tmp.path().join("post");
    let p = agent
        .create_policy(json!({
            "name": "hooked", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}, "paused": true,
            "consistency": {"mode": "fsfreeze", "maxFreezeMs": 60000, "hooks": {
                "pre": [["/usr/bin/false"]],
                "post": [[PYTHON, "-c", RECORD_ENV, post_marker]]
            }}
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let (st, _) = agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    assert_eq!(st, 202);
    let runs = agent.wait_runs(&id, 60, "the failed run", |r| count_state(r, "failed") == 1).await;
    assert_eq!(runs[0]["error"]["code"], "pre_hook_failed", "{}", runs[0]);
    assert!(runs[0]["snapshotId"].is_null());
    let env = std::fs::read_to_string(&post_marker).expect("post runs after a failed pre");
    assert_eq!(env, format!("post|hooked|{}|{id}", data.display()));
    assert!(writable_within(&mnt, Duration::from_secs(2)));

    // pre succeeds, post fails: the snapshot is written, the run fails, thawed.
    let pre_marker = tmp.path().join("pre");
    let (st, v) = agent
        .call(
            "PATCH",
            &format!("/v1/policies/{id}"),
            Some(json!({"consistency": {"mode": "fsfreeze", "maxFreezeMs": 60000, "hooks": {
                "pre": [[PYTHON, "-c", RECORD_ENV, pre_marker]], "post": [["/usr/bin/false"]]}}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    let runs = agent.wait_runs(&id, 60, "the second failed run", |r| count_state(r, "failed") == 2).await;
    assert_eq!(runs[0]["error"]["code"], "post_hook_failed", "{}", runs[0]);
    assert!(runs[0]["snapshotId"].is_string(), "the backup itself was made: {}", runs[0]);
    assert!(runs[0]["error"]["message"].as_str().unwrap().contains("was written"), "{}", runs[0]);
    assert!(std::fs::read_to_string(&pre_marker).unwrap().starts_with("pre|hooked|"));
    assert!(writable_within(&mnt, Duration::from_secs(2)));
    assert!(held(&agent).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_freeze_longer_than_max_freeze_ms_is_thawed_and_fails_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("xfs");
    let _fs = LoopFs::new(&tmp.path().join("xfs.img"), "400M", &["mkfs.xfs", "-q"], &mnt);
    let data = mnt.join("data");
    fill(&data, 200, 512 * 1024);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "short", "source": {"path": data}, "schedule": {"intervalSeconds": 3600},
            "consistency": {"mode": "fsfreeze", "maxFreezeMs": 300}
        }))
        .await;
    let id = p["id"].as_str().unwrap();
    let started = Instant::now();
    let runs = agent.wait_runs(id, 60, "the failed run", |r| count_state(r, "failed") == 1).await;
    let run = &runs[0];
    assert_eq!(run["error"]["code"], "max_freeze_exceeded", "{run}");
    assert!(run["error"]["message"].as_str().unwrap().contains("maxFreezeMs"), "{run}");
    let frozen = run["consistency"]["freezeMs"].as_u64().unwrap();
    assert!((300..1500).contains(&frozen), "frozen for {frozen} ms: {run}");
    assert!(writable_within(&mnt, Duration::from_secs(2)));
    assert!(held(&agent).is_empty());
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_run_during_a_freeze_thaws_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("xfs");
    let _fs = LoopFs::new(&tmp.path().join("xfs.img"), "600M", &["mkfs.xfs", "-q"], &mnt);
    let data = mnt.join("data");
    fill(&data, 300, 512 * 1024);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "cancel", "source": {"path": data}, "schedule": {"intervalSeconds": 3600},
            "consistency": {"mode": "fsfreeze", "maxFreezeMs": 600000}
        }))
        .await;
    let id = p["id"].as_str().unwrap();
    wait_frozen(&agent, 30).await;
    assert!(!writable_within(&mnt, Duration::from_millis(200)));
    let runs = agent.get(&format!("/v1/runs?policy={id}")).await;
    let run_id = runs["runs"][0]["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let (st, v) = agent.call("POST", &format!("/v1/runs/{run_id}/cancel"), None).await;
    assert!(st < 300, "{v}");
    assert!(writable_within(&mnt, Duration::from_secs(10)), "not thawed after the cancel");
    eprintln!("thawed {} ms after the cancel", t.elapsed().as_millis());
    let runs = agent.wait_runs(id, 30, "the cancelled run", |r| count_state(r, "cancelled") == 1).await;
    assert!(runs[0]["consistency"]["freezeMs"].as_u64().unwrap() > 0);
    assert!(held(&agent).is_empty());
}

// ---------------------------------------------------------------- LVM

/// LVM snapshots need device-mapper, which the kernels of this project's
/// machines do not have: this test runs only where /proc/misc lists it.
#[tokio::test(flavor = "multi_thread")]
async fn lvm_snapshots_restore_consistent_where_device_mapper_exists() {
    let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
    if !misc.lines().any(|l| l.trim_end().ends_with(" device-mapper"))
        || Command::new("lvcreate").arg("--version").output().is_err()
    {
        eprintln!("skipped: no device-mapper in this kernel (/proc/misc) or no lvm2 tools");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("pv.img");
    sh(&["truncate", "-s", "1G", img.to_str().unwrap()]);
    let dev = sh(&["losetup", "--find", "--show", img.to_str().unwrap()]);
    let vg = format!("sodatest{}", std::process::id());
    struct Vg(String, String, PathBuf);
    impl Drop for Vg {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.2).output();
            let _ = Command::new("vgremove").args(["--force", "--yes", &self.0]).output();
            let _ = Command::new("losetup").args(["-d", &self.1]).output();
        }
    }
    let mnt = tmp.path().join("lv");
    let _vg = Vg(vg.clone(), dev.clone(), mnt.clone());
    sh(&["pvcreate", "-q", &dev]);
    sh(&["vgcreate", "-q", &vg, &dev]);
    sh(&["lvcreate", "-q", "--yes", "-L", "400M", "-n", "data", &vg]);
    let lv = format!("/dev/{vg}/data");
    sh(&["mkfs.ext4", "-q", &lv]);
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&["mount", &lv, mnt.to_str().unwrap()]);
    every_snapshot_is_consistent(tmp.path(), &mnt.join("vol"), "lvm").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reflink_copy_kept_between_backups_makes_an_unchanged_backup_store_the_same_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("xfs");
    let _fs = LoopFs::new(&tmp.path().join("xfs.img"), "512M", &["mkfs.xfs", "-q", "-m", "reflink=1"], &mnt);
    let source = mnt.join("vol");
    for d in 0..5 {
        fill(&source.join(format!("d{d}")), 20, 4096);
    }
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "kept", "source": {"path": source}, "paused": true,
            "schedule": {"intervalSeconds": 3600}, "consistency": {"mode": "reflink"},
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let copy = mnt.join(".soda-syncer-snapshots").join(format!("policy-{id}"));
    let (repo, pw) = local_repo(&agent);
    // The volume's part of a snapshot, as restic lists it (inode, ctime, mtime of
    // every file and directory). restic also stores the volume path's ancestors
    // (here `/tmp`, whose mtime other processes change), so those are left out.
    let volume_nodes = |snap: &str| -> Vec<Value> {
        let out = restic(&repo, &pw, &[], &["ls", "--json", snap]).unwrap();
        out.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|n| n["path"].as_str().is_some_and(|p| Path::new(p).starts_with(&source)))
            .collect()
    };
    let mut last = Vec::new();
    let mut previous_snapshot: Option<String> = None;
    for n in 1..=3 {
        if n == 3 {
            std::fs::write(source.join("d2/f00003"), "changed").unwrap();
        }
        let (st, run) = agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
        assert_eq!(st, 202, "{run}");
        last = agent.wait_runs(&id, 60, "the backup", |r| count_state(r, "succeeded") == n).await;
        assert_eq!(last[0]["consistency"]["method"], "reflink", "{}", last[0]);
        assert!(copy.is_dir(), "the copy is kept for the next backup");
        let snap = last[0]["snapshotId"].as_str().unwrap().to_string();
        if n == 2 {
            let s = &last[0]["summary"];
            assert_eq!((s["filesNew"].as_u64(), s["filesChanged"].as_u64()), (Some(0), Some(0)), "{s}");
            // Same inodes and ctimes as at the last backup: not even the volume's
            // tree metadata is new (a fresh copy would give every node a new inode
            // and ctime, and every directory a new tree blob).
            let (before, now) = (volume_nodes(previous_snapshot.as_deref().unwrap()), volume_nodes(&snap));
            assert_eq!(now.len(), 106, "5 directories with 20 files, and the volume's root");
            assert_eq!(before, now, "an unchanged backup through the kept copy stores the same volume tree");
            assert!(s["dataAdded"].as_u64().unwrap() < 2048, "only the ancestors' trees are new: {s}");
        }
        previous_snapshot = Some(snap);
    }
    let s = &last[0]["summary"];
    assert_eq!((s["filesNew"].as_u64(), s["filesChanged"].as_u64()), (Some(0), Some(1)), "{s}");
    // The third snapshot has the change (restic reads the copy at the volume's path).
    let snap = last[0]["snapshotId"].as_str().unwrap();
    let out = restic(&repo, &pw, &[], &["dump", snap, &format!("{}/d2/f00003", source.display())]).unwrap();
    assert_eq!(out, "changed");

    // Deleting the policy removes its copy.
    let (st, _) = agent.call("DELETE", &format!("/v1/policies/{id}"), None).await;
    assert_eq!(st, 204);
    let t = std::time::Instant::now();
    while copy.exists() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!copy.exists() && !mnt.join(".soda-syncer-snapshots").exists(), "the copy is gone with its policy");
}
