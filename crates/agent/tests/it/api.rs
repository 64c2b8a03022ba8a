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

/// The bearer token of the in-process harness.
const TOKEN: &str = "test-token-0123456789";

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
    config.repository_roots = vec![dir.path().to_path_buf(), "/tmp".into()];
    let store = Store::open(&config.db_path()).unwrap();
    let restic = Restic::new("restic".into(), config.cache_dir(), "n1".into(), std::time::Duration::from_secs(60));
    let sched =
        Scheduler::new(store.clone(), restic.clone(), config.clone(), tokio_util::sync::CancellationToken::new());
    let policies = soda_syncer::policies::Policies::new(store.clone(), config.clone(), sched.clone());
    let legacy = soda_syncer::legacy::Legacy::new(policies.clone(), store.clone(), config.clone());
    std::fs::write(state.join("token"), format!("{TOKEN}\n")).unwrap();
    let auth =
        soda_syncer::http::auth::Auth::new(state.join("token"), soda_syncer::config::LegacyMode::Network, vec![]);
    let app = router(AppState {
        sched,
        store,
        restic,
        config,
        policies,
        legacy,
        restic_version: Arc::new(Mutex::new(Ok("0.14.0".into()))),
        started: std::time::Instant::now(),
        auth: Arc::new(auth),
        // As the agent fills it in, so /readyz's holder is checked against the document too.
        state_lock: Some(soda_syncer::state_lock::LockHolder::this_process("n1", None, chrono::Utc::now())),
        soda_sync: None,
        cluster: None,
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
    let mut req = Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {TOKEN}"));
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

/// Every operation the router serves, as `GET /openapi.json` must list it.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/snapshot"),
    ("GET", "/v1/policies"),
    ("POST", "/v1/policies"),
    ("GET", "/v1/policies/{id}"),
    ("PUT", "/v1/policies/{id}"),
    ("PATCH", "/v1/policies/{id}"),
    ("DELETE", "/v1/policies/{id}"),
    ("POST", "/v1/policies/{id}/pause"),
    ("POST", "/v1/policies/{id}/resume"),
    ("POST", "/v1/policies/{id}/run"),
    ("POST", "/v1/policies/{id}/drill"),
    ("GET", "/v1/policies/{id}/snapshots"),
    ("POST", "/v1/policies/{id}/restore"),
    ("POST", "/v1/policies/{id}/maintenance"),
    ("POST", "/v1/policies/{id}/drill"),
    ("GET", "/v1/runs"),
    ("GET", "/v1/runs/{id}"),
    ("POST", "/v1/runs/{id}/cancel"),
    ("GET", "/v1/runs/{id}/events"),
    ("GET", "/v1/status"),
    ("GET", "/v1/cluster"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "PATCH", "DELETE"];

async fn openapi(app: &axum::Router) -> Value {
    let (st, doc) = send(app, "GET", "/openapi.json", None, Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")), "{doc}");
    doc
}

/// Whether `value` fits `schema` (a schema of `doc`): types, `required`,
/// `enum`, `oneOf`, `additionalProperties`, RFC 3339 `date-time`, recursively.
/// A small check, not a full JSON Schema validator; enough to see a
/// response drift from what the document promises.
fn schema_errors(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{at}: non-local $ref {r}"));
        let target = &doc["components"]["schemas"][name];
        assert!(target.is_object(), "{at}: $ref to a missing schema {r}");
        return schema_errors(doc, target, value, at, errors);
    }
    if let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array) {
        let fitting = alternatives
            .iter()
            .filter(|alt| {
                let mut e = Vec::new();
                schema_errors(doc, alt, value, at, &mut e);
                e.is_empty()
            })
            .count();
        if fitting != 1 {
            errors.push(format!("{at}: {value} fits {fitting} of oneOf {}", Value::from(alternatives.clone())));
        }
        return;
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let fits = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        });
        if !fits {
            errors.push(format!("{at}: {value} is not of type {t}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            errors.push(format!("{at}: {value} is not one of {}", Value::from(allowed.clone())));
        }
    }
    if let (Some("date-time"), Some(s)) = (schema["format"].as_str(), value.as_str()) {
        if chrono::DateTime::parse_from_rfc3339(s).is_err() {
            errors.push(format!("{at}: {s:?} is not an RFC 3339 date-time"));
        }
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                errors.push(format!("{at}: required property {required} is missing"));
            }
        }
        for (key, v) in object {
            let at = format!("{at}.{key}");
            match (schema["properties"].get(key), schema.get("additionalProperties")) {
                (Some(s), _) => schema_errors(doc, s, v, &at, errors),
                (None, Some(Value::Bool(false))) => errors.push(format!("{at}: not a documented property")),
                (None, Some(s)) if s.is_object() => schema_errors(doc, s, v, &at, errors),
                _ => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            schema_errors(doc, items, v, &format!("{at}[{i}]"), errors);
        }
    }
}

