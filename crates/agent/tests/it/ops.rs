//! Operations with the real binary: `/metrics` in OpenMetrics text; the
//! shipped Prometheus rules and Grafana dashboard name only metrics a
//! running agent exports (so a rename fails here) and pass `promtool`;
//! backup deadlines turn a policy overdue and stay exported while it is
//! paused; clients that trickle their headers or body are cut off while
//! other requests are served.

use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{count_state, fill, AgentProc};

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(rel)
}

/// Metric family name -> type, from the `# TYPE` lines.
fn families(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, ty)| (name.to_string(), ty.to_string()))
        .collect()
}

/// Whether the sample name `name` belongs to an exported family.
fn exported(fams: &HashMap<String, String>, name: &str) -> bool {
    if fams.contains_key(name) {
        return true;
    }
    let suffixed =
        |suffix: &str, ty: &str| name.strip_suffix(suffix).is_some_and(|base| fams.get(base).is_some_and(|t| t == ty));
    suffixed("_total", "counter") || ["_bucket", "_sum", "_count"].iter().any(|s| suffixed(s, "histogram"))
}

/// Every `soda_syncer_*` identifier in `expr`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("soda_syncer_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The prefix of the metrics only an agent with the SODA sync on exports.
pub(crate) const SODA_SYNC_METRICS: &str = "soda_syncer_soda_sync_";

/// The `soda_syncer_soda_sync_*` metrics the rules name, and whether each
/// is in the exposition `text` (of an agent with the SODA sync on).
pub(crate) fn soda_sync_rule_metrics(text: &str) -> Vec<(String, bool)> {
    let fams = families(text);
    let names: BTreeSet<String> = rule_exprs().iter().flat_map(|e| metric_names(e)).collect();
    names.into_iter().filter(|n| n.starts_with(SODA_SYNC_METRICS)).map(|n| (n.clone(), exported(&fams, &n))).collect()
}

/// The rule file's expressions, after checking each rule has what an
/// alert needs.
fn rule_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("prometheus/soda-syncer-rules.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    let mut alerts = BTreeSet::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        assert!(group["name"].as_str().is_some_and(|n| !n.is_empty()), "{group:?}");
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("every rule is an alert");
            assert!(alerts.insert(alert.to_string()), "alert {alert} twice");
            assert!(rule["labels"]["severity"].as_str().is_some(), "{alert} has no severity");
            assert!(rule["annotations"]["summary"].as_str().is_some(), "{alert} has no summary");
            exprs.push(rule["expr"].as_str().expect("expr").to_string());
        }
    }
    for needed in [
        "SodaSyncerBackupOverdue",
        "SodaSyncerPolicyMetricsMissing",
        "SodaSyncerFreezeTooLong",
        "SodaSyncerSodaSyncFailing",
    ] {
        assert!(alerts.contains(needed), "{needed} missing from {alerts:?}");
    }
    exprs
}

/// The dashboard's queries, after checking it is a dashboard Grafana imports.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("grafana/soda-syncer-dashboard.json")).unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["uid"], "soda-syncer");
    assert!(d["title"].is_string() && d["schemaVersion"].as_u64().is_some_and(|v| v >= 30), "{}", d["schemaVersion"]);
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "panel id twice: {}", p["id"]);
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "{}: gridPos.{k}", p["title"]);
        }
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{} has no targets", p["title"]));
        assert!(!targets.is_empty());
        for t in targets {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            exprs.push(q.to_string());
        }
    }
    exprs
}

