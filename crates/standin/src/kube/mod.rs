//! A Kubernetes API server stand-in: plain HTTP/1.1 on 127.0.0.1, an
//! in-memory object store, and the wire protocol that kube-rs 5 (watcher,
//! reflector, patches, events Recorder, Leases) and the real `kubectl`
//! speak. Tests script it through [`KubeStandin`].
//!
//! Reproduced from the real kube-apiserver:
//! - Paths `/api/v1/...` and `/apis/<group>/v1/...`, namespaced and
//!   cluster-scoped, for pods, persistentvolumeclaims, persistentvolumes,
//!   nodes, secrets, namespaces, events, configmaps; storage.k8s.io
//!   storageclasses, csidrivers, csinodes; events.k8s.io events;
//!   coordination.k8s.io leases. `/status` subresources where the real
//!   server has them: a write to the main resource keeps the old `status`,
//!   a write to `/status` keeps the old `spec`.
//! - One global resourceVersion; `uid` and `creationTimestamp` set on
//!   create and never changed; `apiVersion`/`kind` always filled in.
//! - list: `labelSelector` (`=`, `==`, `!=`, exists, `!k`, `in`, `notin`),
//!   `fieldSelector` (`metadata.name`, `metadata.namespace` and the fields
//!   the real server supports per resource, e.g. pods' `spec.nodeName` and
//!   `status.phase`; others get 400 "field label not supported"),
//!   `limit`/`continue` (every page reports the first page's
//!   resourceVersion; a token older than the watch history gets 410).
//! - create (201, 409 AlreadyExists, `generateName`), replace (409 Conflict
//!   on a stale `metadata.resourceVersion`), patch (merge, strategic,
//!   JSON patch, apply; a stale resourceVersion in the result is a 409;
//!   apply creates a missing object), delete (returns the object; with
//!   finalizers it only sets `deletionTimestamp` and answers 202, and the
//!   update that removes the last finalizer deletes it), `dryRun`.
//!   Errors are `Status` bodies with the matching code (400, 401, 404,
//!   405, 409, 410, 415, 422).
//! - watch: chunked JSON lines, replay after `resourceVersion` from a
//!   bounded history (4096 events by default), synthetic ADDED events when
//!   `resourceVersion` is unset or "0", `sendInitialEvents=true` with the
//!   `k8s.io/initial-events-end` bookmark, BOOKMARK events (every 5 s by
//!   default) with `allowWatchBookmarks`, `timeoutSeconds` (default 1800),
//!   selectors with the watch cache's rule (an object that stops matching
//!   arrives as DELETED, one that starts matching as ADDED), and a too old
//!   resourceVersion as an in-stream ERROR 410 "Expired" before the close.
//! - Discovery in the legacy (unaggregated) format: `/version`, `/api`,
//!   `/api/v1`, `/apis`, `/apis/<group>`, `/apis/<group>/v1`, with short
//!   names. kubectl asks for aggregated discovery and falls back to this.
//! - `kubectl get` asks for a `Table`: it gets the default table the real
//!   server gives a resource without its own printer (Name, Created At).
//! - OpenAPI: `/openapi/v2` answers an empty protobuf document (a server
//!   that publishes no models) and `/openapi/v3` 404. Both kubectl 1.20
//!   (Debian 12's `kubernetes-client`, what CI installs) and 1.32 then skip
//!   client-side schema validation and compute `apply`'s strategic merge
//!   patches from their compiled-in types, so `kubectl apply` works
//!   without `--validate=false`. (A 404 on v2 makes `kubectl apply` fail
//!   with "failed to download openapi".)
//!
//! Not reproduced: authorization (one optional bearer token, no RBAC),
//! admission (namespaces need not exist; creating an object keeps the
//! status it is given), schema validation and defaulting (unknown fields
//! are kept), managedFields and apply conflicts (server-side apply is a
//! strategic merge of the body, which must be JSON, not YAML), protobuf,
//! HTTP/2, TLS, consistent snapshots for paginated lists or lists at an
//! old resourceVersion (always the latest state), graceful pod deletion
//! (no kubelet: pods go at once), namespace deletion removing contents,
//! `deletecollection`, the legacy `/watch/` paths, Table output for
//! watches, the conversion between core/v1 and events.k8s.io/v1 Events
//! (two separate stores), and strategic merge keys by path (the keys are
//! looked up by field name: `containers`, `volumes`, `env` by `name`,
//! `volumeMounts` by `mountPath`, ...; other lists are replaced).

mod exec;
mod http;
mod patch;
mod store;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub use exec::ExecRecord;
pub use store::ApiError;
use store::{Store, RESOURCES};

