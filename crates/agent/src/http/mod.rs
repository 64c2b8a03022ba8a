//! The HTTP API: the legacy `POST /snapshot`, `/v1` policies and runs, and
//! the operations endpoints. [`router`] builds it without binding a socket,
//! so tests call it in-process; errors all leave through [`ApiError`].
//! Each handler carries its `#[utoipa::path]`, from which [`openapi`]
//! builds `GET /openapi.json`.

pub mod auth;
mod error;
mod legacy;
pub mod metrics;
pub mod openapi;
pub mod page;
mod policies;
mod runs;
mod schema;
pub mod serve;
pub mod slow;
mod snapshots;
mod status;
mod views;
pub mod waiting;

use axum::extract::{DefaultBodyLimit, Extension};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use error::ApiError;

use crate::scheduler::Scheduler;
use crate::store::{PolicyRecord, StoreError};

/// Bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    /// The run engine: queues, starts and cancels runs.
    pub sched: Scheduler,
    /// The agent's database, for reads.
    pub store: crate::store::Store,
    /// The restic adapter, for its version and counters.
    pub restic: crate::restic::Restic,
    pub config: crate::config::Config,
    /// Makes, changes and removes policies (the one admission path).
    pub policies: crate::policies::Policies,
    /// Turns the upstream `POST /snapshot` into policies.
    pub legacy: crate::legacy::Legacy,
    /// restic's version, or why it is unusable; re-checked by /readyz
    /// while it is missing.
    pub restic_version: Arc<Mutex<Result<String, String>>>,
    pub started: Instant,
    pub auth: Arc<auth::Auth>,
    /// This agent's entry in the state directory's lock file; `None` when
    /// no lock is held (routers built in tests).
    pub state_lock: Option<crate::state_lock::LockHolder>,
    /// The SODA sync's state, when the agent talks to SODA.
    pub soda_sync: Option<crate::kube::SodaStatusBoard>,
    /// Reads the cluster view for `GET /v1/cluster`, when Kubernetes is on.
    pub cluster: Option<Arc<crate::kube::cluster::ClusterReader>>,
}

