//! The SODA adapter: a client of the SODA (hotpot) API server,
//! `{endpoint}/v1beta/{tenantId}/...`, for profiles, block volumes and
//! hosts. It owns authentication (`noauth` with a tenant id, or a Keystone
//! v3 token that is cached, renewed before it expires and renewed once on a
//! 401), a timeout on every request, retries with capped exponential
//! backoff, and cancellation. The wire shapes and the mapping rules live in
//! `soda_syncer_domain::soda`.
//!
//! Retries: a connection that could not be made is retried for every call
//! (the server never saw the request); a timeout, a dropped connection, a
//! 502/503/504, or a 500 without SODA's `{code, message}` body is retried
//! only for GET, PUT and DELETE. SODA's own 500s (e.g. a PUT on a missing
//! volume) are answers, not outages, and are returned at once.
//!
//! Secrets (`OS_PASSWORD`, the token) are held as [`Secret`] and never
//! reach `Debug`, a log line or an error.

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use soda_syncer_domain::secret::redact_url;
use soda_syncer_domain::soda::{
    metadata_value, HostRequest, NewVolume, SodaHost, SodaProfile, SodaVolume, VolumeUpdate, DEFAULT_TENANT_ID,
};
use soda_syncer_domain::Secret;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `constants.DefaultOpensdsEndpoint`'s port, on loopback.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50040";
/// Items asked for per list page (the server's default is 50).
const PAGE: usize = 200;
/// A token this close to its expiry is renewed before use.
const RENEW_BEFORE: chrono::Duration = chrono::Duration::seconds(60);

/// Keystone v3 password credentials, as the `OS_*` variables give them.
#[derive(Debug, Clone)]
pub struct KeystoneCredentials {
    /// `OS_AUTH_URL`, e.g. `http://host/identity` (`/v3` is added unless present).
    pub auth_url: String,
    pub username: String,
    pub password: Secret,
    /// `OS_TENANT_NAME`, else `OS_PROJECT_NAME`: the project the token is scoped to.
    pub project_name: String,
    /// `OS_USER_DOMAIN_ID`: the user's and the project's domain.
    pub user_domain_id: String,
}

#[derive(Debug, Clone)]
pub enum SodaAuth {
    /// The tenant goes into every URL; no token.
    NoAuth {
        tenant_id: String,
    },
    Keystone(KeystoneCredentials),
}

