//! The agent's life around its runs: shutdown, restarts after downtime,
//! a missing restic, the concurrency limit, deletes of running policies, and
//! results that must not pass for plain success (partial, suspicious).

use serde_json::{json, Value};
use std::time::{Duration, Instant};

use crate::support::{children_named, count_state, fill, wait_for_a_lock, wait_for_log, AgentProc};

fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}"))).unwrap().into()
}

async fn wait_running_restic(agent: &AgentProc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while children_named(agent.pid(), "restic").is_empty() {
        assert!(Instant::now() < deadline, "restic never started:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_run_interrupts_it_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 300, 512 * 1024);
    let mut agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "big", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    wait_running_restic(&agent).await;
    let restic_pids = children_named(agent.pid(), "restic");
    let t = Instant::now();
    let status = agent.terminate();
    assert!(status.success(), "exit status {status}\n{}", agent.log_text());
    assert!(t.elapsed() < Duration::from_secs(15), "shutdown took {:?}", t.elapsed());
    for pid in restic_pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "restic {pid} outlived the agent");
    }
    let log = agent.log_text();
    assert!(log.contains("scheduler stopped") && log.contains("stopped"), "{log}");
    agent.restart().unwrap();
    let runs =
        agent.wait_runs(&id, 60, "the interrupted run and a new one", |r| count_state(r, "succeeded") == 1).await;
    let first = runs.last().unwrap();
    assert_eq!(first["state"], "interrupted", "{first}");
    assert_eq!(first["error"]["code"], "agent_stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missed_schedule_runs_once_after_downtime() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 3, 100);
    let mut agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "often", "source": {"path": data}, "schedule": {"intervalSeconds": 2}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent
        .wait_runs(&id, 60, "a first backup", |r| count_state(r, "succeeded") >= 1 && r[0]["state"] == "succeeded")
        .await;
    assert!(agent.terminate().success());
    // Down for about four intervals.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let restarted = chrono::Utc::now();
    agent.restart().unwrap();
    let runs = agent
        .wait_runs(&id, 60, "a run after the restart", |r| {
            r.iter().any(|r| time(&r["queuedAt"]) >= restarted && r["state"] == "succeeded")
        })
        .await;
    let catch_up: Vec<&Value> = runs
        .iter()
        .filter(|r| {
            let q = time(&r["queuedAt"]);
            q >= restarted && q < restarted + chrono::Duration::milliseconds(1500)
        })
        .collect();
    assert_eq!(catch_up.len(), 1, "one catch-up run, not one per missed slot: {catch_up:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_restic_keeps_the_agent_up_but_not_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 1, 10);
    let agent = AgentProc::start(&tmp.path().join("state"), &["--restic", "/nonexistent/restic"]).unwrap();
    let (st, health) = agent.call("GET", "/healthz", None).await;
    assert_eq!(st, 200, "{health}");
    let (st, ready) = agent.call("GET", "/readyz", None).await;
    assert_eq!(st, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    assert!(ready["restic"]["error"].as_str().unwrap().contains("apt-get install restic"), "{ready}");
    let p =
        agent.create_policy(json!({"name": "x", "source": {"path": data}, "schedule": {"intervalSeconds": 60}})).await;
    let runs = agent.wait_runs(p["id"].as_str().unwrap(), 30, "a failed run", |r| count_state(r, "failed") == 1).await;
    assert_eq!(runs[0]["error"]["code"], "restic_missing");
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_respect_the_concurrency_limit_and_queue_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(&tmp.path().join("state"), &["--max-concurrent-runs", "1"]).unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        let data = tmp.path().join(format!("data{i}"));
        fill(&data, 2, 100);
        let p = agent
            .create_policy(
                json!({"name": format!("p{i}"), "source": {"path": data}, "schedule": {"intervalSeconds": 2}}),
            )
            .await;
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut saw_queued = false;
    let runs = loop {
        let v = agent.get("/v1/runs?limit=1000").await;
        let runs = v["runs"].as_array().cloned().unwrap();
        saw_queued |= runs.iter().any(|r| r["state"] == "queued");
        let done = ids
            .iter()
            .all(|id| runs.iter().filter(|r| r["policyId"] == id.as_str() && r["state"] == "succeeded").count() >= 2);
        if done {
            break runs;
        }
        assert!(Instant::now() < deadline, "not every policy ran twice: {runs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(saw_queued, "with a limit of 1 and 4 policies, runs wait in the queue");
    let mut spans: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = runs
        .iter()
        .filter(|r| r["state"] == "succeeded")
        .map(|r| (time(&r["startedAt"]), time(&r["finishedAt"])))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two runs overlapped with --max-concurrent-runs 1: {w:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_policy_cancels_its_running_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 300, 512 * 1024);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "doomed", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    wait_running_restic(&agent).await;
    let pids = children_named(agent.pid(), "restic");
    let (st, _) = agent.call("DELETE", &format!("/v1/policies/{id}"), None).await;
    assert_eq!(st, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()) {
        assert!(Instant::now() < deadline, "restic kept running after the delete");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, _) = agent.call("GET", &format!("/v1/policies/{id}"), None).await;
    assert_eq!(st, 404);
    let (st, _) = agent.call("GET", "/healthz", None).await;
    assert_eq!(st, 200, "the agent is still up");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_source_is_suspicious_not_succeeded() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("empty");
    std::fs::create_dir_all(&data).unwrap();
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "empty", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let runs = agent
        .wait_runs(p["id"].as_str().unwrap(), 60, "the backup", |r| {
            r.first().is_some_and(|r| r["state"] != "queued" && r["state"] != "running")
        })
        .await;
    assert_eq!(runs[0]["state"], "suspicious", "{}", runs[0]);
    assert!(runs[0]["warning"].as_str().unwrap().contains("no files"));
    assert!(runs[0]["snapshotId"].is_string(), "the snapshot is kept and named");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_file_makes_a_partial_backup_that_names_it() {
    // Root reads everything, so this agent runs as nobody.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let data = tmp.path().join("data");
    fill(&data, 3, 100);
    let secret = data.join("locked");
    std::fs::write(&secret, "root only").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let agent = AgentProc::start_as(&tmp.path().join("state"), &[], Some(65534)).unwrap();
    let p = agent
        .create_policy(json!({"name": "partial", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let runs = agent
        .wait_runs(p["id"].as_str().unwrap(), 60, "the backup", |r| {
            r.first().is_some_and(|r| r["state"] != "queued" && r["state"] != "running")
        })
        .await;
    let run = &runs[0];
    assert_eq!(run["state"], "partial", "{run}");
    assert_eq!(run["summary"]["unreadable"], json!([secret.display().to_string()]));
    assert!(run["snapshotId"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_lock_from_a_killed_restic_is_removed_automatically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 2, 100);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    // Retention makes each run end with `forget`, which needs the exclusive lock
    // that a stale lock blocks (a backup alone would not notice it).
    let p = agent
        .create_policy(json!({"name": "locked", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}, "retention": {"keepLast": 5}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "the first backup (creates the repository)", |r| count_state(r, "succeeded") == 1).await;
    fill(&data.join("big"), 300, 512 * 1024);
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    wait_running_restic(&agent).await;
    // As soon as restic holds its lock (the backup's, or the forget's after
    // it on a fast machine), kill restic itself: the lock stays behind. restic
    // 0.14 creates a lock file before it writes it, and ignores a lock it cannot
    // read, so wait until the lock is whole: restic makes a file read-only once
    // it is written (a lock killed half-written, seen under load, blocks
    // nothing, and no recovery would be needed).
    let locks_dir = tmp.path().join("state/repository/locks");
    let written_lock = || {
        use std::os::unix::fs::PermissionsExt;
        std::fs::read_dir(&locks_dir)
            .map(|d| {
                d.flatten().any(|e| e.metadata().is_ok_and(|m| m.len() > 0 && m.permissions().mode() & 0o222 == 0))
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !written_lock() {
        assert!(Instant::now() < deadline, "restic never took its lock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for pid in children_named(agent.pid(), "restic") {
        // SAFETY: a child of the agent this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let runs = agent.wait_runs(&id, 60, "the killed run to fail", |r| count_state(r, "failed") == 1).await;
    let code = runs[0]["error"]["code"].as_str().unwrap();
    assert!(code == "restic_failed" || code == "retention_failed", "{}", runs[0]);
    let locks = std::fs::read_dir(tmp.path().join("state/repository/locks")).unwrap().count();
    assert_eq!(locks, 1, "the killed restic left its lock");
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    agent.wait_runs(&id, 120, "a run that recovers the lock", |r| count_state(r, "succeeded") == 2).await;
    let log = agent.log_text();
    assert!(log.contains("removing stale locks"), "the recovery is logged:\n{log}");
    let metrics = reqwest::get(format!("{}/metrics", agent.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("soda_syncer_stale_lock_recoveries_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_run_history_keeps_the_newest_runs_per_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 2, 100);
    let agent = AgentProc::start(&tmp.path().join("state"), &["--keep-runs", "2"]).unwrap();
    let p = agent
        .create_policy(json!({"name": "short-memory", "source": {"path": data}, "schedule": {"intervalSeconds": 1}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 5 {
        assert!(Instant::now() < deadline, "fewer than 5 runs in a minute");
        let v = agent.get(&format!("/v1/runs?policy={id}&limit=100")).await;
        let runs = v["runs"].as_array().unwrap();
        for r in runs {
            seen.insert(r["id"].as_str().unwrap().to_string());
        }
        let finished = runs.iter().filter(|r| r["state"] != "queued" && r["state"] != "running").count();
        assert!(finished <= 2, "more than --keep-runs finished runs kept: {runs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_held_by_a_live_process_is_waited_for_not_broken_or_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 20, 100_000);
    let state = tmp.path().join("state");
    let agent = AgentProc::start(&state, &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "waits", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") == 1).await;
    // A live `check --read-data`, slowed to a crawl, holds the exclusive lock.
    let repo = state.join("repository");
    let password = std::fs::read_to_string(state.join("repository.password")).unwrap();
    let mut prune = std::process::Command::new("restic")
        .args(["check", "--read-data", "--limit-download", "1", "-r"])
        .arg(&repo)
        .env("RESTIC_PASSWORD", password.trim())
        .env("RESTIC_CACHE_DIR", tmp.path().join("cache"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_a_lock(&repo).await;
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    wait_for_log(&agent, "locked by a live process; waiting", 60).await;
    let runs = agent.get(&format!("/v1/runs?policy={id}")).await;
    assert_eq!(runs["runs"][0]["state"], "running", "waiting, not failed: {runs}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(prune.try_wait().unwrap().is_none(), "the check ended on its own");
    assert!(std::fs::read_dir(repo.join("locks")).unwrap().count() >= 1, "the live check's lock was broken");
    // The holder dies, leaving its lock: now provably stale, it is removed and the backup goes on.
    // SAFETY: the check this test started.
    unsafe { libc::kill(prune.id() as i32, libc::SIGKILL) };
    let _ = prune.wait();
    agent.wait_runs(&id, 90, "the backup after the wait", |r| count_state(r, "succeeded") == 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_last_good_snapshot_after_a_suspicious_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 10, 1000);
    let repo = tmp.path().join("repo");
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "kept", "source": {"path": data}, "schedule": {"intervalSeconds": 3600},
            "repository": {"url": repo, "password": "keep-pw"}, "retention": {"keepLast": 1}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "the good backup", |r| count_state(r, "succeeded") == 1).await;
    let snapshots = || {
        let out =
            crate::support::restic(&repo.display().to_string(), "keep-pw", &[], &["snapshots", "--json"]).unwrap();
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
    };
    let good = snapshots();
    assert_eq!(good.len(), 1);
    // The volume is emptied: the backup is suspicious, and retention (keep 1)
    // must not push the good snapshot out for it.
    for e in std::fs::read_dir(&data).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    let runs = agent.wait_runs(&id, 60, "the suspicious backup", |r| count_state(r, "suspicious") == 1).await;
    assert_eq!(runs[0]["summary"]["snapshotsForgotten"].as_u64().unwrap_or(0), 0, "{}", runs[0]);
    let after = snapshots();
    assert_eq!(after.len(), 2, "the good snapshot is kept beside the suspicious one: {after:?}");
    assert!(after.iter().any(|s| s["id"] == good[0]["id"]));
    // A good backup follows: now retention applies and keeps only it.
    fill(&data, 10, 1000);
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    agent.wait_runs(&id, 60, "the next good backup", |r| count_state(r, "succeeded") == 2).await;
    let last = snapshots();
    assert_eq!(last.len(), 1, "{last:?}");
    assert!(last[0]["id"] != good[0]["id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_prune_starts_in_a_gap_between_the_repositorys_backups() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fill(&a, 5, 1000);
    fill(&b, 5, 2000);
    let args = [
        "--prune-every-seconds=20",
        "--check-every-seconds=100000",
        "--maintenance-jitter-seconds=0",
        "--maintenance-gap-seconds=2",
    ];
    let agent = AgentProc::start(&tmp.path().join("state"), &args).unwrap();
    // Two policies of one repository (the agent's default), due every 8 s, about a second apart.
    let pa = agent.create_policy(json!({"name": "a", "source": {"path": a}, "schedule": {"intervalSeconds": 8}})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pb = agent.create_policy(json!({"name": "b", "source": {"path": b}, "schedule": {"intervalSeconds": 8}})).await;
    let is_prune = |r: &Value| r["kind"] == "prune" && r["state"] == "succeeded";
    let t0 = Instant::now();
    let (mut runs, mut prunes) = (Vec::new(), Vec::new());
    while t0.elapsed() < Duration::from_secs(90) && prunes.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        runs = agent.get("/v1/runs?limit=500").await["runs"].as_array().unwrap().clone();
        prunes = runs.iter().filter(|r| is_prune(r)).cloned().collect();
    }
    assert!(!prunes.is_empty(), "no prune within 90 s:\n{}", agent.log_text());
    let at =
        |r: &Value, k: &str| r[k].as_str().map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis());
    for p in &prunes {
        let start = at(p, "startedAt").unwrap();
        for r in runs.iter().filter(|r| r["kind"] == "backup") {
            let (s, f) = (at(r, "startedAt"), at(r, "finishedAt"));
            // Queued before the prune and started after it: it waited for
            // the repository, which is the point.
            let running_then = s.is_some_and(|s| s <= start) && f.is_none_or(|f| f > start);
            assert!(!running_then, "a prune started while a backup ran:\nprune {p}\nbackup {r}");
            let due = at(r, "dueAt").unwrap_or(i64::MIN);
            assert!(
                !(due > start && due < start - 100 + 2000) || r["trigger"] != "schedule",
                "a backup was due within the gap after the prune started:\nprune {p}\nbackup {r}"
            );
        }
    }
    assert!(!agent.log_text().contains("left no gap"), "{}", agent.log_text());
    let _ = (pa, pb);
}
