//! The Kubernetes adapter: makes the agent a citizen of the cluster with no
//! CRD and no operator. It watches the Pods on this node, the claims, the
//! PersistentVolumes and the StorageClasses (compact copies, see
//! `discovery`), turns annotated claims into policies of origin
//! `kubernetes`, reads repository keys from Secrets when a run starts
//! (`secrets`), writes each result back onto the claim as annotations and
//! Events (`status`), and spreads the legacy `POST /snapshot` to every node
//! (`fanout`). With `--soda-endpoint`, every agent takes policy from SODA's
//! profiles (`profiles`) and one leader mirrors the cluster's CSI volumes
//! in SODA (`soda_sync`).

pub mod cluster;
mod discovery;
mod exec;
mod fanout;
pub mod lease;
mod profiles;
mod secrets;
mod soda_status;
mod soda_sync;
mod status;
mod view;

pub use soda_status::{SodaStatusBoard, SodaSyncStatus, SyncState};

pub use discovery::{DiscoveredVolume, VolumePlace};
pub use fanout::LegacyFanout;

use kube::config::{KubeConfigOptions, Kubeconfig};
use std::path::Path;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, KubeMode};
use crate::legacy::Legacy;
use crate::policies::Policies;
use crate::restic::Restic;
use crate::scheduler::Scheduler;
use crate::store::Store;