impl SodaAuth {
    pub fn kind(&self) -> &'static str {
        match self {
            SodaAuth::NoAuth { .. } => "noauth",
            SodaAuth::Keystone(_) => "keystone",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SodaConfig {
    /// `OPENSDS_ENDPOINT`, e.g. `http://soda:50040`.
    pub endpoint: String,
    pub auth: SodaAuth,
    /// Per HTTP request, body included.
    pub request_timeout: Duration,
    /// Tries per call, the first included.
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Extra CA (PEM) for an `https` endpoint or Keystone.
    pub ca_file: Option<PathBuf>,
}

impl SodaConfig {
    /// Defaults: 10 s per request, 5 tries, backoff 200 ms doubling to 5 s.
    pub fn new(endpoint: impl Into<String>, auth: SodaAuth) -> SodaConfig {
        SodaConfig {
            endpoint: endpoint.into(),
            auth,
            request_timeout: Duration::from_secs(10),
            max_attempts: 5,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            ca_file: None,
        }
    }

    /// From the variables SODA's own tools read: `OPENSDS_ENDPOINT` (unless
    /// `endpoint` is given), `OPENSDS_AUTH_STRATEGY` (`noauth`, the server's
    /// default, or `keystone`), `OPENSDS_TENANT_ID` (noauth; default tenant
    /// otherwise), and for keystone `OS_AUTH_URL`, `OS_USERNAME`,
    /// `OS_PASSWORD`, `OS_TENANT_NAME` or `OS_PROJECT_NAME`, `OS_USER_DOMAIN_ID`.
    pub fn from_env(endpoint: Option<&str>) -> Result<SodaConfig, SodaError> {
        Self::from_lookup(endpoint, |k| std::env::var(k).ok())
    }

    /// [`SodaConfig::from_env`] over any variable source (for tests).
    pub fn from_lookup(endpoint: Option<&str>, var: impl Fn(&str) -> Option<String>) -> Result<SodaConfig, SodaError> {
        let get = |k: &str| var(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let endpoint =
            endpoint.map(str::to_string).or_else(|| get("OPENSDS_ENDPOINT")).unwrap_or(DEFAULT_ENDPOINT.into());
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(SodaError::Config(format!(
                "the SODA endpoint {endpoint:?} is not an http:// or https:// URL (OPENSDS_ENDPOINT / --soda-endpoint)"
            )));
        }
        let strategy = get("OPENSDS_AUTH_STRATEGY").unwrap_or_else(|| "noauth".into());
        let auth = match strategy.as_str() {
            "noauth" => {
                SodaAuth::NoAuth { tenant_id: get("OPENSDS_TENANT_ID").unwrap_or_else(|| DEFAULT_TENANT_ID.into()) }
            }
            "keystone" => {
                let need = |k: &str| {
                    get(k).ok_or_else(|| SodaError::Config(format!("keystone auth needs {k} in the environment")))
                };
                // In the order the proxy's deployment lists them, so the first gap is named.
                let auth_url = need("OS_AUTH_URL")?;
                let username = need("OS_USERNAME")?;
                let password = Secret::new(need("OS_PASSWORD")?);
                let project_name = get("OS_TENANT_NAME").or_else(|| get("OS_PROJECT_NAME")).ok_or_else(|| {
                    SodaError::Config("keystone auth needs OS_TENANT_NAME or OS_PROJECT_NAME in the environment".into())
                })?;
                let user_domain_id = need("OS_USER_DOMAIN_ID")?;
                SodaAuth::Keystone(KeystoneCredentials { auth_url, username, password, project_name, user_domain_id })
            }
            other => {
                return Err(SodaError::Config(format!(
                    "OPENSDS_AUTH_STRATEGY={other:?} is not supported: use noauth or keystone"
                )))
            }
        };
        Ok(SodaConfig::new(endpoint, auth))
    }
}

/// What can go wrong talking to SODA. [`SodaError::kind`] is the stable
/// code for metrics and the API.
#[derive(Debug, thiserror::Error)]
pub enum SodaError {
    #[error("SODA client configuration: {0}")]
    Config(String),
    #[error("cannot reach {server} at {endpoint}: {message}")]
    Unreachable { server: &'static str, endpoint: String, message: String },
    #[error("{server} at {endpoint} did not answer {method} {path} within {} ms", timeout.as_millis())]
    Timeout { server: &'static str, endpoint: String, method: String, path: String, timeout: Duration },
    #[error("Keystone at {auth_url} refused the login of user {username:?} (HTTP {status}): {message}; check OS_USERNAME, OS_PASSWORD, OS_USER_DOMAIN_ID and OS_TENANT_NAME/OS_PROJECT_NAME")]
    LoginFailed { auth_url: String, username: String, status: u16, message: String },
    #[error("SODA answered {method} {path} with 401 (unauthorized){}: {message}", if *.renewed { " even with a fresh token" } else { "" })]
    Unauthorized { method: String, path: String, renewed: bool, message: String },
    #[error("SODA denied {method} {path} (403): {message}")]
    Forbidden { method: String, path: String, message: String },
    #[error("SODA has no such resource for {method} {path} (404): {message}")]
    NotFound { method: String, path: String, message: String },
    #[error("SODA rejected {method} {path} (HTTP {status}): {message}")]
    Rejected { method: String, path: String, status: u16, message: String },
    #[error("SODA failed on {method} {path} (HTTP {status}): {message}")]
    Server { method: String, path: String, status: u16, message: String },
    #[error("unexpected answer from {server} to {method} {path}: {message}")]
    BadResponse { server: &'static str, method: String, path: String, message: String },
    #[error("{method} {path} to SODA was cancelled")]
    Cancelled { method: String, path: String },
}

impl SodaError {
    pub fn kind(&self) -> &'static str {
        match self {
            SodaError::Config(_) => "soda_config",
            SodaError::Unreachable { .. } => "soda_unreachable",
            SodaError::Timeout { .. } => "soda_timeout",
            SodaError::LoginFailed { .. } => "soda_login_failed",
            SodaError::Unauthorized { .. } => "soda_unauthorized",
            SodaError::Forbidden { .. } => "soda_forbidden",
            SodaError::NotFound { .. } => "soda_not_found",
            SodaError::Rejected { .. } => "soda_rejected",
            SodaError::Server { .. } => "soda_server_error",
            SodaError::BadResponse { .. } => "soda_bad_response",
            SodaError::Cancelled { .. } => "soda_cancelled",
        }
    }

    /// The HTTP status SODA (or Keystone) answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            SodaError::LoginFailed { status, .. }
            | SodaError::Rejected { status, .. }
            | SodaError::Server { status, .. } => Some(*status),
            SodaError::Unauthorized { .. } => Some(401),
            SodaError::Forbidden { .. } => Some(403),
            SodaError::NotFound { .. } => Some(404),
            _ => None,
        }
    }

    /// True when trying again later may succeed (the server was away or busy).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SodaError::Unreachable { .. }
                | SodaError::Timeout { .. }
                | SodaError::Server { .. }
                | SodaError::BadResponse { .. }
        )
    }
}

