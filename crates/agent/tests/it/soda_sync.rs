//! The SODA sync with real agent binaries, the real restic and real bind
//! mounts, against both stand-ins: the Kubernetes API server
//! (`soda_syncer_standin::kube`, list/watch, Leases with 409 on a stale
//! resourceVersion, Events) and the SODA hotpot API server
//! (`soda_syncer_standin::soda`: 202 on volume create and delete, the dock's
//! `creating` → `available`, merge-only metadata, `{code, message}` errors,
//! connection refused while stopped with the data kept).
//!
//! Kubernetes → SODA: CSI PVs mirrored as SODA volumes by one leader, with
//! failover. SODA → Kubernetes: a claim's policy from its SODA profile,
//! following changes within a poll, paused when the profile goes; a SODA
//! outage never holds up a backup and loses no update.

use serde_json::{json, Value};
use soda_syncer::soda::{SodaAuth, SodaClient, SodaConfig};
use soda_syncer_domain::soda::{HostRequest, NewVolume, DEFAULT_TENANT_ID};
use soda_syncer_standin::soda::{KeystoneUser, SodaStandin, StandinAuth};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::kube::{eventually, policy_named, wait_policy, Cluster, Node};
use crate::support::{count_state, restic, AgentProc};

const PASSWORD: &str = "soda-profile-repo-pw";

/// Start the node's agent with the SODA sync on, polling every `poll` seconds.
fn start(c: &Cluster, node: &mut Node, soda: &SodaStandin, poll: u64) {
    start_with_env(c, node, soda, poll, &[]);
}

/// As `start`, with `env` (the `OPENSDS_*` and `OS_*` variables) added.
fn start_with_env(c: &Cluster, node: &mut Node, soda: &SodaStandin, poll: u64, env: &[(&str, &str)]) {
    let (kc, kd) = (c.kubeconfig.display().to_string(), node.kubelet.display().to_string());
    node.agent = Some(
        AgentProc::start_with_env(
            &node.state,
            &[
                "--kubernetes=on",
                &format!("--kubeconfig={kc}"),
                &format!("--kubelet-dir={kd}"),
                &format!("--node-name={}", node.name),
                "--namespace=soda-syncer",
                "--rescan-seconds=1",
                &format!("--soda-endpoint={}", soda.url()),
                &format!("--soda-poll-seconds={poll}"),
            ],
            env,
        )
        .unwrap(),
    );
}

/// A cluster whose class `fast` is a soda-csi class naming profile `gold`,
/// whose repository is a local directory.
async fn setup() -> (Cluster, SodaStandin, String, PathBuf) {
    let c = Cluster::new().await;
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let repo = c.dir.path().join("soda-repo");
    let profile = soda.put_profile(gold(None, &repo, 3600));
    c.api
        .apply(json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"},
            "provisioner": "soda-csi", "parameters": {"profile": profile}}))
        .unwrap();
    (c, soda, profile, repo)
}

fn gold(id: Option<&str>, repo: &std::path::Path, interval: u64) -> Value {
    let mut p = json!({"name": "gold", "storageType": "block", "description": "backed up by soda-syncer",
        "customProperties": {"RESTIC_REPOSITORY": repo, "RESTIC_PASSWORD": PASSWORD, "TimeInterval": interval},
        "snapshotProperties": {"retention": {"number": 5}}});
    if let Some(id) = id {
        p["id"] = json!(id);
    }
    p
}

fn pv_uid(c: &Cluster, pv: &str) -> String {
    c.api.get("v1", "PersistentVolume", None, pv).unwrap()["metadata"]["uid"].as_str().unwrap().to_string()
}

/// The SODA volumes that mirror a PV.
fn mirrors(soda: &SodaStandin, uid: &str) -> Vec<Value> {
    soda.volumes().into_iter().filter(|v| v["metadata"]["soda-syncer.pvUid"] == uid).collect()
}

