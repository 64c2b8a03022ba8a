//! Faults injected into the real agent, with the real restic and a real
//! object store (rclone REST on loopback), and what must hold afterwards.
//!
//! - `kill -9` of the agent at seeded random moments, many times in a row:
//!   every policy and every acknowledged write is still there, the database
//!   passes `integrity_check`, runs in flight are marked `interrupted`, no
//!   restic of ours outlives the agent, the next backups succeed and
//!   `restic check` is clean. `FAULT_SEED` replays a run, `FAULT_ITERATIONS`
//!   changes the count (50).
//! - The state directory's filesystem fills up (a small ext4 on a loop
//!   device): writes are refused with 507 `state_disk_full`, nothing stored
//!   is lost, the daemon stays up and works again once space returns.
//! - A hook that never ends: killed after `--hook-timeout-seconds`, the post
//!   hooks still run, the run fails with a clear message, the daemon is up.
//!
//! Covered elsewhere (not repeated here): restic missing
//! (`lifecycle::a_missing_restic_keeps_the_agent_up_but_not_ready`), restic
//! killed mid-run (`lifecycle::a_stale_lock_from_a_killed_restic_is_removed_automatically`),
//! a wrong repository password
//! (`backup::secrets_never_reach_logs_responses_or_process_arguments`), the
//! object store going away mid-backup
//! (`backup::an_unreachable_store_fails_loudly_then_recovers`).

use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::servers::RcloneRest;
use crate::support::{children_named, count_state, fill, restic, AgentProc};

// ---------------------------------------------------------------- helpers

/// splitmix64: small, seedable, good enough to pick moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// `PRAGMA integrity_check` on a read-only connection (does not recover or
/// checkpoint on the agent's behalf beyond what any reader does).
fn integrity_check(db: &Path) -> String {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    let rows: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows.join("; ")
}

/// Ids of the runs the database holds as queued or running.
fn unfinished_runs(db: &Path) -> BTreeSet<String> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut stmt = conn.prepare("SELECT id FROM runs WHERE state IN ('queued', 'running')").unwrap();
    stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
}

/// restic processes started for this test (their cache lives under `root`),
/// whoever their parent is now.
fn restic_processes_under(root: &Path) -> Vec<u32> {
    let needle = root.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if !std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "restic") {
            continue;
        }
        // A zombie has no environment left: it holds nothing.
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if String::from_utf8_lossy(&environ).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

async fn wait_no_restic_under(root: &Path, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = restic_processes_under(root);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "restic {left:?} outlived the killed agent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The policies the agent lists, by id: (name, source path).
async fn listed_policies(agent: &AgentProc) -> BTreeMap<String, (String, String)> {
    let v = agent.get("/v1/policies").await;
    v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                (p["name"].as_str().unwrap().to_string(), p["source"]["path"].as_str().unwrap().to_string()),
            )
        })
        .collect()
}

/// Every run (of one policy, or all), page by page, newest first.
async fn all_runs(agent: &AgentProc, policy: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut q = String::from("/v1/runs?limit=1000");
        if let Some(p) = policy {
            q.push_str(&format!("&policy={p}"));
        }
        if let Some(b) = &before {
            q.push_str(&format!("&before={b}"));
        }
        let v = agent.get(&q).await;
        out.extend(v["runs"].as_array().unwrap().iter().cloned());
        match v["next"].as_str() {
            Some(n) => before = Some(n.to_string()),
            None => return out,
        }
    }
}

// ---------------------------------------------------------------- kill -9

