//! Kubernetes → SODA: one agent in the cluster, the holder of the Lease
//! `soda-syncer-soda-sync` in the agent's namespace, mirrors every CSI
//! PersistentVolume as a SODA block volume (and every CSINode as a SODA
//! host). Another agent takes the lease over within seconds of a clean stop
//! (it is handed back) and within the lease's 15 s after a crash.
//!
//! Each pass lists the PVs, claims, StorageClasses and running Pods,
//! computes each PV's facts (`PvFacts`), lists SODA's volumes and makes
//! SODA match (`desired_volume`, `volume_update`): create the missing, update
//! what differs, delete the volumes whose PV is gone (after
//! `delete_preparation`) and the duplicates a crash or a race left
//! (`managed_by_pv_uid` keeps the oldest). Every step is recomputed from the
//! current state, so it is idempotent, and after a SODA outage the next
//! pass pushes the newest state (no queue of changes). Only volumes the sync
//! created (`soda-syncer.managed`) are ever changed or deleted; a PV whose
//! CSI volume handle is the id of another SODA volume (provisioned through
//! SODA itself) is left to that volume.
//!
//! Passes run every poll interval, soon after a PV or claim changes (a
//! watch, while leading), and again after a second while SODA is still
//! finishing a create or delete.

use chrono::Utc;
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, NodeSelector, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass};
use kube::api::ListParams;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};
use soda_syncer_domain::annotations::{keys, status_keys};
use soda_syncer_domain::soda::{
    delete_preparation, desired_volume, is_managed, is_transient, managed_by_pv_uid, needs_recheck, volume_update,
    BackupFacts, HostRequest, PvFacts, PvPhase, SodaHost, SodaVolume,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::lease::LeaseLock;
use super::profiles::Profiles;
use super::soda_status::{SodaStatusBoard, SyncState};
use crate::config::Config;
use crate::soda::{SodaClient, SodaError, VolumeQuery};

pub const LEASE_NAME: &str = "soda-syncer-soda-sync";
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often a follower asks for the lease (client-go's retry period).
const FOLLOWER_RETRY: Duration = Duration::from_secs(2);
/// A change seen by a watch is synced this much later (a burst settles).
const DEBOUNCE: Duration = Duration::from_millis(300);
/// The least time between two passes started by changes.
const MIN_GAP: Duration = Duration::from_secs(1);
/// When SODA is mid-operation on a volume, look again this soon.
const RECHECK: Duration = Duration::from_secs(1);

const ZONE_KEYS: [&str; 2] = ["topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone"];

/// What stops a sync pass.
#[derive(Debug, thiserror::Error)]
pub enum SodaSyncError {
    #[error("cannot list {kind} from Kubernetes: {source}")]
    Kube { kind: &'static str, source: kube::Error },
    #[error(transparent)]
    Soda(#[from] SodaError),
}

impl SodaSyncError {
    pub fn kind(&self) -> &'static str {
        match self {
            SodaSyncError::Kube { .. } => "kube_unavailable",
            SodaSyncError::Soda(e) => e.kind(),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default)]
struct PassReport {
    pvs: usize,
    created: usize,
    updated: usize,
    deleted: usize,
    hosts_created: usize,
    hosts_updated: usize,
    hosts_deleted: usize,
    /// SODA is still working on a volume: look again soon.
    recheck: bool,
    /// Steps not done: refused by SODA, or waiting for SODA to finish.
    left: u64,
}

pub struct SodaSync {
    kube: kube::Client,
    profiles: Arc<Profiles>,
    lease: LeaseLock,
    holder: String,
    /// The agent's namespace, where the record of our SODA hosts is.
    namespace: String,
    every: Duration,
    /// The last warning per PV / volume / host, so a lasting problem is
    /// logged once, not at every pass.
    warned: Mutex<HashMap<String, String>>,
    status: SodaStatusBoard,
}

impl SodaSync {
    pub fn new(kube: kube::Client, profiles: Arc<Profiles>, config: &Config, status: SodaStatusBoard) -> SodaSync {
        let holder = status.identity().to_string();
        SodaSync {
            lease: LeaseLock::new(kube.clone(), &config.namespace, LEASE_NAME, &holder, LEASE_DURATION),
            kube,
            profiles,
            holder,
            namespace: config.namespace.clone(),
            every: config.soda_poll,
            warned: Mutex::default(),
            status,
        }
    }

    fn soda(&self) -> &SodaClient {
        self.profiles.client()
    }

    /// Follow, lead when the lease is ours, until cancelled.
    pub async fn run(self, cancel: CancellationToken) {
        let mut lease_error = false;
        loop {
            let held = self.lease.try_hold().await;
            self.status.update(|st| {
                st.leader = self.lease.last_holder();
                st.state = SyncState::Following;
            });
            match held {
                Ok(true) => {
                    lease_error = false;
                    self.status.update(|st| {
                        st.state = SyncState::Starting;
                        st.leader = Some(self.holder.clone());
                        // Until a pass has run, SODA may lack anything.
                        st.dirty_since = Some(Utc::now());
                        st.events = 0;
                        st.left = 0;
                    });
                    self.lead(&cancel).await;
                    self.status.update(|st| st.state = SyncState::Following);
                    if cancel.is_cancelled() {
                        return;
                    }
                }
                Ok(false) => lease_error = false,
                Err(e) => {
                    if !lease_error {
                        tracing::warn!(lease = LEASE_NAME, error = %e, "cannot ask for the SODA sync lease; retrying");
                    }
                    lease_error = true;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(FOLLOWER_RETRY) => {}
            }
        }
    }

    /// Sync while the lease is ours; hand it back on a clean stop.
    async fn lead(&self, cancel: &CancellationToken) {
        tracing::info!(holder = %self.holder, lease = LEASE_NAME, "this agent now leads the cluster-wide SODA sync");
        tokio::select! {
            _ = cancel.cancelled() => {
                // Bounded: a shutdown never waits long on the API server.
                match tokio::time::timeout(Duration::from_secs(3), self.lease.release()).await {
                    Ok(()) => tracing::info!(lease = LEASE_NAME, "handed the SODA sync lease back"),
                    Err(_) => tracing::warn!(lease = LEASE_NAME, "could not hand the SODA sync lease back in time; it expires on its own"),
                }
            }
            _ = self.keep_lease() => {
                tracing::warn!(lease = LEASE_NAME, "lost the SODA sync lease; another agent leads the sync now");
            }
            _ = self.work(cancel) => {}
        }
    }

    /// Renew every third of the lease; return when it is lost, or when it
    /// could not be renewed for so long that another agent may take it.
    async fn keep_lease(&self) {
        let every = LEASE_DURATION / 3;
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.lease.try_hold().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(lease = LEASE_NAME, error = %e, "cannot renew the SODA sync lease");
                    if renewed.elapsed() + every >= LEASE_DURATION {
                        return;
                    }
                }
            }
        }
    }

    /// Passes: at once, every poll interval, soon after a change.
    async fn work(&self, cancel: &CancellationToken) {
        let changed = tokio::sync::Notify::new();
        // Changes are counted as they come, during a pass too (the status's
        // lag starts at them), and each wakes the next pass.
        let watch = async {
            let mut changes = std::pin::pin!(changes(self.kube.clone()));
            while let Some(()) = changes.next().await {
                self.status.update(|st| {
                    st.events += 1;
                    st.dirty_since.get_or_insert_with(Utc::now);
                });
                changed.notify_one();
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = watch => {}
            _ = self.passes(&changed, cancel) => {}
        }
    }

    async fn passes(&self, changed: &tokio::sync::Notify, cancel: &CancellationToken) {
        let mut next = Instant::now();
        let mut last_end = Instant::now() - MIN_GAP;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = changed.notified() => {
                    let soon = (Instant::now() + DEBOUNCE).max(last_end + MIN_GAP);
                    next = next.min(soon);
                    continue;
                }
            }
            let started = Instant::now();
            let (started_at, events_before) = (Utc::now(), self.status.events());
            let result = self.pass(cancel).await;
            last_end = Instant::now();
            let ms = started.elapsed().as_millis() as u64;
            self.status.update(|st| {
                st.last_pass_at = Some(Utc::now());
                st.last_pass_ms = Some(ms);
                match &result {
                    Ok(r) => {
                        st.state = SyncState::Ok;
                        st.last_success_at = st.last_pass_at;
                        st.left = r.left;
                        // Events that came during the pass may not be in it.
                        st.events = st.events.saturating_sub(events_before);
                        st.dirty_since = match (r.left, st.events) {
                            (0, 0) => None,
                            (0, _) => Some(st.dirty_since.map_or(started_at, |d| d.max(started_at))),
                            _ => st.dirty_since.or(Some(started_at)),
                        };
                    }
                    Err(SodaSyncError::Soda(SodaError::Cancelled { .. })) => {}
                    Err(_) => st.state = SyncState::Failing,
                }
            });
            if let Err(e) = &result {
                if !matches!(e, SodaSyncError::Soda(SodaError::Cancelled { .. })) {
                    self.status.record_error(e.kind(), e.to_string());
                }
            }
            next = match result {
                Ok(r) => {
                    if failing {
                        tracing::info!(
                            ms,
                            created = r.created,
                            updated = r.updated,
                            deleted = r.deleted,
                            "SODA sync works again; SODA has the current state"
                        );
                        failing = false;
                    } else if r.created + r.updated + r.deleted + r.hosts_created + r.hosts_updated + r.hosts_deleted
                        > 0
                    {
                        tracing::info!(
                            ms,
                            pvs = r.pvs,
                            created = r.created,
                            updated = r.updated,
                            deleted = r.deleted,
                            hosts_created = r.hosts_created,
                            hosts_updated = r.hosts_updated,
                            hosts_deleted = r.hosts_deleted,
                            "SODA sync pass"
                        );
                    } else {
                        tracing::debug!(ms, pvs = r.pvs, "SODA sync pass: nothing to change");
                    }
                    last_end + if r.recheck { RECHECK.min(self.every) } else { self.every }
                }
                Err(SodaSyncError::Soda(SodaError::Cancelled { .. })) => return,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, kind = e.kind(),
                            "SODA sync pass failed; retrying every poll, the newest state is pushed when it works");
                    } else {
                        tracing::debug!(error = %e, "SODA sync pass failed again");
                    }
                    failing = true;
                    last_end + self.every
                }
            };
        }
    }

    /// Warn once per key and message.
    fn warn_once(&self, key: &str, what: &str, e: &SodaError) {
        let msg = e.to_string();
        if self.first_time(key, e.kind(), format!("{what}: {msg}")) {
            tracing::warn!(object = key, what, error = %msg, kind = e.kind(), "SODA refused a sync step; it is tried again every pass");
        }
    }

    /// The ConfigMap of our hosts cannot be read or written: said once.
    fn warn_host_record(&self, e: &SodaSyncError) {
        if self.first_time("hosts", e.kind(), e.to_string()) {
            tracing::warn!(error = %e, configmap = HOST_RECORD,
                "cannot read or write the record of the SODA hosts this sync made (RBAC: get, create, update on configmaps in the agent's namespace); hosts are not synced until it works");
        }
    }

    /// Record an error about `key` in the status; `true` the first time
    /// this message is seen for it (the caller logs it then).
    fn first_time(&self, key: &str, kind: &'static str, msg: String) -> bool {
        self.status.record_error(kind, format!("{key}: {msg}"));
        let mut w = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if w.get(key) == Some(&msg) {
            return false;
        }
        w.insert(key.to_string(), msg);
        true
    }

    fn step_ok(&self, key: &str) {
        self.warned.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// An error that says SODA is away or refuses us as a whole stops the
    /// pass; one about this object is logged and the pass goes on.
    fn judge<T>(&self, key: &str, what: &str, r: Result<T, SodaError>) -> Result<Option<T>, SodaSyncError> {
        match r {
            Ok(v) => {
                self.step_ok(key);
                Ok(Some(v))
            }
            Err(e)
                if e.is_transient()
                    || matches!(
                        e,
                        SodaError::Unauthorized { .. }
                            | SodaError::Forbidden { .. }
                            | SodaError::LoginFailed { .. }
                            | SodaError::Config(_)
                            | SodaError::Cancelled { .. }
                    ) =>
            {
                Err(e.into())
            }
            Err(e) => {
                self.warn_once(key, what, &e);
                Ok(None)
            }
        }
    }

    async fn pass(&self, cancel: &CancellationToken) -> Result<PassReport, SodaSyncError> {
        let cluster = Cluster::read(&self.kube).await?;
        let facts: Vec<PvFacts> =
            cluster.pvs.iter().filter_map(|pv| pv_facts(pv, &cluster, |k| self.profiles.resolve_id(k))).collect();
        let volumes = self.soda().list_volumes(&VolumeQuery::default(), cancel).await?;
        let mut report = PassReport { pvs: facts.len(), ..Default::default() };
        let groups = managed_by_pv_uid(&volumes);
        let others: HashSet<&str> = volumes.iter().filter(|v| !is_managed(v)).map(|v| v.id.as_str()).collect();
        for f in &facts {
            let desired = desired_volume(f);
            let key = format!("pv/{}", f.pv_name);
            match groups.get(&f.pv_uid) {
                None => {
                    if f.volume_handle.as_deref().is_some_and(|h| others.contains(h)) {
                        // Provisioned through SODA: that volume is the PV's record, not ours to mirror.
                        continue;
                    }
                    let created = self.soda().create_volume(&desired.create_request(), cancel).await;
                    if let Some(v) = self.judge(&key, "create", created)? {
                        tracing::info!(pv = %f.pv_name, volume = %v.id, name = %v.name, "mirrored a PersistentVolume in SODA");
                        report.created += 1;
                        report.recheck = true;
                    } else {
                        report.left += 1;
                    }
                }
                Some(group) => {
                    let keep = group[0];
                    if let Some(u) = volume_update(keep, &desired) {
                        let updated = self.soda().update_volume(&keep.id, &u, cancel).await;
                        if self.judge(&key, "update", updated)?.is_some() {
                            tracing::debug!(pv = %f.pv_name, volume = %keep.id, "updated the PV's SODA volume");
                            report.updated += 1;
                        } else {
                            report.left += 1;
                        }
                    }
                    if needs_recheck(keep) {
                        report.recheck = true;
                        report.left += 1;
                    }
                    for dup in &group[1..] {
                        tracing::info!(pv = %f.pv_name, volume = %dup.id, kept = %keep.id, "removing a duplicate SODA volume");
                        let done = self.remove(dup, &mut report.recheck, cancel).await?;
                        report.deleted += done as usize;
                        report.left += !done as u64;
                    }
                }
            }
        }
        let live: HashSet<&str> = facts.iter().map(|f| f.pv_uid.as_str()).collect();
        for (uid, group) in &groups {
            if live.contains(uid.as_str()) {
                continue;
            }
            for v in group {
                tracing::info!(volume = %v.id, name = %v.name, pv_uid = %uid, "the PV is gone; deleting its SODA volume");
                let done = self.remove(v, &mut report.recheck, cancel).await?;
                report.deleted += done as usize;
                report.left += !done as u64;
            }
        }
        self.sync_hosts(&cluster, &mut report, cancel).await?;
        // Forget the warnings about PVs that are gone.
        let names: HashSet<&str> = facts.iter().map(|f| f.pv_name.as_str()).collect();
        self.warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| k.strip_prefix("pv/").is_none_or(|n| names.contains(n)));
        Ok(report)
    }

    /// Delete a managed volume: first make it deletable (`inUse` →
    /// `available`); while SODA is busy with it, later. `true`: deleted.
    async fn remove(
        &self,
        v: &SodaVolume,
        recheck: &mut bool,
        cancel: &CancellationToken,
    ) -> Result<bool, SodaSyncError> {
        if is_transient(&v.status) {
            *recheck = true;
            return Ok(false);
        }
        let key = format!("volume/{}", v.id);
        if let Some(prep) = delete_preparation(v) {
            let r = self.soda().update_volume(&v.id, &prep, cancel).await;
            if self.judge(&key, "make deletable", r)?.is_none() {
                return Ok(false);
            }
        }
        match self.soda().delete_volume(&v.id, cancel).await {
            Err(SodaError::NotFound { .. }) => Ok(false),
            r => {
                let done = self.judge(&key, "delete", r)?.is_some();
                *recheck |= done;
                Ok(done)
            }
        }
    }

    /// Every CSINode whose Node has an IPv4 InternalIP becomes a SODA host
    /// (`agentless`, `linux`) named after the node, in the node's zone.
    /// SODA's host has no field to mark it as ours, so the hosts this sync
    /// created are recorded (node → host id) in the ConfigMap
    /// `soda-syncer-soda-hosts` in the agent's namespace: only those are
    /// updated when their node's address or zone changes and deleted when
    /// the node (or its CSINode) is gone. A host of that name that someone
    /// else made is left alone.
    async fn sync_hosts(
        &self,
        cluster: &Cluster,
        report: &mut PassReport,
        cancel: &CancellationToken,
    ) -> Result<(), SodaSyncError> {
        let wanted: BTreeMap<String, HostRequest> = cluster
            .csi_nodes
            .iter()
            .filter_map(|n| host_request(n, &cluster.nodes))
            .map(|h| (h.host_name.clone(), h))
            .collect();
        // Without the record (no RBAC for it yet: an image upgraded before
        // its manifests), hosts wait; the volumes are synced all the same.
        let record = match HostRecord::read(&self.kube, &self.namespace).await {
            Ok(r) => {
                self.step_ok("hosts");
                r
            }
            Err(e) => {
                self.warn_host_record(&e);
                report.left += 1;
                return Ok(());
            }
        };
        if wanted.is_empty() && record.ours.is_empty() {
            return Ok(());
        }
        let existing = self.soda().list_hosts(None, cancel).await?;
        let by_id: HashMap<&str, &SodaHost> = existing.iter().map(|h| (h.id.as_str(), h)).collect();
        let names: HashSet<&str> = existing.iter().map(|h| h.host_name.as_str()).collect();
        let mut ours = record.ours.clone();
        // Deleted in SODA by someone else: no longer ours to look after.
        ours.retain(|_, id| by_id.contains_key(id.as_str()));
        for (node, req) in &wanted {
            let key = format!("host/{node}");
            match ours.get(node).and_then(|id| by_id.get(id.as_str())) {
                Some(h) => {
                    let zones_differ =
                        !req.availability_zones.is_empty() && h.availability_zones != req.availability_zones;
                    if h.ip != req.ip || zones_differ {
                        let r = self.soda().update_host(&h.id, req, cancel).await;
                        if self.judge(&key, "update host", r)?.is_some() {
                            tracing::info!(node = %node, host = %h.id, ip = %req.ip, "updated the node's SODA host");
                            report.hosts_updated += 1;
                        } else {
                            report.left += 1;
                        }
                    }
                }
                None if names.contains(node.as_str()) => {} // someone else's host of that name
                None => {
                    let r = self.soda().create_host(req, cancel).await;
                    if let Some(host) = self.judge(&key, "create host", r)? {
                        tracing::info!(node = %node, host = %host.id, "registered a node in SODA as a host");
                        ours.insert(node.clone(), host.id);
                        report.hosts_created += 1;
                    } else {
                        report.left += 1;
                    }
                }
            }
        }
        let gone: Vec<(String, String)> = ours
            .iter()
            .filter(|(node, _)| !wanted.contains_key(*node))
            .map(|(n, id)| (n.clone(), id.clone()))
            .collect();
        for (node, id) in gone {
            match self.soda().delete_host(&id, cancel).await {
                Err(SodaError::NotFound { .. }) => {
                    ours.remove(&node);
                }
                r => {
                    if self.judge(&format!("host/{node}"), "delete host", r)?.is_some() {
                        tracing::info!(node = %node, host = %id, "the node is gone; deleted its SODA host");
                        ours.remove(&node);
                        report.hosts_deleted += 1;
                    } else {
                        report.left += 1;
                    }
                }
            }
        }
        if ours != record.ours {
            let mut written = record.write(&self.kube, &self.namespace, &ours).await;
            if matches!(&written, Err(SodaSyncError::Kube { source: kube::Error::Api(s), .. }) if s.code == 409) {
                // Written meanwhile (by hand, or a leader before us): the
                // leader's view wins, on top of the newest version.
                written = match HostRecord::read(&self.kube, &self.namespace).await {
                    Ok(fresh) => fresh.write(&self.kube, &self.namespace, &ours).await,
                    Err(e) => Err(e),
                };
            }
            if let Err(e) = written {
                self.warn_host_record(&e);
            }
        }
        Ok(())
    }
}

