//! A SODA hotpot API server stand-in (plus the few Keystone v3 calls the
//! SODA clients make), on 127.0.0.1 port 0, with knobs for tests.
//!
//! Reproduced from the upstream sources (`sodafoundation/api` at df1bf3d6,
//! paths below are in that repository):
//! - Routes `/v1beta/{tenantId}/profiles[/{id}[/customProperties[/{key}]]]`,
//!   `/v1beta/{tenantId}/block/volumes[/{id}]`, `/v1beta/{tenantId}/host/hosts[/{id}]`,
//!   `GET /` and `GET /v1beta` (`pkg/api/routers/*.go`), with the status
//!   codes the controllers really send (`pkg/api/controllers/*.go`): profile
//!   create 200; volume create and delete 202; a PUT on a missing volume or
//!   profile 500 (not 404); host update errors 400.
//! - Every error body is `{"code":N,"message":"..."}` (`model.ErrorSpec`);
//!   success bodies are `application/json; charset=utf-8`. The auth
//!   filter's 401 bodies go out without a content type, as `context.HttpError`
//!   writes them (Go then sniffs `text/plain`).
//! - Filter order: auth (401), swagger request validation (400: required
//!   fields, JSON types, the host name/IP patterns and enums), policy (403
//!   "operation is not permitted", keystone only), then the controller.
//! - `noauth`: the tenant is the URL's; only `e93b4c0934da416eb9c8d120c5d04d96`
//!   is admin (sees every tenant's volumes and hosts). `keystone`: the
//!   `X-Auth-Token` is checked, the tenant is the token's project (not the
//!   URL's), `policy.json`'s admin_api / admin_or_owner rules apply.
//!   Keystone answers an unknown or expired token with 404 to the API
//!   server, so both give 401 "get token failed,Resource not found"; a
//!   missing header gives 401 "token not found in header".
//! - Keystone `POST /identity/v3/auth/tokens` (password method, user by name
//!   and domain, project scope by name and domain): 201 with the token in
//!   `X-Subject-Token` and a token body with `project.id`, `roles`,
//!   `expires_at`; 401 in Keystone's own error shape on wrong credentials.
//! - Volumes: create validation (`pkg/api/util/db.go`: size > 0, name 1..255
//!   of `^[a-zA-Z0-9 _-]+$`, an existing profile or `default_block`), status
//!   `creating`, then the "dock" sets `available` and a `poolId` after
//!   [`SodaStandin::set_dock_delay`] (200 ms by default). Update
//!   (`pkg/db/drivers/etcd/etcd.go` `UpdateVolume`): only non-empty fields
//!   overwrite, `metadata` is merged key by key and never loses a key,
//!   `replicationDriverData` is replaced, `updatedAt` refreshed. Delete: a
//!   volume without `poolId` or `profileId` is removed at once (202);
//!   otherwise only `available`/`error`/`errorDeleting`/`errorExtending`
//!   may go (400 otherwise), it turns `deleting` and the dock removes it.
//! - Lists filter on exact field values (`name`, `status`, `profileId`,
//!   `poolId`, `id`, ...; Go's `utils.Filter`), sort only when `sortKey` is
//!   given (default direction desc), and return at most `limit` items,
//!   **50 by default**, from `offset`. Order otherwise is etcd key order
//!   (by tenant, then id).
//! - JSON as Go's `encoding/json` writes these structs: `id`, `createdAt`,
//!   `updatedAt` always present (a fresh volume has `updatedAt: ""`), the
//!   `AttachStatus` key always present, empty fields left out, a host's
//!   `availabilityZones`/`initiators` `null` when unset, its `password`
//!   never returned, a profile's nested property objects always present.
//!   Times use `2006-01-02T15:04:05` (UTC here).
//! - Profiles: name unique, storageType block or file; a block profile with
//!   volumes cannot be deleted (400); PUT merges `customProperties`.
//!   `POST .../customProperties` and `DELETE .../customProperties/{key}`
//!   answer 500 "... the profile name 'x' already exists", as upstream does
//!   (etcd `AddCustomProperty`/`RemoveCustomProperty` re-create the profile
//!   and trip over the unique-name check): use PUT or [`SodaStandin::put_profile`].
//! - Hosts: create needs hostName, osType, accessMode, IPv4 ip; hostName is
//!   unique per visible tenant.
//!
//! Not reproduced: snapshots, attachments (so the "no snapshots, no
//! attachments" delete rule never triggers), resize, docks, pools, file
//! shares, HTTPS, Go's case-insensitive JSON keys, the real dock's backend
//! work. A `default_block` profile exists from the start, as an installed
//! hotpot has one.
//!
//! Test knobs: [`SodaStandin::set_down`] answers 503 to everything,
//! [`SodaStandin::stop`]/[`SodaStandin::restart`] close and reopen the port
//! (connection refused in between, data kept), [`SodaStandin::set_delay`]
//! delays every answer, [`SodaStandin::expire_tokens`], and
//! [`SodaStandin::requests`] logs every request (passwords redacted).

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The admin tenant of `noauth` mode.
pub const DEFAULT_TENANT_ID: &str = "e93b4c0934da416eb9c8d120c5d04d96";
/// The pool the stand-in's dock puts every volume in.
pub const POOL_ID: &str = "a3b6c9e2-58f4-4e5b-9d2f-4c7f0e1a2b3c";
const TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S";
const DEFAULT_LIMIT: usize = 50;

/// How the stand-in authenticates (`[osdsapiserver] auth_strategy`).
#[derive(Debug, Clone)]
pub enum StandinAuth {
    NoAuth,
    Keystone(KeystoneUser),
}

/// The one Keystone user the stand-in knows.
#[derive(Debug, Clone)]
pub struct KeystoneUser {
    pub username: String,
    pub password: String,
    pub user_domain_id: String,
    pub project_name: String,
    pub project_id: String,
    pub roles: Vec<String>,
    pub token_ttl: Duration,
}

impl KeystoneUser {
    /// `admin` in project `admin` with role `admin`, domain `default`, as a
    /// devstack install has it.
    pub fn admin(password: &str) -> KeystoneUser {
        KeystoneUser {
            username: "admin".into(),
            password: password.into(),
            user_domain_id: "default".into(),
            project_name: "admin".into(),
            project_id: "5b3c1e2d9f7a4c1e8d6b0a2f4e6c8a10".into(),
            roles: vec!["admin".into()],
            token_ttl: Duration::from_secs(3600),
        }
    }
}

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub status: u16,
    pub auth_token: Option<String>,
    /// The JSON body, with any `password` value replaced by `***`.
    pub body: Option<Value>,
}

struct Token {
    expires_at: chrono::DateTime<chrono::Utc>,
    expired: bool,
}

enum DockJob {
    Created { tenant: String, id: String },
    Deleted { tenant: String, id: String },
}