/// One policy of the kill -9 loop.
struct Layout {
    name: &'static str,
    files: usize,
    size: usize,
    /// Index into the repositories.
    repo: usize,
    interval: u64,
    keep_last: Option<u64>,
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_loses_nothing() {
    let seed = env_u64("FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let iterations = env_u64("FAULT_ITERATIONS").unwrap_or(50);
    eprintln!("kill -9 loop: FAULT_SEED={seed} FAULT_ITERATIONS={iterations} (set both to replay)");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let tmp = tempfile::tempdir().unwrap();
    let rest = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    let state = tmp.path().join("state");
    let db = state.join("state.db");
    let repos = [("a", "pw-fault-a"), ("b", "pw-fault-b")];
    for (name, pw) in repos {
        restic(&rest.url(name), pw, &[], &["init"]).unwrap();
    }
    // Two policies per repository; the ones with retention also take
    // exclusive locks (forget).
    let layout = [
        Layout { name: "small-often", files: 30, size: 64 * 1024, repo: 0, interval: 1, keep_last: Some(3) },
        Layout { name: "big", files: 50, size: 256 * 1024, repo: 0, interval: 2, keep_last: None },
        Layout { name: "tiny", files: 10, size: 4096, repo: 1, interval: 1, keep_last: Some(2) },
        Layout { name: "medium", files: 80, size: 128 * 1024, repo: 1, interval: 3, keep_last: None },
    ];
    let args = ["--keep-runs", "100000", "--repository-timeout-seconds", "20"];
    let mut agent = AgentProc::start(&state, &args).unwrap();
    let mut known: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut no_retention = Vec::new();
    for Layout { name, files, size, repo, interval, keep_last: keep } in layout {
        let data = tmp.path().join("data").join(name);
        fill(&data, files, size);
        let mut body = json!({
            "name": name, "source": {"path": data},
            "repository": {"url": rest.url(repos[repo].0), "password": repos[repo].1},
            "schedule": {"intervalSeconds": interval}
        });
        if let Some(k) = keep {
            body["retention"] = json!({"keepLast": k});
        }
        let p = agent.create_policy(body).await;
        let id = p["id"].as_str().unwrap().to_string();
        if keep.is_none() {
            no_retention.push((id.clone(), repo));
        }
        known.insert(id, (name.to_string(), data.display().to_string()));
    }

    let mut interrupted_seen = 0usize;
    let mut kills_with_restic = 0usize;
    let mut acknowledged_creates = 0usize;
    let mut extra = 0usize;
    for i in 0..iterations {
        // Wait: a random moment, or until a restic of ours runs (and a bit).
        let wait_for_restic = rng.below(3) == 0;
        if wait_for_restic {
            let deadline = Instant::now() + Duration::from_secs(5);
            while children_named(agent.pid(), "restic").is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
        } else {
            tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
        }
        // Sometimes a policy is being created as the agent dies: if the 201
        // arrived, it must survive.
        let create = if rng.below(4) == 0 {
            extra += 1;
            let name = format!("extra-{extra}");
            let data = tmp.path().join("data").join("small-often");
            let body =
                json!({"name": name, "source": {"path": data}, "schedule": {"intervalSeconds": 3600}, "paused": true});
            let (url, token) = (agent.url.clone(), agent.token.clone());
            let task = tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(format!("{url}/v1/policies"))
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .ok()?;
                let status = resp.status().as_u16();
                let v: Value = resp.json().await.ok()?;
                (status == 201).then(|| v["id"].as_str().map(str::to_string)).flatten()
            });
            tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
            Some((name, data.display().to_string(), task))
        } else {
            None
        };
        if !children_named(agent.pid(), "restic").is_empty() {
            kills_with_restic += 1;
        }
        agent.kill9();
        wait_no_restic_under(tmp.path(), 10).await;
        if let Some((name, path, task)) = create {
            if let Ok(Some(id)) = task.await {
                acknowledged_creates += 1;
                known.insert(id, (name, path));
            }
        }
        let check = integrity_check(&db);
        assert_eq!(check, "ok", "iteration {i} (FAULT_SEED={seed}): integrity_check after kill -9");
        let in_flight = unfinished_runs(&db);

        agent.restart().unwrap_or_else(|e| panic!("iteration {i} (FAULT_SEED={seed}): restart: {e}"));
        let listed = listed_policies(&agent).await;
        for (id, want) in &known {
            assert_eq!(listed.get(id), Some(want), "iteration {i} (FAULT_SEED={seed}): policy {id} after kill -9");
        }
        // A create that got no answer may or may not have landed; if it did, it is whole.
        for (id, (name, _)) in &listed {
            if !known.contains_key(id) {
                assert!(name.starts_with("extra-"), "unknown policy {id} {name}");
                let p = agent.get(&format!("/v1/policies/{id}")).await;
                assert_eq!(p["paused"], true, "{p}");
                known.insert(id.clone(), listed[id].clone());
            }
        }
        for run in &in_flight {
            let (st, r) = agent.call("GET", &format!("/v1/runs/{run}"), None).await;
            assert_eq!(st, 200, "iteration {i}: run {run}: {r}");
            assert_eq!(r["state"], "interrupted", "iteration {i} (FAULT_SEED={seed}): run {run} was in flight: {r}");
            assert_eq!(r["error"]["code"], "agent_stopped", "{r}");
            interrupted_seen += 1;
        }
    }

