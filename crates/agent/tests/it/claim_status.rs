//! Status on every claim an agent backs up, whatever made the policy: here
//! the legacy call (soda-proxy's, for every CSI volume, reaching both
//! nodes) and a `/v1` policy whose source is a local PersistentVolume's
//! path, on claims that carry no `soda-syncer.io/` annotation of their own.
//! The real binary, restic and bind mounts, against the API server stand-in.

use serde_json::{json, Value};

use crate::kube::{eventually, local_pv, Cluster};
use crate::support::{count_state, fill, AgentProc};

fn annotations(c: &Cluster, claim: &str) -> Value {
    c.pvc(claim)["metadata"]["annotations"].clone()
}

/// How many times an Event with `reason` was told about `claim`: the
/// Recorder folds a repeat within minutes into the first one's `series`.
fn told(c: &Cluster, claim: &str, reason: &str) -> u64 {
    c.api
        .list("events.k8s.io/v1", "Event", Some("app"))
        .into_iter()
        .filter(|e| e["regarding"]["name"] == claim && e["reason"] == reason)
        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
        .sum()
}

/// The first policy of origin `legacy` on the agent, once there is one.
async fn legacy_policy(agent: &AgentProc, secs: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let list = agent.get("/v1/policies").await;
        if let Some(p) = list["policies"].as_array().unwrap().iter().find(|p| p["origin"] == "legacy") {
            return p.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no legacy policy after {secs} s\n{}", agent.log_text());
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_backed_up_through_the_legacy_call_on_two_nodes_show_annotations_and_events() {
    let c = Cluster::new().await;
    let (mut a, mut b) = (c.node("node-a"), c.node("node-b"));
    // Not opted in by annotation: only the legacy call backs them up.
    c.csi_claim(&mut a, "on-a", json!({}));
    c.csi_claim(&mut b, "on-b", json!({}));
    c.start(&mut a);
    c.start(&mut b);
    let (agent_a, agent_b) = (a.agent.as_ref().unwrap(), b.agent.as_ref().unwrap());

    let legacy_repo = c.dir.path().join("legacy-repo");
    let (st, v) = agent_a
        .call(
            "POST",
            "/snapshot",
            Some(json!({"RESTIC_REPOSITORY": legacy_repo, "RESTIC_PASSWORD": "legacy-pw", "timeInterval": 3600,
                "resticSourceRepo": ""})),
        )
        .await;
    assert!(st < 300, "{st} {v}");
    let mut ids = Vec::new();
    for (agent, node, claim) in [(agent_a, "node-a", "on-a"), (agent_b, "node-b", "on-b")] {
        let p = legacy_policy(agent, 40).await;
        assert_eq!(p["volume"], format!("pv-{claim}"), "{p}");
        let id = p["id"].as_str().unwrap().to_string();
        let runs = agent.wait_runs(&id, 60, "the legacy backup", |r| count_state(r, "succeeded") >= 1).await;
        let snapshot = runs[0]["snapshotId"].as_str().unwrap().to_string();
        let ann = eventually(20, &format!("the backup's annotations on {claim}"), || {
            let a = annotations(&c, claim);
            (a["soda-syncer.io/last-backup-state"] == "succeeded").then_some(a)
        })
        .await;
        assert_eq!(ann["soda-syncer.io/node"], node, "{ann}");
        assert_eq!(ann["soda-syncer.io/policy-id"], id.as_str(), "{ann}");
        assert_eq!(ann["soda-syncer.io/policy-name"], p["name"], "{ann}");
        assert_eq!(ann["soda-syncer.io/last-snapshot-id"], snapshot.as_str(), "{ann}");
        assert_eq!(ann["soda-syncer.io/status"], "active", "{ann}");
        assert_eq!(ann["soda-syncer.io/consistency-used"], "none", "{ann}");
        let success: chrono::DateTime<chrono::Utc> =
            ann["soda-syncer.io/last-success-time"].as_str().unwrap().parse().unwrap();
        let deadline: chrono::DateTime<chrono::Utc> =
            ann["soda-syncer.io/backup-deadline"].as_str().unwrap().parse().unwrap();
        let jitter = p["jitterSeconds"].as_i64().unwrap();
        assert_eq!((deadline - success).num_seconds(), 7200 + jitter, "two intervals and the jitter: {ann}");
        eventually(20, &format!("the BackupSucceeded Event on {claim}"), || {
            (told(&c, claim, "BackupSucceeded") == 1).then_some(())
        })
        .await;
        ids.push(id);
    }

    // A repeat (another success) updates the annotations but sends no Event.
    let before = annotations(&c, "on-a")["soda-syncer.io/last-backup-time"].clone();
    let (st, run) = agent_a.call("POST", &format!("/v1/policies/{}/run", ids[0]), None).await;
    assert_eq!(st, 202, "{run}");
    agent_a.wait_runs(&ids[0], 60, "the second backup", |r| count_state(r, "succeeded") >= 2).await;
    eventually(20, "the second backup's time on the claim", || {
        (annotations(&c, "on-a")["soda-syncer.io/last-backup-time"] != before).then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(told(&c, "on-a", "BackupSucceeded"), 1, "{:?}", c.event_reasons("on-a"));

    // Node B's volume is unmounted: its legacy policy is paused, and the
    // claim says so (the sweep runs every 30 s).
    b.mounts[0].unmount();
    let ann = eventually(45, "the paused status on on-b", || {
        let a = annotations(&c, "on-b");
        a["soda-syncer.io/status"].as_str().is_some_and(|s| s.starts_with("paused: ")).then_some(a)
    })
    .await;
    assert!(ann["soda-syncer.io/status"].as_str().unwrap().contains("no longer mounted"), "{ann}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v1_policy_on_a_local_volumes_path_reports_failure_once_and_recovery_on_its_claim() {
    let c = Cluster::new().await;
    let mut a = c.node("node-a");
    let disk = c.dir.path().join("disk-local");
    fill(&disk, 3, 100);
    local_pv(&c, "pv-local", &disk, "node-a", "by-api");
    c.claim("by-api", "pv-local", json!({}));
    c.start(&mut a);
    let agent = a.agent.as_ref().unwrap();
    let p = agent
        .create_policy(json!({"name": "by-api", "source": {"path": disk},
            "repository": {"url": c.dir.path().join("api-repo"), "password": "pw"},
            "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") >= 1).await;
    eventually(40, "the success on the claim", || {
        let a = annotations(&c, "by-api");
        (a["soda-syncer.io/last-backup-state"] == "succeeded" && a["soda-syncer.io/policy-name"] == "by-api")
            .then_some(())
    })
    .await;

    // The volume's directory goes away: a failure, told once, then repeats are quiet.
    std::fs::remove_dir_all(&disk).unwrap();
    for n in 1..=2 {
        let (st, run) = agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
        assert_eq!(st, 202, "{run}");
        agent.wait_runs(&id, 60, "a failed backup", |r| count_state(r, "failed") >= n).await;
    }
    let ann = eventually(20, "the failure on the claim", || {
        let a = annotations(&c, "by-api");
        (a["soda-syncer.io/last-backup-state"] == "failed").then_some(a)
    })
    .await;
    assert!(ann["soda-syncer.io/last-error"].as_str().unwrap().starts_with("source_missing"), "{ann}");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let reasons = c.event_reasons("by-api");
    assert_eq!(told(&c, "by-api", "BackupFailed"), 1, "a repeated failure is told once: {reasons:?}");

    // Back: a change, so an Event again.
    fill(&disk, 3, 100);
    let (st, _) = agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    assert_eq!(st, 202);
    agent.wait_runs(&id, 60, "the recovery", |r| count_state(r, "succeeded") >= 2).await;
    eventually(20, "the second BackupSucceeded", || (told(&c, "by-api", "BackupSucceeded") == 2).then_some(())).await;
    assert_eq!(annotations(&c, "by-api")["soda-syncer.io/last-backup-state"], "succeeded");
}