#[derive(Default)]
struct Db {
    profiles: BTreeMap<String, Profile>,
    volumes: BTreeMap<(String, String), Volume>,
    hosts: BTreeMap<(String, String), Host>,
    tokens: HashMap<String, Token>,
    jobs: Vec<(Instant, DockJob)>,
}

struct Shared {
    auth: StandinAuth,
    db: Mutex<Db>,
    down: AtomicBool,
    delay_ms: AtomicU64,
    dock_delay_ms: AtomicU64,
    logins: AtomicU64,
    requests: Mutex<Vec<RecordedRequest>>,
}

/// A running stand-in. Dropping it stops the server.
pub struct SodaStandin {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<(JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>>,
    dock: JoinHandle<()>,
}

impl Drop for SodaStandin {
    fn drop(&mut self) {
        if let Some((task, _stop)) = self.server.lock().unwrap().take() {
            task.abort();
        }
        self.dock.abort();
    }
}

impl SodaStandin {
    /// Bind 127.0.0.1:0 and serve.
    pub async fn start(auth: StandinAuth) -> SodaStandin {
        let mut db = Db::default();
        let default_block: Profile = serde_json::from_value(json!({
            "name": "default_block", "description": "default policy", "storageType": "block"
        }))
        .expect("profile");
        let mut p = default_block;
        p.id = new_uuid();
        p.created_at = now();
        db.profiles.insert(p.id.clone(), p);
        let shared = Arc::new(Shared {
            auth,
            db: Mutex::new(db),
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            dock_delay_ms: AtomicU64::new(200),
            logins: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let server = spawn_server(shared.clone(), listener);
        let dock = tokio::spawn(run_dock(shared.clone()));
        SodaStandin { shared, addr, server: Mutex::new(Some(server)), dock }
    }

    /// `http://127.0.0.1:PORT`: the `OPENSDS_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/identity`: the `OS_AUTH_URL`.
    pub fn keystone_url(&self) -> String {
        format!("{}/identity", self.url())
    }

    /// The project id a keystone login scopes to (the `{tenantId}` in URLs).
    pub fn project_id(&self) -> Option<String> {
        match &self.shared.auth {
            StandinAuth::Keystone(u) => Some(u.project_id.clone()),
            StandinAuth::NoAuth => None,
        }
    }

    /// Every volume of every tenant, as the API shows it.
    pub fn volumes(&self) -> Vec<Value> {
        let db = self.shared.db.lock().unwrap();
        db.volumes.values().map(|v| serde_json::to_value(v).expect("json")).collect()
    }

    pub fn volume(&self, id: &str) -> Option<Value> {
        let db = self.shared.db.lock().unwrap();
        db.volumes.values().find(|v| v.id == id).map(|v| serde_json::to_value(v).expect("json"))
    }

    pub fn profiles(&self) -> Vec<Value> {
        let db = self.shared.db.lock().unwrap();
        db.profiles.values().map(|p| serde_json::to_value(p).expect("json")).collect()
    }

    pub fn hosts(&self) -> Vec<Value> {
        let db = self.shared.db.lock().unwrap();
        db.hosts.values().map(|h| serde_json::to_value(h).expect("json")).collect()
    }

    /// Create or replace a profile directly (as an operator editing it in
    /// the dashboard would). `id` absent: a new id. Returns the id.
    pub fn put_profile(&self, profile: Value) -> String {
        let mut p: Profile = serde_json::from_value(strip_nulls(profile, "customProperties")).expect("profile JSON");
        let mut db = self.shared.db.lock().unwrap();
        if p.id.is_empty() {
            p.id = new_uuid();
        }
        match db.profiles.get(&p.id) {
            Some(old) => {
                if p.created_at.is_empty() {
                    p.created_at = old.created_at.clone();
                }
                p.updated_at = now();
            }
            None if p.created_at.is_empty() => p.created_at = now(),
            None => {}
        }
        let id = p.id.clone();
        db.profiles.insert(id.clone(), p);
        id
    }

    /// Remove a profile directly, whatever uses it.
    pub fn delete_profile(&self, id: &str) -> bool {
        self.shared.db.lock().unwrap().profiles.remove(id).is_some()
    }

    /// Answer every request with 503 (a gateway in front of a dead server).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Delay every answer by this much.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How long the dock takes to finish a create or delete.
    pub fn set_dock_delay(&self, delay: Duration) {
        self.shared.dock_delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Expire every token issued so far.
    pub fn expire_tokens(&self) {
        for t in self.shared.db.lock().unwrap().tokens.values_mut() {
            t.expired = true;
        }
    }

    /// Successful Keystone logins so far.
    pub fn logins(&self) -> u64 {
        self.shared.logins.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.requests.lock().unwrap().clear();
    }

    /// Stop serving: the port is closed (connection refused), idle
    /// connections are closed, the data is kept.
    pub async fn stop(&self) {
        let server = self.server.lock().unwrap().take();
        if let Some((task, stop)) = server {
            let _ = stop.send(());
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Serve again on the same port after [`SodaStandin::stop`].
    pub async fn restart(&self) {
        if self.server.lock().unwrap().is_some() {
            return;
        }
        let listener = TcpListener::bind(self.addr).await.expect("re-bind the stand-in's port");
        let server = spawn_server(self.shared.clone(), listener);
        *self.server.lock().unwrap() = Some(server);
    }
}

fn spawn_server(shared: Arc<Shared>, listener: TcpListener) -> (JoinHandle<()>, tokio::sync::oneshot::Sender<()>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(shared);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    (task, tx)
}

async fn run_dock(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut db = shared.db.lock().unwrap();
        let now_i = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut db.jobs).into_iter().partition(|(at, _)| *at <= now_i);
        db.jobs = later;
        for (_, job) in due {
            match job {
                DockJob::Created { tenant, id } => {
                    if let Some(v) = db.volumes.get_mut(&(tenant, id)) {
                        if v.status == "creating" {
                            v.status = "available".into();
                            v.pool_id = POOL_ID.into();
                            v.updated_at = now();
                        }
                    }
                }
                DockJob::Deleted { tenant, id } => {
                    db.volumes.remove(&(tenant, id));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Go-shaped models

fn is_zero(n: &i64) -> bool {
    *n == 0
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// `VolumeSpec` as stored and as Go marshals it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Volume {
    id: String,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    tenant_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    user_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    group_id: String,
    #[serde(skip_serializing_if = "is_zero")]
    size: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    availability_zone: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    status: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pool_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    profile_id: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    snapshot_id: String,
    #[serde(skip_serializing_if = "is_false")]
    snapshot_from_cloud: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    replication_id: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    replication_driver_data: BTreeMap<String, String>,
    #[serde(rename = "AttachStatus")]
    attach_status: String,
    #[serde(skip_serializing_if = "is_false")]
    multi_attach: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    identifier: Option<Identifier>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Identifier {
    #[serde(skip_serializing_if = "String::is_empty")]
    durable_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    durable_name_format: String,
}

/// The body of a volume PUT as Go decodes it: a missing map stays nil.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct VolumeInput {
    name: String,
    availability_zone: String,
    description: String,
    metadata: Option<BTreeMap<String, String>>,
    identifier: Option<Identifier>,
    pool_id: String,
    profile_id: String,
    size: i64,
    status: String,
    replication_driver_data: Option<BTreeMap<String, String>>,
    multi_attach: bool,
    group_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Profile {
    id: String,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    storage_type: String,
    provisioning_properties: ProvisioningProperties,
    replication_properties: ReplicationProperties,
    snapshot_properties: SnapshotProperties,
    data_protection_properties: DataProtectionProperties,
    #[serde(skip_serializing_if = "Option::is_none")]
    custom_properties: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ProvisioningProperties {
    data_storage: DataStorage,
    io_connectivity: IoConnectivity,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct DataStorage {
    #[serde(skip_serializing_if = "is_zero")]
    recovery_time_objective: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    provisioning_policy: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    character_code_set: String,
    #[serde(skip_serializing_if = "is_zero")]
    max_file_name_length_bytes: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    storage_access_capability: Vec<String>,
    compression: bool,
    deduplication: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct IoConnectivity {
    #[serde(rename = "accessProtocol", skip_serializing_if = "String::is_empty")]
    access_protocol: String,
    #[serde(rename = "maxIOPS", skip_serializing_if = "is_zero")]
    max_iops: i64,
    #[serde(rename = "minIOPS", skip_serializing_if = "is_zero")]
    min_iops: i64,
    #[serde(rename = "maxBWS", skip_serializing_if = "is_zero")]
    max_bws: i64,
    #[serde(rename = "minBWS", skip_serializing_if = "is_zero")]
    min_bws: i64,
    #[serde(skip_serializing_if = "is_zero")]
    latency: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct DataProtection {
    is_isolated: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    min_lifetime: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    recovery_geographic_objective: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    recovery_point_objective_time: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    recovery_time_objective: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    replica_type: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ReplicationProperties {
    data_protection: DataProtection,
    replica_infos: ReplicaInfos,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ReplicaInfos {
    #[serde(skip_serializing_if = "String::is_empty")]
    replica_update_mode: String,
    #[serde(skip_serializing_if = "is_false")]
    consistency_enabled: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    replication_period: String,
    #[serde(skip_serializing_if = "is_zero")]
    replication_bandwidth: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct SnapshotProperties {
    schedule: SnapshotSchedule,
    retention: SnapshotRetention,
    topology: SnapshotTopology,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct SnapshotSchedule {
    #[serde(skip_serializing_if = "String::is_empty")]
    datetime: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    occurrence: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct SnapshotRetention {
    #[serde(skip_serializing_if = "is_zero")]
    number: i64,
    #[serde(skip_serializing_if = "is_zero")]
    duration: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct SnapshotTopology {
    #[serde(skip_serializing_if = "String::is_empty")]
    bucket: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct DataProtectionProperties {
    data_protection: DataProtection,
    #[serde(skip_serializing_if = "is_false")]
    consistency_enabled: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Host {
    id: String,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    tenant_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    user_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    host_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    os_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    access_mode: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    ip: String,
    #[serde(skip_serializing_if = "is_zero")]
    port: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    username: String,
    /// Blanked by `HostSpec.MarshalJSON`, so never in a response.
    #[serde(skip_serializing)]
    password: String,
    availability_zones: Option<Vec<String>>,
    initiators: Option<Vec<Initiator>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Initiator {
    #[serde(skip_serializing_if = "String::is_empty")]
    port_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    protocol: String,
}

// ---------------------------------------------------------------------------
// Helpers

fn now() -> String {
    chrono::Utc::now().format(TIME_FORMAT).to_string()
}

fn random_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("getrandom");
    b
}

fn new_uuid() -> String {
    let mut b = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn new_hex() -> String {
    random_bytes().iter().chain(random_bytes().iter()).map(|x| format!("{x:02x}")).collect()
}

/// Go leaves a field alone on `null`; serde would fail on it. Nulls are
/// dropped everywhere except under `keep` (a free map where null is a value).
fn strip_nulls(v: Value, keep: &str) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| if k == keep { (k, v) } else { (k, strip_nulls(v, keep)) })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(|v| strip_nulls(v, keep)).collect()),
        other => other,
    }
}

/// A failed answer: status and body, made into a response at the end
/// (small, unlike `Response`, so it can travel in a `Result`).
struct ApiError {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r =
            (StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), self.body).into_response();
        r.headers_mut().insert("content-type", HeaderValue::from_static(self.content_type));
        r
    }
}

fn error(code: u16, message: impl Into<String>) -> ApiError {
    let body = serde_json::to_vec(&json!({"code": code, "message": message.into()})).expect("json");
    ApiError { status: code, body, content_type: "application/json; charset=utf-8" }
}

/// `context.HttpError` as the auth filter uses it: no content type set, so
/// Go sniffs `text/plain`.
fn auth_error(message: impl Into<String>) -> ApiError {
    let body = serde_json::to_vec(&json!({"code": 401, "message": message.into()})).expect("json");
    ApiError { status: 401, body, content_type: "text/plain; charset=utf-8" }
}

fn success(status: StatusCode, body: Option<Value>) -> Response {
    let bytes = body.map(|b| serde_json::to_vec(&b).expect("json")).unwrap_or_default();
    let mut r = (status, bytes).into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/json; charset=utf-8"));
    r
}

fn keystone_error(code: u16, title: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message, "title": title}});
    let mut r = (StatusCode::from_u16(code).unwrap(), serde_json::to_vec(&body).unwrap()).into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(x) => {
                        out.push(x);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Go's `url.ParseQuery`: every value of every key.
fn parse_query(q: Option<&str>) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.entry(percent_decode(k)).or_default().push(percent_decode(v));
    }
    m
}

/// Go's `strings.Title` on a query key: the struct field it filters on.
fn title(k: &str) -> String {
    let mut c = k.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

/// A struct field printed with `%v`, keyed by its Go name; `None` when the
/// struct has no such field (the filter then ignores the key).
fn go_field(v: &Value, go_name: &str) -> Option<String> {
    let obj = v.as_object()?;
    let json_key = {
        let mut c = go_name.chars();
        c.next().map(|f| f.to_lowercase().collect::<String>() + c.as_str()).unwrap_or_default()
    };
    let known =
        ["Id", "CreatedAt", "UpdatedAt"].contains(&go_name) || obj.contains_key(&json_key) || go_name == "AttachStatus";
    let val = obj.get(&json_key).or_else(|| obj.get(go_name));
    match val {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        Some(Value::Object(m)) => Some(format!(
            "map[{}]",
            m.iter().map(|(k, v)| format!("{k}:{}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(" ")
        )),
        Some(Value::Null) | None if known => Some(String::new()),
        _ => None,
    }
}

/// `utils.Filter`, `utils.Sort` (when sortKey is given), `utils.Slice`.
/// `fields` lists the Go field names of the type, for keys whose JSON
/// value is absent (empty).
fn filter_sort_slice(
    items: Vec<Value>,
    q: &BTreeMap<String, Vec<String>>,
    fields: &[&str],
    sortable: &[&str],
) -> Vec<Value> {
    let total = items.len();
    let mut out: Vec<Value> = items
        .into_iter()
        .filter(|item| {
            q.iter().all(|(key, wanted)| {
                let go = title(key);
                if !fields.contains(&go.as_str()) {
                    return true;
                }
                let have = go_field(item, &go).unwrap_or_default();
                wanted.contains(&have)
            })
        })
        .collect();
    if let Some(key) = q.get("sortKey").and_then(|v| v.first()) {
        if sortable.iter().any(|s| s.eq_ignore_ascii_case(key)) {
            let go = title(key);
            let asc = q.get("sortDir").and_then(|v| v.first()).is_some_and(|d| d.eq_ignore_ascii_case("asc"));
            out.sort_by(|a, b| {
                let (x, y) = (go_field(a, &go).unwrap_or_default(), go_field(b, &go).unwrap_or_default());
                // Only int64 fields (size) compare as numbers, as in utils.Sort.
                let ord = match (go == "Size", x.parse::<i64>(), y.parse::<i64>()) {
                    (true, Ok(x), Ok(y)) => x.cmp(&y),
                    _ => x.cmp(&y),
                };
                if asc {
                    ord
                } else {
                    ord.reverse()
                }
            });
        }
    }
    let limit = match q.get("limit").and_then(|v| v.first()).map(|l| l.parse::<i64>()) {
        Some(Ok(l)) if l >= 0 => l as usize,
        _ => DEFAULT_LIMIT,
    };
    let offset = match q.get("offset").and_then(|v| v.first()).map(|o| o.parse::<i64>()) {
        None => 0,
        Some(Ok(o)) if o > total as i64 => total,
        Some(Ok(o)) if o < 0 => 0,
        Some(Ok(o)) => o as usize,
        Some(Err(_)) => total,
    };
    out.into_iter().skip(offset).take(limit).collect()
}

const VOLUME_FIELDS: &[&str] = &[
    "Id",
    "CreatedAt",
    "UpdatedAt",
    "TenantId",
    "UserId",
    "Name",
    "Description",
    "GroupId",
    "Size",
    "AvailabilityZone",
    "Status",
    "PoolId",
    "ProfileId",
    "Metadata",
    "SnapshotId",
    "SnapshotFromCloud",
    "ReplicationId",
    "AttachStatus",
    "MultiAttach",
];
const VOLUME_SORTABLE: &[&str] =
    &["ID", "NAME", "STATUS", "AVAILABILITYZONE", "PROFILEID", "TENANTID", "SIZE", "POOLID", "DESCRIPTION", "GROUPID"];
const PROFILE_FIELDS: &[&str] = &["Id", "CreatedAt", "UpdatedAt", "Name", "Description", "StorageType"];
const PROFILE_SORTABLE: &[&str] = &["ID", "NAME", "DESCRIPTION"];
const HOST_FIELDS: &[&str] =
    &["Id", "CreatedAt", "UpdatedAt", "TenantId", "UserId", "HostName", "OsType", "AccessMode", "Ip", "Port"];

// ---------------------------------------------------------------------------
// Auth and policy

/// The request context (`pkg/context`).
struct Ctx {
    tenant: String,
    user: String,
    is_admin: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Rule {
    /// `""`: anyone.
    Open,
    AdminApi,
    AdminOrOwner,
}

/// Who the auth filter says is calling.
enum Caller {
    NoAuth,
    Keystone,
}

impl Shared {
    /// The auth filter: 401 on a missing, unknown or expired token.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if matches!(self.auth, StandinAuth::NoAuth) {
            return Ok(Caller::NoAuth);
        }
        let token = headers.get("x-auth-token").and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or("");
        if token.is_empty() {
            return Err(auth_error("token not found in header"));
        }
        let db = self.db.lock().unwrap();
        match db.tokens.get(token) {
            // Keystone itself answers 404 for an expired token.
            Some(t) if !t.expired && t.expires_at > chrono::Utc::now() => Ok(Caller::Keystone),
            _ => Err(auth_error("get token failed,Resource not found")),
        }
    }

    /// `policy.Authorize` (keystone only) and the context it leaves.
    fn policy(&self, caller: Caller, url_tenant: &str, rule: Rule) -> Result<Ctx, ApiError> {
        let (Caller::Keystone, StandinAuth::Keystone(user)) = (caller, &self.auth) else {
            return Ok(Ctx {
                tenant: url_tenant.to_string(),
                user: String::new(),
                is_admin: url_tenant == DEFAULT_TENANT_ID,
            });
        };
        let admin_role = user.roles.iter().any(|r| r == "admin");
        let admin_api = admin_role && user.project_name.eq_ignore_ascii_case("admin");
        let ok = match rule {
            Rule::Open => true,
            Rule::AdminApi => admin_api,
            Rule::AdminOrOwner => admin_api || user.project_id == url_tenant,
        };
        if !ok {
            return Err(error(403, "operation is not permitted"));
        }
        Ok(Ctx { tenant: user.project_id.clone(), user: format!("{}-id", user.username), is_admin: admin_role })
    }

    fn authorize(&self, headers: &HeaderMap, url_tenant: &str, rule: Rule) -> Result<Ctx, ApiError> {
        let caller = self.authenticate(headers)?;
        self.policy(caller, url_tenant, rule)
    }
}

// ---------------------------------------------------------------------------
// Swagger request validation (the parts the routes here need)

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(error(400, "request body has an error: value is required but missing"));
    }
    serde_json::from_slice(body)
        .map_err(|e| error(400, format!("request body has an error: failed to decode request body: {e}")))
}

fn schema_error(path: &str, reason: &str) -> ApiError {
    error(400, format!("request body has an error: doesn't match the schema: Error at \"/{path}\": {reason}"))
}

enum Ty {
    Str,
    Int,
    Bool,
    Obj,
    Arr,
}

fn check_types(v: &Value, props: &[(&str, Ty)]) -> Result<(), ApiError> {
    for (k, ty) in props {
        let Some(x) = v.get(*k) else { continue };
        let ok = match ty {
            Ty::Str => x.is_string(),
            Ty::Int => x.is_i64() || x.as_f64().is_some_and(|f| f.fract() == 0.0),
            Ty::Bool => x.is_boolean(),
            Ty::Obj => x.is_object(),
            Ty::Arr => x.is_array() || x.is_null(),
        };
        if !ok {
            let want = match ty {
                Ty::Str => "string",
                Ty::Int => "integer",
                Ty::Bool => "boolean",
                Ty::Obj => "object",
                Ty::Arr => "array",
            };
            return Err(schema_error(k, &format!("Field must be set to {want} or not be present")));
        }
    }
    Ok(())
}

fn require(v: &Value, keys: &[&str]) -> Result<(), ApiError> {
    if !v.is_object() {
        return Err(schema_error("", "Field must be set to object or not be present"));
    }
    for k in keys {
        if v.get(*k).is_none() {
            return Err(schema_error(k, &format!("property \"{k}\" is missing")));
        }
    }
    Ok(())
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn validate_host(v: &Value, create: bool) -> Result<(), ApiError> {
    if create {
        require(v, &["accessMode", "osType", "ip", "hostName"])?;
    } else if !v.is_object() {
        return Err(schema_error("", "Field must be set to object or not be present"));
    }
    check_types(
        v,
        &[
            ("osType", Ty::Str),
            ("hostName", Ty::Str),
            ("ip", Ty::Str),
            ("port", Ty::Int),
            ("accessMode", Ty::Str),
            ("username", Ty::Str),
            ("password", Ty::Str),
            ("availabilityZones", Ty::Arr),
            ("initiators", Ty::Arr),
        ],
    )?;
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    if let Some(os) = s("osType").filter(|_| create) {
        if !["linux", "windows", "esxi"].contains(&os) {
            return Err(schema_error("osType", "value is not one of the allowed values"));
        }
    }
    if let Some(m) = s("accessMode") {
        if !["agent", "agentless"].contains(&m) {
            return Err(schema_error("accessMode", "value is not one of the allowed values"));
        }
    }
    if let Some(h) = s("hostName") {
        if !is_host_name(h) {
            return Err(schema_error("hostName", "string doesn't match the regular expression"));
        }
    }
    if let Some(ip) = s("ip") {
        if ip.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(schema_error("ip", "string doesn't match the regular expression"));
        }
    }
    if let Some(p) = v.get("port").and_then(Value::as_i64) {
        if !(1..=65535).contains(&p) {
            return Err(schema_error("port", "number must be between 1 and 65535"));
        }
    }
    for (k, max) in [("username", 255), ("password", 1024)] {
        if let Some(x) = s(k) {
            if x.is_empty() || x.len() > max {
                return Err(schema_error(k, &format!("length must be between 1 and {max}")));
            }
        }
    }
    if let Some(inits) = v.get("initiators").and_then(Value::as_array) {
        for i in inits {
            if let Some(p) = i.get("protocol").and_then(Value::as_str) {
                if !["iscsi", "fibre_channel", "nvmeof"].contains(&p) {
                    return Err(schema_error("initiators/protocol", "value is not one of the allowed values"));
                }
            }
        }
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(v: Value, keep: &str, what: &str) -> Result<T, ApiError> {
    serde_json::from_value(strip_nulls(v, keep))
        .map_err(|e| error(400, format!("parse {what} request body failed: json: {e}")))
}

// ---------------------------------------------------------------------------
// Router

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(versions))
        .route("/v1beta", get(version))
        .route("/identity/v3/auth/tokens", post(keystone_login))
        .route("/v1beta/{tenant}/profiles", get(list_profiles).post(create_profile))
        .route("/v1beta/{tenant}/profiles/{id}", get(get_profile).put(update_profile).delete(delete_profile))
        .route("/v1beta/{tenant}/profiles/{id}/customProperties", get(list_custom).post(add_custom))
        .route("/v1beta/{tenant}/profiles/{id}/customProperties/{key}", delete(remove_custom))
        .route("/v1beta/{tenant}/block/volumes", get(list_volumes).post(create_volume))
        .route("/v1beta/{tenant}/block/volumes/{id}", get(get_volume).put(update_volume).delete(delete_volume))
        .route("/v1beta/{tenant}/host/hosts", get(list_hosts).post(create_host))
        .route("/v1beta/{tenant}/host/hosts/{id}", get(get_host).put(update_host).delete(delete_host))
        .fallback(|| async { error(404, "the requested resource is not found").into_response() })
        .method_not_allowed_fallback(|| async { error(405, "method not allowed").into_response() })
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k.eq_ignore_ascii_case("password") && x.is_string() {
                    *x = Value::String("***".into());
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Delay, the 503 switch, and the request log.
async fn gate(State(st): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20).await.unwrap_or_default();
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        status: 0,
        auth_token: parts.headers.get("x-auth-token").and_then(|v| v.to_str().ok()).map(str::to_string),
        body: serde_json::from_slice::<Value>(&bytes).ok().map(|mut v| {
            redact(&mut v);
            v
        }),
    };
    let resp = if st.down.load(Ordering::SeqCst) {
        error(503, "service unavailable").into_response()
    } else {
        next.run(Request::from_parts(parts, Body::from(bytes))).await
    };
    recorded.status = resp.status().as_u16();
    st.requests.lock().unwrap().push(recorded);
    resp
}

async fn versions() -> Response {
    success(
        StatusCode::OK,
        Some(
            json!([{"name": "v1beta", "description": "v1beta version", "status": "CURRENT", "updatedAt": "2017-07-10T14:36:58.014Z"}]),
        ),
    )
}

async fn version() -> Response {
    success(
        StatusCode::OK,
        Some(
            json!({"name": "v1beta", "description": "v1beta version", "status": "CURRENT", "updatedAt": "2017-07-10T14:36:58.014Z"}),
        ),
    )
}

type Res = Result<Response, ApiError>;

// --- Keystone

async fn keystone_login(State(st): State<Arc<Shared>>, body: Bytes) -> Response {
    let StandinAuth::Keystone(user) = &st.auth else {
        return keystone_error(404, "Not Found", "keystone is not enabled on this stand-in (noauth)");
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return keystone_error(400, "Bad Request", "Expecting to find auth in request body.");
    };
    let id = v.pointer("/auth/identity");
    let methods_ok =
        id.and_then(|i| i.get("methods")).and_then(Value::as_array).is_some_and(|m| m.iter().any(|x| x == "password"));
    let Some(pw_user) = id.and_then(|i| i.pointer("/password/user")).filter(|_| methods_ok) else {
        return keystone_error(400, "Bad Request", "Expecting to find identity.password.user in request body.");
    };
    let s = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
    let domain_ok = |d: Option<&Value>| {
        d.is_some_and(|d| {
            s(d, "/id").as_deref() == Some(user.user_domain_id.as_str())
                || s(d, "/name").is_some_and(|n| n.eq_ignore_ascii_case(&user.user_domain_id))
        })
    };
    let user_ok = (s(pw_user, "/name").as_deref() == Some(user.username.as_str()) && domain_ok(pw_user.get("domain")))
        || s(pw_user, "/id").as_deref() == Some(format!("{}-id", user.username).as_str());
    let password_ok = s(pw_user, "/password").as_deref() == Some(user.password.as_str());
    if !user_ok || !password_ok {
        return keystone_error(401, "Unauthorized", "The request you have made requires authentication.");
    }
    let project = v.pointer("/auth/scope/project");
    let scoped = match project {
        None => false,
        Some(p) => {
            let by_name = s(p, "/name").as_deref() == Some(user.project_name.as_str()) && domain_ok(p.get("domain"));
            let by_id = s(p, "/id").as_deref() == Some(user.project_id.as_str());
            if !by_name && !by_id {
                return keystone_error(401, "Unauthorized", "The request you have made requires authentication.");
            }
            true
        }
    };
    let token = format!("gAAAAA{}", new_hex());
    let issued = chrono::Utc::now();
    let expires = issued + chrono::Duration::from_std(user.token_ttl).unwrap_or(chrono::Duration::hours(1));
    st.db.lock().unwrap().tokens.insert(token.clone(), Token { expires_at: expires, expired: false });
    st.logins.fetch_add(1, Ordering::SeqCst);
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let domain = json!({"id": user.user_domain_id, "name": "Default"});
    let mut tok = json!({
        "methods": ["password"],
        "user": {"domain": domain, "id": format!("{}-id", user.username), "name": user.username, "password_expires_at": null},
        "audit_ids": [new_hex()[..22].to_string()],
        "expires_at": fmt(expires),
        "issued_at": fmt(issued),
    });
    if scoped {
        tok["project"] = json!({"domain": domain, "id": user.project_id, "name": user.project_name});
        tok["is_domain"] = json!(false);
        tok["roles"] = user.roles.iter().map(|r| json!({"id": format!("{r}-role-id"), "name": r})).collect();
        tok["catalog"] = json!([]);
    }
    let mut r = (StatusCode::CREATED, serde_json::to_vec(&json!({"token": tok})).unwrap()).into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    r.headers_mut().insert("x-subject-token", HeaderValue::from_str(&token).expect("token header"));
    r
}

// --- Profiles

async fn list_profiles(
    State(st): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Res {
    st.authorize(&headers, &tenant, Rule::Open)?;
    let db = st.db.lock().unwrap();
    let all = db.profiles.values().map(|p| serde_json::to_value(p).unwrap()).collect();
    let out = filter_sort_slice(all, &parse_query(q.as_deref()), PROFILE_FIELDS, PROFILE_SORTABLE);
    Ok(success(StatusCode::OK, Some(Value::Array(out))))
}

async fn create_profile(
    State(st): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    let caller = st.authenticate(&headers)?;
    let v = parse_body(&body)?;
    require(&v, &["name", "storageType"])?;
    check_types(
        &v,
        &[("name", Ty::Str), ("storageType", Ty::Str), ("description", Ty::Str), ("customProperties", Ty::Obj)],
    )?;
    let name = v["name"].as_str().unwrap_or_default();
    if name.is_empty() || name.len() > 255 || !name.bytes().any(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(schema_error("name", "string doesn't match the regular expression \"[A-Za-z0-9_-]\""));
    }
    if !["block", "file", "object"].contains(&v["storageType"].as_str().unwrap_or_default()) {
        return Err(schema_error("storageType", "value is not one of the allowed values"));
    }
    st.policy(caller, &tenant, Rule::AdminApi)?;
    let mut p: Profile = decode(v, "customProperties", "profile")?;
    match p.storage_type.to_lowercase().as_str() {
        "block" => {}
        "file" => {
            if p.provisioning_properties.data_storage.storage_access_capability.is_empty() {
                p.provisioning_properties.data_storage.storage_access_capability =
                    vec!["Read".into(), "Write".into(), "Execute".into()];
            }
            if p.provisioning_properties.io_connectivity.access_protocol.is_empty() {
                p.provisioning_properties.io_connectivity.access_protocol = "nfs".into();
            }
        }
        other => return Err(error(400, format!("parse profile request body failed: {other} is invalid storagetype"))),
    }
    let mut db = st.db.lock().unwrap();
    if db.profiles.values().any(|x| x.name == p.name) {
        return Err(error(400, format!("create profile failed: the profile name '{}' already exists", p.name)));
    }
    if p.id.is_empty() {
        p.id = new_uuid();
    }
    if p.created_at.is_empty() {
        p.created_at = now();
    }
    db.profiles.insert(p.id.clone(), p.clone());
    Ok(success(StatusCode::OK, Some(serde_json::to_value(&p).unwrap())))
}

async fn get_profile(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    st.authorize(&headers, &tenant, Rule::Open)?;
    let db = st.db.lock().unwrap();
    match db.profiles.get(&id) {
        Some(p) => Ok(success(StatusCode::OK, Some(serde_json::to_value(p).unwrap()))),
        None => Err(error(404, format!("profile {id} not found: specified profile({id}) can't find"))),
    }
}

async fn update_profile(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    let caller = st.authenticate(&headers)?;
    let v = parse_body(&body)?;
    check_types(&v, &[("name", Ty::Str), ("description", Ty::Str), ("customProperties", Ty::Obj)])?;
    st.policy(caller, &tenant, Rule::AdminApi)?;
    let input: Profile = decode(v, "customProperties", "profile")?;
    let mut db = st.db.lock().unwrap();
    let Some(p) = db.profiles.get_mut(&id) else {
        return Err(error(500, format!("update profiles failed: specified profile({id}) can't find")));
    };
    if !input.name.is_empty() {
        p.name = input.name;
    }
    if !input.description.is_empty() {
        p.description = input.description;
    }
    if let Some(props) = input.custom_properties.filter(|m| !m.is_empty()) {
        let cp = p.custom_properties.get_or_insert_with(Map::new);
        for (k, v) in props {
            cp.insert(k, v);
        }
    }
    p.updated_at = now();
    Ok(success(StatusCode::OK, Some(serde_json::to_value(&*p).unwrap())))
}

async fn delete_profile(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    st.authorize(&headers, &tenant, Rule::AdminApi)?;
    let mut db = st.db.lock().unwrap();
    let Some(p) = db.profiles.get(&id) else {
        return Err(error(404, format!("profile {id} not found: specified profile({id}) can't find")));
    };
    if p.storage_type == "block" {
        // ListVolumesByProfileId runs in the caller's context: an admin sees every tenant.
        let names: Vec<&str> = db.volumes.values().filter(|v| v.profile_id == id).map(|v| v.name.as_str()).collect();
        if !names.is_empty() {
            return Err(error(
                400,
                format!("There are dependent volumes : [{}] for the specified profile {id}", names.join(" ")),
            ));
        }
    }
    db.profiles.remove(&id);
    Ok(success(StatusCode::OK, None))
}

async fn list_custom(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    st.authorize(&headers, &tenant, Rule::Open)?;
    let db = st.db.lock().unwrap();
    match db.profiles.get(&id) {
        Some(p) => {
            Ok(success(StatusCode::OK, Some(p.custom_properties.clone().map(Value::Object).unwrap_or(Value::Null))))
        }
        None => Err(error(500, format!("list custom properties failed: specified profile({id}) can't find"))),
    }
}

async fn add_custom(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    let caller = st.authenticate(&headers)?;
    let v = parse_body(&body)?;
    if !v.is_object() {
        return Err(schema_error("", "Field must be set to object or not be present"));
    }
    st.policy(caller, &tenant, Rule::AdminApi)?;
    let db = st.db.lock().unwrap();
    match db.profiles.get(&id) {
        // Upstream re-creates the profile and its own name is taken.
        Some(p) => Err(error(500, format!("add custom property failed: the profile name '{}' already exists", p.name))),
        None => Err(error(500, format!("add custom property failed: specified profile({id}) can't find"))),
    }
}

async fn remove_custom(
    State(st): State<Arc<Shared>>,
    Path((tenant, id, _key)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Res {
    st.authorize(&headers, &tenant, Rule::AdminApi)?;
    let db = st.db.lock().unwrap();
    match db.profiles.get(&id) {
        Some(p) => {
            Err(error(500, format!("remove custom property failed: the profile name '{}' already exists", p.name)))
        }
        None => Err(error(500, format!("remove custom property failed: specified profile({id}) can't find"))),
    }
}

// --- Volumes

fn visible<'a, T>(map: &'a BTreeMap<(String, String), T>, ctx: &Ctx) -> impl Iterator<Item = &'a T> {
    let tenant = ctx.tenant.clone();
    let admin = ctx.is_admin;
    map.iter().filter(move |((t, _), _)| admin || *t == tenant).map(|(_, v)| v)
}

fn find_key<T>(map: &BTreeMap<(String, String), T>, ctx: &Ctx, id: &str) -> Option<(String, String)> {
    let own = (ctx.tenant.clone(), id.to_string());
    if map.contains_key(&own) {
        return Some(own);
    }
    if ctx.is_admin {
        return map.keys().find(|(_, i)| i == id).cloned();
    }
    None
}

async fn list_volumes(
    State(st): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Res {
    let ctx = st.authorize(&headers, &tenant, Rule::AdminOrOwner)?;
    let db = st.db.lock().unwrap();
    let all = visible(&db.volumes, &ctx).map(|v| serde_json::to_value(v).unwrap()).collect();
    let out = filter_sort_slice(all, &parse_query(q.as_deref()), VOLUME_FIELDS, VOLUME_SORTABLE);
    Ok(success(StatusCode::OK, Some(Value::Array(out))))
}

fn valid_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty volume name is not allowed. Please give valid name".into());
    }
    if name.len() > 255 {
        return Err(format!(
            "volume name length should not more than 255 characters. current length is : {}",
            name.len()
        ));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ' || b == b'_' || b == b'-') {
        return Err(format!("invalid volume name, it should only contain english char and number  : {name}"));
    }
    Ok(())
}

async fn create_volume(
    State(st): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    let caller = st.authenticate(&headers)?;
    let v = parse_body(&body)?;
    require(&v, &["name", "size"])?;
    check_types(
        &v,
        &[
            ("name", Ty::Str),
            ("multiAttach", Ty::Bool),
            ("description", Ty::Str),
            ("size", Ty::Int),
            ("availabilityZone", Ty::Str),
            ("profileId", Ty::Str),
            ("poolId", Ty::Str),
            ("snapshotId", Ty::Str),
            ("groupId", Ty::Str),
            ("snapshotFromCloud", Ty::Bool),
            ("replicationId", Ty::Str),
        ],
    )?;
    let ctx = st.policy(caller, &tenant, Rule::AdminOrOwner)?;
    let mut vol: Volume = decode(v, "", "volume")?;
    let mut db = st.db.lock().unwrap();
    if vol.profile_id.is_empty() {
        match db.profiles.values().find(|p| p.name == "default_block" && p.storage_type == "block") {
            Some(p) => vol.profile_id = p.id.clone(),
            None => {
                return Err(error(
                    400,
                    "get default profile failed: can't find profile(name: default_block, storageType:block)",
                ))
            }
        }
    } else if !db.profiles.contains_key(&vol.profile_id) {
        return Err(error(400, format!("get profile failed: specified profile({}) can't find", vol.profile_id)));
    }
    if vol.id.is_empty() {
        vol.id = new_uuid();
    }
    if vol.size <= 0 {
        return Err(error(400, format!("create volume failed: invalid volume size: {}", vol.size)));
    }
    valid_volume_name(&vol.name).map_err(|m| error(400, format!("create volume failed: {m}")))?;
    if !vol.snapshot_id.is_empty() {
        return Err(error(400, format!("create volume failed: specified snapshot({}) can't find", vol.snapshot_id)));
    }
    if vol.availability_zone.is_empty() {
        vol.availability_zone = "default".into();
    }
    if vol.created_at.is_empty() {
        vol.created_at = now();
    }
    vol.user_id = ctx.user.clone();
    vol.status = "creating".into();
    vol.tenant_id = ctx.tenant.clone();
    let key = (vol.tenant_id.clone(), vol.id.clone());
    if db.volumes.contains_key(&key) {
        return Err(error(400, format!("create volume failed: the volume {} already exists", vol.id)));
    }
    db.volumes.insert(key, vol.clone());
    let due = Instant::now() + Duration::from_millis(st.dock_delay_ms.load(Ordering::SeqCst));
    db.jobs.push((due, DockJob::Created { tenant: vol.tenant_id.clone(), id: vol.id.clone() }));
    Ok(success(StatusCode::ACCEPTED, Some(serde_json::to_value(&vol).unwrap())))
}

async fn get_volume(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    let ctx = st.authorize(&headers, &tenant, Rule::AdminOrOwner)?;
    let db = st.db.lock().unwrap();
    match find_key(&db.volumes, &ctx, &id).and_then(|k| db.volumes.get(&k)) {
        Some(v) => Ok(success(StatusCode::OK, Some(serde_json::to_value(v).unwrap()))),
        None => Err(error(404, format!("volume {id} not found: specified volume({id}) can't find"))),
    }
}

async fn update_volume(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    let caller = st.authenticate(&headers)?;
    let v = parse_body(&body)?;
    check_types(&v, &[("name", Ty::Str), ("description", Ty::Str)])?;
    let ctx = st.policy(caller, &tenant, Rule::AdminOrOwner)?;
    let input: VolumeInput = decode(v, "", "volume")?;
    let mut db = st.db.lock().unwrap();
    let Some(key) = find_key(&db.volumes, &ctx, &id) else {
        return Err(error(500, format!("update volume failed: specified volume({id}) can't find")));
    };
    let r = db.volumes.get_mut(&key).expect("present");
    if !input.name.is_empty() {
        r.name = input.name;
    }
    if !input.availability_zone.is_empty() {
        r.availability_zone = input.availability_zone;
    }
    if !input.description.is_empty() {
        r.description = input.description;
    }
    if let Some(m) = input.metadata {
        for (k, v) in m {
            r.metadata.insert(k, v);
        }
    }
    if input.identifier.is_some() {
        r.identifier = input.identifier;
    }
    if !input.pool_id.is_empty() {
        r.pool_id = input.pool_id;
    }
    if !input.profile_id.is_empty() {
        r.profile_id = input.profile_id;
    }
    if input.size != 0 {
        r.size = input.size;
    }
    if !input.status.is_empty() {
        r.status = input.status;
    }
    if let Some(d) = input.replication_driver_data {
        r.replication_driver_data = d;
    }
    if input.multi_attach {
        r.multi_attach = true;
    }
    if !input.group_id.is_empty() {
        r.group_id = input.group_id;
    }
    r.updated_at = now();
    Ok(success(StatusCode::OK, Some(serde_json::to_value(&*r).unwrap())))
}

async fn delete_volume(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    let ctx = st.authorize(&headers, &tenant, Rule::AdminOrOwner)?;
    let mut db = st.db.lock().unwrap();
    let Some(key) = find_key(&db.volumes, &ctx, &id) else {
        return Err(error(404, format!("volume {id} not found: specified volume({id}) can't find")));
    };
    let vol = db.volumes.get(&key).expect("present").clone();
    if vol.profile_id.is_empty() || vol.pool_id.is_empty() {
        db.volumes.remove(&key);
        return Ok(success(StatusCode::ACCEPTED, None));
    }
    if !db.profiles.contains_key(&vol.profile_id) {
        return Err(error(400, format!("delete volume failed: specified profile({}) can't find", vol.profile_id)));
    }
    if !["available", "error", "errorDeleting", "errorExtending"].contains(&vol.status.as_str()) {
        return Err(error(
            400,
            format!(
                "delete volume failed: only the volume with the status available, error, error_deleting, error_extending can be deleted, the volume status is {}",
                vol.status
            ),
        ));
    }
    let r = db.volumes.get_mut(&key).expect("present");
    r.status = "deleting".into();
    r.updated_at = now();
    let due = Instant::now() + Duration::from_millis(st.dock_delay_ms.load(Ordering::SeqCst));
    db.jobs.push((due, DockJob::Deleted { tenant: key.0, id: key.1 }));
    Ok(success(StatusCode::ACCEPTED, None))
}

// --- Hosts

async fn list_hosts(
    State(st): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Res {
    let ctx = st.authorize(&headers, &tenant, Rule::AdminOrOwner)?;
    let db = st.db.lock().unwrap();
    let all = visible(&db.hosts, &ctx).map(|h| serde_json::to_value(h).unwrap()).collect();
    let out = filter_sort_slice(all, &parse_query(q.as_deref()), HOST_FIELDS, &["hostName", "createdAt"]);
    Ok(success(StatusCode::OK, Some(Value::Array(out))))
}

async fn create_host(
    State(st): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    let caller = st.authenticate(&headers)?;
    let v = parse_body(&body)?;
    validate_host(&v, true)?;
    let ctx = st.policy(caller, &tenant, Rule::AdminOrOwner)?;
    let mut h: Host = decode(v, "", "host")?;
    let mut db = st.db.lock().unwrap();
    if visible(&db.hosts, &ctx).any(|x| x.host_name == h.host_name) {
        return Err(error(400, format!("the host with name {} already exists in the system", h.host_name)));
    }
    h.tenant_id = ctx.tenant.clone();
    if h.id.is_empty() {
        h.id = new_uuid();
    }
    h.created_at = now();
    db.hosts.insert((h.tenant_id.clone(), h.id.clone()), h.clone());
    Ok(success(StatusCode::OK, Some(serde_json::to_value(&h).unwrap())))
}

async fn get_host(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    let ctx = st.authorize(&headers, &tenant, Rule::AdminOrOwner)?;
    let db = st.db.lock().unwrap();
    match find_key(&db.hosts, &ctx, &id).and_then(|k| db.hosts.get(&k)) {
        Some(h) => Ok(success(StatusCode::OK, Some(serde_json::to_value(h).unwrap()))),
        None => Err(error(404, format!("host {id} not found: specified host({id}) can't find"))),
    }
}

async fn update_host(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    let caller = st.authenticate(&headers)?;
    let v = parse_body(&body)?;
    validate_host(&v, false)?;
    let ctx = st.policy(caller, &tenant, Rule::AdminOrOwner)?;
    let input: Host = decode(v, "", "host")?;
    let mut db = st.db.lock().unwrap();
    let Some(key) = find_key(&db.hosts, &ctx, &id) else {
        return Err(error(400, format!("update host failed: specified host({id}) can't find")));
    };
    let r = db.hosts.get_mut(&key).expect("present");
    let set = |f: &mut String, n: String| {
        if !n.is_empty() {
            *f = n;
        }
    };
    set(&mut r.host_name, input.host_name);
    set(&mut r.os_type, input.os_type);
    set(&mut r.ip, input.ip);
    set(&mut r.access_mode, input.access_mode);
    set(&mut r.username, input.username);
    set(&mut r.password, input.password);
    if input.port > 0 {
        r.port = input.port;
    }
    if let Some(z) = input.availability_zones.filter(|z| !z.is_empty()) {
        r.availability_zones = Some(z);
    }
    if let Some(i) = input.initiators.filter(|i| !i.is_empty()) {
        r.initiators = Some(i);
    }
    r.updated_at = now();
    Ok(success(StatusCode::OK, Some(serde_json::to_value(&*r).unwrap())))
}

async fn delete_host(
    State(st): State<Arc<Shared>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    let ctx = st.authorize(&headers, &tenant, Rule::AdminOrOwner)?;
    let mut db = st.db.lock().unwrap();
    let Some(key) = find_key(&db.hosts, &ctx, &id) else {
        return Err(error(404, format!("host {id} not found: specified host({id}) can't find")));
    };
    db.hosts.remove(&key);
    Ok(success(StatusCode::OK, None))
}