/// One request as the stand-in saw it (never its headers: no tokens).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string, without the `?`.
    pub query: String,
    pub content_type: Option<String>,
    /// The status sent (200 for a watch, whatever it carried).
    pub status: u16,
}

impl RecordedRequest {
    /// The value of one query parameter, percent-decoded.
    pub fn param(&self, key: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
    }
}

/// Settings fixed at start.
#[derive(Debug, Clone)]
pub struct KubeStandinOptions {
    /// 0 = any free port.
    pub port: u16,
    /// Require `Authorization: Bearer <token>` (401 otherwise).
    pub require_token: Option<String>,
    /// Watch events kept for resuming watches; older resourceVersions get 410.
    pub history: usize,
    pub bookmark_interval: Duration,
}

impl Default for KubeStandinOptions {
    fn default() -> Self {
        KubeStandinOptions { port: 0, require_token: None, history: 4096, bookmark_interval: Duration::from_secs(5) }
    }
}

#[derive(Clone, Copy, Default)]
pub(crate) struct Signals {
    epoch: u64,
    expire: u64,
    close: u64,
}

pub(crate) struct Shared {
    store: Mutex<Store>,
    rv_tx: tokio::sync::watch::Sender<u64>,
    signals: tokio::sync::watch::Sender<Signals>,
    requests: Mutex<Vec<RecordedRequest>>,
    faults: Mutex<(u32, u16)>,
    token: Mutex<Option<String>>,
    bookmark_every: Mutex<Duration>,
    addr: Mutex<Option<SocketAddr>>,
    /// `pods/exec`: run the command on this host; every exec received.
    exec_local: Mutex<bool>,
    execs: Mutex<Vec<ExecRecord>>,
}

impl Shared {
    fn write<T>(&self, f: impl FnOnce(&mut Store) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let mut s = self.store.lock().unwrap();
        let out = f(&mut s);
        self.rv_tx.send_if_modified(|rv| std::mem::replace(rv, s.rv) != s.rv);
        out
    }

    fn take_fault(&self) -> Option<u16> {
        let mut f = self.faults.lock().unwrap();
        (f.0 > 0).then(|| {
            f.0 -= 1;
            f.1
        })
    }

    fn addr(&self) -> String {
        self.addr.lock().unwrap().map(|a| a.to_string()).unwrap_or_default()
    }

    fn signal(&self, expire: bool) {
        self.signals.send_modify(|s| {
            s.epoch += 1;
            if expire {
                s.expire = s.epoch;
            } else {
                s.close = s.epoch;
            }
        });
    }
}

/// A running stand-in. Dropping it stops the server.
pub struct KubeStandin {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for KubeStandin {
    fn drop(&mut self) {
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
    }
}

/// A namespaced resource's namespace: the given one, or "" when cluster-scoped.
fn ns_for(res: usize, ns: Option<&str>) -> &str {
    if RESOURCES[res].namespaced {
        ns.unwrap_or("default")
    } else {
        ""
    }
}

fn lookup(api_version: &str, kind: &str) -> Result<usize, ApiError> {
    store::find_by_name(api_version, kind)
        .ok_or_else(|| ApiError::new(404, "NotFound", format!("no resource {kind:?} in {api_version:?}")))
}

impl KubeStandin {
    /// Bind 127.0.0.1:0 and serve, with the namespaces a new cluster has.
    pub async fn start() -> KubeStandin {
        Self::start_with(KubeStandinOptions::default()).await
    }