    // After the last restart: every policy backs up again.
    let last_start = chrono::Utc::now();
    for (id, (name, _)) in &known {
        if name.starts_with("extra-") {
            continue;
        }
        agent
            .wait_runs(id, 90, "a backup after the last kill", |runs| {
                runs.iter().any(|r| {
                    r["state"] == "succeeded"
                        && r["finishedAt"].as_str().is_some_and(|t| {
                            chrono::DateTime::parse_from_rfc3339(t).unwrap() > last_start - chrono::Duration::seconds(1)
                        })
                })
            })
            .await;
    }
    // Stop scheduling and let what runs finish, so nothing holds a lock.
    for id in known.keys() {
        agent.call("POST", &format!("/v1/policies/{id}/pause"), None).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = all_runs(&agent, None).await;
        if count_state(&runs, "running") + count_state(&runs, "queued") == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "runs still in flight after pausing every policy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every snapshot a run reported as succeeded is in the repository
    // (policies without retention, so nothing was forgotten on purpose).
    let mut in_repo: Vec<BTreeSet<String>> = Vec::new();
    for (name, pw) in repos {
        let out = restic(&rest.url(name), pw, &[], &["snapshots", "--json", "--no-lock"]).unwrap();
        let snaps: Vec<Value> = serde_json::from_str(&out).unwrap();
        in_repo.push(snaps.iter().map(|s| s["id"].as_str().unwrap().to_string()).collect());
    }
    let mut succeeded_checked = 0;
    for (id, repo) in &no_retention {
        for r in all_runs(&agent, Some(id)).await.iter().filter(|r| r["state"] == "succeeded") {
            let snap = r["snapshotId"].as_str().unwrap();
            assert!(
                in_repo[*repo].contains(snap),
                "run {} reported snapshot {snap}, which is not in the repository",
                r["id"]
            );
            succeeded_checked += 1;
        }
    }
    let total_runs = all_runs(&agent, None).await.len();
    assert!(agent.terminate().success());
    assert_eq!(integrity_check(&db), "ok");
    for (name, pw) in repos {
        let out = restic(&rest.url(name), pw, &[], &["check"])
            .unwrap_or_else(|e| panic!("restic check of repository {name} (FAULT_SEED={seed}): {e}"));
        assert!(out.contains("no errors were found"), "{out}");
    }
    eprintln!(
        "kill -9 loop: {iterations}/{iterations} iterations survived (FAULT_SEED={seed}), {kills_with_restic} kills with restic running, \
         {interrupted_seen} interrupted runs seen, {} policies intact ({acknowledged_creates} created just before a kill), \
         {succeeded_checked} reported snapshots all in the repository, {total_runs} runs in all, restic check clean, {:.0} s",
        known.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(kills_with_restic > 0, "no kill landed while restic ran: the loop tested too little");
}

// ---------------------------------------------------------------- full state disk

/// A small ext4 on a loop device, mounted at `mnt`; unmounted and detached
/// on drop, also when the test panics.
struct SmallFs {
    image: PathBuf,
    device: Option<String>,
    mnt: PathBuf,
    mounted: bool,
}

fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl SmallFs {
    fn new(image: &Path, mnt: &Path, size: &str) -> SmallFs {
        let mut fs = SmallFs { image: image.to_path_buf(), device: None, mnt: mnt.to_path_buf(), mounted: false };
        run(&["truncate", "-s", size, image.to_str().unwrap()]);
        fs.device = Some(run(&["losetup", "--find", "--show", image.to_str().unwrap()]));
        let dev = fs.device.clone().unwrap();
        run(&["mkfs.ext4", "-q", "-F", &dev]);
        std::fs::create_dir_all(mnt).unwrap();
        run(&["mount", &dev, mnt.to_str().unwrap()]);
        fs.mounted = true;
        fs
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if self.mounted {
            for _ in 0..50 {
                if Command::new("umount").arg(&self.mnt).output().is_ok_and(|o| o.status.success()) {
                    self.mounted = false;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.mounted {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
            }
        }
        if let Some(dev) = self.device.take() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).output();
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Write `path` until the filesystem says ENOSPC; returns the bytes written.
fn fill_until_enospc(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [1 << 20, 64 << 10, 4096, 512, 1] {
        let buf = vec![0x5au8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    // Whatever is still buffered must reach the disk too.
    let _ = f.sync_all();
    written
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_state_disk_is_refused_clearly_loses_nothing_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let fs = SmallFs::new(&tmp.path().join("state.img"), &state, "24M");
    let rest = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    let data = tmp.path().join("data");
    fill(&data, 20, 4096);
    let mut agent = AgentProc::start(&state, &["--keep-runs", "100000"]).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let p = agent
            .create_policy(json!({
                "name": format!("before-{i}"), "source": {"path": data},
                "repository": {"url": rest.url(&format!("r{i}")), "password": "pw-full"},
                "schedule": {"intervalSeconds": 3600}, "exclude": ["*.tmp"], "tags": [format!("n{i}")]
            }))
            .await;
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        agent.wait_runs(id, 60, "a first backup", |r| count_state(r, "succeeded") == 1).await;
    }
    let before: Vec<Value> = {
        let mut v = Vec::new();
        for id in &ids {
            v.push(agent.get(&format!("/v1/policies/{id}")).await);
        }
        v
    };
    let runs_before = agent.get("/v1/runs?limit=1000").await["runs"].as_array().unwrap().len();

    // A backup in flight when the disk fills: it must still end, and be recorded.
    let busy_data = tmp.path().join("busy");
    fill(&busy_data, 60, 512 * 1024);
    let busy = agent
        .create_policy(json!({
            "name": "busy", "source": {"path": busy_data},
            "repository": {"url": rest.url("busy"), "password": "pw-full"},
            "schedule": {"intervalSeconds": 3600}
        }))
        .await;
    let busy = busy["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while children_named(agent.pid(), "restic").is_empty() {
        assert!(Instant::now() < deadline, "the busy backup never started:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let filler = state.join("filler");
    let filled = fill_until_enospc(&filler);
    eprintln!("state disk: {} MiB filler written until ENOSPC", filled >> 20);

    // Writes until the database needs a page it cannot get: each policy
    // carries a large exclude list so the WAL must grow.
    let big_exclude: Vec<String> = (0..200).map(|i| format!("/{i}/{}", "x".repeat(400))).collect();
    let mut created_while_full = Vec::new();
    let mut refusal = None;
    for i in 0..200 {
        let (st, v) = agent
            .call(
                "POST",
                "/v1/policies",
                Some(json!({
                    "name": format!("while-full-{i}"), "source": {"path": data},
                    "schedule": {"intervalSeconds": 3600}, "paused": true, "exclude": big_exclude
                })),
            )
            .await;
        match st {
            201 => created_while_full.push(v["id"].as_str().unwrap().to_string()),
            _ => {
                refusal = Some((st, v));
                break;
            }
        }
    }
    let (st, v) = refusal.expect("200 large policies fit on a full disk?");
    eprintln!("state disk full: {} policies still fitted (WAL space), then {st} {v}", created_while_full.len());
    assert_eq!(st, 507, "{v}\n{}", agent.log_text());
    assert_eq!(v["error"]["code"], "state_disk_full", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("state directory") && message.contains("free space"), "{message}");

    // A run asked for now is refused the same way, or fails clearly; either
    // way the daemon stays up and answers.
    let (st, v) = agent.call("POST", &format!("/v1/policies/{}/run", ids[0]), None).await;
    eprintln!("state disk full: POST run → {st} {v}");
    assert!(st == 507 || st == 202, "{st} {v}");
    if st == 507 {
        assert_eq!(v["error"]["code"], "state_disk_full", "{v}");
    }
    let (st, _) = agent.call("GET", "/healthz", None).await;
    assert_eq!(st, 200);
    for (id, want) in ids.iter().zip(&before) {
        let got = agent.get(&format!("/v1/policies/{id}")).await;
        assert_eq!(got["name"], want["name"]);
        assert_eq!(got["source"], want["source"]);
        assert_eq!(got["exclude"], want["exclude"]);
        assert_eq!(got["tags"], want["tags"]);
    }
    // The backup that ran as the disk filled ends while it is still full.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !children_named(agent.pid(), "restic").is_empty() {
        assert!(Instant::now() < deadline, "the busy backup never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(integrity_check(&state.join("state.db")), "ok", "while full");

    // Space returns: the agent works again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "after", "source": {"path": data},
            "repository": {"url": rest.url("after"), "password": "pw-full"},
            "schedule": {"intervalSeconds": 3600}
        }))
        .await;
    let after = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&after, 60, "a backup after space returned", |r| count_state(r, "succeeded") == 1).await;
    // The run asked for while full ends (or another is accepted now), and a new one succeeds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, v) = agent.call("POST", &format!("/v1/policies/{}/run", ids[0]), None).await;
        if st == 202 {
            break;
        }
        assert_eq!(st, 409, "{v}");
        assert!(Instant::now() < deadline, "the run asked for while full never ended: {v}\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent
        .wait_runs(&ids[0], 60, "a backup after space returned", |r| {
            r.first().is_some_and(|r| r["state"] == "succeeded") && count_state(r, "succeeded") >= 2
        })
        .await;
    let runs_after = agent.get("/v1/runs?limit=1000").await["runs"].as_array().unwrap().len();
    assert!(runs_after > runs_before, "no run history was lost");
    let listed = listed_policies(&agent).await;
    for id in ids.iter().chain(&created_while_full).chain([&after, &busy]) {
        assert!(listed.contains_key(id), "policy {id} is gone");
    }
    assert_eq!(integrity_check(&state.join("state.db")), "ok", "after");

    // The run that ended while the disk was full: its end could not be
    // written then; the scheduler retries with backoff, so once space is
    // back it is recorded (no restart needed) and its policy is scheduled.
    let busy_runs = agent.get(&format!("/v1/runs?policy={busy}&limit=100")).await;
    let first = busy_runs["runs"].as_array().unwrap().last().cloned().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let first = loop {
        let r = agent.get(&format!("/v1/runs/{}", first["id"].as_str().unwrap())).await;
        if r["state"] != "running" && r["state"] != "queued" {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the run that ended while full was never recorded: {r}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let busy_policy = agent.get(&format!("/v1/policies/{busy}")).await;
    assert!(busy_policy["nextRunAt"].is_string(), "the policy is scheduled again: {busy_policy}");
    assert!(agent.terminate().success(), "a clean stop after the full disk");
    agent.restart().unwrap();
    let (st, r) = agent.call("GET", &format!("/v1/runs/{}", first["id"].as_str().unwrap()), None).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["state"], first["state"], "the recorded end survives a restart: {r}");
    let (st, v) = agent.call("POST", &format!("/v1/policies/{busy}/run"), None).await;
    assert_eq!(st, 202, "{v}");
    agent
        .wait_runs(&busy, 60, "the busy policy backs up again", |r| {
            r.first().is_some_and(|r| r["state"] == "succeeded" && r["id"] != first["id"])
        })
        .await;
    assert_eq!(integrity_check(&state.join("state.db")), "ok", "after a restart");
    drop(agent);
    drop(fs);
}

// ---------------------------------------------------------------- a hook that hangs

#[tokio::test(flavor = "multi_thread")]
async fn a_hook_that_hangs_is_killed_after_its_timeout_and_the_post_hooks_still_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 5, 1000);
    let agent = AgentProc::start(
        &tmp.path().join("state"),
        &["--hook-allow", "/usr/bin/sleep,/usr/bin/touch", "--hook-timeout-seconds", "2"],
    )
    .unwrap();
    let post_marker = tmp.path().join("post-ran");
    let p = agent
        .create_policy(json!({
            "name": "hangs", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}, "paused": true,
            "consistency": {"mode": "none", "hooks": {
                "pre": [["/usr/bin/sleep", "600"]], "post": [["/usr/bin/touch", post_marker]]
            }}
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let (st, _) = agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    assert_eq!(st, 202);
    // The hung hook is a child of the agent while it hangs.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sleepers = Vec::new();
    while sleepers.is_empty() {
        assert!(Instant::now() < deadline, "the pre hook never started:\n{}", agent.log_text());
        sleepers = children_named(agent.pid(), "sleep");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runs = agent.wait_runs(&id, 30, "the failed run", |r| count_state(r, "failed") == 1).await;
    let took = t.elapsed();
    let run = &runs[0];
    assert_eq!(run["error"]["code"], "pre_hook_failed", "{run}");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(message.contains("did not finish within 2 s and was killed"), "{message}");
    assert!(message.contains("/usr/bin/sleep 600"), "the hook is named: {message}");
    assert!(run["snapshotId"].is_null(), "no backup without its pre hook: {run}");
    assert!(took < Duration::from_secs(15), "the run took {took:?} with a 2 s hook timeout");
    assert!(post_marker.exists(), "the post hook ran after the pre hook hung");
    for pid in sleepers {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the hung hook {pid} is still alive");
    }

    // A post hook that hangs: killed too; the backup was written and says so.
    std::fs::remove_file(&post_marker).unwrap();
    let (st, v) = agent
        .call(
            "PATCH",
            &format!("/v1/policies/{id}"),
            Some(json!({"consistency": {"mode": "none", "hooks": {
                "pre": [["/usr/bin/touch", post_marker]], "post": [["/usr/bin/sleep", "600"]]}}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    let runs = agent.wait_runs(&id, 30, "the second failed run", |r| count_state(r, "failed") == 2).await;
    assert_eq!(runs[0]["error"]["code"], "post_hook_failed", "{}", runs[0]);
    assert!(runs[0]["snapshotId"].is_string(), "the backup itself was made: {}", runs[0]);
    assert!(runs[0]["error"]["message"].as_str().unwrap().contains("was killed"), "{}", runs[0]);
    assert!(children_named(agent.pid(), "sleep").is_empty(), "no hook left running");
    let (st, _) = agent.call("GET", "/healthz", None).await;
    assert_eq!(st, 200, "the daemon is up");
}
