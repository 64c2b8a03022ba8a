//! `soda-syncer cluster` against the API server stand-in, with two real
//! agents (each in its own UTS namespace, so each has its own liveness
//! Lease as each DaemonSet pod does): protected claims, the reasons others
//! are not, an agent that stops, a deadline that passes, and the exit code.

use serde_json::{json, Value};
use std::process::Command;

use crate::kube::{eventually, local_pv, Cluster};
use crate::support::BIN;

fn cluster(c: &Cluster, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(BIN)
        .arg("cluster")
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v, format!("{stdout}{stderr}"))
}

fn row<'a>(report: &'a Value, claim: &str) -> &'a Value {
    report["claims"].as_array().unwrap().iter().find(|r| r["name"] == claim).unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_view_answers_for_every_claim_with_agents_up_and_down() {
    let c = Cluster::new().await;
    let (mut a, mut b) = (c.node("node-a"), c.node("node-b"));
    let opt_in = json!({"soda-syncer.io/backup": "true", "soda-syncer.io/secret": "repo-keys"});
    c.csi_claim(&mut a, "on-a", opt_in.clone());
    c.csi_claim(&mut b, "on-b", opt_in.clone());
    c.csi_claim(&mut a, "plain", json!({}));
    // Opted in, but Block mode; and opted in on a node with no agent.
    c.api
        .apply(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "blocky", "namespace": "app", "annotations": opt_in},
            "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Pending"}}))
        .unwrap();
    let disk = c.dir.path().join("disk-c");
    std::fs::create_dir_all(&disk).unwrap();
    local_pv(&c, "pv-orphan", &disk, "node-c", "orphan");
    c.claim("orphan", "pv-orphan", opt_in);
    c.start_with(&mut a, &["--uts-hostname=agent-pod-a"]);
    c.start_with(&mut b, &["--uts-hostname=agent-pod-b"]);
    for claim in ["on-a", "on-b"] {
        eventually(90, &format!("the first backup on {claim}"), || {
            (c.pvc(claim)["metadata"]["annotations"]["soda-syncer.io/last-backup-state"] == "succeeded").then_some(())
        })
        .await;
    }

    let (code, r, out) = cluster(&c, &["-o", "json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        r["summary"],
        json!({"claims": 5, "protected": 2, "overdue": 0, "failing": 0, "unprotected": 3}),
        "{out}"
    );
    for (claim, node) in [("on-a", "node-a"), ("on-b", "node-b")] {
        let x = row(&r, claim);
        assert_eq!(x["protected"], true, "{x}");
        assert_eq!(x["node"], node, "{x}");
        assert_eq!(x["policy"], format!("app-{claim}"), "{x}");
        assert_eq!(x["lastState"], "succeeded", "{x}");
        assert_eq!(x["consistency"], "none", "{x}");
        assert_eq!(x["overdue"], false, "{x}");
        assert!(x["lastSuccess"].is_string() && x["deadline"].is_string(), "{x}");
    }
    assert_eq!(row(&r, "plain")["whyNot"], "notOptedIn", "{out}");
    assert_eq!(row(&r, "blocky")["whyNot"], "blockMode", "{out}");
    assert_eq!(row(&r, "orphan")["whyNot"], "noAgentOnItsNode", "{out}");
    assert_eq!(row(&r, "orphan")["node"], "node-c", "{out}");
    let agents: Vec<&str> = r["agents"].as_array().unwrap().iter().map(|a| a["node"].as_str().unwrap()).collect();
    assert_eq!(agents, ["node-a", "node-b"], "{out}");

    // The table and its summary line; YAML; one namespace.
    let (code, _, table) = cluster(&c, &[]);
    assert_eq!(code, 0, "{table}");
    assert!(table.lines().any(|l| l == "2 of 5 claims protected, 0 overdue, 0 failing, 3 unprotected"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("app        orphan") && l.contains("no: no agent on its node")),
        "{table}"
    );
    let (_, _, yaml) = cluster(&c, &["-o", "yaml"]);
    let y: Value = serde_yaml::from_str(yaml.split("\n2 of 5").next().unwrap()).unwrap_or(Value::Null);
    assert_eq!(y["summary"]["protected"], 2, "{yaml}");
    let (code, r, out) = cluster(&c, &["-o", "json", "-n", "elsewhere"]);
    assert_eq!((code, r["summary"]["claims"].as_u64()), (0, Some(0)), "{out}");

    // Node B's agent stops (it hands its Lease back): its claim is no longer protected.
    b.agent.as_mut().unwrap().terminate();
    let (code, r, out) = cluster(&c, &["-o", "json"]);
    assert_eq!(row(&r, "on-b")["whyNot"], "agentGone", "{out}");
    assert_eq!(row(&r, "on-b")["node"], "node-b", "{out}");
    assert_eq!(r["summary"]["protected"], 1, "{out}");
    assert_eq!(code, 0, "still within its deadline: {out}");

    // Time passes with nobody backing it up: its deadline (as the agent last
    // wrote it) is behind us. The stand-in's clock cannot jump, so the
    // annotation is moved back instead.
    c.annotate("on-b", "soda-syncer.io/backup-deadline", Some("2020-01-01T00:00:00+00:00"));
    let (code, r, out) = cluster(&c, &["-o", "json"]);
    assert_eq!(code, 1, "a claim past its deadline fails the command: {out}");
    assert_eq!(row(&r, "on-b")["overdue"], true, "{out}");
    assert_eq!(r["summary"]["overdue"], 1, "{out}");
    let (code, _, table) = cluster(&c, &[]);
    assert_eq!(code, 1);
    assert!(table.contains("1 of 5 claims protected, 1 overdue, 0 failing, 4 unprotected"), "{table}");
}

#[test]
fn the_cluster_command_says_what_to_do_without_a_kubeconfig() {
    let out = Command::new(BIN)
        .args(["cluster", "--kubeconfig", "/nonexistent/kubeconfig"])
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot read the kubeconfig /nonexistent/kubeconfig"), "{err}");
}