fn assert_fits(doc: &Value, schema: &Value, value: &Value, what: &str) {
    let mut errors = Vec::new();
    schema_errors(doc, schema, value, "$", &mut errors);
    assert!(errors.is_empty(), "{what} does not fit its documented schema:\n{}\n{value:#}", errors.join("\n"));
}

/// The documented path template `uri` is an instance of.
fn route_of(doc: &Value, uri: &str) -> String {
    let path: Vec<&str> = uri.split('?').next().unwrap().split('/').collect();
    let fits = |template: &str| {
        let t: Vec<&str> = template.split('/').collect();
        t.len() == path.len() && t.iter().zip(&path).all(|(t, p)| t == p || t.starts_with('{'))
    };
    let found: Vec<&String> = doc["paths"].as_object().unwrap().keys().filter(|t| fits(t)).collect();
    assert_eq!(found.len(), 1, "{uri} is an instance of {found:?}");
    found[0].clone()
}

/// Call `method uri` and check that the status is documented for it and
/// the JSON body fits the documented schema; also that a JSON request body
/// fits the documented one (when its content type is documented: a test of
/// a 415 sends one that is not).
async fn documented_call(
    app: &axum::Router,
    doc: &Value,
    method: &str,
    uri: &str,
    body: Option<(&str, Value)>,
) -> (StatusCode, Value) {
    let route = route_of(doc, uri);
    let op = &doc["paths"][&route][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {route} is not documented");
    let what = format!("{method} {uri}");
    let (st, v) = match body {
        Some((ct, body)) => {
            let schema = &op["requestBody"]["content"][ct]["schema"];
            if schema.is_object() {
                assert_fits(doc, schema, &body, &format!("the request body of {what}"));
            }
            send(app, method, uri, Some(ct), body.to_string()).await
        }
        None => send(app, method, uri, None, Body::empty()).await,
    };
    let what = format!("{what} -> {st}");
    let response = &op["responses"][st.as_str()];
    assert!(response.is_object(), "{what}: status not documented ({v})");
    let schema = &response["content"]["application/json"]["schema"];
    if schema.is_null() {
        assert!(v.is_null(), "{what}: a JSON body where none is documented: {v}");
    } else {
        assert_fits(doc, schema, &v, &what);
    }
    (st, v)
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_routes_the_router_serves() {
    let h = harness();
    let doc = openapi(&h.app).await;
    let mut documented = std::collections::BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    let expected: std::collections::BTreeSet<_> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, expected);

    // The router answers each documented method of each path (never 405 or
    // an unknown route), and refuses the others with 405.
    for path in doc["paths"].as_object().unwrap().keys() {
        let uri = path.replace("{id}", "no-such-id");
        for method in METHODS {
            let (st, v) = send(&h.app, method, &uri, None, Body::empty()).await;
            if expected.contains(&(method.to_string(), path.clone())) {
                assert_ne!(st, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}: {v}");
                assert_ne!(v["error"]["code"], "route_not_found", "{method} {uri}: {v}");
            } else {
                assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri} is served but not documented: {v}");
            }
        }
    }

    // Limits written as literals in schema attributes match the code's.
    let schemas = &doc["components"]["schemas"];
    let max_interval = soda_syncer_domain::schedule::MAX_INTERVAL_SECONDS;
    assert_eq!(schemas["ScheduleSpec"]["properties"]["intervalSeconds"]["maximum"], max_interval);
    assert_eq!(schemas["LegacySnapshotRequest"]["properties"]["timeInterval"]["maximum"], max_interval);
    assert_eq!(schemas["PolicySpec"]["properties"]["name"]["maxLength"], soda_syncer_domain::policy::MAX_NAME_LEN);
    for (name, rule) in schemas["Retention"]["properties"].as_object().unwrap() {
        if name != "keepWithin" {
            assert_eq!(rule["maximum"], soda_syncer_domain::retention::MAX_KEEP, "{name}");
        }
    }
    // Read-only response fields are tolerated on input but not advertised.
    let spec_fields = schemas["PolicySpec"]["properties"].as_object().unwrap();
    for read_only in ["id", "origin", "createdAt", "status", "lastRun", "passwordSet"] {
        assert!(!spec_fields.contains_key(read_only), "{read_only}");
    }
    assert!(!schemas["RepositorySpec"]["properties"].as_object().unwrap().contains_key("passwordSet"));
    assert_eq!(schemas["RepositorySpec"]["properties"]["password"]["writeOnly"], true);
    assert_eq!(schemas["RepositoryView"]["properties"]["password"]["type"], "null");
}