/// What can go wrong talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes is on, but this is not a pod (no KUBERNETES_SERVICE_HOST and service account token) and no --kubeconfig was given")]
    NoConfig,
    #[error("cannot read the kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("cannot use the in-cluster service account: {0}")]
    InCluster(String),
    #[error("the Kubernetes API refused or failed: {0}")]
    Api(#[from] kube::Error),
    #[error("this node {node:?} is not known to the API server: {message}")]
    NoNode { node: String, message: String },
    #[error("the SODA client cannot be set up: {0}")]
    Soda(#[from] crate::soda::SodaError),
}

const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Inside a pod the in-cluster service account is used explicitly (so a
/// stray kubeconfig in the image cannot win, unlike `Config::infer`);
/// outside, only the kubeconfig named by `--kubeconfig`.
pub async fn client(config: &Config) -> Result<Option<kube::Client>, KubeError> {
    let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && Path::new(SERVICE_ACCOUNT_TOKEN).exists();
    let cfg = match (config.kubernetes, &config.kubeconfig) {
        (KubeMode::Off, _) => return Ok(None),
        (_, Some(path)) => {
            let err = |m: String| KubeError::Kubeconfig { path: path.display().to_string(), message: m };
            let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| err(e.to_string()))?
        }
        (_, None) if in_pod => kube::Config::incluster().map_err(|e| KubeError::InCluster(e.to_string()))?,
        (KubeMode::Auto, None) => return Ok(None),
        (KubeMode::On, None) => return Err(KubeError::NoConfig),
    };
    Ok(Some(kube::Client::try_from(cfg)?))
}

/// What the adapter acts through: the run engine (for repository keys,
/// hooks and run results), the policies and legacy services, the store
/// (reads), restic (locks and leases) and the configuration.
pub struct Deps {
    pub sched: Scheduler,
    pub policies: Policies,
    pub legacy: Legacy,
    pub store: Store,
    pub restic: Restic,
    pub config: Config,
}

/// The running adapter's handles.
pub struct Kube {
    pub fanout: LegacyFanout,
    /// Reads the cluster view for `GET /v1/cluster`.
    pub cluster: cluster::ClusterReader,
    pub tasks: tokio::task::JoinSet<()>,
    /// The SODA sync's state, when the agent talks to SODA.
    pub soda_status: Option<SodaStatusBoard>,
}

/// Connect and start watching. `Ok(None)`: Kubernetes is off (or `auto`
/// found no cluster). A cluster that is configured but unreachable is not
/// fatal: the watchers retry with backoff and `/readyz` says so.
pub async fn start(deps: &Deps, cancel: CancellationToken) -> Result<Option<Kube>, KubeError> {
    let Deps { sched, policies, legacy, store, restic, config } = deps;
    let Some(client) = client(config).await? else {
        tracing::info!("Kubernetes discovery is off");
        if config.soda_endpoint.is_some() {
            tracing::warn!(
                "--soda-endpoint is set, but the SODA sync works through Kubernetes, which is off: no SODA sync"
            );
        }
        return Ok(None);
    };
    tracing::info!(node = %config.node_name, "Kubernetes discovery is on");
    let soda = match &config.soda_endpoint {
        Some(endpoint) => Some(std::sync::Arc::new(profiles::Profiles::from_env(endpoint)?)),
        None => None,
    };
    let secrets = secrets::Secrets::new(client.clone());
    match &soda {
        Some(p) => sched.set_secret_source(std::sync::Arc::new(profiles::Sources { secrets, profiles: p.clone() })),
        None => sched.set_secret_source(std::sync::Arc::new(secrets)),
    }
    sched.set_maintainership(std::sync::Arc::new(lease::MaintainerLeases {
        client: client.clone(),
        namespace: config.namespace.clone(),
        holder: config.node_name.clone(),
        period: config.prune_every.max(config.check_every) + std::time::Duration::from_secs(86_400),
    }));
    restic.set_init_guard(std::sync::Arc::new(lease::InitLeases {
        client: client.clone(),
        namespace: config.namespace.clone(),
        holder: config.node_name.clone(),
    }));
    // Liveness, so other nodes can break the locks this host's restic left
    // if this agent dies, and can tell when another host's agent died.
    let mut tasks = tokio::task::JoinSet::new();
    let hostname = crate::restic::own_hostname();
    lease::keep_alive(
        client.clone(),
        &config.namespace,
        &hostname,
        &config.node_name,
        restic.clone(),
        &mut tasks,
        cancel.clone(),
    );
    restic.set_lock_holders(std::sync::Arc::new(lease::HostLeases {
        api: kube::Api::namespaced(client.clone(), &config.namespace),
    }));
    lease::sweep_host_leases(
        kube::Api::namespaced(client.clone(), &config.namespace),
        hostname.clone(),
        &mut tasks,
        cancel.clone(),
    );
    let view = std::sync::Arc::new(view::View::default());
    let soda_status = soda.as_ref().map(|p| {
        tracing::info!(endpoint = %p.client().endpoint(), auth = p.client().config().auth.kind(),
            poll_seconds = config.soda_poll.as_secs(), "SODA sync is on");
        let identity = config.pod_name.clone().unwrap_or_else(|| config.node_name.clone());
        let board = SodaStatusBoard::new(soda_syncer_domain::secret::redact_url(p.endpoint()), identity);
        tasks.spawn(p.clone().poll_loop(view.clone(), config.soda_poll, board.clone(), cancel.clone()));
        tasks.spawn(soda_sync::SodaSync::new(client.clone(), p.clone(), config, board.clone()).run(cancel.clone()));
        board
    });
    sched.set_pod_hooks(std::sync::Arc::new(exec::PodExec::new(client.clone(), view.clone())));
    let reporter =
        status::Reporter::new(client.clone(), config, view.clone(), store.clone(), sched.schedules().clone());
    let reconciler = discovery::Reconciler {
        store: store.clone(),
        config: config.clone(),
        policies: policies.clone(),
        reporter: reporter.clone(),
        profiles: soda.clone(),
    };
    discovery::start(client.clone(), reconciler, view, &mut tasks, cancel.clone());
    tasks.spawn(reporter.clone().write_loop(cancel.clone()));
    tasks.spawn(status::report_runs(sched.clone(), reporter, cancel.clone()));
    let cluster = cluster::ClusterReader::new(client.clone(), config.namespace.clone());
    let fanout = LegacyFanout::new(client, config);
    legacy.set_publisher(std::sync::Arc::new(fanout.clone()));
    tasks.spawn(fanout.clone().watch(legacy.clone(), cancel));
    Ok(Some(Kube { fanout, cluster, tasks, soda_status }))
}
