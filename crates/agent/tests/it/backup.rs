//! Backups through the real binary and the real restic into real object
//! stores on loopback: S3 (moto) and REST (rclone), a restart after
//! `kill -9` mid-run, an object store that goes away and comes back, paths
//! that would be dangerous in a shell, and secrets that must never leak.

use serde_json::{json, Value};
use std::time::{Duration, Instant};

use crate::servers::{MotoS3, RcloneRest};
use crate::support::{children_named, count_state, fill, restic, AgentProc};

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_policy_backs_up_and_lists_its_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 20, 4096);
    let s3 = MotoS3::start().unwrap();
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let env: serde_json::Map<String, Value> = s3.env().into_iter().map(|(k, v)| (k, json!(v))).collect();
    let p = agent
        .create_policy(json!({
            "name": "s3-vol",
            "source": {"path": data},
            "repository": {"url": s3.repo_url("bucket1"), "password": "s3-repo-pw", "env": env},
            "schedule": {"intervalSeconds": 3600},
            "retention": {"keepLast": 1}
        }))
        .await;
    let id = p["id"].as_str().unwrap();
    // The first run starts right after creation, not one interval later.
    let runs = agent.wait_runs(id, 60, "the first backup", |r| count_state(r, "succeeded") == 1).await;
    let run = &runs[0];
    assert_eq!(run["trigger"], "schedule");
    assert_eq!(run["snapshotId"].as_str().unwrap().len(), 64, "the full restic id: {run}");
    assert_eq!(run["summary"]["totalFilesProcessed"], 20);
    let snaps = agent.get(&format!("/v1/policies/{id}/snapshots")).await;
    let snaps = snaps["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["id"], run["snapshotId"]);
    assert_eq!(snaps[0]["hostname"], "test-node");
    let tags: Vec<&str> = snaps[0]["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(tags.contains(&"soda-syncer") && tags.contains(&format!("policy={id}").as_str()), "{tags:?}");

    // A manual run, then retention keeps only the newest snapshot.
    let (st, _) = agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    assert_eq!(st, 202);
    let runs = agent.wait_runs(id, 60, "the manual backup", |r| count_state(r, "succeeded") == 2).await;
    assert_eq!(runs[0]["trigger"], "manual");
    assert_eq!(runs[0]["summary"]["snapshotsForgotten"], 1);
    let out = restic(&s3.repo_url("bucket1"), "s3-repo-pw", &s3.env(), &["snapshots", "--json"]).unwrap();
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], runs[0]["snapshotId"]);

    // And back: a restore from S3 gives the same bytes.
    let target = tmp.path().join("restored");
    let (st, run) = agent.call("POST", &format!("/v1/policies/{id}/restore"), Some(json!({"target": target}))).await;
    assert_eq!(st, 202, "{run}");
    let runs =
        agent.wait_runs(id, 60, "the restore", |r| r[0]["kind"] == "restore" && r[0]["state"] == "succeeded").await;
    assert_eq!(runs[0]["snapshotId"], listed[0]["id"]);
    for i in 0..20 {
        let name = format!("f{i:05}");
        assert_eq!(std::fs::read(data.join(&name)).unwrap(), std::fs::read(target.join(&name)).unwrap(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_run_loses_nothing_and_backups_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 300, 512 * 1024); // 150 MB: the backup takes long enough to be killed in
    let mut rest = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    let repo = rest.url("vol");
    let mut agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "big", "source": {"path": data},
            "repository": {"url": repo, "password": "pw-kill9"},
            "schedule": {"intervalSeconds": 3600}
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 30, "a running backup", |r| r.first().is_some_and(|r| r["state"] == "running")).await;
    // Let restic get going (so it holds a lock), then kill the agent hard.
    let deadline = Instant::now() + Duration::from_secs(20);
    while children_named(agent.pid(), "restic").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let orphans = children_named(agent.pid(), "restic");
    assert!(!orphans.is_empty());
    agent.kill9();
    // restic has its own process group, so the SIGKILL does not reach it; the
    // parent-death signal does, and restic stops and releases its lock.
    let deadline = Instant::now() + Duration::from_secs(15);
    while orphans.iter().any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()) {
        assert!(Instant::now() < deadline, "restic outlived the killed agent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.restart().unwrap();
    let policy = agent.get(&format!("/v1/policies/{id}")).await;
    assert_eq!(policy["name"], "big", "the policy survived");
    let runs = agent
        .wait_runs(&id, 90, "an interrupted run and a successful one after it", |r| {
            count_state(r, "interrupted") == 1 && count_state(r, "succeeded") >= 1
        })
        .await;
    let interrupted = runs.iter().find(|r| r["state"] == "interrupted").unwrap();
    assert_eq!(interrupted["error"]["code"], "agent_stopped");
    let after = runs.iter().find(|r| r["state"] == "succeeded").unwrap();
    assert_eq!(after["trigger"], "startup", "the missed run is made up at once after the restart");
    restic(&repo, "pw-kill9", &[], &["check"]).expect("restic check is clean");
    rest.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_store_fails_loudly_then_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 5, 1000);
    let mut rest = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    let repo = rest.url("vol");
    let agent = AgentProc::start(&tmp.path().join("state"), &["--repository-timeout-seconds", "3"]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "flaky", "source": {"path": data},
            "repository": {"url": repo, "password": "pw-flaky"},
            "schedule": {"intervalSeconds": 3},
            // An unchanged volume's scheduled runs make no repository traffic
            // (README, "Unchanged volumes"): an outage shows at its next real
            // backup. This test is about restic meeting the outage.
            "verifyUnchanged": false
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 30, "a first success", |r| count_state(r, "succeeded") >= 1).await;
    rest.stop();
    let runs = agent.wait_runs(&id, 30, "a failure", |r| count_state(r, "failed") >= 1).await;
    let failed = runs.iter().find(|r| r["state"] == "failed").unwrap();
    assert_eq!(failed["error"]["code"], "repository_unreachable", "{failed}");
    assert!(!failed["error"]["message"].as_str().unwrap().contains(rest.pass()), "the URL's password is scrubbed");
    let policy = agent.get(&format!("/v1/policies/{id}")).await;
    assert!(policy["consecutiveFailures"].as_u64().unwrap() >= 1);
    let metrics = reqwest::get(format!("{}/metrics", agent.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("soda_syncer_run_errors_total{code=\"repository_unreachable\"}"), "{metrics}");
    rest.restart().unwrap();
    let before = count_state(&runs, "succeeded");
    agent
        .wait_runs(&id, 30, "a success after the store returned", |r| {
            r[0]["state"] == "succeeded" && count_state(r, "succeeded") > before
        })
        .await;
    let policy = agent.get(&format!("/v1/policies/{id}")).await;
    assert_eq!(policy["consecutiveFailures"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_full_of_shell_characters_is_backed_up_literally() {
    let tmp = tempfile::tempdir().unwrap();
    let canary = tmp.path().join("pwned");
    let weird = tmp.path().join(format!("vol; touch {} ; echo 'it\"s $(id)`x`", canary.display()));
    fill(&weird, 3, 100);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    // No repository given: the agent's own local repository.
    let p = agent
        .create_policy(json!({"name": "weird", "source": {"path": weird}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap();
    agent.wait_runs(id, 60, "the backup", |r| count_state(r, "succeeded") == 1).await;
    let snaps = agent.get(&format!("/v1/policies/{id}/snapshots")).await;
    assert_eq!(snaps["snapshots"][0]["paths"][0], weird.display().to_string());
    assert!(!canary.exists(), "nothing was executed");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_logs_responses_or_process_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 200, 256 * 1024); // long enough to catch restic running
    let rest = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    let password = "repo-pw-Zq81xv";
    let key = "AKIA-secret-Pq7w";
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({
            "name": "secretive", "source": {"path": data},
            "repository": {"url": rest.url("s"), "password": password, "env": {"AWS_SECRET_ACCESS_KEY": key}},
            "schedule": {"intervalSeconds": 3600}
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let mut cmdlines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cmdlines.is_empty() && Instant::now() < deadline {
        for pid in children_named(agent.pid(), "restic") {
            if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                cmdlines.push(String::from_utf8_lossy(&c).replace('\0', " "));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!cmdlines.is_empty(), "restic was seen running");
    agent.wait_runs(&id, 60, "the backup", |r| count_state(r, "succeeded") == 1).await;
    // A failing run too: its error must not echo the secrets either.
    let (_, _) = agent
        .call("PATCH", &format!("/v1/policies/{id}"), Some(json!({"repository": {"password": "wrong-pw-Kk2"}})))
        .await;
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    let runs = agent.wait_runs(&id, 60, "a failed run", |r| count_state(r, "failed") == 1).await;
    assert_eq!(runs[0]["error"]["code"], "wrong_password", "{}", runs[0]);

    let mut seen = vec![agent.log_text()];
    seen.extend(cmdlines);
    for path in ["/v1/policies", &format!("/v1/policies/{id}"), &format!("/v1/runs?policy={id}"), "/metrics", "/readyz"]
    {
        let (_, v) = agent.call("GET", path, None).await;
        seen.push(v.to_string());
    }
    let own_env = std::fs::read(format!("/proc/{}/environ", agent.pid())).unwrap_or_default();
    seen.push(String::from_utf8_lossy(&own_env).into_owned());
    for text in &seen {
        for secret in [password, key, "wrong-pw-Kk2", rest.pass(), agent.token.as_str()] {
            assert!(!text.contains(secret), "secret {secret:?} found in: {}", &text[..text.len().min(2000)]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_sealed_at_rest_and_a_lost_key_is_reported_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 3, 100);
    let rest = RcloneRest::start(&tmp.path().join("rest")).unwrap();
    let state = tmp.path().join("state");
    let mut agent = AgentProc::start(&state, &[]).unwrap();
    let password = "sealed-pw-Qr5t";
    let p = agent
        .create_policy(json!({
            "name": "sealed", "source": {"path": data},
            "repository": {"url": rest.url("s"), "password": password, "env": {"AWS_ACCESS_KEY_ID": "sealed-key-Lm3"}},
            "schedule": {"intervalSeconds": 3600}
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "a backup", |r| count_state(r, "succeeded") == 1).await;
    assert!(agent.terminate().success());
    let db = std::fs::read(state.join("state.db")).unwrap();
    let wal = std::fs::read(state.join("state.db-wal")).unwrap_or_default();
    for secret in [password, "sealed-key-Lm3", rest.pass()] {
        let needle = secret.as_bytes();
        assert!(!db.windows(needle.len()).any(|w| w == needle), "{secret} in state.db");
        assert!(!wal.windows(needle.len()).any(|w| w == needle), "{secret} in the WAL");
    }

    // The key is lost: the agent starts, says so, and the policy's runs fail clearly.
    std::fs::remove_file(state.join("secrets.key")).unwrap();
    agent.restart().unwrap();
    let policy = agent.get(&format!("/v1/policies/{id}")).await;
    assert!(policy["secretsUnavailable"].as_str().unwrap().contains("cannot be unsealed"), "{policy}");
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    let runs = agent.wait_runs(&id, 30, "a failed run", |r| count_state(r, "failed") == 1).await;
    assert_eq!(runs[0]["error"]["code"], "secrets_unavailable");
    assert!(agent.log_text().contains("cannot be unsealed"));
    // Giving the password alone is not enough: the URL carried one too.
    let (st, v) =
        agent.call("PATCH", &format!("/v1/policies/{id}"), Some(json!({"repository": {"password": password}}))).await;
    assert_eq!(st, 422, "{v}");
    assert_eq!(v["error"]["field"], "repository.url");
    // Giving the credentials again heals it.
    let (st, v) = agent
        .call(
            "PATCH",
            &format!("/v1/policies/{id}"),
            Some(json!({"repository": {"url": rest.url("s"), "password": password}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["secretsUnavailable"], Value::Null);
    agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
    agent.wait_runs(&id, 60, "a backup again", |r| count_state(r, "succeeded") == 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_hears_the_end_of_a_run_the_moment_it_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 3, 100);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "followed", "source": {"path": data}, "paused": true,
                              "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap();
    for n in 1..=3 {
        let (st, run) = agent.call("POST", &format!("/v1/policies/{id}/run"), None).await;
        assert_eq!(st, 202, "{run}");
        let mut resp = reqwest::Client::new()
            .get(format!("{}/v1/runs/{}/events", agent.url, run["id"].as_str().unwrap()))
            .bearer_auth(&agent.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut text = String::new();
        let (heard, end) = loop {
            let chunk = resp.chunk().await.unwrap().expect("the stream ends after an end event");
            text.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(at) = text.find("event: end") {
                let heard = chrono::Utc::now();
                let data = text[at..].lines().find_map(|l| l.strip_prefix("data:")).map(str::trim).unwrap_or("");
                if let Ok(end) = serde_json::from_str::<Value>(data) {
                    break (heard, end);
                }
            }
        };
        assert_eq!(end["state"], "succeeded", "{end}");
        let finished: chrono::DateTime<chrono::Utc> = end["finishedAt"].as_str().unwrap().parse().unwrap();
        // The stream wakes on the run's end (it used to look every 500 ms,
        // so half of the ends were heard 250 ms late or more).
        let lag = (heard - finished).num_milliseconds();
        assert!(lag < 200, "run {n}: the end was sent {lag} ms after the run finished");
        assert!(resp.chunk().await.unwrap().is_none(), "nothing after the end event");
    }
}