#[tokio::test]
async fn real_responses_fit_the_documented_schemas() {
    let h = harness();
    let doc = openapi(&h.app).await;
    let call = |method: &'static str, uri: String, body: Option<(&'static str, Value)>| {
        let (app, doc) = (h.app.clone(), doc.clone());
        async move { documented_call(&app, &doc, method, &uri, body).await }
    };
    let json = |v: Value| Some(("application/json", v));

    let (st, created) = call("POST", "/v1/policies".into(), json(policy(&h, "orders-db"))).await;
    assert_eq!(st, StatusCode::CREATED, "{created}");
    let one = format!("/v1/policies/{}", created["id"].as_str().unwrap());
    assert_eq!(call("GET", "/v1/policies".into(), None).await.0, StatusCode::OK);
    assert_eq!(call("GET", one.clone(), None).await.0, StatusCode::OK);
    let patch = json!({"schedule": {"intervalSeconds": null, "cron": "0 */6 * * *"}, "tags": ["team-a"]});
    let (st, v) = call("PATCH", one.clone(), Some(("application/merge-patch+json", patch))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut again = policy(&h, "orders-db");
    again["repository"] = json!({"url": "rest:http://user:***@127.0.0.1:1/r/", "env": {"AWS_SECRET_ACCESS_KEY": null}});
    let (st, v) = call("PUT", one.clone(), json(again)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(call("POST", format!("{one}/pause"), None).await.0, StatusCode::OK);
    assert_eq!(call("POST", format!("{one}/resume"), None).await.0, StatusCode::OK);

    // A run: queued (the scheduler loop is not running here), listed, cancelled.
    let (st, run) = call("POST", format!("{one}/run"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{run}");
    assert_eq!(call("POST", format!("{one}/run"), None).await.0, StatusCode::CONFLICT);
    let run_uri = format!("/v1/runs/{}", run["id"].as_str().unwrap());
    let (st, page) = call("GET", "/v1/runs?limit=1&state=".into(), None).await;
    assert_eq!((st, &page["next"]), (StatusCode::OK, &run["id"]), "a full page names the next one");
    assert_eq!(call("POST", format!("{run_uri}/cancel"), None).await.0, StatusCode::ACCEPTED);
    let (st, ended) = call("GET", run_uri.clone(), None).await;
    assert_eq!((st, &ended["state"]), (StatusCode::OK, &json!("cancelled")));
    assert_eq!(call("POST", format!("{run_uri}/cancel"), None).await.0, StatusCode::CONFLICT);
    let (st, page) = call("GET", format!("/v1/runs?policy={}", created["id"].as_str().unwrap()), None).await;
    assert_eq!((st, &page["next"]), (StatusCode::OK, &Value::Null));

    // Errors, each with its documented status and the one error shape.
    let missing_source = json!({"name": "x", "source": {"path": "/nonexistent"}, "schedule": {"intervalSeconds": 60}});
    let cases = [
        ("POST", "/v1/policies".to_string(), json(policy(&h, "orders-db")), StatusCode::CONFLICT),
        ("POST", "/v1/policies".into(), Some(("text/plain", json!({}))), StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("POST", "/v1/policies".into(), json(missing_source), StatusCode::UNPROCESSABLE_ENTITY),
        ("GET", "/v1/policies/nope".into(), None, StatusCode::NOT_FOUND),
        ("GET", "/v1/runs?state=sleeping".into(), None, StatusCode::BAD_REQUEST),
        ("GET", "/v1/runs?policy=nope".into(), None, StatusCode::NOT_FOUND),
        ("GET", "/v1/runs/nope/events".into(), None, StatusCode::NOT_FOUND),
        ("POST", "/snapshot".into(), json(json!({"timeInterval": 0})), StatusCode::UNPROCESSABLE_ENTITY),
    ];
    for (method, uri, body, status) in cases {
        let (st, v) = call(method, uri.clone(), body).await;
        assert_eq!(st, status, "{method} {uri}: {v}");
        assert_error_shape(&v);
    }

    let legacy = json!({"RESTIC_REPOSITORY": "/tmp/r", "RESTIC_PASSWORD": "pw", "timeInterval": 60,
                        "resticSourceRepo": h.data.display().to_string()});
    let (st, v) = call("POST", "/snapshot".into(), json(legacy)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(call("GET", "/healthz".into(), None).await.0, StatusCode::OK);
    // The scheduler loop is not running in this harness: not ready.
    let (st, ready) = call("GET", "/readyz".into(), None).await;
    assert_eq!((st, &ready["scheduler"]), (StatusCode::SERVICE_UNAVAILABLE, &json!("stopped")));

    // The non-JSON responses have the documented content types.
    for uri in ["/metrics".to_string(), format!("{run_uri}/events")] {
        let resp = h
            .app
            .clone()
            .oneshot(Request::get(&uri).header("authorization", format!("Bearer {TOKEN}")).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{uri}");
        let documented = doc["paths"][route_of(&doc, &uri)]["get"]["responses"]["200"]["content"].as_object().unwrap();
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        let mime = ct.split(';').next().unwrap().trim();
        assert!(documented.contains_key(mime), "{uri}: {ct} is not documented ({documented:?})");
        let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert!(!text.is_empty(), "{uri}");
        if mime == "text/event-stream" {
            // Before OpenAPI 3.2 the schema describes one event; `data` holds JSON.
            let schema = &documented[mime]["schema"];
            let events: Vec<&str> = text.split("\n\n").filter(|e| e.contains("data:")).collect();
            assert!(!events.is_empty(), "{text}");
            for event in events {
                let field = |name: &str| {
                    event.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim_start().to_string()).unwrap()
                };
                let name = Value::from(field("event:"));
                let data: Value = serde_json::from_str(&field("data:")).unwrap();
                assert_fits(&doc, &schema["properties"]["event"], &name, "an event name");
                assert_fits(&doc, &schema["properties"]["data"]["contentSchema"], &data, "an event's data");
            }
        }
    }

    assert_eq!(call("DELETE", one, None).await.0, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn policies_are_listed_in_pages_by_name() {
    let h = harness();
    for name in ["e", "a", "d", "b", "c"] {
        let (st, v) = json_req(&h.app, "POST", "/v1/policies", policy(&h, name)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let mut seen = Vec::new();
    let mut uri = "/v1/policies?limit=2".to_string();
    loop {
        let (st, page) = send(&h.app, "GET", &uri, None, Body::empty()).await;
        assert_eq!(st, StatusCode::OK, "{page}");
        let names: Vec<String> =
            page["policies"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
        assert!(names.len() <= 2, "{page}");
        seen.extend(names);
        match page["next"].as_str() {
            Some(n) => uri = format!("/v1/policies?limit=2&after={n}"),
            None => break,
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
    let (_, all) = send(&h.app, "GET", "/v1/policies", None, Body::empty()).await;
    assert_eq!(all["policies"].as_array().unwrap().len(), 5);
    assert_eq!(all["next"], Value::Null);
    for bad in ["/v1/policies?limit=0", "/v1/policies?limit=1001", "/v1/policies?limit=x", "/v1/policies?page=2"] {
        let (st, v) = send(&h.app, "GET", bad, None, Body::empty()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_error_shape(&v);
    }
}

#[tokio::test]
async fn a_local_repository_outside_the_repository_roots_is_refused() {
    let h = harness();
    let root = h._dir.path();
    let evil = h.outside.join("link");
    std::os::unix::fs::symlink("/etc", &evil).unwrap();
    let cases = [
        ("/etc/soda-syncer-repo".to_string(), "outside the repository roots"),
        ("local:/etc/soda-syncer-repo".to_string(), "outside the repository roots"),
        ("relative/repo".to_string(), "neither an absolute path"),
        (format!("{}/../../etc/x", root.display()), "without '..'"),
        // Inside a root by name, /etc by a symlink: no link is followed below a root.
        (format!("{}/new-repo", evil.display()), "is a symbolic link"),
    ];
    for (url, why) in cases {
        let body = json!({"name": "r", "source": {"path": h.data}, "schedule": {"intervalSeconds": 3600},
            "repository": {"url": url, "password": "pw"}});
        let (st, err) = json_req(&h.app, "POST", "/v1/policies", body).await;
        assert_eq!(st, 422, "{url}: {err}");
        assert_eq!(err["error"]["field"], "repository.url", "{url}: {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(why), "{url}: {err}");
    }
    assert!(!std::path::Path::new("/etc/soda-syncer-repo").exists());
    // Below a root, or a remote backend: accepted.
    for url in [format!("{}/repos/a", root.display()), "s3:http://127.0.0.1:1/bucket".to_string()] {
        let body = json!({"name": "ok", "source": {"path": h.data}, "paused": true, "schedule": {"intervalSeconds": 3600},
            "repository": {"url": url, "password": "pw"}});
        let (st, p) = json_req(&h.app, "POST", "/v1/policies", body).await;
        assert_eq!(st, 201, "{url}: {p}");
        let id = p["id"].as_str().unwrap();
        send(&h.app, "DELETE", &format!("/v1/policies/{id}"), None, Body::empty()).await;
    }
}
