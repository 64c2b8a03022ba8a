//! Immutable backups (issue 20): nodes write with credentials that cannot
//! delete; `soda-syncer maintain`, with its own credentials on an endpoint
//! that can, applies the retention and prunes. Real servers: rclone's
//! `serve restic --append-only` and restic's rest-server `--append-only`,
//! each beside a second process over the same directory without it (the
//! maintainer's endpoint), the real restic from PATH and the real binary.

use crate::servers::{RcloneRest, RestServer};
use crate::support::{count_state, fill, restic, AgentProc, BIN};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PW: &str = "append-only-repo-pw";
const DELEGATED: &str = "delegated to the maintainer";

fn snapshots_of(url: &str, tag: Option<&str>) -> Vec<Value> {
    let mut args = vec!["snapshots", "--json", "--no-lock"];
    if let Some(t) = tag {
        args.extend(["--tag", t]);
    }
    serde_json::from_str(&restic(url, PW, &[], &args).unwrap()).unwrap()
}

/// Run restic with the node's credentials and expect a refused delete:
/// restic 0.17+ gives up on a 403 at once; 0.14 retries it with backoff
/// for many minutes, so it is stopped (SIGINT, by its pid) once the first
/// refusal shows. Returns stderr; panics if restic succeeded.
fn refused_with_node_credentials(url: &str, args: &[&str]) -> String {
    refused_with(url, &[], args)
}

