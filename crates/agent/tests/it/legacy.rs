//! The upstream contract: soda-proxy's exact `POST /snapshot` body with an
//! empty `resticSourceRepo` backs up every CSI volume mounted under the
//! kubelet directory, picks up volumes that appear later, and pauses (never
//! deletes) the policy of a volume that goes away.

use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::servers::RcloneRest;
use crate::support::{count_state, fill, restic, AgentProc, BindMount};

fn csi_volume(kubelet: &Path, pod: &str, pv: &str, backing: &Path) -> BindMount {
    let dir = kubelet.join("pods").join(pod).join("volumes/kubernetes.io~csi").join(pv);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("vol_data.json"),
        json!({"specVolID": pv, "volumeHandle": format!("handle-{pv}"), "driverName": "local.csi.test", "nodeName": "test-node", "volumeLifecycleMode": "Persistent"}).to_string(),
    )
    .unwrap();
    BindMount::new(backing, &dir.join("mount")).unwrap()
}

async fn policies(agent: &AgentProc) -> Vec<Value> {
    agent.get("/v1/policies").await["policies"].as_array().cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_body_backs_up_every_csi_volume_on_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    let kubelet = tmp.path().join("kubelet");
    let (a, b) = (tmp.path().join("backing-a"), tmp.path().join("backing-b"));
    fill(&a, 10, 1000);
    fill(&b, 7, 1000);
    let _vol_a = csi_volume(&kubelet, "pod-uid-1", "pvc-aaaa", &a);
    let rest = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    let repo = rest.url("legacy");
    let agent = AgentProc::start(
        &tmp.path().join("state"),
        &["--kubelet-dir", kubelet.to_str().unwrap(), "--rescan-seconds", "1"],
    )
    .unwrap();
    let body = json!({
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
        "RESTIC_REPOSITORY": repo, "RESTIC_PASSWORD": "legacy-pw",
        "timeInterval": 2, "resticSourceRepo": ""
    });
    let t = Instant::now();
    let (status, resp) = agent.call("POST", "/snapshot", Some(body.clone())).await;
    let answered = t.elapsed();
    assert_eq!(status, 201, "{resp}");
    assert!(answered < Duration::from_secs(1), "answered in {answered:?}");
    assert_eq!(resp["policies"].as_array().unwrap().len(), 1, "{resp}");
    assert_eq!(resp["policies"][0]["volume"], "pvc-aaaa");
    let id_a = resp["policies"][0]["id"].as_str().unwrap().to_string();

    // The same body again: still one policy per volume.
    let (status, again) = agent.call("POST", "/snapshot", Some(body.clone())).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["policies"][0]["action"], "updated");
    assert_eq!(policies(&agent).await.len(), 1);

    // Periodic snapshots, every 2 s.
    let runs =
        agent.wait_runs(&id_a, 60, "two backups of the first volume", |r| count_state(r, "succeeded") >= 2).await;
    let ok = runs.iter().find(|r| r["state"] == "succeeded").unwrap();
    assert_eq!(ok["snapshotId"].as_str().unwrap().len(), 64, "the full id, resolved from the REST listing: {ok}");

    // A volume that appears later gets its own policy and backups.
    let _vol_b = csi_volume(&kubelet, "pod-uid-2", "pvc-bbbb", &b);
    let deadline = Instant::now() + Duration::from_secs(20);
    let id_b = loop {
        if let Some(p) = policies(&agent).await.into_iter().find(|p| p["volume"] == "pvc-bbbb") {
            break p["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the new volume was not picked up:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    agent.wait_runs(&id_b, 60, "a backup of the second volume", |r| count_state(r, "succeeded") >= 1).await;

    // The first volume goes away: its policy is paused and flagged, not deleted.
    drop(_vol_a);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = agent.get(&format!("/v1/policies/{id_a}")).await;
        if p["status"]["state"] == "volumeGone" {
            assert_eq!(p["paused"], true);
            assert!(p["status"]["message"].as_str().unwrap().contains("pvc-aaaa"));
            break;
        }
        assert!(Instant::now() < deadline, "the gone volume's policy was not paused: {p}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every snapshot in the repository belongs to one of the two volumes.
    let out = restic(&repo, "legacy-pw", &[], &["snapshots", "--json"]).unwrap();
    let snaps: Vec<Value> = serde_json::from_str(&out).unwrap();
    // One per volume at least: a later scheduled run of an unchanged volume
    // writes none (README, "Unchanged volumes").
    assert!(snaps.len() >= 2, "{snaps:?}");
    assert!(snaps.iter().any(|s| s["id"] == ok["snapshotId"]), "the run names a snapshot that exists");
    for s in &snaps {
        let tags = s["tags"].to_string();
        assert!(tags.contains("volume=pvc-aaaa") || tags.contains("volume=pvc-bbbb"), "{s}");
        assert_eq!(s["hostname"], "test-node");
    }
}