pub(crate) async fn scrape(agent: &AgentProc) -> (String, String) {
    // What Prometheus asks for; curl's `*/*` gets the older text format (newuser.rs).
    let resp = reqwest::Client::new()
        .get(format!("{}/metrics", agent.url))
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    (ct, resp.text().await.unwrap())
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_rules_and_dashboard_use_only_metrics_the_agent_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 3, 1000);
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let p = agent
        .create_policy(json!({"name": "ops-db", "source": {"path": data}, "schedule": {"intervalSeconds": 3600}}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    agent.wait_runs(&id, 60, "a backup", |r| count_state(r, "succeeded") == 1).await;
    // A raw path with an id in it, and one no route matches.
    let (st, _) = agent.call("GET", "/v1/policies/no-such-policy-4711", None).await;
    assert_eq!(st, 404);
    let (st, _) = agent.call("GET", "/nowhere/4712", None).await;
    assert_eq!(st, 404);

    let (ct, text) = scrape(&agent).await;
    assert!(ct.starts_with("application/openmetrics-text; version=1.0.0"), "{ct}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    let fams = families(&text);

    let mut names = BTreeSet::new();
    for expr in rule_exprs().iter().chain(dashboard_exprs().iter()) {
        names.extend(metric_names(expr));
    }
    // The SODA sync's exist only with --soda-endpoint: checked in soda_sync.rs.
    names.retain(|n| !n.starts_with(SODA_SYNC_METRICS));
    assert!(names.len() >= 15, "the rules and dashboard name few metrics: {names:?}");
    let missing: Vec<_> = names.iter().filter(|n| !exported(&fams, n)).collect();
    assert!(missing.is_empty(), "named in deploy/ but not exported: {missing:?}\n{text}");

    // The per-policy gauges of a healthy policy.
    let labels = format!("{{policy=\"{id}\",name=\"ops-db\"}}");
    let last = sample(&text, &format!("soda_syncer_policy_last_success_timestamp_seconds{labels}")).unwrap();
    let deadline = sample(&text, &format!("soda_syncer_policy_backup_deadline_timestamp_seconds{labels}")).unwrap();
    let jitter = p["jitterSeconds"].as_f64().unwrap();
    assert!(last > 0.0, "{text}");
    assert_eq!(deadline, last + 7200.0 + jitter, "two intervals and the jitter after the last success");
    assert_eq!(sample(&text, &format!("soda_syncer_policy_interval_seconds{labels}")), Some(3600.0));
    assert_eq!(sample(&text, "soda_syncer_policies_overdue{paused=\"false\"}"), Some(0.0));
    assert_eq!(sample(&text, "soda_syncer_runs_total{kind=\"backup\",state=\"succeeded\"}"), Some(1.0));
    assert!(sample(&text, &format!("soda_syncer_backup_data_added_bytes_total{labels}")).unwrap() > 0.0);
    assert_eq!(sample(&text, &format!("soda_syncer_backup_files_processed_total{labels}")), Some(3.0));
    assert_eq!(sample(&text, "soda_syncer_run_duration_seconds_count{kind=\"backup\"}"), Some(1.0));
    assert_eq!(sample(&text, "soda_syncer_run_repository_wait_seconds_count{kind=\"backup\"}"), Some(1.0));
    assert_eq!(
        sample(&text, "soda_syncer_run_repository_wait_seconds_sum{kind=\"backup\"}"),
        Some(0.0),
        "it did not wait"
    );
    // Requests by route template, never by raw path.
    assert_eq!(
        sample(&text, "soda_syncer_http_requests_total{route=\"/v1/policies/{id}\",method=\"GET\",status=\"404\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "soda_syncer_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"}"),
        Some(1.0)
    );
    assert!(!text.contains("4711") && !text.contains("4712"), "a raw path leaked into a label");
    let repo = p["repository"]["url"].as_str().unwrap();
    assert!(!text.contains(repo), "the repository URL is no label");
}

/// `promtool` from the Debian package `prometheus`; required in CI.
fn promtool() -> Option<&'static str> {
    let found = std::process::Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "promtool is missing in CI: run scripts/install-deps");
        eprintln!("promtool not installed; skipping (apt-get install prometheus)");
        return None;
    }
    Some("promtool")
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    for args in [["check", "rules", "soda-syncer-rules.yaml"], ["test", "rules", "soda-syncer-rules.test.yaml"]] {
        let out = std::process::Command::new(promtool).args(args).current_dir(deploy("prometheus")).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_that_cannot_back_up_turns_overdue_within_its_grace_and_stays_exported_when_paused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fill(&data, 1, 100);
    let agent = AgentProc::start(
        &tmp.path().join("state"),
        &["--deadline-grace-seconds", "1", "--repository-timeout-seconds", "2"],
    )
    .unwrap();
    // Nothing listens on port 1 of loopback: every backup fails.
    let p = agent
        .create_policy(json!({
            "name": "ops-broken", "source": {"path": data},
            "repository": {"url": "rest:http://127.0.0.1:1/none/", "password": "pw"},
            "schedule": {"intervalSeconds": 2}
        }))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let created = Instant::now();
    let labels = format!("{{policy=\"{id}\",name=\"ops-broken\"}}");
    // Due at creation + 2 s (interval) + 0 (jitter) + 1 s (grace).
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (_, text) = scrape(&agent).await;
        if sample(&text, "soda_syncer_policies_overdue{paused=\"false\"}") == Some(1.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "never overdue:\n{text}\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = created.elapsed();
    assert!(took >= Duration::from_secs(2), "overdue before its deadline ({took:?})");
    assert_eq!(sample(&text, &format!("soda_syncer_policy_last_success_timestamp_seconds{labels}")), Some(0.0));
    let due = sample(&text, &format!("soda_syncer_policy_backup_deadline_timestamp_seconds{labels}")).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(due <= now, "{due} > {now}");
    agent.wait_runs(&id, 30, "a failed run", |r| count_state(r, "failed") >= 1).await;

    let (st, v) = agent.call("POST", &format!("/v1/policies/{id}/pause"), None).await;
    assert_eq!(st, 200, "{v}");
    let (_, text) = scrape(&agent).await;
    assert_eq!(sample(&text, &format!("soda_syncer_policy_paused{labels}")), Some(1.0), "{text}");
    assert_eq!(sample(&text, &format!("soda_syncer_policy_next_run_timestamp_seconds{labels}")), Some(0.0));
    assert_eq!(
        sample(&text, &format!("soda_syncer_policy_backup_deadline_timestamp_seconds{labels}")),
        Some(due),
        "the deadline stays exported while paused"
    );
    assert_eq!(sample(&text, "soda_syncer_policies_overdue{paused=\"false\"}"), Some(0.0));
    assert_eq!(sample(&text, "soda_syncer_policies_overdue{paused=\"true\"}"), Some(1.0));
    assert!(sample(&text, "soda_syncer_run_errors_total{code=\"repository_unreachable\"}").unwrap() >= 1.0, "{text}");
    assert!(!text.contains("127.0.0.1:1"), "the repository URL is no label");
}

/// Send `bytes` one per second; return how long until the server answered
/// or closed, and what it sent.
async fn trickle(addr: &str, head: &[u8], bytes: &[u8]) -> (Duration, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for b in bytes.iter().chain(std::iter::repeat(&b' ')) {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {}
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never cut off");
    }
    (start.elapsed(), String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_time_out_without_blocking_other_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(&tmp.path().join("state"), &["--request-read-timeout-seconds", "3"]).unwrap();
    let addr = agent.url.trim_start_matches("http://").to_string();
    let body = json!({"name": "slow", "source": {"path": tmp.path()}, "schedule": {"intervalSeconds": 60}}).to_string();
    let post = format!(
        "POST /v1/policies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        agent.token,
        body.len()
    );
    let headers = tokio::spawn({
        let addr = addr.clone();
        async move { trickle(&addr, b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n").await }
    });
    let bodied = tokio::spawn({
        let addr = addr.clone();
        async move { trickle(&addr, post.as_bytes(), body.as_bytes()).await }
    });
    // Meanwhile everyone else is served at once.
    let client = reqwest::Client::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let r = client.get(format!("{}/healthz", agent.url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slowest < Duration::from_secs(1), "a request waited {slowest:?} behind slow clients");

    let (took, got) = headers.await.unwrap();
    assert!((Duration::from_millis(2500)..Duration::from_secs(8)).contains(&took), "headers cut off after {took:?}");
    assert!(!got.contains("200 OK"), "{got}");
    let (took, got) = bodied.await.unwrap();
    assert!((Duration::from_millis(2500)..Duration::from_secs(8)).contains(&took), "body cut off after {took:?}");
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("\"request_timeout\"") && got.to_lowercase().contains("connection: close"), "{got}");

    let list = agent.get("/v1/policies").await;
    assert_eq!(list["policies"].as_array().unwrap().len(), 0, "the trickled policy was not created");
    let (_, text) = scrape(&agent).await;
    assert_eq!(sample(&text, "soda_syncer_http_body_timeouts_total"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "soda_syncer_http_requests_total{route=\"/v1/policies\",method=\"POST\",status=\"408\"}"),
        Some(1.0)
    );
}
