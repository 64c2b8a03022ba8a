//! Restore drills through the real binary and restic: a sample of the
//! newest snapshot is restored, verified and removed; a damaged
//! repository makes the drill fail loudly; a drill schedule runs drills on
//! its own.

use serde_json::{json, Value};

use crate::support::{count_state, fill, AgentProc};

async fn policy_with_backup(agent: &AgentProc, src: &std::path::Path, repo: &std::path::Path, extra: Value) -> String {
    let mut body = json!({
        "name": "drilled",
        "source": { "path": src },
        "repository": { "url": repo, "password": "drill-pw" },
        "schedule": { "intervalSeconds": 86400 },
    });
    body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    let p = agent.create_policy(body).await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") >= 1).await;
    id
}

fn drills(runs: &[Value]) -> Vec<&Value> {
    runs.iter().filter(|r| r["kind"] == "drill" && r["finishedAt"].is_string()).collect()
}

#[tokio::test]
async fn a_drill_restores_and_verifies_a_sample_then_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let (src, repo, state) = (dir.path().join("src"), dir.path().join("repo"), dir.path().join("state"));
    fill(&src, 40, 3000);
    std::fs::write(src.join("odd[1].txt"), b"glob characters").unwrap();
    let agent = AgentProc::start(&state, &[]).unwrap();
    let id = policy_with_backup(
        &agent,
        &src,
        &repo,
        json!({ "drill": { "schedule": { "intervalSeconds": 604800 }, "sampleFiles": 10 } }),
    )
    .await;

    let (status, run) = agent.call("POST", &format!("/v1/policies/{id}/drill"), None).await;
    assert_eq!(status, 202, "{run}");
    assert_eq!(run["kind"], "drill");
    let runs = agent.wait_runs(&id, 60, "the drill", |r| !drills(r).is_empty()).await;
    let d = drills(&runs)[0];
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(d["summary"]["filesChecked"], 10, "{d}");
    assert_eq!(d["summary"]["bytesChecked"], 30000, "{d}");
    assert!(d["summary"]["mismatches"].as_array().is_none_or(|m| m.is_empty()), "{d}");
    assert!(d["warning"].as_str().unwrap_or("").contains("1 files with glob characters"), "{d}");
    assert!(d["snapshotId"].as_str().is_some_and(|s| s.len() == 64), "{d}");
    let scratch = state.join("drills");
    assert!(std::fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0) == 0, "the scratch directory is left behind");

    // Damage every data pack: the next drill fails, loudly.
    for entry in walk(&repo.join("data")) {
        let mut bytes = std::fs::read(&entry).unwrap();
        // Every 256th byte, so every blob in the pack is hit.
        for b in bytes.iter_mut().step_by(256) {
            *b ^= 0xff;
        }
        std::fs::write(&entry, bytes).unwrap();
    }
    let (status, _) = agent.call("POST", &format!("/v1/policies/{id}/drill"), None).await;
    assert_eq!(status, 202);
    let runs = agent.wait_runs(&id, 60, "the second drill", |r| drills(r).len() >= 2).await;
    let d = drills(&runs)[0];
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["error"]["code"], "drill_mismatch", "{d}");
    assert!(!d["summary"]["mismatches"].as_array().unwrap().is_empty(), "{d}");
    let listed = agent.get(&format!("/v1/runs?policy={id}&kind=drill&state=failed")).await;
    assert_eq!(listed["runs"].as_array().unwrap().len(), 1, "{listed}");
    assert!(std::fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0) == 0, "the scratch directory is left behind");
}

#[tokio::test]
async fn a_drill_schedule_runs_drills_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (src, repo, state) = (dir.path().join("src"), dir.path().join("repo"), dir.path().join("state"));
    fill(&src, 5, 100);
    let agent = AgentProc::start(&state, &[]).unwrap();
    let id =
        policy_with_backup(&agent, &src, &repo, json!({ "drill": { "schedule": { "intervalSeconds": 2 } } })).await;
    let runs = agent
        .wait_runs(&id, 60, "two scheduled drills", |r| {
            drills(r).iter().filter(|d| d["trigger"] == "schedule" && d["state"] == "succeeded").count() >= 2
        })
        .await;
    assert!(drills(&runs).iter().all(|d| d["summary"]["filesChecked"] == 5), "{runs:?}");
}

#[tokio::test]
async fn a_drill_before_any_backup_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fill(&src, 1, 10);
    let agent = AgentProc::start(&dir.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "never", "paused": true, "source": { "path": src },
            "repository": { "url": dir.path().join("repo"), "password": "x" },
            "schedule": { "intervalSeconds": 86400 },
        }))
        .await;
    let id = p["id"].as_str().unwrap();
    agent.call("POST", &format!("/v1/policies/{id}/drill"), None).await;
    let runs = agent.wait_runs(id, 60, "the drill", |r| !drills(r).is_empty()).await;
    let d = drills(&runs)[0];
    assert_eq!(d["state"], "failed", "{d}");
    assert!(["snapshot_not_found", "repository_not_found"].contains(&d["error"]["code"].as_str().unwrap()), "{d}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