/// The SODA hosts the sync created: node name → host id, in a ConfigMap.
struct HostRecord {
    ours: BTreeMap<String, String>,
    resource_version: Option<String>,
}

const HOST_RECORD: &str = "soda-syncer-soda-hosts";

impl HostRecord {
    async fn read(client: &kube::Client, namespace: &str) -> Result<HostRecord, SodaSyncError> {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let cm = api.get_opt(HOST_RECORD).await.map_err(|source| SodaSyncError::Kube { kind: "ConfigMap", source })?;
        Ok(HostRecord {
            ours: cm.as_ref().and_then(|c| c.data.clone()).unwrap_or_default(),
            resource_version: cm.and_then(|c| c.metadata.resource_version),
        })
    }

    /// Replace the record (create it the first time); 409 when it was
    /// written since it was read.
    async fn write(
        &self,
        client: &kube::Client,
        namespace: &str,
        ours: &BTreeMap<String, String>,
    ) -> Result<(), SodaSyncError> {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(HOST_RECORD.into()),
                resource_version: self.resource_version.clone(),
                labels: Some(BTreeMap::from([("app.kubernetes.io/name".into(), "soda-syncer".into())])),
                ..Default::default()
            },
            data: Some(ours.clone()),
            ..Default::default()
        };
        let pp = kube::api::PostParams::default();
        let r = match &self.resource_version {
            Some(_) => api.replace(HOST_RECORD, &pp, &cm).await.map(|_| ()),
            None => api.create(&pp, &cm).await.map(|_| ()),
        };
        r.map_err(|source| SodaSyncError::Kube { kind: "ConfigMap", source })
    }
}

