//! What a new user trips on first, each tried the way that user would: the
//! README's curl example for the legacy call, `curl /metrics | promtool check
//! metrics`, the `runs` table, `serve --help`, a source that went away, and
//! `-o yaml`. The real binary, the real restic, promtool from Debian.

use serde_json::{json, Value};
use std::process::{Command, Stdio};

use crate::support::{count_state, fill, AgentProc, BIN};

/// The CLI against `agent`, with the agent's URL and token.
fn cli(agent: &AgentProc, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["--server", &agent.url, "--token", &agent.token])
        .args(args)
        .env_remove("SODA_SYNCER_SERVER")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_curl_example_for_the_legacy_call_is_accepted_without_a_json_content_type() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 2, 10);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let body = json!({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
        "RESTIC_REPOSITORY": tmp.path().join("repo"), "RESTIC_PASSWORD": "pw",
        "timeInterval": 3600, "resticSourceRepo": data});
    // `curl -d` sends application/x-www-form-urlencoded; others send text/plain or nothing.
    for (i, ct) in ["application/x-www-form-urlencoded", "text/plain", ""].into_iter().enumerate() {
        let mut req = reqwest::Client::new().post(format!("{}/snapshot", agent.url)).body(body.to_string());
        if !ct.is_empty() {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(status, if i == 0 { 201 } else { 200 }, "{ct:?}: {v}");
        assert_eq!(v["policies"][0]["action"], if i == 0 { "created" } else { "updated" }, "{ct:?}: {v}");
    }
    // Whatever the content type, the body must still be JSON.
    let resp = reqwest::Client::new()
        .post(format!("{}/snapshot", agent.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("RESTIC_REPOSITORY=/tmp/r")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "malformed_json", "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_fetched_like_curl_pass_promtool_check_metrics_without_a_warning() {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "promtool is missing in CI: run scripts/install-deps");
        eprintln!("promtool not installed; skipping (apt-get install prometheus)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 2, 10);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "prom", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "a backup", |r| count_state(r, "succeeded") == 1).await;
    let resp =
        reqwest::Client::new().get(format!("{}/metrics", agent.url)).header("accept", "*/*").send().await.unwrap();
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = resp.text().await.unwrap();
    assert!(text.contains("# TYPE soda_syncer_runs_total counter"), "{text}");
    assert!(!text.contains("# EOF"));
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}\n{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runs_table_names_the_policy_a_missing_source_says_so_and_yaml_has_plain_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 2, 10);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "orders-db", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "a backup", |r| count_state(r, "succeeded") == 1).await;

    // The source goes away (a volume unmounted): its own error code.
    std::fs::remove_dir_all(&data).unwrap();
    let (st, run) = agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    assert_eq!(st, 202, "{run}");
    let runs = agent.wait_runs(&id, 30, "a failed run", |r| count_state(r, "failed") == 1).await;
    let failed = runs.iter().find(|r| r["state"] == "failed").unwrap();
    assert_eq!(failed["error"]["code"], "source_missing", "{failed}");
    assert!(failed["error"]["message"].as_str().unwrap().contains("does not exist"), "{failed}");

    let out = cli(&agent, &["runs"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    for row in rows {
        assert_eq!(row.split_whitespace().nth(1), Some("orders-db"), "the POLICY column names the policy:\n{table}");
    }

    let out = cli(&agent, &["policy", "get", "orders-db", "-o", "yaml"]);
    let yaml = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{yaml}{}", String::from_utf8_lossy(&out.stderr));
    assert!(yaml.lines().any(|l| l == "name: orders-db"), "plain keys and plain strings:\n{yaml}");
    assert!(yaml.lines().any(|l| l.starts_with("consecutiveFailures: ")), "{yaml}");
    assert!(!yaml.contains("\"name\""), "no quoted keys:\n{yaml}");
    let parsed: Value = serde_yaml::from_str(&yaml).unwrap();
    let (_, json) = agent.call("GET", &format!("/v1/policies/{id}"), None).await;
    assert_eq!(parsed["id"], json["id"]);
    assert_eq!(parsed["schedule"], json["schedule"], "the YAML reads back as the same data");
}

#[test]
fn serve_help_lists_only_the_servers_flags_and_serve_refuses_client_flags() {
    let out = Command::new(BIN).args(["serve", "--help"]).env_clear().output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for client_flag in ["--server", "--agent-state-dir", "--output", "--ca-file", "--token "] {
        assert!(!help.contains(client_flag), "{client_flag} in serve --help:\n{help}");
    }
    assert!(help.contains("--listen") && help.contains("--state-dir") && help.contains("--token-file"), "{help}");
    let out = Command::new(BIN).args(["serve", "--server", "http://127.0.0.1:1"]).env_clear().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--server is for the commands that talk to an agent, not this one (serve listens on --listen)"),
        "{err}"
    );
    // The client commands keep their flags, before or after the subcommand.
    let out = Command::new(BIN).args(["runs", "--help"]).env_clear().output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--server"));
}
