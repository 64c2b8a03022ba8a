//! The Kubernetes adapter with the real agent binary, the real restic and
//! real bind mounts under a temporary kubelet root, against the wire-level
//! API server stand-in (`soda-syncer-standin`; kubectl drives it in its own
//! tests to show it answers like a real one).

use serde_json::{json, Value};
use soda_syncer_standin::kube::KubeStandin;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::{count_state, fill, restic, wait_for_log, AgentProc, BindMount};

pub(crate) fn b64(s: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).unwrap()
}

/// One node of the test cluster: its kubelet root, state and agent.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) kubelet: PathBuf,
    pub(crate) state: PathBuf,
    pub(crate) mounts: Vec<BindMount>,
    pub(crate) agent: Option<AgentProc>,
}

pub(crate) struct Cluster {
    pub(crate) api: KubeStandin,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) kubeconfig: PathBuf,
    pub(crate) repo: PathBuf,
}

impl Cluster {
    pub(crate) async fn new() -> Cluster {
        let api = KubeStandin::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let repo = dir.path().join("repo");
        for ns in ["app", "soda-syncer"] {
            api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})).unwrap();
        }
        api.apply(json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "fast"}, "provisioner": "csi.example.com"}))
            .unwrap();
        api.apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "repo-keys", "namespace": "app"},
            "data": {"RESTIC_REPOSITORY": b64(&repo.display().to_string()), "RESTIC_PASSWORD": b64("k8s-repo-pw")}}))
            .unwrap();
        Cluster { api, dir, kubeconfig, repo }
    }

    pub(crate) fn node(&self, name: &str) -> Node {
        self.api
            .apply(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}))
            .unwrap();
        let kubelet = self.dir.path().join(format!("kubelet-{name}"));
        std::fs::create_dir_all(kubelet.join("pods")).unwrap();
        Node {
            name: name.into(),
            kubelet,
            state: self.dir.path().join(format!("state-{name}")),
            mounts: Vec::new(),
            agent: None,
        }
    }

    pub(crate) fn start(&self, node: &mut Node) {
        self.start_with(node, &[]);
    }

    pub(crate) fn start_with(&self, node: &mut Node, extra: &[&str]) {
        let (kc, kd) = (self.kubeconfig.display().to_string(), node.kubelet.display().to_string());
        let mut args = vec![
            "--kubernetes=on".to_string(),
            format!("--kubeconfig={kc}"),
            format!("--kubelet-dir={kd}"),
            format!("--node-name={}", node.name),
            "--namespace=soda-syncer".into(),
            "--rescan-seconds=1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        node.agent = Some(AgentProc::start(&node.state, &args).unwrap());
    }

    /// A claim bound to a CSI volume, used by a running pod on `node`, its
    /// data really mounted where the kubelet would mount it.
    pub(crate) fn csi_claim(&self, node: &mut Node, claim: &str, annotations: Value) -> PathBuf {
        let pv = format!("pv-{claim}");
        self.api
            .apply(json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                    "volumeMode": "Filesystem",
                    "csi": {"driver": "csi.example.com", "volumeHandle": format!("h-{claim}")},
                    "claimRef": {"namespace": "app", "name": claim}},
                "status": {"phase": "Bound"}}))
            .unwrap();
        self.claim(claim, &pv, annotations);
        // The API server assigns the pod's uid; the kubelet's path uses it.
        let pod = self
            .api
            .apply(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("pod-{claim}"), "namespace": "app"},
                "spec": {"nodeName": node.name, "containers": [{"name": "app", "image": "busybox"}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]},
                "status": {"phase": "Running"}}))
            .unwrap();
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
        let data = self.dir.path().join(format!("data-{claim}"));
        fill(&data, 20, 2000);
        let vol = node.kubelet.join("pods").join(&uid).join("volumes/kubernetes.io~csi").join(&pv);
        node.mounts.push(BindMount::new(&data, &vol.join("mount")).unwrap());
        std::fs::write(
            vol.join("vol_data.json"),
            json!({"specVolID": pv, "driverName": "csi.example.com", "volumeHandle": format!("h-{claim}"),
                "nodeName": node.name, "volumeLifecycleMode": "Persistent"})
            .to_string(),
        )
        .unwrap();
        data
    }

    pub(crate) fn claim(&self, claim: &str, pv: &str, annotations: Value) {
        self.api
            .apply(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": "app", "annotations": annotations},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast", "volumeName": pv,
                    "resources": {"requests": {"storage": "1Gi"}}},
                "status": {"phase": "Bound"}}))
            .unwrap();
    }

    pub(crate) fn pvc(&self, claim: &str) -> Value {
        self.api.get("v1", "PersistentVolumeClaim", Some("app"), claim).unwrap_or(Value::Null)
    }

    pub(crate) fn annotate(&self, claim: &str, key: &str, value: Option<&str>) {
        let mut pvc = self.pvc(claim);
        let a = pvc["metadata"]["annotations"].as_object_mut().unwrap();
        match value {
            Some(v) => a.insert(key.into(), v.into()),
            None => a.remove(key),
        };
        pvc["metadata"].as_object_mut().unwrap().remove("resourceVersion");
        self.api.apply(pvc).unwrap();
    }

    /// The reasons of the Events about a claim, oldest first.
    pub(crate) fn event_reasons(&self, claim: &str) -> Vec<String> {
        self.api
            .list("events.k8s.io/v1", "Event", Some("app"))
            .into_iter()
            .filter(|e| e["regarding"]["name"] == claim)
            .map(|e| e["reason"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

pub(crate) async fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn policy_named(agent: &AgentProc, name: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (st, v) = agent.call("GET", &format!("/v1/policies/{name}"), None).await;
        if st == 200 {
            return v;
        }
        assert!(Instant::now() < deadline, "no policy {name} after {secs} s\nagent log:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn wait_policy(
    agent: &AgentProc,
    name: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = agent.get(&format!("/v1/policies/{name}")).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {v}\nagent log:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn names(v: &Value) -> Vec<String> {
    v["policies"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn an_annotated_claim_is_backed_up_and_the_claim_shows_it() {
    let c = Cluster::new().await;
    let mut a = c.node("node-a");
    c.csi_claim(
        &mut a,
        "data",
        json!({"soda-syncer.io/backup": "true", "soda-syncer.io/schedule": "6h", "soda-syncer.io/secret": "repo-keys",
            "soda-syncer.io/retention": "keepLast=3"}),
    );
    // Not opted in: never backed up.
    c.csi_claim(&mut a, "scratch", json!({}));
    c.start(&mut a);
    let agent = a.agent.as_ref().unwrap();

    let p = policy_named(agent, "app-data", 30).await;
    assert_eq!(p["origin"], "kubernetes", "{p}");
    assert_eq!(p["repository"]["secretRef"], json!({"namespace": "app", "name": "repo-keys"}), "{p}");
    assert_eq!(p["repository"]["passwordSet"], false, "the password stays in the Secret: {p}");
    assert_eq!(p["schedule"]["intervalSeconds"], 21600);
    assert_eq!(p["retention"]["keepLast"], 3);
    let id = p["id"].as_str().unwrap().to_string();
    let runs = agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") >= 1).await;
    let snapshot = runs[0]["snapshotId"].as_str().unwrap().to_string();
    let out = restic(&c.repo.display().to_string(), "k8s-repo-pw", &[], &["snapshots", "--json"]).unwrap();
    assert!(out.contains(&snapshot), "{out}");
    assert!(!agent.log_text().contains("k8s-repo-pw"), "the Secret's password reached the log");
    let listed = agent.get("/v1/policies").await;
    assert_eq!(names(&listed), ["app-data"], "only the opted-in claim");

    // Status where operators look: the claim's annotations and Events.
    let pvc = eventually(20, "the backup's annotations on the claim", || {
        let pvc = c.pvc("data");
        (pvc["metadata"]["annotations"]["soda-syncer.io/last-backup-state"] == "succeeded").then_some(pvc)
    })
    .await;
    let ann = &pvc["metadata"]["annotations"];
    assert_eq!(ann["soda-syncer.io/last-snapshot-id"], snapshot.as_str(), "{ann}");
    assert_eq!(ann["soda-syncer.io/policy-id"], id.as_str(), "{ann}");
    assert_eq!(ann["soda-syncer.io/node"], "node-a", "{ann}");
    assert!(ann["soda-syncer.io/next-backup-time"].is_string(), "{ann}");
    eventually(20, "the Events", || {
        let r = c.event_reasons("data");
        (r.contains(&"BackupPolicyCreated".to_string()) && r.contains(&"BackupSucceeded".to_string())).then_some(())
    })
    .await;

    // The API may not edit what the annotations own.
    let (st, v) = agent.call("PATCH", "/v1/policies/app-data", Some(json!({"tags": ["x"]}))).await;
    assert_eq!((st, v["error"]["code"].as_str()), (409, Some("managed_by_kubernetes")), "{v}");

    // An annotation edit changes the schedule within seconds.
    c.annotate("data", "soda-syncer.io/schedule", Some("0 3 * * *"));
    wait_policy(agent, "app-data", 15, "the new schedule", |p| p["schedule"]["cron"] == "0 3 * * *").await;

    // A bad annotation is reported on the claim, the policy left as it was.
    c.annotate("data", "soda-syncer.io/retention", Some("keepForever=1"));
    eventually(15, "the InvalidAnnotation event", || {
        c.event_reasons("data").contains(&"InvalidAnnotation".to_string()).then_some(())
    })
    .await;
    let status = c.pvc("data")["metadata"]["annotations"]["soda-syncer.io/status"].clone();
    assert!(status.as_str().unwrap_or("").contains("soda-syncer.io/retention"), "{status}");
    c.annotate("data", "soda-syncer.io/retention", None);

    // The claim deleted: the policy is paused by the agent, not deleted.
    c.api.delete("v1", "PersistentVolumeClaim", Some("app"), "data").unwrap();
    let p = wait_policy(agent, "app-data", 15, "the pause", |p| p["status"]["state"] == "volumeGone").await;
    assert!(p["status"]["message"].as_str().unwrap().contains("deleted"), "{p}");
    assert_eq!(p["nextRunAt"], Value::Null, "{p}");
}

#[tokio::test]
async fn each_node_backs_up_its_own_claims_and_one_legacy_call_reaches_every_node() {
    let c = Cluster::new().await;
    let (mut a, mut b) = (c.node("node-a"), c.node("node-b"));
    let opt_in = json!({"soda-syncer.io/backup": "true", "soda-syncer.io/secret": "repo-keys"});
    c.csi_claim(&mut a, "on-a", opt_in.clone());
    c.csi_claim(&mut b, "on-b", opt_in);
    c.start(&mut a);
    c.start(&mut b);
    let (agent_a, agent_b) = (a.agent.as_ref().unwrap(), b.agent.as_ref().unwrap());
    policy_named(agent_a, "app-on-a", 30).await;
    policy_named(agent_b, "app-on-b", 30).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(names(&agent_a.get("/v1/policies").await), ["app-on-a"]);
    assert_eq!(names(&agent_b.get("/v1/policies").await), ["app-on-b"]);

    // soda-proxy reaches only node A's agent; node B's volumes are backed up too.
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
    for (agent, claim) in [(agent_a, "on-a"), (agent_b, "on-b")] {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let list = agent.get("/v1/policies").await;
            let legacy: Vec<&Value> =
                list["policies"].as_array().unwrap().iter().filter(|p| p["origin"] == "legacy").collect();
            if let Some(p) = legacy.first() {
                assert_eq!(legacy.len(), 1, "{list}");
                assert_eq!(p["volume"], format!("pv-{claim}"), "{p}");
                let id = p["id"].as_str().unwrap();
                agent.wait_runs(id, 60, "the legacy backup", |r| count_state(r, "succeeded") >= 1).await;
                break;
            }
            assert!(Instant::now() < deadline, "no legacy policy on the agent of {claim}\n{}", agent.log_text());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let hosts = restic(&legacy_repo.display().to_string(), "legacy-pw", &[], &["snapshots", "--json"]).unwrap();
    assert!(hosts.contains("node-a") && hosts.contains("node-b"), "{hosts}");
    let shared = c.api.list("v1", "Secret", Some("soda-syncer"));
    assert_eq!(shared.len(), 1, "one shared request per repository: {shared:?}");
}

#[tokio::test]
async fn block_volumes_are_reported_local_volumes_found_without_a_pod_and_restarts_survived() {
    let c = Cluster::new().await;
    let mut a = c.node("node-a");
    let opt_in = json!({"soda-syncer.io/backup": "true", "soda-syncer.io/secret": "repo-keys"});
    // A Block-mode claim used on this node: reported, not skipped in silence.
    c.api
        .apply(json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-raw"},
            "spec": {"capacity": {"storage": "1Gi"}, "volumeMode": "Block", "storageClassName": "fast",
                "csi": {"driver": "csi.example.com", "volumeHandle": "raw"},
                "claimRef": {"namespace": "app", "name": "raw"}}}))
        .unwrap();
    c.claim("raw", "pv-raw", opt_in.clone());
    c.api
        .apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "db", "namespace": "app"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "db", "image": "x"}],
                "volumes": [{"name": "raw", "persistentVolumeClaim": {"claimName": "raw"}}]},
            "status": {"phase": "Running"}}))
        .unwrap();
    // A local PV pinned to this node, no pod using it: backed up from spec.local.path.
    let local = c.dir.path().join("local-disk");
    fill(&local, 3, 100);
    local_pv(&c, "pv-local", &local, "node-a", "local");
    c.claim("local", "pv-local", opt_in.clone());
    // One pinned to another node: not ours.
    let other = c.dir.path().join("other-disk");
    fill(&other, 1, 10);
    local_pv(&c, "pv-other", &other, "node-z", "elsewhere");
    c.claim("elsewhere", "pv-other", opt_in.clone());
    c.start(&mut a);
    let agent = a.agent.take().unwrap();
    let agent = &agent;

    let p = policy_named(agent, "app-local", 30).await;
    assert_eq!(p["source"]["path"], local.display().to_string(), "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "the local volume's backup", |r| count_state(r, "succeeded") >= 1).await;
    eventually(20, "the VolumeUnsupported event", || {
        c.event_reasons("raw").contains(&"VolumeUnsupported".to_string()).then_some(())
    })
    .await;
    let status = c.pvc("raw")["metadata"]["annotations"]["soda-syncer.io/status"].clone();
    assert!(status.as_str().unwrap_or("").contains("Block"), "{status}");
    assert_eq!(names(&agent.get("/v1/policies").await), ["app-local"]);

    // The API server restarts mid-watch, then its watch history expires:
    // changes made after each are still seen.
    c.api.restart().await;
    c.csi_claim(&mut a, "after-restart", opt_in.clone());
    policy_named(agent, "app-after-restart", 40).await;
    c.api.expire_watches();
    c.csi_claim(&mut a, "after-expiry", opt_in);
    policy_named(agent, "app-after-expiry", 40).await;
}

pub(crate) fn local_pv(c: &Cluster, name: &str, path: &Path, node: &str, claim: &str) {
    c.api
        .apply(json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"capacity": {"storage": "1Gi"}, "volumeMode": "Filesystem", "storageClassName": "fast",
                "local": {"path": path},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
                "claimRef": {"namespace": "app", "name": claim}}}))
        .unwrap();
}