/// A trigger per change of a PV or a claim (errors too: the pass reports them).
fn changes(client: kube::Client) -> impl Stream<Item = ()> + Send {
    let pvs = watcher(Api::<PersistentVolume>::all(client.clone()), watcher::Config::default()).default_backoff();
    let claims = watcher(Api::<PersistentVolumeClaim>::all(client), watcher::Config::default()).default_backoff();
    futures_util::stream::select(pvs.map(|_| ()), claims.map(|_| ()))
}

/// The cluster as one pass sees it.
struct Cluster {
    pvs: Vec<PersistentVolume>,
    claims: HashMap<(String, String), PersistentVolumeClaim>,
    classes: HashMap<String, StorageClass>,
    /// (namespace, claim) → the node of a running pod that uses it.
    users: HashMap<(String, String), String>,
    csi_nodes: Vec<CSINode>,
    nodes: HashMap<String, Node>,
}

impl Cluster {
    async fn read(client: &kube::Client) -> Result<Cluster, SodaSyncError> {
        let all = ListParams::default();
        let err = |kind: &'static str| move |source| SodaSyncError::Kube { kind, source };
        let pvs = Api::<PersistentVolume>::all(client.clone()).list(&all).await.map_err(err("PersistentVolumes"))?;
        let claims = Api::<PersistentVolumeClaim>::all(client.clone())
            .list(&all)
            .await
            .map_err(err("PersistentVolumeClaims"))?;
        let classes = Api::<StorageClass>::all(client.clone()).list(&all).await.map_err(err("StorageClasses"))?;
        let running = ListParams::default().fields("status.phase=Running");
        let pods = Api::<Pod>::all(client.clone()).list(&running).await.map_err(err("Pods"))?;
        let csi_nodes = Api::<CSINode>::all(client.clone()).list(&all).await.map_err(err("CSINodes"))?;
        let nodes = if csi_nodes.items.is_empty() {
            Default::default()
        } else {
            Api::<Node>::all(client.clone()).list(&all).await.map_err(err("Nodes"))?.items
        };
        let mut users = HashMap::new();
        for pod in &pods.items {
            let (Some(ns), Some(node)) = (pod.namespace(), pod.spec.as_ref().and_then(|s| s.node_name.clone())) else {
                continue;
            };
            for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
                if let Some(c) = &v.persistent_volume_claim {
                    users.insert((ns.clone(), c.claim_name.clone()), node.clone());
                }
            }
        }
        Ok(Cluster {
            pvs: pvs.items,
            claims: claims.items.into_iter().map(|c| ((c.namespace().unwrap_or_default(), c.name_any()), c)).collect(),
            classes: classes.items.into_iter().map(|c| (c.name_any(), c)).collect(),
            users,
            csi_nodes: csi_nodes.items,
            nodes: nodes.into_iter().map(|n| (n.name_any(), n)).collect(),
        })
    }
}