fn mirror(soda: &SodaStandin, uid: &str) -> Option<Value> {
    let m = mirrors(soda, uid);
    assert!(m.len() <= 1, "more than one SODA volume for PV {uid}: {m:?}");
    m.into_iter().next()
}

/// A CSI PV with no claim.
fn bare_pv(c: &Cluster, name: &str) {
    c.api
        .apply(json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"capacity": {"storage": "2500Mi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                "csi": {"driver": "csi.example.com", "volumeHandle": format!("h-{name}")}},
            "status": {"phase": "Available"}}))
        .unwrap();
}

/// SIGTERM, then wait without blocking the runtime the stand-ins serve on
/// (the agent hands its lease back to them while it stops).
async fn stop(agent: &mut AgentProc) {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the agent did not stop within 20 s\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `soda-syncer status` through the CLI, as a table, and `/v1/status`'s `sodaSync`.
async fn sync_status(agent: &AgentProc) -> (String, Value) {
    let out = std::process::Command::new(crate::support::BIN)
        .args(["status", "--agent-state-dir"])
        .arg(&agent.state_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8(out.stdout).unwrap(), agent.get("/v1/status").await["sodaSync"].clone())
}

fn log_of(node: &Node) -> String {
    node.agent.as_ref().map(|a| a.log_text()).unwrap_or_default()
}

#[tokio::test]
async fn a_csi_volume_is_mirrored_in_soda_and_its_profile_is_the_claims_policy() {
    let (c, soda, profile, repo) = setup().await;
    let mut a = c.node("node-a");
    // Opted in by its class alone (a soda-csi class naming a profile).
    c.csi_claim(&mut a, "data", json!({"soda-syncer.io/schedule": "6h", "soda-syncer.io/retention": "keepLast=2"}));
    start(&c, &mut a, &soda, 1);
    let agent = a.agent.as_ref().unwrap();

    // Kubernetes → SODA: the PV, its claim, class, driver, node and use.
    let uid = pv_uid(&c, "pv-data");
    let vol =
        eventually(30, "the PV's SODA volume in use", || mirror(&soda, &uid).filter(|v| v["status"] == "inUse")).await;
    assert_eq!((vol["name"].as_str(), vol["size"].as_i64()), (Some("pv-data"), Some(1)), "{vol}");
    assert_eq!(vol["profileId"], profile.as_str(), "{vol}");
    let m = &vol["metadata"];
    for (k, want) in [
        ("soda-syncer.managed", "true"),
        ("k8s.pvName", "pv-data"),
        ("k8s.phase", "Bound"),
        ("k8s.capacityBytes", "1073741824"),
        ("k8s.claimNamespace", "app"),
        ("k8s.claimName", "data"),
        ("k8s.storageClass", "fast"),
        ("k8s.csiDriver", "csi.example.com"),
        ("k8s.volumeHandle", "h-data"),
        ("k8s.node", "node-a"),
        ("k8s.volumeMode", "Filesystem"),
    ] {
        assert_eq!(m[k], want, "{k} in {m}");
    }

    // Sync lag: a PV created now is in SODA within a few seconds.
    let t = Instant::now();
    bare_pv(&c, "pv-late");
    let late_uid = pv_uid(&c, "pv-late");
    let late = eventually(10, "the new PV in SODA", || mirror(&soda, &late_uid)).await;
    let lag = t.elapsed();
    eprintln!("sync lag, PV created to SODA volume listed: {} ms", lag.as_millis());
    assert!(lag < Duration::from_secs(5), "{lag:?}");
    assert_eq!((late["size"].as_i64(), late["name"].as_str()), (Some(3), Some("pv-late")), "2500Mi is 3 GiB: {late}");

    // SODA → Kubernetes: the profile wins for schedule, retention, repository.
    let p = policy_named(agent, "app-data", 30).await;
    assert_eq!(p["repository"]["sodaProfile"], profile.as_str(), "{p}");
    assert_eq!(p["repository"]["url"], Value::Null, "the repository is not stored: {p}");
    assert_eq!(p["schedule"]["intervalSeconds"], 3600, "TimeInterval, not the 6h annotation: {p}");
    assert_eq!(p["retention"]["keepLast"], 5, "snapshotProperties.retention.number: {p}");
    let id = p["id"].as_str().unwrap().to_string();
    let runs = agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") >= 1).await;
    let snapshot = runs[0]["snapshotId"].as_str().unwrap().to_string();
    let out = restic(&repo.display().to_string(), PASSWORD, &[], &["snapshots", "--json"]).unwrap();
    assert!(out.contains(&snapshot), "the profile's repository holds the snapshot: {out}");
    assert!(!agent.log_text().contains(PASSWORD), "the profile's password reached the log");

    // The backup, as the node agent wrote it on the claim, reaches SODA.
    let vol = eventually(20, "the last backup in SODA's metadata", || {
        mirror(&soda, &uid).filter(|v| v["metadata"]["soda-syncer.lastSnapshotId"] == snapshot.as_str())
    })
    .await;
    assert_eq!(vol["metadata"]["soda-syncer.lastBackupState"], "succeeded", "{vol}");
    assert!(vol["metadata"]["soda-syncer.lastBackupTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{vol}");

    // A changed TimeInterval is the policy's within about one poll.
    let t = Instant::now();
    soda.put_profile(gold(Some(&profile), &repo, 600));
    wait_policy(agent, "app-data", 10, "the profile's new interval", |p| p["schedule"]["intervalSeconds"] == 600).await;
    eprintln!("profile change to policy change: {} ms", t.elapsed().as_millis());

    // The profile deleted: the policy paused, a warning on the claim.
    soda.delete_profile(&profile);
    let p = wait_policy(agent, "app-data", 10, "the pause", |p| p["status"]["state"] == "volumeGone").await;
    assert!(p["status"]["message"].as_str().unwrap().contains("was deleted"), "{p}");
    eventually(10, "the ProfileDeleted Event", || {
        c.event_reasons("data").contains(&"ProfileDeleted".to_string()).then_some(())
    })
    .await;
    // Back again: the policy resumes.
    soda.put_profile(gold(Some(&profile), &repo, 600));
    wait_policy(agent, "app-data", 10, "the resumption", |p| p["status"]["state"] == "active").await;

    // The PV deleted: its SODA volume (in use) is made available and deleted.
    c.api.delete("v1", "PersistentVolume", None, "pv-data").unwrap();
    eventually(15, "the SODA volume's deletion", || mirrors(&soda, &uid).is_empty().then_some(())).await;
    assert!(mirror(&soda, &late_uid).is_some(), "the other PV's volume stays");
}

#[tokio::test]
async fn a_soda_outage_holds_up_no_backup_and_the_newest_state_is_pushed_when_soda_returns() {
    let (c, soda, _profile, repo) = setup().await;
    let mut a = c.node("node-a");
    c.csi_claim(&mut a, "data", json!({}));
    start(&c, &mut a, &soda, 1);
    let agent = a.agent.as_ref().unwrap();
    let uid = pv_uid(&c, "pv-data");
    let p = policy_named(agent, "app-data", 30).await;
    let id = p["id"].as_str().unwrap().to_string();
    let runs = agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") >= 1).await;
    let first = runs[0]["snapshotId"].as_str().unwrap().to_string();
    eventually(20, "the first backup in SODA", || {
        mirror(&soda, &uid).filter(|v| v["metadata"]["soda-syncer.lastSnapshotId"] == first.as_str())
    })
    .await;

    // SODA goes away (connection refused). A backup starts at once and uses
    // the profile as last polled.
    soda.stop().await;
    let t = Instant::now();
    let (st, v) = agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    assert_eq!(st, 202, "{v}");
    let runs = agent.wait_runs(&id, 30, "the backup during the outage", |r| count_state(r, "succeeded") >= 2).await;
    let took = t.elapsed();
    eprintln!("backup during the SODA outage: {} ms", took.as_millis());
    let second = runs[0]["snapshotId"].as_str().unwrap().to_string();
    assert_ne!(first, second);
    let out = restic(&repo.display().to_string(), PASSWORD, &[], &["snapshots", "--json"]).unwrap();
    assert!(out.contains(&second), "{out}");
    assert!(agent.log_text().contains("using the profile as last polled"), "{}", agent.log_text());
    // More changes while SODA is away: a new PV.
    bare_pv(&c, "pv-while-away");
    let away_uid = pv_uid(&c, "pv-while-away");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(soda.volumes().iter().all(|v| v["metadata"]["soda-syncer.lastSnapshotId"] != second.as_str()));
    // The outage is visible: API, CLI and metrics say the sync fails, what
    // waits and since when.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (table, st) = loop {
        let (table, st) = sync_status(agent).await;
        if st["state"] == "failing" {
            break (table, st);
        }
        assert!(Instant::now() < deadline, "the sync never showed failing: {st}\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(st["leader"], "node-a", "{st}");
    assert!(st["pendingChanges"].as_u64().unwrap() >= 1, "the PV made while away waits: {st}");
    assert!(st["lagSeconds"].as_u64().unwrap() >= 2, "{st}\n{}", agent.log_text());
    assert_eq!(st["lastError"]["code"], "soda_unreachable", "{st}");
    assert!(st["lastSuccessAt"].as_str().unwrap() < st["lastError"]["at"].as_str().unwrap(), "{st}");
    assert!(table.contains("sync      failing") && table.contains("soda_unreachable"), "{table}");
    let (_, m) = crate::ops::scrape(agent).await;
    // The shipped alert rules name only SODA sync metrics the agent exports.
    let named = crate::ops::soda_sync_rule_metrics(&m);
    assert!(named.len() >= 2 && named.iter().all(|(_, ok)| *ok), "rules name unexported metrics: {named:?}");
    assert!(m.contains("soda_syncer_soda_sync_failing 1"), "{m}");
    assert!(m.contains("soda_syncer_soda_sync_leader 1"), "{m}");
    assert!(m.contains("soda_syncer_soda_sync_errors_total{kind=\"soda_unreachable\"}"), "{m}");

    // SODA back: the newest state is pushed; nothing was lost.
    soda.restart().await;
    let t = Instant::now();
    eventually(20, "the state made during the outage in SODA", || {
        let ok = mirror(&soda, &uid).is_some_and(|v| v["metadata"]["soda-syncer.lastSnapshotId"] == second.as_str())
            && mirror(&soda, &away_uid).is_some();
        ok.then_some(())
    })
    .await;
    eprintln!("SODA restarted to caught up: {} ms", t.elapsed().as_millis());
    // And its end: nothing waits, the error stays as history.
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        let st = agent.get("/v1/status").await["sodaSync"].clone();
        if st["state"] == "ok" && st["pendingChanges"] == 0 {
            break st;
        }
        assert!(Instant::now() < deadline, "the status never caught up: {st}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(st["lagSeconds"], 0, "{st}");
    assert_eq!(st["lastError"]["code"], "soda_unreachable", "{st}");
    assert!(st["lastSuccessAt"].as_str().unwrap() > st["lastError"]["at"].as_str().unwrap(), "{st}");
    assert_eq!(st["profiles"]["failing"], false, "{st}");
    assert!(st["profiles"]["count"].as_u64().unwrap() >= 1, "{st}");
    let log = agent.log_text();
    // The client's own retries (5 tries, backoff to 5 s) may outlast a short
    // outage; a pass that gave up is logged once, and its recovery too.
    let failed = log.matches("SODA sync pass failed; retrying").count();
    assert!(failed <= 1, "logged once at most:\n{log}");
    if failed == 1 {
        assert!(log.contains("SODA sync works again"), "{log}");
    }
}

#[tokio::test]
async fn one_leader_mirrors_each_pv_once_and_another_agent_takes_over_when_it_stops() {
    let c = Cluster::new().await;
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    for pv in ["pv-1", "pv-2", "pv-3"] {
        bare_pv(&c, pv);
    }
    // A crash left two volumes for pv-1; another tool's volume is not ours.
    let client =
        SodaClient::new(SodaConfig::new(soda.url(), SodaAuth::NoAuth { tenant_id: DEFAULT_TENANT_ID.into() })).unwrap();
    let cancel = CancellationToken::new();
    let uid1 = pv_uid(&c, "pv-1");
    for name in ["pv-1", "pv-1-dup"] {
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("soda-syncer.managed".to_string(), "true".to_string());
        metadata.insert("soda-syncer.pvUid".to_string(), uid1.clone());
        let v = NewVolume { name: name.into(), size: 1, metadata, ..Default::default() };
        client.create_volume(&v, &cancel).await.unwrap();
    }
    let foreign = client
        .create_volume(&NewVolume { name: "someone-elses".into(), size: 7, ..Default::default() }, &cancel)
        .await
        .unwrap();

    let (mut a, mut b) = (c.node("node-a"), c.node("node-b"));
    // Polling every 30 s: what happens sooner is the watch's doing.
    start(&c, &mut a, &soda, 30);
    start(&c, &mut b, &soda, 30);
    let uids: Vec<String> = ["pv-1", "pv-2", "pv-3"].iter().map(|p| pv_uid(&c, p)).collect();
    eventually(20, "one SODA volume per PV", || uids.iter().all(|u| mirrors(&soda, u).len() == 1).then_some(())).await;
    // Several passes later, with two agents running: still one each.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for u in &uids {
        assert_eq!(mirrors(&soda, u).len(), 1, "{:?}", soda.volumes());
    }
    // With a 30 s poll, a new PV is synced soon after the watch sees it.
    let t = Instant::now();
    bare_pv(&c, "pv-5");
    let uid5 = pv_uid(&c, "pv-5");
    eventually(5, "pv-5 in SODA", || mirror(&soda, &uid5)).await;
    eprintln!("sync lag with a 30 s poll, PV created to SODA volume listed: {} ms", t.elapsed().as_millis());
    let f = soda.volume(&foreign.id).unwrap();
    assert_eq!((f["size"].as_i64(), f["name"].as_str()), (Some(7), Some("someone-elses")), "untouched: {f}");
    assert_eq!(f["metadata"], Value::Null, "untouched: {f}");

    let holder = |c: &Cluster| {
        c.api.get("coordination.k8s.io/v1", "Lease", Some("soda-syncer"), "soda-syncer-soda-sync").unwrap()["spec"]
            ["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let leader = holder(&c);
    let (gone, stays) = match leader.as_str() {
        "node-a" => (&mut a, &mut b),
        "node-b" => (&mut b, &mut a),
        other => panic!("lease holder {other:?}\n{}\n{}", log_of(&a), log_of(&b)),
    };
    assert!(log_of(gone).contains("now leads the cluster-wide SODA sync"));
    assert!(!log_of(stays).contains("now leads the cluster-wide SODA sync"), "{}", log_of(stays));
    // Both agents name the leader; only the leader has a backlog to report.
    let (_, lead) = sync_status(gone.agent.as_ref().unwrap()).await;
    assert_eq!((lead["state"].as_str(), lead["leader"].as_str()), (Some("ok"), Some(leader.as_str())), "{lead}");
    assert_eq!(lead["pendingChanges"], 0, "{lead}");
    let (table, follow) = sync_status(stays.agent.as_ref().unwrap()).await;
    assert_eq!((follow["state"].as_str(), follow["leader"].as_str()), (Some("following"), Some(leader.as_str())));
    assert!(follow["pendingChanges"].is_null(), "{follow}");
    assert!(table.contains(&format!("leader {leader}")), "{table}");

    // The leader stops: the other agent takes over and syncs.
    let t = Instant::now();
    stop(gone.agent.as_mut().unwrap()).await;
    eprintln!("leader stopped in {} ms", t.elapsed().as_millis());
    let t = Instant::now();
    bare_pv(&c, "pv-4");
    let uid4 = pv_uid(&c, "pv-4");
    eventually(10, "the new leader's sync", || mirror(&soda, &uid4)).await;
    eprintln!("leader stopped to the next PV synced by the new leader: {} ms", t.elapsed().as_millis());
    assert_eq!(holder(&c), stays.name, "{}", log_of(stays));
    c.api.delete("v1", "PersistentVolume", None, "pv-2").unwrap();
    eventually(15, "pv-2's volume deleted by the new leader", || mirrors(&soda, &uids[1]).is_empty().then_some(()))
        .await;
    assert!(soda.volume(&foreign.id).is_some());
}

/// The whole agent with Keystone auth, as soda-proxy's variables give it:
/// it logs in once, mirrors, logs in again when its token expires, and a
/// wrong password is a clear error in the status that never shows it.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_keystone_auth_logs_in_mirrors_and_logs_in_again_when_its_token_expires() {
    const PW: &str = "Keystone-agent-pw-4711";
    let c = Cluster::new().await;
    let soda = SodaStandin::start(StandinAuth::Keystone(KeystoneUser::admin(PW))).await;
    let auth_url = soda.keystone_url();
    let env = |pw: &'static str| {
        vec![
            ("OPENSDS_AUTH_STRATEGY", "keystone"),
            ("OS_AUTH_URL", auth_url.as_str()),
            ("OS_USERNAME", "admin"),
            ("OS_PASSWORD", pw),
            ("OS_PROJECT_NAME", "admin"),
            ("OS_USER_DOMAIN_ID", "default"),
        ]
    };
    bare_pv(&c, "pv-k1");
    let uid1 = pv_uid(&c, "pv-k1");
    let mut a = c.node("node-a");
    start_with_env(&c, &mut a, &soda, 30, &env(PW));
    let v = eventually(20, "pv-k1 in SODA", || mirror(&soda, &uid1)).await;
    assert_eq!(v["tenantId"], soda.project_id().unwrap().as_str(), "{v}");
    // One login, shared by the profile poll and the sync.
    assert_eq!(soda.logins(), 1);

    soda.expire_tokens();
    bare_pv(&c, "pv-k2");
    let uid2 = pv_uid(&c, "pv-k2");
    eventually(20, "pv-k2 in SODA after the token expired", || mirror(&soda, &uid2)).await;
    assert_eq!(soda.logins(), 2, "one new login after the expiry");
    let agent = a.agent.as_ref().unwrap();
    let st = agent.get("/v1/status").await["sodaSync"].clone();
    assert_eq!(st["state"], "ok", "{st}");

    // Another node's agent with a wrong password: a clear error, no secret.
    let mut b = c.node("node-b");
    start_with_env(&c, &mut b, &soda, 1, &env("wrong-password-0815"));
    let other = b.agent.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = other.get("/v1/status").await["sodaSync"].clone();
        if st["profiles"]["lastError"].is_object() {
            break st;
        }
        assert!(Instant::now() < deadline, "no poll error: {st}\n{}", other.log_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(st["profiles"]["lastError"]["code"], "soda_login_failed", "{st}");
    assert_eq!(st["profiles"]["failing"], true, "{st}");
    for text in [st.to_string(), other.log_text(), agent.log_text()] {
        assert!(!text.contains("wrong-password-0815") && !text.contains(PW), "a password shows: {text}");
    }
}

/// A Node with an InternalIP (and a zone) and its CSINode, as a CSI plugin
/// registers it.
fn csi_node(c: &Cluster, name: &str, ip: &str, zone: Option<&str>) {
    let mut labels = json!({"kubernetes.io/hostname": name});
    if let Some(z) = zone {
        labels["topology.kubernetes.io/zone"] = json!(z);
    }
    c.api
        .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}}))
        .unwrap();
    c.api
        .apply(json!({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": name},
            "spec": {"drivers": [{"name": "soda-csi", "nodeID": name}]}}))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_nodes_become_soda_hosts_that_follow_their_node_and_go_with_it() {
    let c = Cluster::new().await;
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    // Someone else registered node-x already: never ours to change.
    let client =
        SodaClient::new(SodaConfig::new(soda.url(), SodaAuth::NoAuth { tenant_id: DEFAULT_TENANT_ID.into() })).unwrap();
    let foreign = HostRequest {
        host_name: "node-x".into(),
        os_type: "linux".into(),
        access_mode: "agentless".into(),
        ip: "10.0.0.99".into(),
        ..Default::default()
    };
    let foreign = client.create_host(&foreign, &CancellationToken::new()).await.unwrap();
    let mut a = c.node("node-a");
    csi_node(&c, "node-a", "10.0.0.1", Some("zone-1"));
    csi_node(&c, "node-x", "10.0.0.2", None);
    start(&c, &mut a, &soda, 1);
    let host = |name: &str| soda.hosts().into_iter().find(|h| h["hostName"] == name);
    let record =
        || c.api.get("v1", "ConfigMap", Some("soda-syncer"), "soda-syncer-soda-hosts").map(|m| m["data"].clone());

    let h = eventually(20, "node-a as a SODA host", || host("node-a")).await;
    assert_eq!((h["ip"].as_str(), h["accessMode"].as_str()), (Some("10.0.0.1"), Some("agentless")), "{h}");
    assert_eq!(h["availabilityZones"], json!(["zone-1"]), "{h}");
    let id = h["id"].as_str().unwrap().to_string();
    let rec = eventually(10, "the record of our hosts", record).await;
    assert_eq!(rec, json!({"node-a": id}), "only the host it made is recorded");
    // A recorded host that SODA does not have (deleted there, or a hand
    // edit) is forgotten at the next pass.
    c.api
        .apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "soda-syncer-soda-hosts", "namespace": "soda-syncer"},
            "data": {"node-a": id, "node-gone": "no-such-host-id"}}))
        .unwrap();
    eventually(10, "the unknown host forgotten", || record().filter(|r| r == &json!({"node-a": id}))).await;

    // node-a's address changes: its host follows, under the same id.
    csi_node(&c, "node-a", "10.0.0.5", Some("zone-1"));
    let h = eventually(20, "node-a's host updated", || host("node-a").filter(|h| h["ip"] == "10.0.0.5")).await;
    assert_eq!(h["id"], id.as_str());

    // node-a leaves the cluster: its host goes; node-x's stays as it was.
    c.api.delete("storage.k8s.io/v1", "CSINode", None, "node-a").unwrap();
    c.api.delete("v1", "Node", None, "node-a").unwrap();
    eventually(20, "node-a's host deleted", || host("node-a").is_none().then_some(())).await;
    eventually(10, "the record emptied", || record().filter(|r| r.as_object().is_none_or(|o| o.is_empty()))).await;
    let x = host("node-x").expect("someone else's host stays");
    assert_eq!((x["id"].as_str(), x["ip"].as_str()), (Some(foreign.id.as_str()), Some("10.0.0.99")), "{x}");
    let log = a.agent.as_ref().unwrap().log_text();
    assert!(log.contains("updated the node's SODA host") && log.contains("deleted its SODA host"), "{log}");
}