/// Application hooks: pod annotations run through `pods/exec` (the
/// stand-in runs the argv on this host) before and after the snapshot;
/// `Fail` fails the run and still runs `post`, `Continue` leaves a warning,
/// a hook past its timeout is abandoned (the process killed) with a clear error.
#[tokio::test]
async fn pod_hooks_run_around_the_backup_through_pods_exec() {
    let c = Cluster::new().await;
    c.api.exec_runs_locally(true);
    let mut a = c.node("node-a");
    let opt_in =
        json!({"soda-syncer.io/backup": "true", "soda-syncer.io/schedule": "6h", "soda-syncer.io/secret": "repo-keys"});
    let log = |claim: &str| c.dir.path().join(format!("hooks-{claim}.log"));
    let append = |claim: &str, line: &str| json!(["/bin/sh", "-c", format!("echo {line} >> {}", log(claim).display())]);
    let cases = [
        (
            "hooked",
            json!({"pre.hook.soda-syncer.io/command": append("hooked", "pre").to_string(),
            "post.hook.soda-syncer.io/command": append("hooked", "post").to_string(),
            "post.hook.soda-syncer.io/container": "side"}),
        ),
        (
            "failpre",
            json!({"pre.hook.soda-syncer.io/command": r#"["/bin/sh","-c","echo not ready >&2; exit 3"]"#,
            "post.hook.soda-syncer.io/command": append("failpre", "post").to_string()}),
        ),
        (
            "contpre",
            json!({"pre.hook.soda-syncer.io/command": r#"["/bin/sh","-c","exit 4"]"#,
            "pre.hook.soda-syncer.io/on-error": "Continue",
            "post.hook.soda-syncer.io/command": append("contpre", "post").to_string()}),
        ),
        (
            "slowpre",
            json!({"pre.hook.soda-syncer.io/command": r#"["/bin/sleep","37"]"#,
            "pre.hook.soda-syncer.io/timeout": "1s",
            "post.hook.soda-syncer.io/command": append("slowpre", "post").to_string()}),
        ),
    ];
    for (claim, hooks) in &cases {
        c.csi_claim(&mut a, claim, opt_in.clone());
        // The hooks are annotations on the pod, which has two containers.
        let mut pod = c.api.get("v1", "Pod", Some("app"), &format!("pod-{claim}")).unwrap();
        pod["metadata"]["annotations"] = hooks.clone();
        pod["spec"]["containers"] = json!([{"name": "app", "image": "busybox"}, {"name": "side", "image": "busybox"}]);
        pod["metadata"].as_object_mut().unwrap().remove("resourceVersion");
        c.api.apply(pod).unwrap();
    }
    c.start(&mut a);
    let agent = a.agent.as_ref().unwrap();
    let first_run = |claim: &'static str| async move {
        let p = policy_named(agent, &format!("app-{claim}"), 30).await;
        let id = p["id"].as_str().unwrap().to_string();
        let runs = agent
            .wait_runs(&id, 60, &format!("the backup of {claim}"), |r| {
                r.iter().any(|r| r["state"] == "succeeded" || r["state"] == "failed")
            })
            .await;
        runs.last().unwrap().clone()
    };
    let read = |claim: &str| std::fs::read_to_string(log(claim)).unwrap_or_default();

    // pre, then the snapshot, then post; each in its container.
    let run = first_run("hooked").await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(run["warning"], Value::Null, "{run}");
    assert_eq!(read("hooked"), "pre\npost\n");
    let execs: Vec<_> = c.api.execs().into_iter().filter(|e| e.pod == "pod-hooked").collect();
    assert_eq!(execs.len(), 2, "{execs:?}");
    assert_eq!((execs[0].namespace.as_str(), execs[0].container.as_str()), ("app", "app"), "pre: the first container");
    assert_eq!(execs[0].command, serde_json::from_value::<Vec<String>>(append("hooked", "pre")).unwrap());
    assert_eq!(execs[1].container, "side", "post: the named container");

    // on-error Fail (the default): no backup, and post still ran.
    let run = first_run("failpre").await;
    assert_eq!(run["state"], "failed", "{run}");
    assert_eq!(run["error"]["code"], "pre_hook_failed", "{run}");
    let msg = run["error"]["message"].as_str().unwrap();
    assert!(msg.contains("exited with code 3") && msg.contains("not ready") && msg.contains("pod-failpre"), "{msg}");
    assert_eq!(read("failpre"), "post\n");
    assert_eq!(run["snapshotId"], Value::Null, "{run}");

    // on-error Continue: backed up, with a warning naming the hook.
    let run = first_run("contpre").await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let warning = run["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("exited with code 4") && warning.contains("pod-contpre"), "{run}");
    assert_eq!(read("contpre"), "post\n");

    // Past its timeout: abandoned (the stand-in kills the process when the
    // connection closes), a clear error, and post ran.
    let run = first_run("slowpre").await;
    assert_eq!(run["error"]["code"], "pre_hook_failed", "{run}");
    assert!(run["error"]["message"].as_str().unwrap().contains("timeout of 1 s"), "{run}");
    assert_eq!(read("slowpre"), "post\n");
    eventually(10, "the timed-out hook's process to be killed", || {
        crate::support::children_named(std::process::id(), "sleep").is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn one_agent_maintains_a_repository_shared_across_nodes() {
    let c = Cluster::new().await;
    let (mut a, mut b) = (c.node("node-a"), c.node("node-b"));
    let opt_in = json!({"soda-syncer.io/backup": "true", "soda-syncer.io/secret": "repo-keys"});
    c.csi_claim(&mut a, "shared-a", opt_in.clone());
    c.csi_claim(&mut b, "shared-b", opt_in);
    let fast = ["--prune-every-seconds=2", "--check-every-seconds=2", "--maintenance-jitter-seconds=0"];
    c.start_with(&mut a, &fast);
    c.start_with(&mut b, &fast);
    let (agent_a, agent_b) = (a.agent.as_ref().unwrap(), b.agent.as_ref().unwrap());
    let pa = policy_named(agent_a, "app-shared-a", 30).await;
    let pb = policy_named(agent_b, "app-shared-b", 30).await;
    let maint = |r: &Value| matches!(r["kind"].as_str(), Some("prune" | "check")) && r["state"] == "succeeded";
    let done = |r: &Value| maint(r) && r["warning"].is_null();
    let skipped = |r: &Value| maint(r) && r["warning"].as_str().is_some_and(|w| w.starts_with("skipped"));
    let ra = agent_a.wait_runs(pa["id"].as_str().unwrap(), 90, "maintenance on a", |r| r.iter().any(maint)).await;
    let rb = agent_b.wait_runs(pb["id"].as_str().unwrap(), 90, "maintenance on b", |r| r.iter().any(maint)).await;
    let lease = c.api.list("coordination.k8s.io/v1", "Lease", Some("soda-syncer"));
    let maintainer = lease
        .iter()
        .find(|l| l["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("soda-syncer-maint-")))
        .map(|l| l["spec"]["holderIdentity"].as_str().unwrap_or("").to_string())
        .unwrap_or_else(|| panic!("no maintenance Lease: {lease:?}"));
    let (mine, other) = if maintainer == "node-a" { (&ra, &rb) } else { (&rb, &ra) };
    assert!(mine.iter().any(done) && !mine.iter().any(skipped), "the maintainer maintains: {mine:?}");
    assert!(other.iter().any(skipped) && !other.iter().any(done), "the other skips: {other:?}");
}

/// Start `node`'s agent, wait for its liveness Lease (named after this
/// host), and back up a small directory once into the cluster's shared
/// repository with a paused API policy; returns the policy id.
async fn one_backup_with_a_liveness_lease(c: &Cluster, node: &mut Node) -> String {
    let data = c.dir.path().join("data");
    fill(&data, 5, 1000);
    c.start_with(node, &[&format!("--allowed-root={}", c.dir.path().display())]);
    let agent = node.agent.as_ref().unwrap();
    let me = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let lease = format!("soda-syncer-host-{me}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.api.get("coordination.k8s.io/v1", "Lease", Some("soda-syncer"), &lease).is_none() {
        assert!(Instant::now() < deadline, "no liveness lease {lease}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = agent
        .create_policy(json!({"name": "shared", "source": {"path": data}, "paused": true,
            "schedule": {"intervalSeconds": 3600},
            "repository": {"url": c.repo, "password": "k8s-repo-pw"}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") == 1).await;
    id
}

/// restic run by "another node's agent": its own UTS namespace, so its
/// locks carry that host name.
fn restic_on_host(
    host: &str,
    repo: &str,
    env: &[(String, String)],
    password: &str,
    cache: &Path,
    args: &[&str],
) -> std::process::Child {
    std::process::Command::new("unshare")
        .args(["--uts", "--", "sh", "-c", "hostname \"$0\" && exec restic \"$@\"", host])
        .args(args)
        .arg("-r")
        .arg(repo)
        .envs(env.iter().cloned())
        .env("RESTIC_PASSWORD", password)
        .env("RESTIC_CACHE_DIR", cache)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn liveness_lease(c: &Cluster, host: &str, renewed_secs_ago: i64) {
    let t = chrono::Utc::now() - chrono::Duration::seconds(renewed_secs_ago);
    let micro = t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    c.api
        .apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": format!("soda-syncer-host-{host}"), "namespace": "soda-syncer"},
            "spec": {"holderIdentity": host, "leaseDurationSeconds": 30, "renewTime": micro, "acquireTime": micro}}))
        .unwrap();
}

/// node-b's agent is alive (a fresh Lease) and its restic holds the
/// repository's exclusive lock: a backup of `id` waits. That restic dies by
/// kill -9 and leaves its lock, but the Lease is still fresh: nothing proves
/// the holder dead, so the lock stays and the backup still waits.
async fn a_live_nodes_lock_is_waited_for(
    c: &Cluster,
    agent: &AgentProc,
    id: &str,
    repo: &str,
    env: &[(String, String)],
    password: &str,
    locks: impl Fn() -> usize,
) {
    liveness_lease(c, "node-b-pod", 0);
    let cache = c.dir.path().join("cache-b");
    let mut check =
        restic_on_host("node-b-pod", repo, env, password, &cache, &["check", "--read-data", "--limit-download", "1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while locks() == 0 {
        assert!(Instant::now() < deadline, "node-b's restic took no lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    wait_for_log(agent, "locked by a live process; waiting", 60).await;
    // SAFETY: the process this test started.
    unsafe { libc::kill(check.id() as i32, libc::SIGKILL) };
    let _ = check.wait();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let runs = agent.get(&format!("/v1/runs?policy={id}")).await;
    assert_eq!(runs["runs"][0]["state"], "running", "still waiting: {runs}");
    assert_eq!(locks(), 1, "a lock of a node whose Lease is fresh was broken");
    assert!(!agent.log_text().contains("holder is gone"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_left_on_another_node_is_broken_once_that_nodes_agent_lease_expires_not_before() {
    let c = Cluster::new().await;
    let mut a = c.node("node-a");
    let id = one_backup_with_a_liveness_lease(&c, &mut a).await;
    let agent = a.agent.as_ref().unwrap();

    let repo = c.repo.display().to_string();
    let locks = || std::fs::read_dir(c.repo.join("locks")).map(|d| d.count()).unwrap_or(0);
    a_live_nodes_lock_is_waited_for(&c, agent, &id, &repo, &[], "k8s-repo-pw", locks).await;

    // node-b's agent stops renewing: once its Lease has expired (plus the
    // grace), its lock goes and the waiting backup goes on by itself.
    liveness_lease(&c, "node-b-pod", 120);
    let runs = agent.wait_runs(&id, 90, "the backup after the wait", |r| count_state(r, "succeeded") == 2).await;
    assert_eq!(runs[0]["trigger"], "manual");
    assert!(agent.log_text().contains("removed a lock whose holder is gone"), "{}", agent.log_text());
    assert_eq!(std::fs::read_dir(c.repo.join("locks")).unwrap().count(), 0);
}

/// An S3 repository's lock files cannot be deleted by the agent itself: a
/// dead node's lock there goes by `restic unlock` run as that host.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_nodes_lock_in_an_s3_repository_goes_once_its_lease_expires_not_before() {
    let c = Cluster::new().await;
    let s3 = crate::servers::MotoS3::start().unwrap();
    let mut a = c.node("node-a");
    let data = c.dir.path().join("data");
    fill(&data, 5, 1000);
    c.start_with(&mut a, &[&format!("--allowed-root={}", c.dir.path().display())]);
    let agent = a.agent.as_ref().unwrap();
    let (repo, pw, env) = (s3.repo_url("shared"), "s3-shared-pw", s3.env());
    let env_json: serde_json::Map<String, Value> = env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let p = agent
        .create_policy(json!({"name": "s3-shared", "source": {"path": data}, "paused": true,
            "schedule": {"intervalSeconds": 3600},
            "repository": {"url": repo, "password": pw, "env": env_json}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") == 1).await;
    let locks = || restic(&repo, pw, &env, &["list", "locks", "--no-lock"]).unwrap().lines().count();

    a_live_nodes_lock_is_waited_for(&c, agent, &id, &repo, &env, pw, locks).await;

    // Its Lease expires: the lock goes (unlocked as node-b-pod) and the
    // waiting backup goes on by itself.
    liveness_lease(&c, "node-b-pod", 120);
    agent.wait_runs(&id, 90, "the backup after the wait", |r| count_state(r, "succeeded") == 2).await;
    assert!(agent.log_text().contains("restic unlock run as that host"), "{}", agent.log_text());
    assert_eq!(locks(), 0);
}

// Multi-threaded: the stand-in must answer the hand-back while this thread
// waits for the agent to exit.
#[tokio::test(flavor = "multi_thread")]
async fn liveness_leases_of_agents_gone_for_over_an_hour_are_deleted_and_a_clean_stop_hands_its_own_back() {
    let c = Cluster::new().await;
    let mut a = c.node("node-a");
    let lease = |name: &str| c.api.get("coordination.k8s.io/v1", "Lease", Some("soda-syncer"), name);
    // A pod replaced two hours ago, and one whose Lease expired ten minutes
    // ago (its restic's locks may still be younger than restic's own
    // 30-minute rule: it must stay, it is the proof that they are dead).
    liveness_lease(&c, "replaced-pod", 2 * 3600);
    liveness_lease(&c, "recent-pod", 600);
    // Handed back two hours ago (no holder), and a Lease that is not a
    // liveness Lease at all, as old.
    let two_hours_ago = (chrono::Utc::now() - chrono::Duration::hours(2)).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    for (name, holder) in
        [("soda-syncer-host-stopped-pod", None), ("soda-syncer-maint-0123456789abcdef", Some("node-x"))]
    {
        c.api
            .apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "soda-syncer"},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": 30, "renewTime": two_hours_ago}}))
            .unwrap();
    }
    c.start(&mut a);
    let agent = a.agent.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lease("soda-syncer-host-replaced-pod").is_some() || lease("soda-syncer-host-stopped-pod").is_some() {
        assert!(Instant::now() < deadline, "the Leases of gone agents stayed\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(agent.log_text().contains("removed the liveness Lease of an agent gone for over an hour"));
    assert!(lease("soda-syncer-host-recent-pod").is_some(), "a Lease expired 10 minutes ago was deleted");
    assert!(lease("soda-syncer-maint-0123456789abcdef").is_some(), "a maintenance Lease was deleted");
    let me = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let own = format!("soda-syncer-host-{me}");
    assert_eq!(lease(&own).expect("its own liveness Lease")["spec"]["holderIdentity"], me.as_str());

    // A clean stop hands its own Lease back (no holder: other nodes may
    // remove its locks at once) and dates it, so a later sweep can tell its age.
    let stopped = chrono::Utc::now();
    assert!(agent.terminate().success());
    let spec = lease(&own).expect("kept after a clean stop")["spec"].clone();
    assert!(spec["holderIdentity"].is_null() || spec["holderIdentity"] == "", "{spec}\n{}", agent.log_text());
    let renewed = chrono::DateTime::parse_from_rfc3339(spec["renewTime"].as_str().unwrap()).unwrap();
    assert!(renewed >= stopped - chrono::Duration::seconds(1), "renewTime {renewed} is not the hand-back ({stopped})");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_cannot_renew_its_liveness_lease_stops_running_restic_until_it_can() {
    let c = Cluster::new().await;
    let mut a = c.node("node-a");
    let id = one_backup_with_a_liveness_lease(&c, &mut a).await;
    let agent = a.agent.as_ref().unwrap();

    // The API server stops answering: after the Lease's 30 s the node is fenced.
    c.api.fail_next(u32::MAX, 503);
    wait_for_log(agent, "restic fenced", 60).await;
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    let runs = agent.wait_runs(&id, 30, "the fenced backup", |r| r.len() == 2 && r[0]["state"] == "failed").await;
    assert_eq!(runs[0]["error"]["code"], "node_fenced", "{}", runs[0]);
    assert!(runs[0]["error"]["message"].as_str().unwrap().contains("liveness Lease"), "{}", runs[0]);

    // Back: the Lease is renewed and backups run again.
    c.api.fail_next(0, 503);
    wait_for_log(agent, "restic allowed again", 30).await;
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    agent.wait_runs(&id, 60, "a backup after the fence", |r| count_state(r, "succeeded") == 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_naming_a_local_repository_outside_the_roots_fails_the_run_and_creates_nothing() {
    let c = Cluster::new().await;
    let mut a = c.node("node-a");
    let evil = format!("/etc/soda-syncer-evil-{}", std::process::id());
    c.api
        .apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "evil-keys", "namespace": "app"},
            "data": {"RESTIC_REPOSITORY": b64(&evil), "RESTIC_PASSWORD": b64("pw")}}))
        .unwrap();
    c.csi_claim(&mut a, "evil", json!({"soda-syncer.io/backup": "true", "soda-syncer.io/secret": "evil-keys"}));
    c.start(&mut a);
    let agent = a.agent.as_ref().unwrap();
    let p = policy_named(agent, "app-evil", 30).await;
    let runs = agent
        .wait_runs(p["id"].as_str().unwrap(), 60, "the refused backup", |r| r.iter().any(|r| r["state"] == "failed"))
        .await;
    let failed = runs.iter().find(|r| r["state"] == "failed").unwrap();
    assert_eq!(failed["error"]["code"], "repository_not_allowed", "{failed}");
    assert!(failed["error"]["message"].as_str().unwrap().contains("--repository-root"), "{failed}");
    assert!(!std::path::Path::new(&evil).exists(), "the agent created {evil}");
}