fn nonempty(s: Option<&str>) -> Option<String> {
    s.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string)
}

/// The single value that every node selector term pins `keys` (or, for
/// `metadata.name`, the field) to with `In`; `None` when absent or when
/// terms disagree.
fn pinned(sel: Option<&NodeSelector>, keys: &[&str], field: bool) -> Option<String> {
    let mut found: Option<String> = None;
    for term in &sel?.node_selector_terms {
        let reqs = if field { term.match_fields.as_deref() } else { term.match_expressions.as_deref() };
        let value = reqs.unwrap_or_default().iter().find_map(|r| {
            let values = r.values.as_deref().unwrap_or_default();
            (keys.contains(&r.key.as_str()) && r.operator == "In" && values.len() == 1).then(|| values[0].clone())
        })?;
        match &found {
            Some(f) if *f != value => return None,
            _ => found = Some(value),
        }
    }
    found
}

/// The last backup as the node agents wrote it onto the claim. The
/// snapshot id is kept only for states that write a snapshot (the agent
/// leaves an older id in place after a failure).
fn backup_facts(a: &BTreeMap<String, String>) -> Option<BackupFacts> {
    let time = chrono::DateTime::parse_from_rfc3339(a.get(status_keys::LAST_BACKUP_TIME)?.trim()).ok()?;
    let state = nonempty(a.get(status_keys::LAST_BACKUP_STATE).map(String::as_str)).unwrap_or_default();
    let wrote_snapshot = matches!(state.as_str(), "succeeded" | "partial" | "suspicious");
    Some(BackupFacts {
        time: time.with_timezone(&chrono::Utc),
        snapshot_id: nonempty(a.get(status_keys::LAST_SNAPSHOT).map(String::as_str)).filter(|_| wrote_snapshot),
        state,
    })
}

