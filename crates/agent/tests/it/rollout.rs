//! Rollouts: one agent per state directory (a second one exits with code
//! 75, or waits, alive and not ready, and takes over the moment the first
//! exits), and the hand-over of a backup in flight when the old agent is
//! stopped for an upgrade. The real binary, the real restic and the agent's
//! local repository. restic 0.14 (the system restic here) leaves its
//! repository lock behind when it dies on SIGTERM or SIGKILL, so a lock left
//! in the repository means the old agent stopped restic the wrong way.

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{
    children_named, count_state, fill, lock_holder_pid, wait_for_a_lock, wait_for_log, AgentProc, BIN,
};

fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}"))).unwrap().into()
}

/// restic, throttled to `kib` KiB/s of upload: a backup of a few MB then
/// lasts long enough to stop an agent in the middle of it. `exec`, so the
/// agent's child is restic itself (same pid, same signals). More backend
/// connections than the local backend's 2: on SIGINT restic removes its
/// lock through a free connection, and with every one busy uploading at
/// this rate it would wait minutes for one (as on a saturated real link;
/// the README says so).
fn slow_restic(dir: &Path, kib: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let real = crate::servers::which("restic").expect("restic on PATH");
    let wrapper = dir.join("slow-restic");
    let script = format!("#!/bin/sh\nexec '{}' --limit-upload {kib} -o local.connections=8 \"$@\"\n", real.display());
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

/// The restic backups working on `repo` now, whoever their parent is (an
/// orphan counts too): by the repository in their environment.
fn backups_of(repo: &Path) -> Vec<u32> {
    let needle = format!("RESTIC_REPOSITORY={}", repo.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if !std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "restic") {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let has = |hay: &[u8], what: &[u8]| hay.split(|b| *b == 0).any(|part| part == what);
        if has(&cmdline, b"backup") && has(&environ, needle.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// Watches a repository's restic backups every few milliseconds on a
/// thread of its own: the most that ran at once, and every pid seen.
struct BackupWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, BTreeSet<u32>)>>,
}

impl BackupWatch {
    fn start(repo: &Path) -> BackupWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, repo) = (stop.clone(), repo.to_path_buf());
        let thread = std::thread::spawn(move || {
            let (mut most, mut seen) = (0, BTreeSet::new());
            while !s2.load(Ordering::Relaxed) {
                let now = backups_of(&repo);
                most = most.max(now.len());
                seen.extend(now);
                std::thread::sleep(Duration::from_millis(5));
            }
            (most, seen)
        });
        BackupWatch { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> (usize, BTreeSet<u32>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for BackupWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The address a waiting agent logged (`addr=...` on its waiting line).
fn waiting_url(agent: &AgentProc) -> String {
    let log = agent.log_text();
    let line = log.lines().find(|l| l.contains("waiting for it to exit")).expect("the waiting line");
    let addr = line.split("addr=").nth(1).and_then(|a| a.split_whitespace().next()).expect("addr= on the line");
    format!("http://{addr}")
}

async fn get_json(url: &str) -> (u16, Value) {
    let resp = reqwest::get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// Wait until the lock file names `pid`; how long that took.
async fn wait_for_holder(state: &Path, pid: u32, secs: u64) -> Duration {
    let t = Instant::now();
    while lock_holder_pid(state) != Some(pid) {
        assert!(t.elapsed() < Duration::from_secs(secs), "pid {pid} did not take the state directory within {secs} s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t.elapsed()
}

/// No two runs of the list overlap in time (runs that started).
fn assert_no_overlap(runs: &[Value]) {
    type Time = chrono::DateTime<chrono::Utc>;
    let mut spans: Vec<(Time, Option<Time>, &Value)> = runs
        .iter()
        .filter(|r| r["startedAt"].is_string())
        .map(|r| (time(&r["startedAt"]), r["finishedAt"].as_str().map(|_| time(&r["finishedAt"])), r))
        .collect();
    spans.sort_by_key(|s| s.0);
    for w in spans.windows(2) {
        let end = w[0].1.unwrap_or_else(|| panic!("a run still open before a later one started: {}", w[0].2));
        assert!(end <= w[1].0, "two runs overlapped:\n{}\n{}", w[0].2, w[1].2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_on_a_held_state_directory_exits_at_once_with_code_75_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let first = AgentProc::start(&state, &[]).unwrap();
    let t = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--node-name", "test-node", "--state-dir"])
        .arg(&state)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(10), "it waited: {:?}", t.elapsed());
    for part in [
        "is in use by another soda-syncer agent".to_string(),
        format!("pid {} on node test-node", first.pid()),
        "--wait-for-state-lock".into(),
    ] {
        assert!(stderr.contains(&part), "{part:?} not in: {stderr}");
    }
    // The holder is untouched: still the agent the URL file names, still ready.
    assert_eq!(std::fs::read_to_string(state.join("agent.url")).unwrap().trim(), first.url);
    assert_eq!(lock_holder_pid(&state), Some(first.pid()));
    let (st, ready) = first.call("GET", "/readyz", None).await;
    assert_eq!(st, 200, "{ready}");
    assert_eq!(ready["stateLock"]["held"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_agent_schedules_nothing_while_the_holder_lives_and_takes_over_within_a_second_of_its_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 3, 1000);
    let state = tmp.path().join("state");
    let mut first = AgentProc::start(&state, &[]).unwrap();
    let p = first
        .create_policy(json!({"name": "busy", "source": {"path": data}, "schedule": {"intervalSeconds": 1}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    first.wait_runs(&id, 60, "a first backup", |r| count_state(r, "succeeded") >= 1).await;

    let mut second = AgentProc::start_without_waiting(&state, &["--wait-for-state-lock"]).unwrap();
    wait_for_log(&second, "waiting for it to exit", 20).await;
    let waiting = waiting_url(&second);
    assert_eq!(get_json(&format!("{waiting}/healthz")).await.0, 200, "alive while waiting");
    let (st, ready) = get_json(&format!("{waiting}/readyz")).await;
    assert_eq!(st, 503, "{ready}");
    assert_eq!(ready["stateLock"]["held"], false, "{ready}");
    assert_eq!(ready["stateLock"]["holder"]["pid"], first.pid(), "{ready}");
    let (st, refused) = get_json(&format!("{waiting}/v1/policies")).await;
    assert_eq!((st, &refused["error"]["code"]), (503, &json!("state_locked")), "{refused}");
    assert!(second.log_text().contains(&format!("holder=pid {} on node test-node", first.pid())));
    // The URL file still names the holder, so the CLI reaches it.
    assert_eq!(std::fs::read_to_string(state.join("agent.url")).unwrap().trim(), first.url);
    let cli = std::process::Command::new(BIN)
        .arg("--agent-state-dir")
        .arg(&state)
        .args(["policy", "list", "-o", "json"])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert!(String::from_utf8_lossy(&cli.stdout).contains("\"busy\""));

    // While the holder runs two more backups, the waiting agent runs nothing.
    let done = |r: &[Value]| count_state(r, "succeeded");
    let before = done(&first.get(&format!("/v1/runs?policy={id}&limit=100")).await["runs"].as_array().unwrap().clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(children_named(second.pid(), "restic").is_empty(), "the waiting agent started restic");
        let runs = first.get(&format!("/v1/runs?policy={id}&limit=100")).await["runs"].as_array().unwrap().clone();
        if done(&runs) >= before + 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the holder ran no two more backups in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!second.log_text().contains("run started"), "{}", second.log_text());

    assert!(first.terminate().success(), "{}", first.log_text());
    let took = wait_for_holder(&state, second.pid(), 10).await;
    eprintln!("take-over after the holder's exit: {} ms", took.as_millis());
    assert!(took < Duration::from_secs(1), "took {took:?}");
    second.wait_until_holding(30).await.unwrap();
    let (st, ready) = second.call("GET", "/readyz", None).await;
    assert_eq!(st, 200, "{ready}");
    assert_eq!(ready["stateLock"]["holder"]["pid"], second.pid());
    let took_over = chrono::Utc::now();
    let runs = second
        .wait_runs(&id, 60, "a backup by the new holder", |r| {
            r.iter().any(|r| r["state"] == "succeeded" && time(&r["startedAt"]) >= took_over)
        })
        .await;
    assert!(second.log_text().contains("run started"));
    assert_no_overlap(&runs);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_during_a_backup_hands_it_over_without_a_stale_lock_or_two_backups_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 40, 512 * 1024); // 20 MB of incompressible data: ~80 s at 256 KiB/s
    let state = tmp.path().join("state");
    let repo = state.join("repository");
    let slow = slow_restic(tmp.path(), 256);
    // A shorter grace than the default 30 s: restic 0.18+ removes its lock
    // at once on SIGINT but then waits for the throttled uploads in flight
    // (the throttle is not cancellable), so it is killed at the end of the
    // grace (here 5 s) instead of stopping; 0.14 stops in milliseconds.
    let old_args = ["--restic", slow.to_str().unwrap(), "--shutdown-grace-seconds", "12"];
    let mut old = AgentProc::start(&state, &old_args).unwrap();
    let p = old
        .create_policy(json!({"name": "upgraded", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let watch = BackupWatch::start(&repo);
    wait_for_a_lock(&repo).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while backups_of(&repo).is_empty() {
        assert!(Instant::now() < deadline, "no backup running:\n{}", old.log_text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Under way: restic reports bytes read. (restic 0.14 has a window of a
    // few milliseconds after it writes its lock and before it registers it
    // for removal on SIGINT; a stop inside it leaves the lock. The README
    // says so.)
    old.wait_runs(&id, 60, "the backup to be under way", |r| {
        r.first().is_some_and(|r| r["state"] == "running" && r["progress"]["bytesDone"].as_u64().unwrap_or(0) > 0)
    })
    .await;

    // The rollout: SIGTERM to the old agent, and the new one (unthrottled
    // restic: the new version) started in the same moment.
    let sigterm = chrono::Utc::now();
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(old.pid() as i32, libc::SIGTERM) };
    let mut new = AgentProc::start_without_waiting(&state, &["--wait-for-state-lock"]).unwrap();
    let status = old.child.wait().unwrap();
    let old_exit = chrono::Utc::now();
    assert!(status.success(), "the old agent ended with {status}:\n{}", old.log_text());
    new.wait_until_holding(30).await.unwrap();
    let runs = new
        .wait_runs(&id, 60, "the new agent's backup to start", |r| {
            r.iter().any(|r| r["trigger"] == "startup" && r["startedAt"].is_string())
        })
        .await;
    let restarted = runs.iter().find(|r| r["trigger"] == "startup").unwrap();
    let started = time(&restarted["startedAt"]);
    eprintln!(
        "rollout: SIGTERM to old exit {} ms, old exit to new backup start {} ms, SIGTERM to new backup start {} ms",
        (old_exit - sigterm).num_milliseconds(),
        (started - old_exit).num_milliseconds(),
        (started - sigterm).num_milliseconds()
    );
    assert!(
        started - old_exit <= chrono::Duration::seconds(2),
        "the new agent started its backup {} ms after the old one exited",
        (started - old_exit).num_milliseconds()
    );

    let runs = new.wait_runs(&id, 120, "the new agent's backup to succeed", |r| count_state(r, "succeeded") == 1).await;
    let (most_at_once, seen) = watch.finish();
    assert_eq!(most_at_once, 1, "two restic backups of the repository ran at once");
    assert!(seen.len() >= 2, "the old and the new agent's backups were both seen: {seen:?}");
    let interrupted: Vec<&Value> = runs.iter().filter(|r| r["state"] == "interrupted").collect();
    assert_eq!(interrupted.len(), 1, "exactly one run interrupted: {runs:#?}");
    assert_eq!(interrupted[0]["error"]["code"], "agent_stopped", "{}", interrupted[0]);
    let why = interrupted[0]["error"]["message"].as_str().unwrap();
    assert!(why.contains("agent stopping for upgrade"), "{why}");
    assert!(time(&interrupted[0]["finishedAt"]) <= old_exit, "the old agent recorded it before it exited");
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_no_overlap(&runs);
    let log = new.log_text();
    assert!(log.contains("the last stop interrupted this policy's backup; running it again now"), "{log}");
    assert!(!log.contains("removing stale locks"), "the new agent had to clean up after the old one:\n{log}");
    let locks: Vec<String> = std::fs::read_dir(repo.join("locks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !locks.is_empty() {
        let password = std::fs::read_to_string(state.join("repository.password")).unwrap();
        let held: Vec<String> = locks
            .iter()
            .map(|l| {
                crate::support::restic(
                    &repo.display().to_string(),
                    password.trim(),
                    &[],
                    &["cat", "lock", l, "--no-lock"],
                )
                .unwrap_or_else(|e| e.to_string())
            })
            .collect();
        panic!(
            "locks left in the repository: {held:?}\nbackups seen: {seen:?}\nold agent:\n{}\nnew agent:\n{}",
            old.log_text(),
            new.log_text()
        );
    }
    assert!(old.log_text().contains("releasing the state directory lock"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_holders_lock_is_released_by_the_kernel_and_the_waiting_agent_takes_over() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 20, 512 * 1024);
    let state = tmp.path().join("state");
    let repo = state.join("repository");
    let slow = slow_restic(tmp.path(), 256);
    let mut first = AgentProc::start(&state, &["--restic", slow.to_str().unwrap()]).unwrap();
    let p = first
        .create_policy(json!({"name": "killed", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    wait_for_a_lock(&repo).await;
    let mut second = AgentProc::start_without_waiting(&state, &["--wait-for-state-lock"]).unwrap();
    wait_for_log(&second, "waiting for it to exit", 20).await;
    let stale_url = first.url.clone();

    first.kill9();
    let took = wait_for_holder(&state, second.pid(), 10).await;
    eprintln!("take-over after kill -9 of the holder: {} ms", took.as_millis());
    assert!(took < Duration::from_secs(1), "took {took:?}");
    second.wait_until_holding(30).await.unwrap();
    assert_ne!(second.url, stale_url, "the URL file names the new holder");
    // The killed agent's run was left running: the crash path interrupts it
    // and the policy backs up again at once.
    let runs = second
        .wait_runs(&id, 120, "a backup after the take-over", |r| {
            r.iter().any(|r| r["trigger"] == "startup" && r["state"] == "succeeded")
        })
        .await;
    let interrupted: Vec<&Value> = runs.iter().filter(|r| r["state"] == "interrupted").collect();
    assert_eq!(interrupted.len(), 1, "{runs:#?}");
    assert_eq!(interrupted[0]["error"]["code"], "agent_stopped");
    // The killed agent's restic got SIGINT as its parent died (PR_SET_PDEATHSIG)
    // and is gone, not running on as an orphan. (Its repository lock may stay:
    // restic's stderr pipe broke with the agent, and writing its "cleaning up"
    // line there kills it with SIGPIPE first. Removing such locks is the stale
    // lock recovery's job; lifecycle.rs tests it.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backups_of(&repo).is_empty() {
        assert!(Instant::now() < deadline, "a restic of the killed agent runs on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
