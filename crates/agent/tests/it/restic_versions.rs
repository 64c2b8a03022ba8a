//! The restic the agent drives: the supported range (0.14.0 to 0.19.x), what
//! it says about the version it found, and that every way a run can be
//! stopped (a cancel, a timeout, the agent's shutdown) leaves no lock in the
//! repository. scripts/test runs this module once per restic version (each
//! first on PATH), so "every version" means 0.14.0, 0.18.0 and 0.19.1.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{children_named, fill, real_restic, wrapper, AgentProc, BIN};

fn restic_version(bin: &Path) -> String {
    let out = Command::new(bin).arg("version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string()
}

fn locks(repo: &Path) -> Vec<String> {
    std::fs::read_dir(repo.join("locks"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Until a lock file with content is in the repository (restic 0.14 creates
/// the file before it writes it, and ignores an empty one).
async fn wait_for_a_written_lock(agent: &AgentProc, repo: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let written =
            locks(repo).iter().any(|l| std::fs::metadata(repo.join("locks").join(l)).is_ok_and(|m| m.len() > 0));
        if written {
            return;
        }
        assert!(Instant::now() < deadline, "no lock within 60 s:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

enum Stop {
    Cancel,
    Timeout,
    Shutdown,
    /// kill -9 of the agent: restic gets SIGINT as its parent-death signal.
    Kill,
}

/// A backup that takes about 15 s (8 MB at restic's `--limit-upload 512`
/// KiB/s), stopped in the middle once restic holds its lock.
async fn stop_a_backup_midway(stop: Stop) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 8, 1024 * 1024);
    let slow = wrapper(tmp.path(), "slow-restic", None, "--limit-upload 512");
    let state = tmp.path().join("state");
    let mut args = vec!["--restic".to_string(), slow.display().to_string()];
    if matches!(stop, Stop::Timeout) {
        args.push("--run-timeout-seconds=4".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = AgentProc::start(&state, &args).unwrap();
    let p = agent
        .create_policy(json!({"name": "slow", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let repo = state.join("repository");
    wait_for_a_written_lock(&agent, &repo).await;
    let version = agent.get("/v1/status").await["restic"]["version"].clone();
    let run = agent.get(&format!("/v1/runs?policy={id}")).await["runs"][0].clone();
    assert_eq!(run["state"], "running", "{run}");
    let ended: Value = match stop {
        Stop::Cancel => {
            let (st, v) = agent.call("POST", &format!("/v1/runs/{}/cancel", run["id"].as_str().unwrap()), None).await;
            assert!(st < 300, "{st} {v}");
            agent.wait_runs(&id, 30, "the cancelled run", |r| r[0]["state"] == "cancelled").await[0].clone()
        }
        Stop::Timeout => agent.wait_runs(&id, 30, "the timed-out run", |r| r[0]["state"] == "failed").await[0].clone(),
        Stop::Shutdown => {
            let status = agent.terminate();
            assert!(status.success(), "exit status {status}\n{}", agent.log_text());
            Value::Null
        }
        Stop::Kill => {
            // Past restic 0.14's window right after writing its lock, in
            // which no signal makes it remove the lock (nobody is left to
            // run `restic unlock` after a kill -9; the next start does).
            tokio::time::sleep(Duration::from_secs(1)).await;
            let restic = children_named(agent.pid(), "restic");
            assert_eq!(restic.len(), 1, "one restic runs: {restic:?}");
            agent.kill9();
            // 0.18+ remove the lock at once, then finish the throttled
            // uploads in flight (8 MB at 512 KiB/s at most).
            let deadline = Instant::now() + Duration::from_secs(60);
            while std::path::Path::new(&format!("/proc/{}", restic[0])).exists() {
                assert!(Instant::now() < deadline, "restic outlived its agent by 60 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Value::Null
        }
    };
    if let Stop::Timeout = stop {
        assert_eq!(ended["error"]["code"], "timed_out", "{ended}");
    }
    // By the time the run's end is recorded (or the agent has exited),
    // restic has ended, and with it, its lock.
    assert_eq!(locks(&repo), Vec::<String>::new(), "restic {version} left its lock\n{}", agent.log_text());
    // What a human would run next works at once: an exclusive command.
    let out = Command::new(real_restic())
        .args(["-r"])
        .arg(&repo)
        .args(["check", "--no-cache"])
        .env("RESTIC_PASSWORD", std::fs::read_to_string(state.join("repository.password")).unwrap().trim())
        .output()
        .unwrap();
    assert!(out.status.success(), "restic check after the stop: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_backup_leaves_no_lock() {
    stop_a_backup_midway(Stop::Cancel).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timed_out_backup_leaves_no_lock() {
    stop_a_backup_midway(Stop::Timeout).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_stopped_by_the_agent_s_shutdown_leaves_no_lock() {
    stop_a_backup_midway(Stop::Shutdown).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_whose_agent_is_killed_removes_its_lock() {
    stop_a_backup_midway(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restic_older_than_0_14_keeps_the_agent_not_ready_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let old = wrapper(tmp.path(), "old-restic", Some("restic 0.13.1 compiled with go1.18 on linux/amd64"), "");
    let agent = AgentProc::start(&tmp.path().join("state"), &["--restic", old.to_str().unwrap()]).unwrap();
    let (st, ready) = agent.call("GET", "/readyz", None).await;
    assert_eq!(st, 503, "{ready}");
    let why = ready["restic"]["error"].as_str().unwrap_or_default();
    assert!(why.contains("0.13.1") && why.contains("older than 0.14.0"), "{ready}");
    let status = agent.get("/v1/status").await;
    assert_eq!(status["restic"]["version"], "0.13.1", "{status}");
    assert_eq!(status["restic"]["support"], "tooOld", "{status}");
    assert!(agent.log_text().contains("older than 0.14.0"), "{}", agent.log_text());
    let out = Command::new(BIN).args(["--server", &agent.url, "--token", &agent.token, "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("restic    0.13.1 (tooOld)") && text.contains("older than 0.14.0"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restic_newer_than_the_newest_tested_runs_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 3, 1000);
    // The real restic answers every command; only its version is from the future.
    let next = wrapper(tmp.path(), "next-restic", Some("restic 0.20.0 compiled with go1.27 on linux/amd64"), "");
    let agent = AgentProc::start(&tmp.path().join("state"), &["--restic", next.to_str().unwrap()]).unwrap();
    let (st, ready) = agent.call("GET", "/readyz", None).await;
    assert_eq!(st, 200, "{ready}");
    let status = agent.get("/v1/status").await;
    assert_eq!(status["restic"]["support"], "newerThanTested", "{status}");
    assert!(status["restic"]["message"].as_str().unwrap().contains("newer than 0.19.1"), "{status}");
    assert!(agent.log_text().contains("newer than 0.19.1"), "{}", agent.log_text());
    let real = restic_version(&real_restic());
    if real.as_str() < "0.17" {
        // Claiming 0.20 makes the agent use flags this restic lacks; the
        // backup below only makes sense with a restic that has them.
        eprintln!("restic {real} on PATH: the backup part of this test runs with restic 0.17 or newer");
        return;
    }
    let p = agent
        .create_policy(json!({"name": "x", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let runs = agent
        .wait_runs(p["id"].as_str().unwrap(), 60, "the backup", |r| {
            r[0]["state"] != "queued" && r[0]["state"] != "running"
        })
        .await;
    assert_eq!(runs[0]["state"], "succeeded", "{}", runs[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_names_the_restic_version_and_the_newer_features_the_agent_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let real = restic_version(&real_restic());
    let status = agent.get("/v1/status").await;
    let r = &status["restic"];
    assert_eq!(r["version"], real.as_str(), "{status}");
    assert_eq!(r["support"], "supported", "{status}");
    let features: Vec<&str> = r["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    let minor: u32 = real.split('.').nth(1).unwrap().parse().unwrap();
    assert_eq!(features.contains(&"retryLock"), minor >= 16, "{status}");
    assert_eq!(features.contains(&"restoreDelete"), minor >= 17, "{status}");
    assert_eq!(features.contains(&"exitErrorJson"), minor >= 18, "{status}");
    assert_eq!(features.is_empty(), minor == 14, "{status}");
    let (_, ready) = agent.call("GET", "/readyz", None).await;
    assert_eq!(ready["restic"]["version"], real.as_str(), "{ready}");
}