/// The facts of a CSI PV; `None` for other volume types.
fn pv_facts(pv: &PersistentVolume, c: &Cluster, profile_id: impl Fn(&str) -> Option<String>) -> Option<PvFacts> {
    let spec = pv.spec.as_ref()?;
    let csi = spec.csi.as_ref()?;
    let pv_uid = nonempty(pv.metadata.uid.as_deref())?;
    let phase =
        pv.status.as_ref().and_then(|s| s.phase.as_deref()).and_then(PvPhase::parse).unwrap_or(PvPhase::Pending);
    let claim_ref = spec.claim_ref.as_ref();
    let claim_key = claim_ref.and_then(|r| Some((r.namespace.clone()?, r.name.clone()?)));
    // A claimRef may name a claim that was deleted and made again: match the uid when given.
    let claim = claim_key.as_ref().and_then(|k| c.claims.get(k)).filter(|cl| {
        claim_ref.and_then(|r| r.uid.as_deref()).is_none_or(|uid| cl.metadata.uid.as_deref() == Some(uid))
    });
    let user_node = claim_key.as_ref().filter(|_| phase == PvPhase::Bound).and_then(|k| c.users.get(k));
    let class_name = nonempty(spec.storage_class_name.as_deref());
    let class = class_name.as_ref().and_then(|n| c.classes.get(n));
    let empty = BTreeMap::new();
    let claim_annotations = claim.map(|cl| cl.annotations()).unwrap_or(&empty);
    let class_annotations = class.map(|cl| cl.annotations()).unwrap_or(&empty);
    let profile_key = nonempty(claim_annotations.get(keys::PROFILE).map(String::as_str))
        .or_else(|| nonempty(class_annotations.get(keys::PROFILE).map(String::as_str)))
        .or_else(|| {
            class
                .filter(|cl| cl.provisioner == "soda-csi")
                .and_then(|cl| nonempty(cl.parameters.as_ref()?.get("profile").map(String::as_str)))
        });
    let affinity = spec.node_affinity.as_ref().and_then(|a| a.required.as_ref());
    let node = pinned(affinity, &["kubernetes.io/hostname"], false)
        .or_else(|| pinned(affinity, &["metadata.name"], true))
        .or_else(|| user_node.cloned());
    let zone = pinned(affinity, &ZONE_KEYS, false)
        .or_else(|| ZONE_KEYS.iter().find_map(|k| nonempty(pv.labels().get(*k).map(String::as_str))));
    Some(PvFacts {
        pv_name: pv.name_any(),
        pv_uid,
        capacity_bytes: spec
            .capacity
            .as_ref()
            .and_then(|cap| cap.get("storage"))
            .and_then(|q| quantity_bytes(&q.0))
            .unwrap_or(0),
        phase,
        attached: user_node.is_some(),
        storage_class: class_name,
        soda_profile_id: profile_key.and_then(|k| profile_id(&k)),
        csi_driver: nonempty(Some(&csi.driver)),
        volume_handle: nonempty(Some(&csi.volume_handle)),
        claim_namespace: claim_key.as_ref().map(|k| k.0.clone()),
        claim_name: claim_key.as_ref().map(|k| k.1.clone()),
        node,
        volume_mode: Some(spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into())),
        availability_zone: zone,
        last_backup: claim.and_then(|cl| backup_facts(cl.annotations())),
    })
}

