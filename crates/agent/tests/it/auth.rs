//! Authentication with the real binary: /v1 needs the bearer token the
//! agent generated (or the operator's file, re-read when it changes); the
//! legacy route is guarded by network, token, or switched off; refusals are
//! counted and the presented token is never logged.

use serde_json::json;

use crate::support::AgentProc;

#[tokio::test(flavor = "multi_thread")]
async fn v1_requires_the_token_and_operations_stay_open() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(tmp.path().join("state/token")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the generated token file is private");
    let guess = "guessed-token-Xy9";
    for token in [None, Some(guess)] {
        let (st, v) = agent.call_with_token("GET", "/v1/policies", None, token).await;
        assert_eq!(st, 401, "{v}");
        assert_eq!(v["error"]["code"], "unauthorized");
        assert!(v["error"]["message"].as_str().unwrap().contains("Bearer"));
    }
    let (st, _) = agent.call("GET", "/v1/policies", None).await;
    assert_eq!(st, 200);
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let (st, _) = agent.call_with_token("GET", open, None, None).await;
        assert_eq!(st, 200, "{open} needs no token");
    }
    let metrics = reqwest::get(format!("{}/metrics", agent.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("soda_syncer_auth_refused_total{route=\"v1\"} 2"), "{metrics}");
    assert!(!agent.log_text().contains(guess), "a presented token is never logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_token_file_rotates_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tokens");
    std::fs::write(&file, "old-token-1\n").unwrap();
    let mut agent = AgentProc::start(&tmp.path().join("state"), &["--token-file", file.to_str().unwrap()]).unwrap();
    assert!(!tmp.path().join("state/token").exists(), "no generated token when a file is given");
    agent.token = "old-token-1".into();
    assert_eq!(agent.call("GET", "/v1/runs", None).await.0, 200);
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&file, "# rotated\nnew-token-2\n").unwrap();
    assert_eq!(agent.call("GET", "/v1/runs", None).await.0, 401, "the old token is gone");
    agent.token = "new-token-2".into();
    assert_eq!(agent.call("GET", "/v1/runs", None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_legacy_route_is_guarded_by_network_token_or_switched_off() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let body = json!({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "RESTIC_REPOSITORY": "", "RESTIC_PASSWORD": "",
                      "timeInterval": 3600, "resticSourceRepo": data});
    // Loopback is not in the allowed networks here.
    let agent = AgentProc::start(&tmp.path().join("a"), &["--legacy-allow-cidr", "10.0.0.0/8"]).unwrap();
    let (st, v) = agent.call_with_token("POST", "/snapshot", Some(body.clone()), None).await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"]["code"], "legacy_caller_refused");
    assert!(v["error"]["message"].as_str().unwrap().contains("--legacy-allow-cidr"));
    let (st, v) = agent.call("POST", "/snapshot", Some(body.clone())).await;
    assert_eq!(st, 201, "the token is accepted too: {v}");

    let agent = AgentProc::start(&tmp.path().join("b"), &["--legacy", "off"]).unwrap();
    let (st, _) = agent.call("POST", "/snapshot", Some(body.clone())).await;
    assert_eq!(st, 403);

    let agent = AgentProc::start(&tmp.path().join("c"), &["--legacy", "token"]).unwrap();
    assert_eq!(agent.call_with_token("POST", "/snapshot", Some(body.clone()), None).await.0, 403);
    assert_eq!(agent.call("POST", "/snapshot", Some(body)).await.0, 201);
}