    pub async fn start_with(opts: KubeStandinOptions) -> KubeStandin {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(opts.history)),
            rv_tx: tokio::sync::watch::Sender::new(0),
            signals: tokio::sync::watch::Sender::new(Signals::default()),
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new((0, 0)),
            token: Mutex::new(opts.require_token),
            bookmark_every: Mutex::new(opts.bookmark_interval),
            addr: Mutex::new(None),
            exec_local: Mutex::new(false),
            execs: Mutex::new(Vec::new()),
        });
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let v = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
            shared.write(|s| s.put(store::find("", "v1", "namespaces").expect("namespaces"), v)).expect("namespace");
        }
        let listener = TcpListener::bind(("127.0.0.1", opts.port)).await.expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        *shared.addr.lock().unwrap() = Some(addr);
        let server = tokio::spawn(serve(shared.clone(), listener));
        KubeStandin { shared, addr, server: Mutex::new(Some(server)) }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A kubeconfig (context `standin`, namespace `default`) for this
    /// server with a bearer-token user: the required token, or a dummy one.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        let token = self.shared.token.lock().unwrap().clone().unwrap_or_else(|| "standin-token".into());
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\n\
             contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\n\
             current-context: standin\nusers:\n- name: standin\n  user:\n    token: {token}\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    /// `pods/exec` runs the command on the test host (argv as given, no
    /// shell) when on; when off (the default) every exec fails with exit
    /// code 126. Only for tests that mean it.
    pub fn exec_runs_locally(&self, on: bool) {
        *self.shared.exec_local.lock().unwrap() = on;
    }

    /// Every `pods/exec` received, in order.
    pub fn execs(&self) -> Vec<ExecRecord> {
        self.shared.execs.lock().unwrap().clone()
    }

    /// Require this bearer token from now on (None: accept anything).
    pub fn require_token(&self, token: Option<&str>) {
        *self.shared.token.lock().unwrap() = token.map(str::to_string);
    }

    /// Create or replace an object as given (status included, no
    /// resourceVersion check); watchers see ADDED or MODIFIED. Returns the
    /// stored object. A namespaced object without a namespace goes to `default`.
    pub fn apply(&self, obj: Value) -> Result<Value, ApiError> {
        let av = obj["apiVersion"].as_str().unwrap_or_default();
        let res = lookup(av, obj["kind"].as_str().unwrap_or_default())?;
        self.shared.write(|s| s.put(res, obj)).map(|o| o.value())
    }

    /// [`KubeStandin::apply`] for many objects under one lock (10,000 at start).
    pub fn apply_all(&self, objs: impl IntoIterator<Item = Value>) -> Result<usize, ApiError> {
        self.shared.write(|s| {
            let mut n = 0;
            for obj in objs {
                let res =
                    lookup(obj["apiVersion"].as_str().unwrap_or_default(), obj["kind"].as_str().unwrap_or_default())?;
                s.put(res, obj)?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// One object; `kind` may be the kind, plural, singular or short name.
    pub fn get(&self, api_version: &str, kind: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        let res = store::find_by_name(api_version, kind)?;
        self.shared.store.lock().unwrap().get(res, ns_for(res, ns), name).map(|o| o.value())
    }

    /// Every object of a kind (in one namespace, or all with `None`), in key order.
    pub fn list(&self, api_version: &str, kind: &str, ns: Option<&str>) -> Vec<Value> {
        let Some(res) = store::find_by_name(api_version, kind) else { return Vec::new() };
        let sel = store::Selector::parse(&RESOURCES[res], "", "").expect("empty selector");
        let ns = ns.filter(|_| RESOURCES[res].namespaced);
        let (items, _) = self.shared.store.lock().unwrap().list(res, ns, &sel, usize::MAX, None);
        items.iter().map(|o| o.value()).collect()
    }

    /// Remove an object now, finalizers or not (watchers see DELETED).
    pub fn delete(&self, api_version: &str, kind: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        let res = store::find_by_name(api_version, kind)?;
        self.shared.write(|s| Ok(s.force_remove(res, ns_for(res, ns), name))).ok().flatten().map(|o| o.value())
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv
    }

    /// How many objects are stored.
    pub fn object_count(&self) -> usize {
        self.shared.store.lock().unwrap().len()
    }

    /// Compact the watch history and end every open watch with an in-stream
    /// 410 Expired (as after an etcd compaction): clients must relist.
    pub fn expire_watches(&self) {
        self.shared.store.lock().unwrap().compact();
        self.shared.signal(true);
    }

    /// End every open watch cleanly (as the server's watch timeout does).
    pub fn close_watches(&self) {
        self.shared.signal(false);
    }

    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_every.lock().unwrap() = every;
    }

    /// Answer the next `n` requests with `status` (a `Status` body).
    pub fn fail_next(&self, n: u32, status: u16) {
        *self.shared.faults.lock().unwrap() = (n, status);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.requests.lock().unwrap().clear();
    }

    /// Stop serving: the port closes (connection refused) and every open
    /// connection, watches included, is cut. The data is kept.
    pub async fn stop(&self) {
        let task = self.server.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Serve again on the same port after [`KubeStandin::stop`].
    pub async fn resume(&self) {
        if self.server.lock().unwrap().is_some() {
            return;
        }
        // The old listener is gone, but give the kernel a moment if it lingers.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries >= 50 => panic!("re-bind {}: {e}", self.addr),
                Err(_) => tries += 1,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        *self.server.lock().unwrap() = Some(tokio::spawn(serve(self.shared.clone(), listener)));
    }

    /// An API server restart: stop, then serve again on the same port
    /// with the same data and resourceVersions.
    pub async fn restart(&self) {
        self.stop().await;
        self.resume().await;
    }
}

/// The accept loop. Aborting it drops the JoinSet, which aborts every
/// connection: that is how `stop` cuts open watches.
async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let svc = hyper::service::service_fn(move |req| http::handle(shared.clone(), req));
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades().await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