/// Which volumes a list asks for. `name`, `profile_id` and `status` are
/// filtered by the server (exact match); `metadata` here, because SODA
/// cannot filter on it (a blanked value counts as absent).
#[derive(Debug, Clone, Default)]
pub struct VolumeQuery {
    pub name: Option<String>,
    pub profile_id: Option<String>,
    pub status: Option<String>,
    pub metadata: Vec<(String, String)>,
}

impl VolumeQuery {
    /// Volumes whose metadata has `key` = `value`.
    pub fn with_metadata(key: &str, value: &str) -> VolumeQuery {
        VolumeQuery { metadata: vec![(key.into(), value.into())], ..Default::default() }
    }
}

#[derive(Debug, Clone)]
struct Session {
    token: Option<Secret>,
    tenant_id: String,
    expires_at: Option<DateTime<Utc>>,
    generation: u64,
}

struct Inner {
    config: SodaConfig,
    base: String,
    http: reqwest::Client,
    session: tokio::sync::Mutex<Option<Session>>,
    generation: AtomicU64,
    logins: AtomicU64,
}

/// A SODA API client; cheap to clone (one connection pool, one token).
#[derive(Clone)]
pub struct SodaClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for SodaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SodaClient")
            .field("endpoint", &redact_url(&self.inner.base))
            .field("auth", &self.inner.config.auth.kind())
            .finish()
    }
}

/// A response that came back, before it is judged.
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
    subject_token: Option<String>,
}

/// SODA's `{code, message}`, or the body's text when it is not one.
fn error_message(body: &[u8]) -> (bool, String) {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let soda = parsed.as_ref().and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string));
    let keystone =
        parsed.as_ref().and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string));
    let (is_soda, msg) = match (soda, keystone) {
        (Some(m), _) => (true, m),
        (None, Some(m)) => (false, m),
        (None, None) => (false, String::from_utf8_lossy(body).trim().to_string()),
    };
    let mut msg: String = msg.chars().take(500).collect();
    if msg.is_empty() {
        msg = "(no message)".into();
    }
    (is_soda, msg)
}

use crate::ids::percent_encode as enc;

/// reqwest's error text without the URL, and with its causes.
fn describe(e: &reqwest::Error) -> String {
    let mut msg = String::new();
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !msg.contains(&s) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&s);
        }
        cur = err.source();
    }
    msg
}