/// A CSINode as a SODA host, when its Node has an IPv4 InternalIP.
fn host_request(csi_node: &CSINode, nodes: &HashMap<String, Node>) -> Option<HostRequest> {
    let name = csi_node.name_any();
    if csi_node.spec.drivers.is_empty() {
        return None;
    }
    let node = nodes.get(&name)?;
    let ip = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find_map(|a| (a.type_ == "InternalIP").then(|| a.address.parse::<std::net::Ipv4Addr>().ok()).flatten())?;
    let zones = ZONE_KEYS.iter().find_map(|k| nonempty(node.labels().get(*k).map(String::as_str)));
    Some(HostRequest {
        host_name: name,
        os_type: "linux".into(),
        access_mode: "agentless".into(),
        ip: ip.to_string(),
        availability_zones: zones.into_iter().collect(),
        initiators: Vec::new(),
    })
}

/// A Kubernetes quantity (`1Gi`, `500M`, `1.5Ti`, `1e9`, `100`) in bytes,
/// rounded up.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    let bytes = (value * mult).ceil();
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities_become_bytes() {
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("500Mi"), Some(500 << 20));
        assert_eq!(quantity_bytes("10G"), Some(10_000_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(quantity_bytes("1e3"), Some(1000));
        assert_eq!(quantity_bytes("4096"), Some(4096));
        assert_eq!(quantity_bytes("1500m"), Some(2));
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(quantity_bytes("1Xi"), None);
    }

    fn cluster(objs: &[serde_json::Value]) -> Cluster {
        let mut c = Cluster {
            pvs: vec![],
            claims: HashMap::new(),
            classes: HashMap::new(),
            users: HashMap::new(),
            csi_nodes: vec![],
            nodes: HashMap::new(),
        };
        for o in objs {
            match o["kind"].as_str().unwrap() {
                "PersistentVolume" => c.pvs.push(serde_json::from_value(o.clone()).unwrap()),
                "PersistentVolumeClaim" => {
                    let pvc: PersistentVolumeClaim = serde_json::from_value(o.clone()).unwrap();
                    c.claims.insert((pvc.namespace().unwrap(), pvc.name_any()), pvc);
                }
                "StorageClass" => {
                    let sc: StorageClass = serde_json::from_value(o.clone()).unwrap();
                    c.classes.insert(sc.name_any(), sc);
                }
                k => panic!("{k}"),
            }
        }
        c
    }

    fn pv(extra: serde_json::Value) -> serde_json::Value {
        let mut v = json!({"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "pv-1", "uid": "u-1"},
            "spec": {"capacity": {"storage": "3Gi"}, "storageClassName": "soda",
                "csi": {"driver": "csi.example.com", "volumeHandle": "h-1"},
                "claimRef": {"namespace": "app", "name": "data", "uid": "c-1"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]},
                    {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["z1"]}]}]}}},
            "status": {"phase": "Bound"}});
        soda_syncer_domain::merge_patch(&mut v, &extra);
        v
    }

    #[test]
    fn a_csi_pv_gives_its_facts_from_the_claim_the_class_and_the_pods() {
        let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "app", "uid": "c-1", "annotations": {
                "soda-syncer.io/last-backup-time": "2026-03-01T10:00:00+00:00",
                "soda-syncer.io/last-backup-state": "succeeded",
                "soda-syncer.io/last-snapshot-id": "1a2b3c4d"}},
            "spec": {}});
        let class = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "soda"},
            "provisioner": "soda-csi", "parameters": {"profile": "gold"}});
        let mut c = cluster(&[pv(json!({})), claim.clone(), class]);
        c.users.insert(("app".into(), "data".into()), "node-b".into());
        let f = pv_facts(&c.pvs[0], &c, |k| (k == "gold").then(|| "p-1".to_string())).unwrap();
        assert_eq!((f.pv_name.as_str(), f.pv_uid.as_str(), f.capacity_bytes), ("pv-1", "u-1", 3 << 30));
        assert!(f.attached);
        assert_eq!(f.node.as_deref(), Some("node-a"), "node affinity before the pod's node");
        assert_eq!(f.availability_zone.as_deref(), Some("z1"));
        assert_eq!(f.soda_profile_id.as_deref(), Some("p-1"));
        assert_eq!((f.csi_driver.as_deref(), f.volume_handle.as_deref()), (Some("csi.example.com"), Some("h-1")));
        assert_eq!((f.claim_namespace.as_deref(), f.claim_name.as_deref()), (Some("app"), Some("data")));
        assert_eq!(f.volume_mode.as_deref(), Some("Filesystem"));
        let b = f.last_backup.unwrap();
        assert_eq!((b.state.as_str(), b.snapshot_id.as_deref()), ("succeeded", Some("1a2b3c4d")));

        // No affinity: the pod's node. A failed backup: no snapshot id. An unknown profile: none.
        let mut claim = claim;
        claim["metadata"]["annotations"]["soda-syncer.io/last-backup-state"] = json!("failed");
        let mut c = cluster(&[pv(json!({"spec": {"nodeAffinity": null}})), claim]);
        c.users.insert(("app".into(), "data".into()), "node-b".into());
        let f = pv_facts(&c.pvs[0], &c, |_| None).unwrap();
        assert_eq!((f.node.as_deref(), f.availability_zone.as_deref()), (Some("node-b"), None));
        assert_eq!(f.last_backup.unwrap().snapshot_id, None);
        assert_eq!(f.soda_profile_id, None);

        // A claim made again under the same name is not this PV's claim.
        let other = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "app", "uid": "c-2", "annotations": {
                "soda-syncer.io/last-backup-time": "2026-03-01T10:00:00Z"}}, "spec": {}});
        let c = cluster(&[pv(json!({})), other]);
        assert_eq!(pv_facts(&c.pvs[0], &c, |_| None).unwrap().last_backup, None);

        // Not CSI: not mirrored.
        let c = cluster(&[pv(json!({"spec": {"csi": null, "hostPath": {"path": "/x"}}}))]);
        assert!(pv_facts(&c.pvs[0], &c, |_| None).is_none());
    }

    #[test]
    fn a_csi_node_with_an_internal_ipv4_becomes_a_host() {
        let csi: CSINode = serde_json::from_value(json!({"metadata": {"name": "node-a"},
            "spec": {"drivers": [{"name": "csi.example.com", "nodeID": "node-a",
                "topologyKeys": ["topology.kubernetes.io/zone"]}]}}))
        .unwrap();
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-a",
                "labels": {"topology.kubernetes.io/zone": "z1"}},
            "status": {"addresses": [{"type": "Hostname", "address": "node-a"},
                {"type": "InternalIP", "address": "fd00::1"}, {"type": "InternalIP", "address": "10.0.0.7"}]}}))
        .unwrap();
        let mut nodes = HashMap::from([("node-a".to_string(), node)]);
        let h = host_request(&csi, &nodes).unwrap();
        assert_eq!((h.host_name.as_str(), h.ip.as_str()), ("node-a", "10.0.0.7"));
        assert_eq!(h.availability_zones, ["z1"]);
        assert_eq!((h.os_type.as_str(), h.access_mode.as_str()), ("linux", "agentless"));
        nodes.get_mut("node-a").unwrap().status = None;
        assert!(host_request(&csi, &nodes).is_none(), "no IP, no host");
    }
}
