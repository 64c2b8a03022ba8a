//! Scheduled backups of unchanged volumes (README, "Unchanged volumes"):
//! the real agent, the real restic behind a wrapper that logs every
//! command, a one-second schedule. A run proven unchanged starts no restic
//! at all; every kind of metadata change, a policy change, an agent
//! restart, a manual run and `verifyUnchanged: false` run restic; a change
//! to an excluded file does not. (An unreadable directory during the walk
//! is tested at unit level, in `soda_syncer::unchanged`: root reads every
//! directory, so a test needs a thread without CAP_DAC_*.)

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::consistency::{sh, LoopFs};
use crate::support::{logging_restic, AgentProc};

struct Harness {
    agent: AgentProc,
    id: String,
    data: PathBuf,
    log: PathBuf,
    /// Dropped after the agent (which holds it open), before `_tmp`.
    _fs: Option<LoopFs>,
    _tmp: tempfile::TempDir,
}

fn time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str().and_then(|s| DateTime::parse_from_rfc3339(s).ok()).map(|t| t.with_timezone(&Utc))
}

/// Set a file's mtime (`None`: now) in-process, as `touch -m` / `touch -d`
/// do (utimensat): no process to start while the next run is due.
fn set_mtime(path: &Path, secs: Option<i64>) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let omit = libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT };
    let m = match secs {
        Some(s) => libc::timespec { tv_sec: s, tv_nsec: 0 },
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
    };
    let times = [omit, m];
    // SAFETY: a NUL-terminated path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(rc, 0, "utimensat: {}", std::io::Error::last_os_error());
}

/// 2024-01-02 03:04:05 UTC, the mtime `a.txt` starts with.
const A_MTIME: i64 = 1_704_164_645;