/// As [`refused_with_node_credentials`], with storage keys in restic's environment.
fn refused_with(url: &str, env: &[(String, String)], args: &[&str]) -> String {
    let cache = tempfile::tempdir().unwrap();
    let mut child = Command::new("restic")
        .args(args)
        .env("RESTIC_REPOSITORY", url)
        .env("RESTIC_PASSWORD", PW)
        .env("RESTIC_CACHE_DIR", cache.path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let refused = line.contains("403") || line.contains("Access Denied");
                text.push_str(&line);
                text.push('\n');
                if refused && line.contains("retrying after") {
                    // SAFETY: SIGINT to our own child, by its pid.
                    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                assert!(Instant::now() < deadline, "restic {args:?} neither ended nor was refused; stderr:\n{text}");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "restic {args:?} with the node's credentials succeeded; stderr:\n{text}");
    assert!(
        text.contains("403") || text.contains("Access Denied"),
        "restic {args:?} failed, but not for a refused delete:\n{text}"
    );
    text
}

/// A raw HTTP DELETE of a repository file with the node's user.
async fn raw_delete(base: &str, user: &str, pass: &str, path: &str) -> u16 {
    reqwest::Client::new()
        .delete(format!("{base}/{path}"))
        .basic_auth(user, Some(pass))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn restore_matches(agent: &AgentProc, id: &str, data: &Path, target: &Path) {
    let (st, run) = agent.call("POST", &format!("/v1/policies/{id}/restore"), Some(json!({"target": target}))).await;
    assert_eq!(st, 202, "{run}");
    let run_id = run["id"].as_str().unwrap().to_string();
    agent
        .wait_runs(id, 60, "the restore", |r| {
            r.iter()
                .any(|r| r["id"] == run_id.as_str() && ["succeeded", "failed"].contains(&r["state"].as_str().unwrap()))
        })
        .await;
    let run = agent.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    for name in ["f00000", "f00007"] {
        assert_eq!(std::fs::read(data.join(name)).unwrap(), std::fs::read(target.join(name)).unwrap(), "{name}");
    }
}

/// Pause the policy and wait until none of its runs is queued or running.
async fn pause_and_settle(agent: &AgentProc, id: &str) -> Vec<Value> {
    let (st, v) = agent.call("POST", &format!("/v1/policies/{id}/pause"), None).await;
    assert_eq!(st, 200, "{v}");
    agent
        .wait_runs(id, 60, "the runs to settle", |r| {
            r.iter().all(|r| !["queued", "running"].contains(&r["state"].as_str().unwrap_or("")))
        })
        .await
}

fn write_maintainer_config(
    dir: &Path,
    agent: &AgentProc,
    agent_repository: &str,
    url: &str,
    extra: &str,
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (url_file, pw_file) = (dir.join("url"), dir.join("password"));
    std::fs::write(&url_file, url).unwrap();
    std::fs::write(&pw_file, PW).unwrap();
    let config = dir.join("maintainer.yaml");
    std::fs::write(
        &config,
        format!(
            "agents:\n- url: {}\n  tokenFile: {}\nrepositories:\n- agentRepository: {agent_repository}\n  urlFile: {}\n  passwordFile: {}\n{extra}",
            agent.url,
            agent.state_dir.join("token").display(),
            url_file.display(),
            pw_file.display()
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn an_append_only_rclone_repository_keeps_every_snapshot_until_the_maintainer_applies_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 20, 2000);
    let node = RcloneRest::start_append_only(&tmp.path().join("rest")).unwrap();
    let admin = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    let agent = AgentProc::start(&tmp.path().join("agent"), &[]).unwrap();
    // As a new user would: nothing says append-only; the agent finds out.
    let p = agent
        .create_policy(json!({
            "name": "ao", "source": {"path": data},
            "repository": {"url": node.url("repo"), "password": PW},
            // Every run a real backup (the volume does not change between
            // them, and a proven-unchanged run makes no snapshot to forget).
            "verifyUnchanged": false,
            "schedule": {"intervalSeconds": 2}, "retention": {"keepLast": 1},
        }))
        .await;
    let id = p["id"].as_str().unwrap();
    let runs = agent.wait_runs(id, 90, "four backups", |r| count_state(r, "succeeded") >= 4).await;
    assert_eq!(count_state(&runs, "failed"), 0, "{runs:#?}\n{}", agent.log_text());
    let delegated = runs.iter().filter(|r| r["summary"]["retention"] == DELEGATED).count();
    assert!(delegated >= 2, "retention was not reported as delegated: {runs:#?}");
    let runs = pause_and_settle(&agent, id).await;
    assert_eq!(count_state(&runs, "failed"), 0, "{runs:#?}");
    let v = agent.get(&format!("/v1/policies/{id}")).await;
    assert!(v["maintenanceLease"].as_str().unwrap().starts_with("soda-syncer-maint-"), "{v}");

    // Every snapshot is there, and the node's credentials cannot change that.
    let tag = format!("policy={id}");
    let all = snapshots_of(&admin.url("repo"), Some(&tag));
    assert_eq!(all.len(), count_state(&runs, "succeeded"), "keepLast 1 removed nothing: {all:#?}");
    refused_with_node_credentials(&node.url("repo"), &["forget", "--keep-last", "1"]);
    let first = all[0]["id"].as_str().unwrap();
    assert_eq!(raw_delete(&node.base_url(), node.user(), node.pass(), &format!("repo/snapshots/{first}")).await, 403);
    assert_eq!(snapshots_of(&admin.url("repo"), Some(&tag)).len(), all.len());
    restore_matches(&agent, id, &data, &tmp.path().join("restored-before")).await;

    // Unreferenced data (a snapshot of other files that the maintainer's
    // credentials forgot): the node's prune would delete packs, and is refused.
    let scratch = tmp.path().join("scratch");
    fill(&scratch, 3, 50_000);
    restic(
        &admin.url("repo"),
        PW,
        &[],
        &["backup", "--host", "scratch", "--tag", "scratch", scratch.to_str().unwrap()],
    )
    .unwrap();
    let scratch_id = snapshots_of(&admin.url("repo"), Some("scratch"))[0]["id"].as_str().unwrap().to_string();
    restic(&admin.url("repo"), PW, &[], &["forget", &scratch_id]).unwrap();
    refused_with_node_credentials(&node.url("repo"), &["prune"]);
    assert_eq!(snapshots_of(&admin.url("repo"), Some(&tag)).len(), all.len());

    // The maintainer, with its own endpoint: retention from the agent's API, then prune and check.
    let config = write_maintainer_config(
        &tmp.path().join("maint"),
        &agent,
        &format!("rest:{}/repo/", node.base_url()),
        &admin.url("repo"),
        "",
    );
    // In a cluster it holds the repository's maintenance Lease, the one
    // the agents name (API server stand-in; see tests/it/kube.rs).
    let api = soda_syncer_standin::kube::KubeStandin::start().await;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "soda-syncer"}})).unwrap();
    let lease_name = v["maintenanceLease"].as_str().unwrap();
    let lease = |holder: &str, renewed_secs_ago: i64| {
        let t = chrono::Utc::now() - chrono::Duration::seconds(renewed_secs_ago);
        let micro = t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
        api.apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": lease_name, "namespace": "soda-syncer"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3600, "renewTime": micro, "acquireTime": micro}}))
            .unwrap();
    };
    let maintain_once = || {
        let out = Command::new(BIN)
            .args(["maintain", "--once", "--lease-namespace", "soda-syncer", "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(tmp.path().join("maint-state"))
            .env("SODA_SYNCER_LOG", "info")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "maintain --once failed:\n{log}");
        log
    };
    // An agent that still holds it (renewed a minute ago): left alone.
    lease("node-a", 60);
    let log = maintain_once();
    assert!(log.contains("another maintainer holds the repository's Lease"), "{log}");
    assert_eq!(snapshots_of(&admin.url("repo"), Some(&tag)).len(), all.len(), "nothing forgotten");
    // Expired: taken over.
    lease("node-a", 7200);
    let started = Instant::now();
    let log = maintain_once();
    let held = api.get("coordination.k8s.io/v1", "Lease", Some("soda-syncer"), lease_name).unwrap();
    assert!(held["spec"]["holderIdentity"].as_str().unwrap().starts_with("maintainer-"), "{held}");
    assert!(log.contains("pruned") && log.contains("checked"), "{log}");
    assert!(!log.contains(node.pass()) && !log.contains(admin.pass()), "a password in the log:\n{log}");
    eprintln!("maintain --once took {:?}", started.elapsed());
    let left = snapshots_of(&admin.url("repo"), Some(&tag));
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["id"], all.last().unwrap()["id"], "the newest snapshot is the one kept");
    restic(&admin.url("repo"), PW, &[], &["check"]).unwrap();
    restore_matches(&agent, id, &data, &tmp.path().join("restored-after")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rest_server_append_only_policy_never_forgets_recovers_a_stale_lock_and_the_maintainer_prunes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 20, 2000);
    let dir = tmp.path().join("rest");
    let node = RestServer::start(&dir, true).unwrap();
    let admin = RestServer::start(&dir, false).unwrap();
    let fast = [
        "--prune-every-seconds=2",
        "--check-every-seconds=2",
        "--maintenance-jitter-seconds=0",
        "--maintenance-gap-seconds=0",
    ];
    let agent = AgentProc::start(&tmp.path().join("agent"), &fast).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "ao", "source": {"path": data}, "appendOnly": true,
            "repository": {"url": node.url("repo"), "password": PW},
            // Every run a real backup (the volume does not change between
            // them, and a proven-unchanged run makes no snapshot to forget).
            "verifyUnchanged": false,
            "schedule": {"intervalSeconds": 2}, "retention": {"keepLast": 2},
        }))
        .await;
    assert_eq!(p["appendOnly"], true, "{p}");
    let id = p["id"].as_str().unwrap();
    agent.wait_runs(id, 90, "four backups", |r| count_state(r, "succeeded") >= 4).await;
    // The agent's scheduled prune and check are the maintainer's: skipped, and say why.
    let delegated = |r: &Value| {
        matches!(r["kind"].as_str(), Some("prune" | "check"))
            && r["trigger"] == "schedule"
            && r["warning"].as_str().is_some_and(|w| w.starts_with("skipped: the repository is append-only"))
    };
    agent.wait_runs(id, 60, "a scheduled prune or check left to the maintainer", |r| r.iter().any(delegated)).await;
    let runs = pause_and_settle(&agent, id).await;
    assert_eq!(count_state(&runs, "failed"), 0, "{runs:#?}\n{}", agent.log_text());
    for r in runs.iter().filter(|r| matches!(r["kind"].as_str(), Some("prune" | "check"))) {
        assert!(delegated(r), "a scheduled maintenance run that was not delegated: {r:#}");
    }
    for r in runs.iter().filter(|r| r["kind"] == "backup") {
        assert_eq!(r["summary"]["retention"], DELEGATED, "every run left retention to the maintainer: {r:#}");
        assert_eq!(r["summary"]["snapshotsForgotten"], 0);
    }
    let tag = format!("policy={id}");
    let all = snapshots_of(&admin.url("repo"), Some(&tag));
    let backups: Vec<Value> = runs.iter().filter(|r| r["kind"] == "backup").cloned().collect();
    assert_eq!(all.len(), count_state(&backups, "succeeded"));
    refused_with_node_credentials(&node.url("repo"), &["forget", "--keep-last", "1"]);
    let first = all[0]["id"].as_str().unwrap();
    assert_eq!(raw_delete(&node.base_url(), node.user(), node.pass(), &format!("repo/snapshots/{first}")).await, 403);

    // A restic killed (SIGKILL) while it held a lock on the append-only
    // repository: the agent's check removes the stale lock through the
    // node's endpoint (rest-server lets append-only clients delete locks).
    let cache = tempfile::tempdir().unwrap();
    let mut stuck = Command::new("restic")
        .args(["backup", "--stdin", "--stdin-filename", "never-finished", "--host", "elsewhere"])
        .env("RESTIC_REPOSITORY", node.url("repo"))
        .env("RESTIC_PASSWORD", PW)
        .env("RESTIC_CACHE_DIR", cache.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let locks = dir.join("repo").join("locks");
    let deadline = Instant::now() + Duration::from_secs(30);
    let stale = loop {
        if let Some(e) = std::fs::read_dir(&locks).unwrap().flatten().next() {
            break e.file_name();
        }
        assert!(Instant::now() < deadline, "restic backup --stdin took no lock");
        std::thread::sleep(Duration::from_millis(50));
    };
    stuck.kill().unwrap();
    stuck.wait().unwrap();
    let (st, run) = agent.call("POST", &format!("/v1/policies/{id}/maintenance"), Some(json!({"check": true}))).await;
    assert_eq!(st, 202, "{run}");
    let run_id = run["id"].as_str().unwrap().to_string();
    agent
        .wait_runs(id, 60, "the check", |r| r.iter().any(|r| r["id"] == run_id.as_str() && r["state"] == "succeeded"))
        .await;
    assert!(!locks.join(&stale).exists(), "the stale lock is still there");
    // Asked for by hand, a prune on this repository is reported as delegated, not run.
    let (st, run) = agent.call("POST", &format!("/v1/policies/{id}/maintenance"), Some(json!({"prune": true}))).await;
    assert_eq!(st, 202, "{run}");
    let run_id = run["id"].as_str().unwrap().to_string();
    let runs = agent
        .wait_runs(id, 60, "the prune", |r| r.iter().any(|r| r["id"] == run_id.as_str() && r["state"] == "succeeded"))
        .await;
    let pr = runs.iter().find(|r| r["id"] == run_id.as_str()).unwrap();
    assert_eq!(pr["summary"]["retention"], DELEGATED, "{pr:#}");

    // A retention floor: whatever the agent reports, nothing younger than a day goes.
    let floor = write_maintainer_config(
        &tmp.path().join("maint-floor"),
        &agent,
        &format!("rest:{}/repo", node.base_url()),
        &admin.url("repo"),
        "keepWithinAtLeast: 1d\n",
    );
    let out = Command::new(BIN)
        .args(["maintain", "--once", "--config"])
        .arg(&floor)
        .arg("--state-dir")
        .arg(tmp.path().join("maint-floor-state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(snapshots_of(&admin.url("repo"), Some(&tag)).len(), all.len(), "the floor kept every snapshot");

    // The maintainer as a service: metrics show its prune and check.
    let config = write_maintainer_config(
        &tmp.path().join("maint"),
        &agent,
        &format!("rest:{}/repo", node.base_url()),
        &admin.url("repo"),
        "pollSeconds: 1\ngapSeconds: 0\n",
    );
    let log_path = tmp.path().join("maint.log");
    let mut maint = Command::new(BIN)
        .args(["maintain", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(tmp.path().join("maint-state"))
        .env("SODA_SYNCER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let addr = log.split("address=").nth(1).and_then(|s| s.split_whitespace().next()).map(str::to_string);
        if let Some(addr) = addr {
            if let Ok(r) = reqwest::get(format!("http://{addr}/metrics")).await {
                let text = r.text().await.unwrap();
                let nonzero = |name: &str| {
                    text.lines().any(|l| l.starts_with(name) && !l.ends_with(" 0") && l.contains("repository="))
                };
                if nonzero("soda_syncer_repository_last_prune_timestamp")
                    && nonzero("soda_syncer_repository_last_check_timestamp")
                {
                    break text;
                }
            }
        }
        if Instant::now() > deadline {
            let _ = maint.kill();
            let _ = maint.wait();
            panic!("the maintainer's metrics never showed a prune and a check; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // SAFETY: SIGTERM to our own child, by its pid.
    unsafe { libc::kill(maint.id() as i32, libc::SIGTERM) };
    let status = maint.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "maintain exited with {status}:\n{log}");
    assert!(metrics.contains("soda_syncer_maintainer_snapshots_forgotten_total"), "{metrics}");
    assert!(!log.contains(admin.pass()), "the maintainer's password in its log:\n{log}");
    let left = snapshots_of(&admin.url("repo"), Some(&tag));
    assert_eq!(left.len(), 2, "keepLast 2: {left:#?}");
    restore_matches(&agent, id, &data, &tmp.path().join("restored-after")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_the_agent_is_told_is_append_only_never_sees_a_forget() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 5, 1000);
    let node = RcloneRest::start_append_only(&tmp.path().join("rest")).unwrap();
    // Named without its user and password, as an operator would write it.
    let flag = format!("--append-only-repository=rest:{}/repo/", node.base_url());
    let agent = AgentProc::start(&tmp.path().join("agent"), &[&flag]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "told", "source": {"path": data},
            "repository": {"url": node.url("repo"), "password": PW},
            // Every run a real backup (the volume does not change between
            // them, and a proven-unchanged run makes no snapshot to forget).
            "verifyUnchanged": false,
            "schedule": {"intervalSeconds": 2}, "retention": {"keepLast": 1},
        }))
        .await;
    let id = p["id"].as_str().unwrap();
    agent.wait_runs(id, 60, "three backups", |r| count_state(r, "succeeded") >= 3).await;
    let runs = pause_and_settle(&agent, id).await;
    assert_eq!(count_state(&runs, "failed"), 0, "{runs:#?}");
    // Even the first run (one snapshot, nothing to forget) delegated: no
    // forget was tried, so none was refused.
    for r in runs.iter().filter(|r| r["state"] == "succeeded") {
        assert_eq!(r["summary"]["retention"], DELEGATED, "{r:#}");
    }
    assert!(!agent.log_text().contains("refused a delete"), "a forget was tried:\n{}", agent.log_text());
}