impl SodaClient {
    pub fn new(config: SodaConfig) -> Result<SodaClient, SodaError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("soda-syncer/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| SodaError::Config(format!("cannot read the CA file {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| SodaError::Config(format!("the CA file {} is not PEM: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| SodaError::Config(format!("HTTP client: {}", describe(&e))))?;
        if config.max_attempts == 0 {
            return Err(SodaError::Config("max_attempts must be at least 1".into()));
        }
        let base = config.endpoint.trim_end_matches('/').to_string();
        Ok(SodaClient {
            inner: Arc::new(Inner {
                config,
                base,
                http,
                session: tokio::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
                logins: AtomicU64::new(0),
            }),
        })
    }

    /// The endpoint, for display (any `user:password@` part masked).
    pub fn endpoint(&self) -> String {
        redact_url(&self.inner.base)
    }

    pub fn config(&self) -> &SodaConfig {
        &self.inner.config
    }

    /// Keystone logins made so far (0 with noauth).
    pub fn logins(&self) -> u64 {
        self.inner.logins.load(Ordering::SeqCst)
    }

    /// The tenant in the URLs: the configured one, or the token's project.
    pub async fn tenant_id(&self, cancel: &CancellationToken) -> Result<String, SodaError> {
        Ok(self.session(cancel).await?.tenant_id)
    }

    // --- profiles

    pub async fn list_profiles(&self, cancel: &CancellationToken) -> Result<Vec<SodaProfile>, SodaError> {
        self.list_all("profiles", &[], cancel).await
    }

    pub async fn get_profile(&self, id: &str, cancel: &CancellationToken) -> Result<SodaProfile, SodaError> {
        self.call_json(Method::GET, &format!("profiles/{}", enc(id)), &[], None::<&()>, cancel).await
    }

    // --- block volumes

    /// Every volume matching `query` (all pages).
    pub async fn list_volumes(
        &self,
        query: &VolumeQuery,
        cancel: &CancellationToken,
    ) -> Result<Vec<SodaVolume>, SodaError> {
        let mut q = Vec::new();
        for (k, v) in [("name", &query.name), ("profileId", &query.profile_id), ("status", &query.status)] {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        let all: Vec<SodaVolume> = self.list_all("block/volumes", &q, cancel).await?;
        Ok(all
            .into_iter()
            .filter(|v| query.metadata.iter().all(|(k, want)| metadata_value(v, k) == Some(want.as_str())))
            .collect())
    }

    pub async fn get_volume(&self, id: &str, cancel: &CancellationToken) -> Result<SodaVolume, SodaError> {
        self.call_json(Method::GET, &format!("block/volumes/{}", enc(id)), &[], None::<&()>, cancel).await
    }

    /// `POST /block/volumes` (202): the volume comes back `creating`.
    pub async fn create_volume(&self, volume: &NewVolume, cancel: &CancellationToken) -> Result<SodaVolume, SodaError> {
        self.call_json(Method::POST, "block/volumes", &[], Some(volume), cancel).await
    }

    /// `PUT /block/volumes/{id}`: SODA overwrites non-empty fields and merges
    /// metadata. A missing volume is a 500 from SODA, not a 404.
    pub async fn update_volume(
        &self,
        id: &str,
        update: &VolumeUpdate,
        cancel: &CancellationToken,
    ) -> Result<SodaVolume, SodaError> {
        self.call_json(Method::PUT, &format!("block/volumes/{}", enc(id)), &[], Some(update), cancel).await
    }

    /// `DELETE /block/volumes/{id}` (202). SODA refuses (400) unless the
    /// status is available, error, errorDeleting or errorExtending; a
    /// volume already gone is [`SodaError::NotFound`].
    pub async fn delete_volume(&self, id: &str, cancel: &CancellationToken) -> Result<(), SodaError> {
        self.call(Method::DELETE, &format!("block/volumes/{}", enc(id)), &[], None::<&()>, cancel).await?;
        Ok(())
    }

    // --- hosts

    pub async fn list_hosts(
        &self,
        host_name: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Vec<SodaHost>, SodaError> {
        let q: Vec<(&str, String)> = host_name.map(|h| vec![("hostName", h.to_string())]).unwrap_or_default();
        self.list_all("host/hosts", &q, cancel).await
    }

    pub async fn create_host(&self, host: &HostRequest, cancel: &CancellationToken) -> Result<SodaHost, SodaError> {
        self.call_json(Method::POST, "host/hosts", &[], Some(host), cancel).await
    }

    pub async fn update_host(
        &self,
        id: &str,
        host: &HostRequest,
        cancel: &CancellationToken,
    ) -> Result<SodaHost, SodaError> {
        self.call_json(Method::PUT, &format!("host/hosts/{}", enc(id)), &[], Some(host), cancel).await
    }

    pub async fn delete_host(&self, id: &str, cancel: &CancellationToken) -> Result<(), SodaError> {
        self.call(Method::DELETE, &format!("host/hosts/{}", enc(id)), &[], None::<&()>, cancel).await?;
        Ok(())
    }

    // --- machinery

    async fn list_all<T: DeserializeOwned>(
        &self,
        resource: &str,
        query: &[(&str, String)],
        cancel: &CancellationToken,
    ) -> Result<Vec<T>, SodaError> {
        let mut out: Vec<Value> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for page in 0..10_000usize {
            let mut q: Vec<(&str, String)> = query.to_vec();
            q.push(("limit", PAGE.to_string()));
            q.push(("offset", (page * PAGE).to_string()));
            let items: Vec<Value> = self.call_json(Method::GET, resource, &q, None::<&()>, cancel).await?;
            let n = items.len();
            let mut fresh = 0;
            for item in items {
                let id = item.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
                if id.is_empty() || seen.insert(id) {
                    fresh += 1;
                    out.push(item);
                }
            }
            // A short page ends the list; a page of repeats means the server ignores offset.
            if n < PAGE || fresh == 0 {
                break;
            }
        }
        out.into_iter()
            .map(|v| {
                serde_json::from_value(v).map_err(|e| SodaError::BadResponse {
                    server: "the SODA API",
                    method: "GET".into(),
                    path: resource.into(),
                    message: format!("a list item does not parse: {e}"),
                })
            })
            .collect()
    }

    async fn call_json<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        rel: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        cancel: &CancellationToken,
    ) -> Result<T, SodaError> {
        let (path, bytes) = self.call(method.clone(), rel, query, body, cancel).await?;
        serde_json::from_slice(&bytes).map_err(|e| SodaError::BadResponse {
            server: "the SODA API",
            method: method.to_string(),
            path,
            message: format!("the body does not parse: {e}"),
        })
    }

    /// One API call: session, retries, one renewal on 401, error mapping.
    /// Returns the path (for messages) and the body of a 2xx answer.
    async fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        rel: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        cancel: &CancellationToken,
    ) -> Result<(String, Vec<u8>), SodaError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| SodaError::Config(format!("cannot encode the request body: {e}")))?;
        let keystone = matches!(self.inner.config.auth, SodaAuth::Keystone(_));
        let mut renewed = false;
        loop {
            let session = self.session(cancel).await?;
            let path = format!("/v1beta/{}/{rel}", enc(&session.tenant_id));
            let url = format!("{}{path}", self.inner.base);
            let idempotent = method != Method::POST;
            let token = session.token.clone();
            let answer = self
                .send("the SODA API", &method, &path, idempotent, cancel, || {
                    let mut req = self
                        .inner
                        .http
                        .request(method.clone(), &url)
                        .timeout(self.inner.config.request_timeout)
                        .header("Content-Type", "application/json");
                    if !query.is_empty() {
                        req = req.query(query);
                    }
                    if let Some(t) = &token {
                        req = req.header("X-Auth-Token", t.expose());
                    }
                    if let Some(b) = &body {
                        req = req.body(b.clone());
                    }
                    req
                })
                .await?;
            let status = answer.status;
            if status.is_success() {
                return Ok((path, answer.body));
            }
            let (_, message) = error_message(&answer.body);
            let (m, p) = (method.to_string(), path.clone());
            match status.as_u16() {
                401 if keystone && !renewed => {
                    tracing::info!(method = %m, path = %p, "SODA refused the token; logging in again once");
                    self.invalidate(session.generation).await;
                    renewed = true;
                    continue;
                }
                401 => return Err(SodaError::Unauthorized { method: m, path: p, renewed, message }),
                403 => return Err(SodaError::Forbidden { method: m, path: p, message }),
                404 => return Err(SodaError::NotFound { method: m, path: p, message }),
                s if s >= 500 => return Err(SodaError::Server { method: m, path: p, status: s, message }),
                s => return Err(SodaError::Rejected { method: m, path: p, status: s, message }),
            }
        }
    }

    /// Send with retries. `build` makes a fresh request for each try.
    async fn send(
        &self,
        server: &'static str,
        method: &Method,
        path: &str,
        idempotent: bool,
        cancel: &CancellationToken,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Answer, SodaError> {
        let cfg = &self.inner.config;
        let endpoint = if server == "Keystone" {
            match &cfg.auth {
                SodaAuth::Keystone(k) => redact_url(&k.auth_url),
                SodaAuth::NoAuth { .. } => String::new(),
            }
        } else {
            redact_url(&self.inner.base)
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let last = attempt >= cfg.max_attempts;
            let sent = cancellable(cancel, method, path, async {
                let resp = build().send().await?;
                let status = resp.status();
                let subject_token =
                    resp.headers().get("x-subject-token").and_then(|v| v.to_str().ok()).map(str::to_string);
                let body = resp.bytes().await?.to_vec();
                Ok::<_, reqwest::Error>(Answer { status, body, subject_token })
            })
            .await?;
            let (retry, err) = match sent {
                Ok(a) => {
                    let s = a.status.as_u16();
                    let gateway = matches!(s, 502..=504);
                    let bare_500 = s == 500 && !error_message(&a.body).0;
                    if idempotent && (gateway || bare_500) && !last {
                        let (_, message) = error_message(&a.body);
                        tracing::debug!(server, method = %method, path, status = s, attempt, message, "retrying");
                        (true, None)
                    } else {
                        return Ok(a);
                    }
                }
                Err(e) => {
                    let connect = e.is_connect();
                    let timeout = e.is_timeout();
                    let err = if timeout && !connect {
                        SodaError::Timeout {
                            server,
                            endpoint: endpoint.clone(),
                            method: method.to_string(),
                            path: path.into(),
                            timeout: cfg.request_timeout,
                        }
                    } else {
                        SodaError::Unreachable {
                            server,
                            endpoint: endpoint.clone(),
                            message: describe(&e.without_url()),
                        }
                    };
                    let retry = (connect || idempotent) && !last;
                    tracing::debug!(server, method = %method, path, attempt, error = %err, retry, "request failed");
                    (retry, Some(err))
                }
            };
            if !retry {
                return Err(err.expect("an error when not retrying"));
            }
            let exp = attempt.saturating_sub(1).min(16);
            let delay = cfg.backoff_initial.saturating_mul(1 << exp).min(cfg.backoff_max);
            cancellable(cancel, method, path, tokio::time::sleep(delay)).await?;
        }
    }

    /// The current session, logging in to Keystone when there is none or
    /// the token is about to expire. One login at a time.
    async fn session(&self, cancel: &CancellationToken) -> Result<Session, SodaError> {
        let creds = match &self.inner.config.auth {
            SodaAuth::NoAuth { tenant_id } => {
                return Ok(Session { token: None, tenant_id: tenant_id.clone(), expires_at: None, generation: 0 })
            }
            SodaAuth::Keystone(k) => k,
        };
        let mut guard = cancellable(cancel, &Method::POST, "keystone session", self.inner.session.lock()).await?;
        if let Some(s) = guard.as_ref() {
            if s.expires_at.is_none_or(|t| t - Utc::now() > RENEW_BEFORE) {
                return Ok(s.clone());
            }
        }
        // Never reused, so a late 401 on an old token cannot drop a newer session.
        let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let s = self.login(creds, generation, cancel).await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Forget the session that got a 401, unless another call already
    /// replaced it (so concurrent 401s cause one login, not many).
    async fn invalidate(&self, generation: u64) {
        let mut guard = self.inner.session.lock().await;
        if guard.as_ref().is_some_and(|s| s.generation == generation) {
            *guard = None;
        }
    }

    async fn login(
        &self,
        creds: &KeystoneCredentials,
        generation: u64,
        cancel: &CancellationToken,
    ) -> Result<Session, SodaError> {
        let base = creds.auth_url.trim_end_matches('/');
        let url = if base.ends_with("/v3") { format!("{base}/auth/tokens") } else { format!("{base}/v3/auth/tokens") };
        let path = "/v3/auth/tokens";
        let domain = json!({ "id": creds.user_domain_id });
        let body = serde_json::to_vec(&json!({
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": { "user": { "name": creds.username, "domain": domain, "password": creds.password.expose() } }
                },
                "scope": { "project": { "name": creds.project_name, "domain": domain } }
            }
        }))
        .expect("JSON");
        let answer = self
            .send("Keystone", &Method::POST, path, true, cancel, || {
                self.inner
                    .http
                    .post(&url)
                    .timeout(self.inner.config.request_timeout)
                    .header("Content-Type", "application/json")
                    .body(body.clone())
            })
            .await?;
        if !answer.status.is_success() {
            let (_, message) = error_message(&answer.body);
            return Err(SodaError::LoginFailed {
                auth_url: redact_url(&creds.auth_url),
                username: creds.username.clone(),
                status: answer.status.as_u16(),
                message,
            });
        }
        let bad = |message: String| SodaError::BadResponse {
            server: "Keystone",
            method: "POST".into(),
            path: path.into(),
            message,
        };
        let token =
            answer.subject_token.filter(|t| !t.is_empty()).ok_or_else(|| bad("no X-Subject-Token header".into()))?;
        let v: Value =
            serde_json::from_slice(&answer.body).map_err(|e| bad(format!("the token body does not parse: {e}")))?;
        let tenant_id = v
            .pointer("/token/project/id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                bad(format!("the token is not scoped to a project (OS_TENANT_NAME {:?})", creds.project_name))
            })?
            .to_string();
        let expires_at = v
            .pointer("/token/expires_at")
            .and_then(Value::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc));
        self.inner.logins.fetch_add(1, Ordering::SeqCst);
        tracing::info!(auth_url = %redact_url(&creds.auth_url), user = %creds.username, project = %tenant_id, "logged in to Keystone");
        Ok(Session { token: Some(Secret::new(token)), tenant_id, expires_at, generation })
    }
}