pub fn router(state: AppState) -> Router {
    let registry = Arc::new(metrics::Metrics::new(&state));
    let body_deadline = slow::BodyDeadline { timeout: state.config.request_read_timeout, metrics: registry.clone() };
    Router::new()
        .route("/snapshot", post(legacy::legacy_snapshot))
        .route("/v1/policies", get(policies::list_policies).post(policies::create_policy))
        .route(
            "/v1/policies/{id}",
            get(policies::get_policy)
                .put(policies::put_policy)
                .patch(policies::patch_policy)
                .delete(policies::delete_policy),
        )
        .route("/v1/policies/{id}/pause", post(policies::pause_policy))
        .route("/v1/policies/{id}/resume", post(policies::resume_policy))
        .route("/v1/policies/{id}/run", post(runs::run_policy))
        .route("/v1/policies/{id}/drill", post(runs::drill_policy))
        .route("/v1/policies/{id}/snapshots", get(snapshots::policy_snapshots))
        .route("/v1/policies/{id}/restore", post(snapshots::restore_policy))
        .route("/v1/policies/{id}/maintenance", post(runs::maintain_policy))
        .route("/v1/runs", get(runs::list_runs))
        .route("/v1/runs/{id}", get(runs::get_run))
        .route("/v1/runs/{id}/cancel", post(runs::cancel_run))
        .route("/v1/runs/{id}/events", get(runs::run_events))
        .route("/v1/status", get(status::agent_status))
        .route("/v1/cluster", get(status::cluster_view))
        .route("/healthz", get(status::healthz))
        .route("/readyz", get(status::readyz))
        .route("/metrics", get(status::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(page::routes())
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such route; see GET /openapi.json for the API")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard))
        .layer(axum::middleware::from_fn_with_state(body_deadline, slow::body_deadline))
        .layer(axum::middleware::from_fn_with_state(registry.clone(), metrics::track))
        .layer(Extension(registry))
        .layer(Extension(Arc::new(policies::PolicyPages::default())))
        .with_state(state)
}

fn find_policy(state: &AppState, id_or_name: &str) -> Result<PolicyRecord, ApiError> {
    let store = &state.store;
    match store.get_policy(id_or_name) {
        Ok(p) => Ok(p),
        Err(StoreError::NotFound) => store.get_policy_by_name(id_or_name).map_err(|e| match e {
            StoreError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "policy_not_found",
                format!("there is no policy with id or name {id_or_name:?}; GET /v1/policies lists them"),
            ),
            other => other.into(),
        }),
        Err(e) => Err(e.into()),
    }
}

fn find_run(state: &AppState, id: &str) -> Result<crate::store::RunRecord, ApiError> {
    state.store.get_run(id).map_err(|e| match e {
        StoreError::NotFound => ApiError::new(
            StatusCode::NOT_FOUND,
            "run_not_found",
            format!("there is no run with id {id:?}; GET /v1/runs lists them"),
        ),
        other => other.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::policies::PolicyPages;
    use super::*;
    use axum::body::Body;
    use axum::body::Bytes;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use serde_json::{json, Value};
    use soda_syncer_domain::{RunKind, RunState, RunTrigger};
    use std::collections::BTreeMap;
    use tower::ServiceExt;

    const TOKEN: &str = "test-token-0123456789";
    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const OTHER_KEY: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const SECRETS: [&str; 4] = ["hunter2", "urlpass", "s3cr3tkey", "n3wpass"];

    struct Harness {
        app: Router,
        store: crate::store::Store,
        db: std::path::PathBuf,
        data: std::path::PathBuf,
        /// The scheduler's token: cancelled when the agent stops.
        stop: tokio_util::sync::CancellationToken,
        _dir: tempfile::TempDir,
    }

    /// The router over a store that seals secrets, as the agent runs it.
    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let data = dir.path().join("allowed/data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&state_dir).unwrap();
        std::fs::write(state_dir.join("repository.password"), "pw").unwrap();
        std::fs::write(state_dir.join("token"), format!("{TOKEN}\n")).unwrap();
        let mut config = crate::Config::with_state_dir(state_dir.clone());
        config.allowed_roots = vec![dir.path().join("allowed")];
        let db = config.db_path();
        let store = crate::store::Store::open(&db)
            .unwrap()
            .with_seal_key(crate::sealed::SealKey::from_hex(KEY, "test").unwrap())
            .unwrap();
        let restic = crate::restic::Restic::new(
            "restic".into(),
            config.cache_dir(),
            "n1".into(),
            std::time::Duration::from_secs(60),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let sched = Scheduler::new(store.clone(), restic.clone(), config.clone(), stop.clone());
        let policies = crate::policies::Policies::new(store.clone(), config.clone(), sched.clone());
        let legacy = crate::legacy::Legacy::new(policies.clone(), store.clone(), config.clone());
        let auth = auth::Auth::new(state_dir.join("token"), crate::config::LegacyMode::Network, vec![]);
        let app = router(AppState {
            sched,
            store: store.clone(),
            restic,
            config,
            policies,
            legacy,
            restic_version: Arc::new(Mutex::new(Ok("0.14.0".into()))),
            started: Instant::now(),
            auth: Arc::new(auth),
            state_lock: None,
            soda_sync: None,
            cluster: None,
        });
        Harness { app, store, db, data, stop, _dir: dir }
    }

    async fn call(h: &Harness, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, String) {
        let req = Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {TOKEN}"));
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        };
        let resp = h.app.clone().oneshot(req.unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// Every policy of the listing, each checked to be exactly what its own
    /// GET shows, and no secret anywhere.
    async fn listing(h: &Harness) -> BTreeMap<String, Value> {
        let (st, text) = call(h, "GET", "/v1/policies?limit=1000", None).await;
        assert_eq!(st, StatusCode::OK, "{text}");
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        let list: Value = serde_json::from_str(&text).unwrap();
        let mut out = BTreeMap::new();
        for p in list["policies"].as_array().unwrap() {
            let (st, one) = call(h, "GET", &format!("/v1/policies/{}", p["id"].as_str().unwrap()), None).await;
            assert_eq!(st, StatusCode::OK, "{one}");
            let mut one: Value = serde_json::from_str(&one).unwrap();
            // Only a policy's own GET names its maintenance Lease: it is
            // derived from the sealed URL, which a listing does not unseal.
            assert!(one.as_object_mut().unwrap().remove("maintenanceLease").is_some(), "{one}");
            assert_eq!(p, &one, "the listing differs from GET");
            out.insert(p["name"].as_str().unwrap().to_string(), p.clone());
        }
        out
    }

    fn run(h: &Harness, policy_id: &str, state: RunState) -> String {
        // Run ids sort by their millisecond: two made in one have no order.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let now = chrono::Utc::now();
        let mut r =
            crate::store::RunRecord::new(crate::ids::new_id(), policy_id, RunKind::Backup, RunTrigger::Manual, now);
        r.state = state;
        r.finished_at = Some(now);
        r.snapshot_id = Some("ab".repeat(32));
        h.store.save_run(&r).unwrap();
        r.id
    }

    #[tokio::test]
    async fn a_stopping_agent_refuses_new_runs_with_503_and_queues_nothing() {
        let h = harness();
        let body =
            json!({"name": "late", "source": {"path": h.data}, "schedule": {"intervalSeconds": 3600}, "paused": true});
        let (st, text) = call(&h, "POST", "/v1/policies", Some(body)).await;
        assert_eq!(st, StatusCode::CREATED, "{text}");
        h.stop.cancel();
        for route in ["run", "drill", "maintenance"] {
            let body = (route == "maintenance").then(|| json!({"check": true}));
            let (st, text) = call(&h, "POST", &format!("/v1/policies/late/{route}"), body).await;
            assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{route}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["code"], "agent_stopping", "{route}: {text}");
            assert!(v["error"]["message"].as_str().unwrap().contains("next agent"), "{text}");
        }
        let (_, runs) = call(&h, "GET", "/v1/runs", None).await;
        assert_eq!(serde_json::from_str::<Value>(&runs).unwrap()["runs"], json!([]), "nothing was queued");
    }

    #[tokio::test]
    async fn the_listing_shows_each_policy_as_its_get_does_and_every_change_at_once() {
        let h = harness();
        let a = json!({
            "name": "a", "source": {"path": h.data}, "schedule": {"intervalSeconds": 3600},
            "repository": {"url": "rest:http://user:urlpass@127.0.0.1:1/r/", "password": "hunter2",
                           "env": {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "s3cr3tkey"}},
        });
        let b = json!({"name": "b", "source": {"path": h.data}, "schedule": {"intervalSeconds": 60}, "paused": true});
        let mut ids = BTreeMap::new();
        for spec in [a, b] {
            let (st, text) = call(&h, "POST", "/v1/policies", Some(spec)).await;
            assert_eq!(st, StatusCode::CREATED, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            ids.insert(v["name"].as_str().unwrap().to_string(), v["id"].as_str().unwrap().to_string());
        }
        let l = listing(&h).await;
        assert_eq!(l["a"]["repository"]["url"], "rest:http://user:***@127.0.0.1:1/r/");
        assert_eq!(l["a"]["repository"]["passwordSet"], true);
        assert_eq!(l["a"]["repository"]["envSet"], json!({"AWS_ACCESS_KEY_ID": false, "AWS_SECRET_ACCESS_KEY": true}));
        assert_eq!(l["a"]["lastRun"], Value::Null);

        // The same page twice is the same bytes.
        let (_, first) = call(&h, "GET", "/v1/policies", None).await;
        let (_, again) = call(&h, "GET", "/v1/policies", None).await;
        assert_eq!(first, again);

        // Runs: the newest shows, also one recorded while the page is kept.
        run(&h, &ids["a"], RunState::Failed);
        let newest = run(&h, &ids["a"], RunState::Succeeded);
        let l = listing(&h).await;
        assert_eq!(l["a"]["lastRun"]["id"], newest.as_str());
        assert_eq!(l["a"]["lastRun"]["state"], "succeeded");

        // Edits through the API: spec and secrets.
        let patch =
            json!({"tags": ["edited"], "repository": {"password": "n3wpass", "env": {"AWS_ACCESS_KEY_ID": "id"}}});
        let (st, text) = call(&h, "PATCH", "/v1/policies/a", Some(patch)).await;
        assert_eq!(st, StatusCode::OK, "{text}");
        let l = listing(&h).await;
        assert_eq!(l["a"]["tags"], json!(["edited"]));
        assert_eq!(l["a"]["repository"]["envSet"]["AWS_ACCESS_KEY_ID"], true);
        let (st, _) = call(&h, "POST", "/v1/policies/b/resume", None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(listing(&h).await["b"]["paused"], false);

        // Writes by another connection to the same database.
        let outside = rusqlite::Connection::open(&h.db).unwrap();
        outside.execute("UPDATE policies SET status_message = 'from outside' WHERE name = 'b'", []).unwrap();
        assert_eq!(listing(&h).await["b"]["status"]["message"], "from outside");
        // Secrets sealed under another key: the policy stays listed, without them.
        let other = crate::sealed::SealKey::from_hex(OTHER_KEY, "test").unwrap();
        outside
            .execute("UPDATE policies SET secrets = ?1 WHERE name = 'a'", [other.seal(br#"{"password":"hunter2"}"#)])
            .unwrap();
        let l = listing(&h).await;
        assert!(l["a"]["secretsUnavailable"].as_str().is_some_and(|m| !m.is_empty()), "{}", l["a"]);
        assert_eq!(l["a"]["repository"]["passwordSet"], false);

        let (st, _) = call(&h, "DELETE", "/v1/policies/b", None).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        assert_eq!(listing(&h).await.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn kept_pages_are_few_small_and_of_one_version() {
        let store = crate::store::Store::open(&tempfile::tempdir().unwrap().path().join("s.db")).unwrap();
        let v1 = store.data_version().unwrap();
        let pages = PolicyPages::default();
        for i in 0..PolicyPages::MAX_PAGES + 4 {
            pages.put(&format!("p{i}"), 100, v1, Bytes::from_static(b"{}"));
        }
        assert_eq!(pages.lock().len(), PolicyPages::MAX_PAGES);
        assert!(pages.get("p0", 100, v1).is_none(), "the oldest went first");
        assert!(pages.get(&format!("p{}", PolicyPages::MAX_PAGES + 3), 100, v1).is_some());
        assert!(pages.get(&format!("p{}", PolicyPages::MAX_PAGES + 3), 10, v1).is_none(), "another limit");
        pages.put("big", 1000, v1, Bytes::from(vec![b' '; PolicyPages::MAX_BYTES]));
        assert!(pages.get("big", 1000, v1).is_none(), "too big to keep");
        assert_eq!(store.data_version().unwrap(), v1, "reads change nothing");
        store.count_policies().unwrap();
        assert_eq!(store.data_version().unwrap(), v1, "reads change nothing");
        store.ensure_repository("k", chrono::Utc::now(), chrono::Utc::now()).unwrap();
        let v2 = store.data_version().unwrap();
        assert_ne!(v1, v2);
        assert!(pages.get("p19", 100, v2).is_none());
        pages.put("", 100, v2, Bytes::from_static(b"{}"));
        assert_eq!(pages.lock().len(), 1, "pages of the older version were dropped");
    }
}
