//! The HTTP contract in-process (router + oneshot, no socket): policy CRUD,
//! validation that names the field, and the one error shape for every kind
//! of bad request.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use soda_syncer::http::{router, AppState};
use soda_syncer::restic::Restic;
use soda_syncer::scheduler::Scheduler;
use soda_syncer::store::Store;
use soda_syncer::Config;
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

struct Harness {
    app: axum::Router,
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let allowed = dir.path().join("allowed");
    let data = allowed.join("data");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("repository.password"), "pw").unwrap();
    let mut config = Config::with_state_dir(state.clone());
    config.allowed_roots = vec![allowed];
    let store = Store::open(&config.db_path()).unwrap();
    let restic = Restic::new("restic".into(), config.cache_dir(), "n1".into(), std::time::Duration::from_secs(60));
    let sched = Scheduler::new(store, restic, config, tokio_util::sync::CancellationToken::new());
    let app = router(AppState {
        sched,
        restic_version: Arc::new(Mutex::new(Ok("0.14.0".into()))),
        started: std::time::Instant::now(),
    });
    Harness { app, _dir: dir, data, outside }
}

async fn send(
    app: &axum::Router,
    method: &str,
    uri: &str,
    ct: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ct) = ct {
        req = req.header("content-type", ct);
    }
    let resp = app.clone().oneshot(req.body(body.into()).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn json_req(app: &axum::Router, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
    send(app, method, uri, Some("application/json"), body.to_string()).await
}

fn policy(h: &Harness, name: &str) -> Value {
    json!({
        "name": name,
        "source": {"path": h.data},
        "repository": {"url": "rest:http://user:urlpass@127.0.0.1:1/r/", "password": "hunter2", "env": {"AWS_SECRET_ACCESS_KEY": "s3cr3tkey"}},
        "schedule": {"intervalSeconds": 3600},
        "retention": {"keepLast": 3}
    })
}

fn assert_error_shape(v: &Value) {
    assert!(v["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.len() > 10), "{v}");
}

#[tokio::test]
async fn policy_crud_round_trip_never_shows_secrets() {
    let h = harness();
    let (st, created) = json_req(&h.app, "POST", "/v1/policies", policy(&h, "orders-db")).await;
    assert_eq!(st, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["origin"], "api");
    assert_eq!(created["repository"]["password"], Value::Null);
    assert_eq!(created["repository"]["passwordSet"], true);
    assert_eq!(created["repository"]["env"]["AWS_SECRET_ACCESS_KEY"], Value::Null);
    assert_eq!(created["repository"]["envSet"]["AWS_SECRET_ACCESS_KEY"], true);
    assert_eq!(created["repository"]["url"], "rest:http://user:***@127.0.0.1:1/r/");
    assert!(created["nextRunAt"].is_string(), "first run is due at once: {created}");

    let (st, dup) = json_req(&h.app, "POST", "/v1/policies", policy(&h, "orders-db")).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(dup["error"]["code"], "name_taken");

    let (st, list) = send(&h.app, "GET", "/v1/policies", None, Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["policies"].as_array().unwrap().len(), 1);
    for text in [list.to_string(), created.to_string()] {
        for secret in ["hunter2", "s3cr3tkey", "urlpass"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    // GET by id and by name; PUT of the GET body keeps the secrets.
    let (_, got) = send(&h.app, "GET", &format!("/v1/policies/{id}"), None, Body::empty()).await;
    let (_, by_name) = send(&h.app, "GET", "/v1/policies/orders-db", None, Body::empty()).await;
    assert_eq!(got["id"], by_name["id"]);
    let mut edited = got.clone();
    edited["schedule"] = json!({"cron": "0 */6 * * *", "timezone": "Europe/Berlin"});
    let (st, put) = json_req(&h.app, "PUT", &format!("/v1/policies/{id}"), edited).await;
    assert_eq!(st, StatusCode::OK, "{put}");
    assert_eq!(put["schedule"]["cron"], "0 */6 * * *");
    assert_eq!(put["repository"]["passwordSet"], true);

    let (st, patched) = send(
        &h.app,
        "PATCH",
        &format!("/v1/policies/{id}"),
        Some("application/merge-patch+json"),
        json!({"retention": {"keepDaily": 7}, "tags": ["team-a"]}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{patched}");
    assert_eq!(patched["retention"], json!({"keepLast": 3, "keepDaily": 7}));
    assert_eq!(patched["tags"], json!(["team-a"]));

    let (st, paused) = send(&h.app, "POST", &format!("/v1/policies/{id}/pause"), None, Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["nextRunAt"], Value::Null);
    let (_, resumed) = send(&h.app, "POST", &format!("/v1/policies/{id}/resume"), None, Body::empty()).await;
    assert_eq!(resumed["paused"], false);
    assert!(resumed["nextRunAt"].is_string());

    let (st, _) = send(&h.app, "DELETE", &format!("/v1/policies/{id}"), None, Body::empty()).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, gone) = send(&h.app, "GET", &format!("/v1/policies/{id}"), None, Body::empty()).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(gone["error"]["code"], "policy_not_found");
}

#[tokio::test]
async fn a_manual_run_is_queued_once_and_a_second_request_conflicts() {
    let h = harness();
    let (_, p) = json_req(&h.app, "POST", "/v1/policies", policy(&h, "p")).await;
    let id = p["id"].as_str().unwrap();
    // The scheduler loop is not running here, so the run stays queued.
    let (st, run) = send(&h.app, "POST", &format!("/v1/policies/{id}/run"), None, Body::empty()).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{run}");
    assert_eq!(run["state"], "queued");
    assert_eq!(run["trigger"], "manual");
    let (st, busy) = send(&h.app, "POST", &format!("/v1/policies/{id}/run"), None, Body::empty()).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(busy["error"]["code"], "run_in_progress");
    let (st, cancelled) =
        send(&h.app, "POST", &format!("/v1/runs/{}/cancel", run["id"].as_str().unwrap()), None, Body::empty()).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{cancelled}");
    let (_, r) = send(&h.app, "GET", &format!("/v1/runs/{}", run["id"].as_str().unwrap()), None, Body::empty()).await;
    assert_eq!(r["state"], "cancelled");
    let (_, runs) = send(&h.app, "GET", &format!("/v1/runs?policy={id}&state=cancelled"), None, Body::empty()).await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn malformed_requests_get_a_clear_error_and_change_nothing() {
    let h = harness();
    let ok = policy(&h, "valid");
    let with = |patch: Value| {
        let mut v = ok.clone();
        soda_syncer_domain::policy::merge_patch(&mut v, &patch);
        v.to_string()
    };
    let huge = format!("{{\"name\":\"{}\"}}", "x".repeat(2 * 1024 * 1024));
    // (what, content type, body, status, error code, field)
    type Case<'a> = (&'a str, Option<&'a str>, String, StatusCode, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("not json", Some("application/json"), "{\"name\": ".into(), StatusCode::BAD_REQUEST, "malformed_json", None),
        (
            "wrong content type",
            Some("text/plain"),
            ok.to_string(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
        ),
        ("no content type", None, ok.to_string(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", None),
        (
            "unknown field",
            Some("application/json"),
            with(json!({"colour": "red"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            None,
        ),
        (
            "wrong type",
            Some("application/json"),
            with(json!({"schedule": {"intervalSeconds": "often"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            Some("schedule.intervalSeconds"),
        ),
        (
            "zero interval",
            Some("application/json"),
            with(json!({"schedule": {"intervalSeconds": 0}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("schedule.intervalSeconds"),
        ),
        (
            "interval over 31 days",
            Some("application/json"),
            with(json!({"schedule": {"intervalSeconds": 2678401}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("schedule.intervalSeconds"),
        ),
        (
            "bad cron",
            Some("application/json"),
            with(json!({"schedule": {"intervalSeconds": null, "cron": "every day"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("schedule.cron"),
        ),
        (
            "jitter above interval",
            Some("application/json"),
            with(json!({"jitterSeconds": 7200})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("jitterSeconds"),
        ),
        (
            "relative source",
            Some("application/json"),
            with(json!({"source": {"path": "data"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("source.path"),
        ),
        (
            "missing source",
            Some("application/json"),
            with(json!({"source": {"path": "/nonexistent/dir"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("source.path"),
        ),
        (
            "source outside allowed roots",
            Some("application/json"),
            with(json!({"source": {"path": h.outside}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("source.path"),
        ),
        (
            "dot-dot escape",
            Some("application/json"),
            with(json!({"source": {"path": format!("{}/../../outside", h.data.display())}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("source.path"),
        ),
        (
            "empty repository",
            Some("application/json"),
            with(json!({"repository": {"url": ""}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("repository.url"),
        ),
        (
            "bad retention",
            Some("application/json"),
            with(json!({"retention": {"keepWithin": "forever"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("retention.keepWithin"),
        ),
        (
            "unsafe env",
            Some("application/json"),
            with(json!({"repository": {"env": {"LD_PRELOAD": "/x.so"}}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("repository.env.LD_PRELOAD"),
        ),
        (
            "bad name",
            Some("application/json"),
            with(json!({"name": "no spaces allowed"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        ("body over 1 MiB", Some("application/json"), huge, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None),
    ];
    for (what, ct, body, status, code, field) in cases {
        let (st, v) = send(&h.app, "POST", "/v1/policies", ct, body).await;
        assert_eq!(st, status, "{what}: {v}");
        assert_error_shape(&v);
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        if let Some(f) = field {
            assert_eq!(v["error"]["field"], f, "{what}: {v}");
        }
        assert!(!v.to_string().contains("hunter2"), "{what}: secret in error {v}");
    }
    let (_, list) = send(&h.app, "GET", "/v1/policies", None, Body::empty()).await;
    assert_eq!(list["policies"], json!([]), "no bad request created anything");

    // Unknown routes, ids, methods and query parameters use the same shape.
    for (method, uri, status) in [
        ("GET", "/v1/policies/nope", StatusCode::NOT_FOUND),
        ("GET", "/v1/runs/nope", StatusCode::NOT_FOUND),
        ("GET", "/v2/anything", StatusCode::NOT_FOUND),
        ("DELETE", "/v1/runs", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/v1/runs?state=sleeping", StatusCode::BAD_REQUEST),
        ("GET", "/v1/runs?limit=0", StatusCode::BAD_REQUEST),
        ("GET", "/v1/runs?colour=red", StatusCode::BAD_REQUEST),
    ] {
        let (st, v) = send(&h.app, method, uri, None, Body::empty()).await;
        assert_eq!(st, status, "{method} {uri}: {v}");
        assert_error_shape(&v);
    }
}

#[tokio::test]
async fn the_legacy_route_validates_the_upstream_body() {
    let h = harness();
    let body = |interval: i64, source: &str| {
        json!({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "RESTIC_REPOSITORY": "/tmp/r", "RESTIC_PASSWORD": "pw",
               "timeInterval": interval, "resticSourceRepo": source})
    };
    let (st, v) = json_req(&h.app, "POST", "/snapshot", body(0, "")).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "timeInterval");
    let (st, v) = json_req(&h.app, "POST", "/snapshot", body(60, "relative/path")).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "resticSourceRepo");
    let (st, v) = send(&h.app, "POST", "/snapshot", None, "{\"timeInterval\": 60, \"surprise\": 1}").await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    // An explicit source: one policy, and the same body again updates it.
    let src = h.data.display().to_string();
    let (st, v) = json_req(&h.app, "POST", "/snapshot", body(60, &src)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["policies"][0]["action"], "created");
    let (st, v) = json_req(&h.app, "POST", "/snapshot", body(120, &src)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["policies"][0]["action"], "updated");
    let (_, list) = send(&h.app, "GET", "/v1/policies", None, Body::empty()).await;
    let ps = list["policies"].as_array().unwrap();
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0]["origin"], "legacy");
    assert_eq!(ps[0]["schedule"]["intervalSeconds"], 120);
}