/// Run `fut` unless `cancel` fires first.
async fn cancellable<F: Future>(
    cancel: &CancellationToken,
    method: &Method,
    path: &str,
    fut: F,
) -> Result<F::Output, SodaError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(SodaError::Cancelled { method: method.to_string(), path: path.to_string() }),
        out = fut => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn noauth_defaults_to_the_default_tenant_and_loopback() {
        let c = SodaConfig::from_lookup(None, lookup(&[])).unwrap();
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        assert!(matches!(c.auth, SodaAuth::NoAuth { ref tenant_id } if tenant_id == DEFAULT_TENANT_ID));
        let c = SodaConfig::from_lookup(
            Some("http://soda:50040"),
            lookup(&[("OPENSDS_ENDPOINT", "http://other:1"), ("OPENSDS_TENANT_ID", "t1")]),
        )
        .unwrap();
        assert_eq!(c.endpoint, "http://soda:50040");
        assert!(matches!(c.auth, SodaAuth::NoAuth { ref tenant_id } if tenant_id == "t1"));
    }

    #[test]
    fn keystone_reads_the_os_variables_and_names_a_missing_one() {
        let full = [
            ("OPENSDS_AUTH_STRATEGY", "keystone"),
            ("OS_AUTH_URL", "http://h/identity"),
            ("OS_USERNAME", "admin"),
            ("OS_PASSWORD", "hunter22"),
            ("OS_PROJECT_NAME", "admin"),
            ("OS_USER_DOMAIN_ID", "default"),
        ];
        let c = SodaConfig::from_lookup(None, lookup(&full)).unwrap();
        let SodaAuth::Keystone(k) = &c.auth else { panic!("keystone") };
        assert_eq!(k.project_name, "admin");
        assert!(!format!("{c:?}").contains("hunter22"));
        let e = SodaConfig::from_lookup(None, lookup(&full[..3])).unwrap_err();
        assert!(e.to_string().contains("OS_PASSWORD"), "{e}");
        let e = SodaConfig::from_lookup(None, lookup(&[("OPENSDS_AUTH_STRATEGY", "basic")])).unwrap_err();
        assert_eq!(e.kind(), "soda_config");
        assert!(SodaConfig::from_lookup(Some("soda:50040"), lookup(&[])).is_err());
    }

    #[test]
    fn error_bodies_give_sodas_message_or_keystones_or_the_text() {
        assert_eq!(
            error_message(br#"{"code":404,"message":"volume x not found"}"#),
            (true, "volume x not found".into())
        );
        assert_eq!(
            error_message(br#"{"error":{"code":401,"message":"requires authentication","title":"Unauthorized"}}"#),
            (false, "requires authentication".into())
        );
        assert_eq!(error_message(b"<html>bad gateway</html>"), (false, "<html>bad gateway</html>".into()));
        assert_eq!(error_message(b""), (false, "(no message)".into()));
    }
}