impl Harness {
    async fn start(extra: &[&str], policy: Value) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        Harness::start_in(tmp, None, data, extra, policy).await
    }

    /// The volume is the btrfs subvolume `vol` at the top of a btrfs
    /// filesystem on a loop device.
    async fn start_on_btrfs(extra: &[&str], policy: Value) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("btrfs");
        let fs = LoopFs::new(&tmp.path().join("btrfs.img"), "300M", &["mkfs.btrfs", "-q"], &mnt);
        let data = mnt.join("vol");
        sh(&["btrfs", "subvolume", "create", data.to_str().unwrap()]);
        Harness::start_in(tmp, Some(fs), data, extra, policy).await
    }

    async fn start_in(
        tmp: tempfile::TempDir,
        fs: Option<LoopFs>,
        data: PathBuf,
        extra: &[&str],
        policy: Value,
    ) -> Harness {
        std::fs::create_dir_all(data.join("sub")).unwrap();
        std::fs::write(data.join("a.txt"), b"hello").unwrap();
        std::fs::write(data.join("sub/b.txt"), b"world").unwrap();
        std::fs::write(data.join("c.txt"), b"to become a link").unwrap();
        std::fs::write(data.join("scratch.tmp"), b"excluded").unwrap();
        // Enough bytes that no change below looks like a suspicious drop.
        std::fs::write(data.join("sub/bulk.bin"), vec![7u8; 64 * 1024]).unwrap();
        set_mtime(&data.join("a.txt"), Some(A_MTIME));
        let log = tmp.path().join("restic-commands.log");
        let restic = logging_restic(tmp.path(), &log);
        let mut args = vec!["--restic", restic.to_str().unwrap()];
        args.extend_from_slice(extra);
        let agent = AgentProc::start(&tmp.path().join("state"), &args).unwrap();
        let mut body = json!({
            "name": "vol",
            "source": {"path": data},
            "schedule": {"intervalSeconds": 1},
            "exclude": ["*.tmp"],
        });
        for (k, v) in policy.as_object().unwrap() {
            body[k] = v.clone();
        }
        let p = agent.create_policy(body).await;
        let id = p["id"].as_str().unwrap().to_string();
        let h = Harness { agent, id, data, log, _fs: fs, _tmp: tmp };
        let runs = h
            .agent
            .wait_runs(&h.id, 60, "the first backup", |r| r.last().is_some_and(|x| x["state"] == "succeeded"))
            .await;
        let first = runs.last().unwrap();
        assert!(first["unchanged"].is_null(), "the first backup runs restic: {first}");
        h
    }

    fn restic_commands(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(str::to_string).collect()
    }

    async fn runs(&self) -> Vec<Value> {
        self.agent.get(&format!("/v1/runs?policy={}&limit=100", self.id)).await["runs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Until no run is queued or running and the next one is at least
    /// 400 ms away, so a change made now is seen by the next run's walk
    /// and by no walk in flight. Returns the newest run's id. One request:
    /// the policy's `nextRunAt` and `lastRun` come from one read.
    async fn settle(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let p = self.agent.get(&format!("/v1/policies/{}", self.id)).await;
            let last = &p["lastRun"];
            let idle = last["finishedAt"].is_string();
            let next = time(&p["nextRunAt"]);
            if idle && next.is_some_and(|t| t - Utc::now() > chrono::Duration::milliseconds(400)) {
                return last["id"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "the policy never settled:\n{}", self.agent.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The first run after `after` (a run id), once it ended.
    async fn next_run(&self, after: &str, what: &str) -> Value {
        let runs = self
            .agent
            .wait_runs(&self.id, 60, what, |r| {
                r.iter()
                    .rfind(|x| x["id"].as_str().unwrap() > after)
                    .is_some_and(|x| !matches!(x["state"].as_str(), Some("queued") | Some("running")))
            })
            .await;
        runs.into_iter().rfind(|x| x["id"].as_str().unwrap() > after).unwrap()
    }

    /// Change the volume (or the policy) with `change`, then expect the
    /// next run to run restic's backup.
    async fn expect_real(&self, what: &str, change: impl FnOnce(&Path)) -> Value {
        let before = self.settle().await;
        let commands = self.restic_commands().len();
        change(&self.data);
        let run = self.next_run(&before, what).await;
        assert_eq!(run["state"], "succeeded", "{what}: {run}\n{}", self.agent.log_text());
        assert!(run["unchanged"].is_null(), "{what} must cause a real backup: {run}\n{}", self.agent.log_text());
        let new = &self.restic_commands()[commands..];
        assert!(new.iter().any(|c| c.starts_with("backup ")), "{what}: restic ran no backup: {new:?}");
        run
    }

    /// The next run (after `change`) is proven unchanged and ran no restic.
    /// Restore "latest" into `target` and wait for the run to succeed.
    async fn restore_latest(&self, target: &Path) -> Value {
        let body = json!({"snapshot": "latest", "target": target});
        let (st, r) = self.agent.call("POST", &format!("/v1/policies/{}/restore", self.id), Some(body)).await;
        assert!(st < 300, "{st} {r}");
        let restore_id = r["id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.agent.get(&format!("/v1/runs/{restore_id}")).await;
            if r["state"] == "succeeded" {
                return r;
            }
            assert!(!matches!(r["state"].as_str(), Some("failed" | "cancelled")), "{r}");
            assert!(Instant::now() < deadline, "restore did not end: {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn expect_unchanged(&self, what: &str, change: impl FnOnce(&Path)) -> Value {
        let before = self.settle().await;
        let previous = self.runs().await[0]["snapshotId"].clone();
        let commands = self.restic_commands().len();
        change(&self.data);
        let run = self.next_run(&before, what).await;
        assert_eq!(run["state"], "succeeded", "{what}: {run}");
        let u = &run["unchanged"];
        assert!(u.is_object(), "{what}: expected an unchanged run: {run}\n{}", self.agent.log_text());
        assert_eq!(run["snapshotId"], previous, "{what}: it points to the previous snapshot");
        assert_eq!(u["snapshotId"], previous);
        assert!(time(&u["verifiedAt"]).is_some() && time(&u["backedUpAt"]).is_some(), "{u}");
        assert!(u["entries"].as_u64().unwrap() >= 6, "root, sub, a.txt, sub/b.txt, sub/bulk.bin, c.txt: {u}");
        let new = &self.restic_commands()[commands..];
        assert!(new.is_empty(), "{what}: an unchanged run starts no restic process, but ran {new:?}");
        run
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metadata_change_runs_restic_and_an_untouched_or_excluded_one_does_not() {
    let h = Harness::start(&[], json!({})).await;
    h.expect_unchanged("nothing changed", |_| {}).await;
    h.expect_unchanged("nothing changed, again", |_| {}).await;
    h.expect_real("an mtime change only", |d| {
        set_mtime(&d.join("sub/b.txt"), None);
    })
    .await;
    h.expect_real("a content change with size and mtime restored (touch -d)", |d| {
        std::fs::write(d.join("a.txt"), b"HELLO").unwrap();
        set_mtime(&d.join("a.txt"), Some(A_MTIME));
        assert_eq!(std::fs::metadata(d.join("a.txt")).unwrap().len(), 5, "same size");
    })
    .await;
    h.expect_real("a rename", |d| std::fs::rename(d.join("sub/b.txt"), d.join("sub/b2.txt")).unwrap()).await;
    h.expect_real("a new empty file", |d| std::fs::write(d.join("empty"), b"").unwrap()).await;
    h.expect_real("a chmod", |d| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("a.txt"), std::fs::Permissions::from_mode(0o600)).unwrap()
    })
    .await;
    h.expect_real("a chown", |d| std::os::unix::fs::chown(d.join("a.txt"), Some(1234), Some(1234)).unwrap()).await;
    h.expect_real("an xattr set (setxattr)", |d| {
        let path = std::ffi::CString::new(d.join("a.txt").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated path and name, a value of the length given.
        let rc = unsafe { libc::setxattr(path.as_ptr(), c"user.note".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
    })
    .await;
    h.expect_real("a new hard link", |d| std::fs::hard_link(d.join("a.txt"), d.join("sub/a-link")).unwrap()).await;
    h.expect_real("a file replaced by a symlink", |d| {
        std::fs::remove_file(d.join("c.txt")).unwrap();
        std::os::unix::fs::symlink("a.txt", d.join("c.txt")).unwrap();
    })
    .await;
    h.expect_real("an empty directory added", |d| std::fs::create_dir(d.join("sub/new-dir")).unwrap()).await;
    h.expect_unchanged("an excluded file changed", |d| {
        std::fs::write(d.join("scratch.tmp"), b"changed, and excluded").unwrap();
    })
    .await;

    // Deadlines, "latest" and the metrics.
    let last = h.expect_unchanged("nothing changed at the end", |_| {}).await;
    let p = h.agent.get(&format!("/v1/policies/{}", h.id)).await;
    assert_eq!(p["lastRun"]["id"], last["id"], "{p}");
    let metrics = reqwest::get(format!("{}/metrics", h.agent.url)).await.unwrap().text().await.unwrap();
    let counted: u64 = metrics
        .lines()
        .find(|l| l.starts_with("soda_syncer_backup_unchanged_total{") && l.contains(&h.id))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no unchanged counter for the policy in:\n{metrics}"));
    assert!(counted >= 4, "at least the four unchanged runs above: {counted}");
    let last_success = metrics
        .lines()
        .find(|l| l.starts_with("soda_syncer_policy_last_success_timestamp") && l.contains(&h.id))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no last success for the policy in:\n{metrics}")) as i64;
    assert!(
        last_success >= time(&last["finishedAt"]).unwrap().timestamp(),
        "an unchanged run counts as a success for deadlines"
    );
    // The CLI's runs table says so, and how it was proven.
    let out = std::process::Command::new(crate::support::BIN)
        .args(["runs", "--policy", &h.id, "--agent-state-dir", h.agent.state_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let snap: String = last["unchanged"]["snapshotId"].as_str().unwrap_or_default().chars().take(8).collect();
    assert!(
        table
            .lines()
            .any(|l| l.contains(last["id"].as_str().unwrap()) && l.contains("unchanged (walk)") && l.contains(&snap)),
        "{table}"
    );
    // A restore of "latest" gets the snapshot the unchanged runs point to.
    let target = h.data.parent().unwrap().join("restored");
    let restored = h.restore_latest(&target).await;
    assert_eq!(restored["snapshotId"], last["snapshotId"], "{restored}");
    assert_eq!(std::fs::read(target.join("a.txt")).unwrap(), b"HELLO");
    assert!(target.join("sub/new-dir").is_dir());
    assert!(!target.join("scratch.tmp").exists(), "excluded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_runs_policy_changes_restarts_and_the_opt_out_run_restic() {
    let mut h = Harness::start(&[], json!({})).await;
    h.expect_unchanged("nothing changed", |_| {}).await;
    // "Back up now": whoever asks for a backup gets one.
    let (agent, id) = (&h.agent, h.id.clone());
    let run = h
        .expect_real("a manual run", |_| {
            let url = format!("{}/v1/policies/{id}/run", agent.url);
            let token = agent.token.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async { reqwest::Client::new().post(url).bearer_auth(token).send().await.unwrap() })
            })
            .join()
            .unwrap();
        })
        .await;
    assert_eq!(run["trigger"], "manual", "{run}");
    h.expect_unchanged("nothing changed after the manual run", |_| {}).await;
    let (agent, id) = (&h.agent, h.id.clone());
    h.expect_real("a policy change", |_| {
        let url = format!("{}/v1/policies/{id}", agent.url);
        let token = agent.token.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let r = rt.block_on(async {
                reqwest::Client::new().patch(url).bearer_auth(token).json(&json!({"tags": ["t1"]})).send().await
            });
            assert!(r.unwrap().status().is_success());
        })
        .join()
        .unwrap();
    })
    .await;
    h.expect_unchanged("nothing changed after the policy change", |_| {}).await;

    h.settle().await;
    let before = h.runs().await[0]["id"].as_str().unwrap().to_string();
    let commands = h.restic_commands().len();
    h.agent.restart().unwrap();
    let run = h.next_run(&before, "the first run after a restart").await;
    assert!(run["unchanged"].is_null(), "an agent restart forces a real backup: {run}");
    assert!(h.restic_commands()[commands..].iter().any(|c| c.starts_with("backup ")));
    h.expect_unchanged("nothing changed after the restart", |_| {}).await;

    // A slower schedule: real backups take about a second here.
    let (st, v) = h
        .agent
        .call(
            "PATCH",
            &format!("/v1/policies/{}", h.id),
            Some(json!({"verifyUnchanged": false, "schedule": {"intervalSeconds": 3}})),
        )
        .await;
    assert!(st < 300, "{st} {v}");
    assert_eq!(v["verifyUnchanged"], false, "{v}");
    h.expect_real("verifyUnchanged: false (first run)", |_| {}).await;
    h.expect_real("verifyUnchanged: false (nothing changed)", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_backup_runs_at_least_every_full_backup_every() {
    let h = Harness::start(&["--full-backup-every", "8s"], json!({})).await;
    h.expect_unchanged("nothing changed", |_| {}).await;
    // Nothing changes from here on; within 8 s of the last real backup (plus
    // a slot) restic runs again, and then the runs are unchanged again.
    let start = h.settle().await;
    let runs = h
        .agent
        .wait_runs(&h.id, 30, "a real backup without any change", |r| {
            r.iter().any(|x| {
                x["id"].as_str().unwrap() > start.as_str() && x["state"] == "succeeded" && x["unchanged"].is_null()
            })
        })
        .await;
    assert!(runs.iter().all(|r| r["state"] == "succeeded"), "{runs:?}");
    h.expect_unchanged("nothing changed after the full backup", |_| {}).await;
}

/// The proof an unchanged run names: `btrfs-generation` (no walk) or `walk`.
fn proof(run: &Value) -> &str {
    run["unchanged"]["proof"].as_str().unwrap_or_else(|| panic!("no proof on {run}"))
}

/// The volume is a btrfs subvolume: an untouched one is proven unchanged
/// by its generation alone; any write, also one not yet committed when the
/// check starts, runs restic; an excluded file's change moves the
/// generation, and the walk then proves the volume unchanged (after which
/// the generation suffices again); a nested subvolume, whose writes do not
/// move the outer generation, turns the shortcut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_btrfs_subvolume_is_proven_unchanged_by_its_generation_without_a_walk() {
    let h = Harness::start_on_btrfs(&[], json!({})).await;
    // The first check after a real backup may walk (restic's reading can
    // move an access time once); from then on the generation proves it.
    let first = h.expect_unchanged("nothing changed", |_| {}).await;
    eprintln!("first unchanged run after the real backup proven by: {}", proof(&first));
    for i in 0..2 {
        let run = h.expect_unchanged("nothing changed, again", |_| {}).await;
        assert_eq!(proof(&run), "btrfs-generation", "run {i}: {run}\n{}", h.agent.log_text());
    }

    // Written right before the check, in the page cache only: the check's
    // syncfs commits it, so the generation moves.
    h.expect_real("a write not yet committed", |d| {
        std::fs::write(d.join("sub/b.txt"), b"WORLD").unwrap();
    })
    .await;
    h.expect_real("an append not yet committed", |d| {
        use std::io::Write;
        std::fs::OpenOptions::new().append(true).open(d.join("a.txt")).unwrap().write_all(b"!").unwrap();
    })
    .await;
    h.expect_real("a new file, committed", |d| {
        std::fs::write(d.join("committed"), b"c").unwrap();
        sh(&["sync", "-f", d.to_str().unwrap()]);
    })
    .await;
    h.expect_unchanged("nothing changed after the writes", |_| {}).await;
    let run = h.expect_unchanged("nothing changed after the writes, again", |_| {}).await;
    assert_eq!(proof(&run), "btrfs-generation", "{run}");

    let run = h
        .expect_unchanged("an excluded file changed", |d| {
            std::fs::write(d.join("scratch.tmp"), b"changed, and excluded").unwrap();
        })
        .await;
    assert_eq!(proof(&run), "walk", "the generation moved; the walk proves it: {run}");
    let run = h.expect_unchanged("nothing changed after the excluded change", |_| {}).await;
    assert_eq!(proof(&run), "btrfs-generation", "the walk moved the basis to the new generation: {run}");

    // A nested subvolume: its writes do not move the outer generation.
    h.expect_real("a nested subvolume", |d| {
        let nested = d.join("nested");
        sh(&["btrfs", "subvolume", "create", nested.to_str().unwrap()]);
        std::fs::write(nested.join("n"), b"n").unwrap();
    })
    .await;
    let run = h.expect_unchanged("nothing changed with a nested subvolume", |_| {}).await;
    assert_eq!(proof(&run), "walk", "{run}");
    h.expect_real("a write inside the nested subvolume, committed", |d| {
        std::fs::write(d.join("nested/n"), b"N").unwrap();
        sh(&["sync", "-f", d.join("nested").to_str().unwrap()]);
    })
    .await;
    // The restored volume has every write above.
    let target = h.data.parent().unwrap().parent().unwrap().join("restored");
    h.restore_latest(&target).await;
    assert_eq!(std::fs::read(target.join("sub/b.txt")).unwrap(), b"WORLD");
    assert_eq!(std::fs::read(target.join("a.txt")).unwrap(), b"hello!");
    assert_eq!(std::fs::read(target.join("nested/n")).unwrap(), b"N");
}
