//! Which annotated claims have their data on this node, and where.
//!
//! Five watches feed one compact view: the Pods of this node (field
//! selector `spec.nodeName`), every claim, every PersistentVolume, every
//! StorageClass, and this Node (for its labels). The API cannot filter
//! claims or volumes by node, so those are listed cluster-wide, but only the
//! few fields the decision needs are kept (a claim is its class, volume,
//! phase and `soda-syncer.io/` annotations), so memory stays small with
//! thousands of claims. After every change (debounced) and every 30 s, the
//! view is reconciled with the policies of origin `kubernetes`:
//! - a local PV whose node affinity matches this Node is backed up from
//!   `spec.local.path`, whether or not a pod uses it;
//! - a claim used by a pod on this node is backed up at the kubelet's path
//!   (`pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount` for CSI, which must
//!   be a mount point), or at `spec.hostPath.path`;
//! - a Block-mode volume, or a plugin we cannot read, is reported on the
//!   claim as unsupported, never skipped in silence;
//! - a policy whose claim went away, stopped opting in, or left this node is
//!   paused by the agent (status `volumeGone`), not deleted, and resumes
//!   when the claim is back.
//!
//! Nothing is decided before all five initial lists are complete, so a slow
//! start never pauses a policy whose claim simply was not listed yet.

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeSelector, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};
use soda_syncer_domain::annotations::{self, OptIn, PREFIX};
use soda_syncer_domain::field::FieldError;
use soda_syncer_domain::{Origin, PolicySpec};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::profiles::Profiles;
use super::status::Reporter;
use super::view::{ClaimInfo, ClassInfo, NodeInfo, PodInfo, PvInfo, PvSource, State, View, ALL_SYNCED, KEY_PREFIX};
use crate::config::Config;
use crate::policies::Policies;
use crate::store::{PolicyRecord, PolicyStatus, Store};

/// Where a claim's data is on this node.
#[derive(Debug, Clone, PartialEq)]
pub enum VolumePlace {
    Path(PathBuf),
    /// Opted in and on this node, but not something a file backup can read.
    Unsupported(String),
    /// Not on this node (another node's agent backs it up), or not mounted yet.
    NotHere(String),
}

/// An opted-in claim as this node sees it.
#[derive(Debug, Clone)]
pub struct DiscoveredVolume {
    pub namespace: String,
    pub claim: String,
    pub pv: String,
    pub place: VolumePlace,
    pub opt_in: Result<OptIn, FieldError>,
}

/// What the reconciler decides with and acts through.
pub(super) struct Reconciler {
    pub store: Store,
    pub config: Config,
    pub policies: Policies,
    pub reporter: Reporter,
    /// SODA's profiles, when the agent talks to SODA.
    pub profiles: Option<Arc<Profiles>>,
}

pub(super) fn start(
    client: kube::Client,
    reconciler: Reconciler,
    view: Arc<View>,
    tasks: &mut tokio::task::JoinSet<()>,
    cancel: CancellationToken,
) {
    let node = reconciler.config.node_name.clone();
    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let this_node = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let all = watcher::Config::default;
    tasks.spawn(watch(
        Api::<Pod>::all(client.clone()),
        on_node,
        view.clone(),
        0,
        pod_info,
        |s| &mut s.pods,
        cancel.clone(),
    ));
    tasks.spawn(watch(Api::all(client.clone()), all(), view.clone(), 1, claim_info, |s| &mut s.claims, cancel.clone()));
    tasks.spawn(watch(Api::all(client.clone()), all(), view.clone(), 2, pv_info, |s| &mut s.pvs, cancel.clone()));
    tasks.spawn(watch(
        Api::all(client.clone()),
        all(),
        view.clone(),
        3,
        class_info,
        |s| &mut s.classes,
        cancel.clone(),
    ));
    tasks.spawn(watch(Api::all(client), this_node, view.clone(), 4, node_info, |s| &mut s.node, cancel.clone()));
    tasks.spawn(reconcile_loop(view, reconciler, cancel));
}

/// Keep one table of the view equal to what the API server has, through
/// relists (410), restarts of the server and network errors (backoff).
async fn watch<K, T>(
    api: Api<K>,
    config: watcher::Config,
    view: Arc<View>,
    bit: u8,
    map: fn(&K) -> (String, Option<T>),
    table: fn(&mut State) -> &mut HashMap<String, T>,
    cancel: CancellationToken,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    T: PartialEq,
{
    let kind = std::any::type_name::<K>().rsplit("::").next().unwrap_or("object");
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    let mut buffer: Option<HashMap<String, T>> = None;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            e = stream.next() => e,
        };
        let changed = match event {
            None => return,
            Some(Err(e)) => {
                if !failing {
                    tracing::warn!(kind, error = %e, "Kubernetes watch failed; retrying with backoff");
                }
                failing = true;
                false
            }
            Some(Ok(ev)) => {
                if failing {
                    tracing::info!(kind, "Kubernetes watch works again");
                    failing = false;
                }
                match ev {
                    Event::Init => {
                        buffer = Some(HashMap::new());
                        false
                    }
                    Event::InitApply(o) => {
                        if let (k, Some(v)) = map(&o) {
                            buffer.get_or_insert_with(HashMap::new).insert(k, v);
                        }
                        false
                    }
                    Event::InitDone => {
                        tracing::debug!(kind, "initial list complete");
                        let mut st = view.lock();
                        *table(&mut st) = buffer.take().unwrap_or_default();
                        st.synced |= 1 << bit;
                        true
                    }
                    // Only a change of what the view keeps wakes the
                    // reconciler: the agent's own status annotations on a
                    // claim (see `prefixed`) come back as watch events.
                    Event::Apply(o) => {
                        let mut st = view.lock();
                        let t = table(&mut st);
                        match map(&o) {
                            (k, Some(v)) if t.get(&k) == Some(&v) => false,
                            (k, Some(v)) => {
                                t.insert(k, v);
                                true
                            }
                            (k, None) => t.remove(&k).is_some(),
                        }
                    }
                    Event::Delete(o) => table(&mut view.lock()).remove(&map(&o).0).is_some(),
                }
            }
        };
        if changed {
            view.changed.notify_one();
        }
    }
}

fn ns_key<K: Resource>(o: &K) -> String {
    format!("{}/{}", o.meta().namespace.as_deref().unwrap_or(""), o.meta().name.as_deref().unwrap_or(""))
}

/// The `soda-syncer.io/` annotations the reconciler reads: a user's keys,
/// and of the agent's own status only the node (the others it only writes).
fn prefixed(a: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    use annotations::status_keys as sk;
    let written = [
        sk::POLICY,
        sk::POLICY_NAME,
        sk::LAST_BACKUP_TIME,
        sk::LAST_BACKUP_STATE,
        sk::LAST_SNAPSHOT,
        sk::LAST_ERROR,
        sk::LAST_SUCCESS_TIME,
        sk::NEXT_BACKUP_TIME,
        sk::BACKUP_DEADLINE,
        sk::CONSISTENCY_USED,
        sk::STATUS,
    ];
    a.iter()
        .filter(|(k, _)| k.starts_with(PREFIX) && !written.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn pod_info(p: &Pod) -> (String, Option<PodInfo>) {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let claims: Vec<String> = p
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone()))
        .collect();
    let info = (!claims.is_empty()).then(|| PodInfo {
        uid: p.metadata.uid.clone().unwrap_or_default(),
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        active: !matches!(phase, "Succeeded" | "Failed"),
        claims,
        name: p.metadata.name.clone().unwrap_or_default(),
        first_container: p.spec.as_ref().and_then(|s| s.containers.first()).map(|c| c.name.clone()).unwrap_or_default(),
        hooks: p
            .annotations()
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix("pre.")
                    .or_else(|| k.strip_prefix("post."))
                    .is_some_and(|r| r.starts_with(annotations::pod_keys::SUFFIX))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    });
    (ns_key(p), info)
}

fn claim_info(c: &PersistentVolumeClaim) -> (String, Option<ClaimInfo>) {
    let spec = c.spec.as_ref();
    let info = ClaimInfo {
        uid: c.metadata.uid.clone().unwrap_or_default(),
        annotations: prefixed(c.annotations()),
        class: spec.and_then(|s| s.storage_class_name.clone()),
        volume: spec.and_then(|s| s.volume_name.clone()).filter(|v| !v.is_empty()),
        bound: c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"),
    };
    (ns_key(c), Some(info))
}

fn pv_info(pv: &PersistentVolume) -> (String, Option<PvInfo>) {
    let name = pv.name_any();
    let Some(spec) = &pv.spec else { return (name, None) };
    let source = if let Some(csi) = &spec.csi {
        PvSource::Csi { driver: csi.driver.clone() }
    } else if let Some(l) = &spec.local {
        PvSource::Local { path: l.path.clone() }
    } else if let Some(h) = &spec.host_path {
        PvSource::HostPath { path: h.path.clone() }
    } else {
        let v = serde_json::to_value(spec).unwrap_or_default();
        let plugin = v
            .as_object()
            .and_then(|o| {
                o.iter()
                    .find(|(_, v)| v.is_object())
                    .map(|(k, _)| k.clone())
                    .filter(|k| !matches!(k.as_str(), "claimRef" | "nodeAffinity" | "capacity"))
            })
            .unwrap_or_else(|| "unknown".into());
        PvSource::Other { plugin }
    };
    let info = PvInfo {
        source,
        block: spec.volume_mode.as_deref() == Some("Block"),
        affinity: spec.node_affinity.as_ref().and_then(|a| a.required.clone()),
    };
    (name, Some(info))
}

fn class_info(sc: &StorageClass) -> (String, Option<ClassInfo>) {
    // The soda-csi convention: the class names a SODA profile in its parameters.
    let profile = (sc.provisioner == "soda-csi")
        .then(|| sc.parameters.as_ref().and_then(|p| p.get("profile").cloned()))
        .flatten()
        .filter(|p| !p.is_empty());
    (sc.name_any(), Some(ClassInfo { annotations: prefixed(sc.annotations()), profile }))
}

fn node_info(n: &Node) -> (String, Option<NodeInfo>) {
    (n.name_any(), Some(NodeInfo { labels: n.labels().clone() }))
}

/// Whether a node selector (terms ORed, expressions ANDed) matches a node.
fn selector_matches(sel: &NodeSelector, node_name: &str, labels: &BTreeMap<String, String>) -> bool {
    sel.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.iter().flatten().map(|e| (e, labels.get(&e.key).map(String::as_str)));
        let fields = term.match_fields.iter().flatten().map(|e| (e, (e.key == "metadata.name").then_some(node_name)));
        let mut all = exprs.chain(fields).peekable();
        all.peek().is_some()
            && all.all(|(e, value)| {
                let values = e.values.as_deref().unwrap_or_default();
                match e.operator.as_str() {
                    "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
                    "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    "Gt" | "Lt" => {
                        let (Some(v), Some(x)) = (
                            value.and_then(|v| v.parse::<i64>().ok()),
                            values.first().and_then(|x| x.parse::<i64>().ok()),
                        ) else {
                            return false;
                        };
                        if e.operator == "Gt" {
                            v > x
                        } else {
                            v < x
                        }
                    }
                    _ => false,
                }
            })
    })
}

/// Every opted-in claim this node has an opinion about.
fn discover(st: &State, node: &str, kubelet: &std::path::Path, mounts: &HashSet<PathBuf>) -> Vec<DiscoveredVolume> {
    let labels = st.node.get(node).map(|n| n.labels.clone()).unwrap_or_default();
    // claim key -> the pods on this node using it (oldest uid order is stable enough)
    let mut users: HashMap<String, Vec<&PodInfo>> = HashMap::new();
    for pod in st.pods.values().filter(|p| p.active) {
        for c in &pod.claims {
            users.entry(format!("{}/{c}", pod.namespace)).or_default().push(pod);
        }
    }
    let mut out = Vec::new();
    for (key, claim) in &st.claims {
        let (class_annotations, class_profile) = match claim.class.as_ref().and_then(|c| st.classes.get(c)) {
            Some(c) => (c.annotations.clone(), c.profile.clone()),
            None => (BTreeMap::new(), None),
        };
        let opt_in = match annotations::parse(&claim.annotations, &class_annotations, class_profile.as_deref()) {
            Ok(None) => continue,
            Ok(Some(o)) => Ok(o),
            Err(e) => Err(e),
        };
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        let pv_name = claim.volume.clone().unwrap_or_default();
        let pods = users.get(key).map(Vec::as_slice).unwrap_or_default();
        let place = match (claim.bound, st.pvs.get(&pv_name)) {
            (false, _) | (_, None) => VolumePlace::NotHere("the claim is not bound to a volume yet".into()),
            (true, Some(pv)) => {
                let local_here = matches!(pv.source, PvSource::Local { .. })
                    && pv.affinity.as_ref().is_some_and(|a| selector_matches(a, node, &labels));
                if !local_here && pods.is_empty() {
                    VolumePlace::NotHere(format!("no pod on node {node} uses it"))
                } else if pv.block {
                    VolumePlace::Unsupported(
                        "the volume is in Block mode: a file backup cannot read a raw device; use a Filesystem-mode volume"
                            .into(),
                    )
                } else {
                    let mut pods = pods.to_vec();
                    pods.sort_by(|a, b| a.uid.cmp(&b.uid));
                    match &pv.source {
                        PvSource::Local { path } => VolumePlace::Path(PathBuf::from(path)),
                        PvSource::HostPath { path } => VolumePlace::Path(PathBuf::from(path)),
                        PvSource::Csi { driver } => {
                            let path = kubelet
                                .join("pods")
                                .join(&pods[0].uid)
                                .join("volumes/kubernetes.io~csi")
                                .join(&pv_name)
                                .join("mount");
                            if mounts.contains(&path) {
                                VolumePlace::Path(path)
                            } else {
                                VolumePlace::NotHere(format!(
                                    "the {driver} volume is not mounted at {} yet",
                                    path.display()
                                ))
                            }
                        }
                        PvSource::Other { plugin } => VolumePlace::Unsupported(format!(
                            "volumes of type {plugin} are not backed up by this agent (CSI, local and hostPath volumes are)"
                        )),
                    }
                }
            }
        };
        out.push(DiscoveredVolume { namespace: namespace.into(), claim: name.into(), pv: pv_name, place, opt_in });
    }
    out.sort_by(|a, b| (&a.namespace, &a.claim).cmp(&(&b.namespace, &b.claim)));
    out
}

async fn reconcile_loop(view: Arc<View>, reconciler: Reconciler, cancel: CancellationToken) {
    let Reconciler { store, config, policies, reporter, profiles } = reconciler;
    let mut trimmed = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = view.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Let a burst of changes (a list, an apply of many objects) settle.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let found = {
            let st = view.lock();
            if st.synced != ALL_SYNCED {
                tracing::debug!(synced = format!("{:05b}", st.synced), "waiting for the initial lists");
                continue;
            }
            discover(&st, &config.node_name, &config.kubelet_dir, &crate::kubelet::mount_points())
        };
        if !trimmed {
            // The initial lists went through full objects page by page; hand
            // the freed pages back, so the agent's footprint is what it keeps.
            // SAFETY: malloc_trim only releases free memory of the allocator.
            unsafe { libc::malloc_trim(0) };
            trimmed = true;
        }
        if let Err(e) = reconcile(&store, &config, &policies, &reporter, &view, profiles.as_deref(), found).await {
            tracing::warn!(error = %e, "cannot apply the claims' annotations to the policies");
        }
    }
}

/// The policy a claim asks for.
fn wanted_spec(
    v: &DiscoveredVolume,
    o: &OptIn,
    soda_profile: Option<&str>,
    path: &std::path::Path,
    paused: bool,
) -> Result<PolicySpec, String> {
    let name = annotations::policy_name(&v.namespace, &v.claim, |s| crate::ids::short_hash(&[s])[..8].to_string());
    let repository = match (soda_profile, &o.secret) {
        (Some(p), _) => serde_json::json!({ "sodaProfile": p }),
        (None, Some(s)) => serde_json::json!({ "secretRef": { "namespace": v.namespace, "name": s } }),
        (None, None) => serde_json::json!({}),
    };
    serde_json::from_value(serde_json::json!({
        "name": name,
        "source": { "path": path },
        "repository": repository,
        "schedule": o.schedule,
        "jitterSeconds": o.jitter_seconds,
        "retention": o.retention,
        "appendOnly": o.append_only,
        "consistency": o.consistency,
        "exclude": o.exclude,
        "tags": [format!("k8s-namespace={}", v.namespace), format!("k8s-claim={}", v.claim)],
        "paused": paused,
    }))
    .map_err(|e| e.to_string())
}

/// Whether a stored policy already is what the claim asks for.
fn same(have: &PolicySpec, want: &PolicySpec) -> bool {
    have.source == want.source
        && have.repository.secret_ref == want.repository.secret_ref
        && have.repository.soda_profile == want.repository.soda_profile
        && have.schedule == want.schedule
        && have.jitter_seconds == want.jitter_seconds
        && have.retention == want.retention
        && have.append_only == want.append_only
        && have.consistency == want.consistency
        && have.exclude == want.exclude
        && have.tags == want.tags
        && have.name == want.name
}

async fn reconcile(
    store: &Store,
    config: &Config,
    policies: &Policies,
    reporter: &Reporter,
    view: &View,
    profiles: Option<&Profiles>,
    found: Vec<DiscoveredVolume>,
) -> Result<(), crate::store::StoreError> {
    let node = config.node_name.clone();
    let mut ours: HashMap<String, PolicyRecord> = store
        .list_policies()?
        .into_iter()
        .filter(|p| p.origin == Origin::Kubernetes)
        .filter_map(|p| {
            p.legacy_key.clone().and_then(|k| k.strip_prefix(KEY_PREFIX).map(str::to_string)).map(|k| (k, p))
        })
        .collect();
    for v in &found {
        let key = format!("{}/{}", v.namespace, v.claim);
        tracing::debug!(claim = %key, place = ?v.place, "opted-in claim");
        let existing = ours.remove(&key);
        let claim_node = view.claim(&key).and_then(|c| c.annotations.get(annotations::status_keys::NODE).cloned());
        // SODA wins for policy: what the claim's profile sets replaces its annotations.
        let mut profiled = None;
        let problem = match (&v.place, &v.opt_in) {
            (VolumePlace::NotHere(why), _) => {
                if let Some(p) = existing.filter(|p| p.status_message.as_deref() != Some(why.as_str())) {
                    pause(policies, reporter, &p, v, why, claim_node.as_deref() == Some(node.as_str())).await;
                }
                continue;
            }
            (VolumePlace::Unsupported(why), _) => Some(("VolumeUnsupported", why.clone())),
            (_, Err(e)) => Some(("InvalidAnnotation", format!("annotation {}: {}", e.field, e.message))),
            (VolumePlace::Path(_), Ok(o)) => match super::profiles::apply(profiles, o) {
                super::profiles::Applied::Policy { opt_in, soda_profile } => {
                    profiled = Some((opt_in, soda_profile));
                    None
                }
                super::profiles::Applied::Problem { reason, message } => Some((reason, message)),
            },
        };
        if let Some((reason, message)) = problem {
            tracing::warn!(claim = %key, reason, %message, "claim opted in but not backed up as asked");
            reporter.claim_problem(&v.namespace, &v.claim, reason, &message);
            // A typo in an annotation (or a profile) keeps the last good
            // settings running; a volume that cannot be read, or a profile
            // that is gone, pauses its policy.
            if reason == "VolumeUnsupported" || super::profiles::PAUSING.contains(&reason) {
                if let Some(p) = existing.filter(|p| p.status_message.as_deref() != Some(message.as_str())) {
                    let _ = policies.set_status(&p.id, PolicyStatus::VolumeGone, Some(message));
                }
            }
            continue;
        }
        let (VolumePlace::Path(path), Ok(o)) = (&v.place, &v.opt_in) else { continue };
        let (o, profile) = match &profiled {
            Some((o, p)) => (&**o, p.as_deref()),
            None => (o, None),
        };
        let result = match &existing {
            None => wanted_spec(v, o, profile, path, false).map_err(|e| e.to_string()).and_then(|spec| {
                policies
                    .create(spec, Origin::Kubernetes, Some(v.pv.clone()), Some(format!("{KEY_PREFIX}{key}")))
                    .map(|p| (p, "BackupPolicyCreated"))
                    .map_err(|e| e.to_string())
            }),
            Some(p) => wanted_spec(v, o, profile, path, p.spec.paused).map_err(|e| e.to_string()).and_then(|spec| {
                let mut updated = if same(&p.spec, &spec) {
                    Ok((p.clone(), ""))
                } else {
                    policies
                        .replace(&p.id, spec, Origin::Kubernetes)
                        .map(|p| (p, "BackupPolicyUpdated"))
                        .map_err(|e| e.to_string())
                };
                if p.status != PolicyStatus::Active {
                    updated = updated.and_then(|(p, r)| {
                        policies.set_status(&p.id, PolicyStatus::Active, None).map_err(|e| e.to_string())?;
                        Ok((p, if r.is_empty() { "BackupPolicyResumed" } else { r }))
                    });
                }
                updated
            }),
        };
        match result {
            Ok((p, reason)) => {
                if !reason.is_empty() {
                    tracing::info!(claim = %key, policy = %p.id, reason, "claim's policy applied");
                }
                let p = store.get_policy(&p.id).unwrap_or(p);
                reporter.claim_active(&v.namespace, &v.claim, &p, reason);
            }
            Err(message) => {
                tracing::warn!(claim = %key, %message, "cannot make a policy for the claim");
                reporter.claim_problem(&v.namespace, &v.claim, "BackupPolicyRejected", &message);
            }
        }
    }
    // Policies whose claim is gone or no longer opts in.
    for (key, p) in ours {
        let (namespace, claim) = key.split_once('/').unwrap_or(("", &key));
        let why = if view.claim(&key).is_some() { "the claim no longer opts in" } else { "the claim was deleted" };
        if p.status_message.as_deref() == Some(why) {
            continue;
        }
        let v = DiscoveredVolume {
            namespace: namespace.into(),
            claim: claim.into(),
            pv: p.volume.clone().unwrap_or_default(),
            place: VolumePlace::NotHere(why.into()),
            opt_in: Err(FieldError::new("", "")),
        };
        let still_ours =
            view.claim(&key).is_some_and(|c| c.annotations.get(annotations::status_keys::NODE) == Some(&node));
        pause(policies, reporter, &p, &v, why, still_ours).await;
    }
    Ok(())
}

/// Pause (never delete) a policy whose claim is not backed up here any more.
async fn pause(
    policies: &Policies,
    reporter: &Reporter,
    p: &PolicyRecord,
    v: &DiscoveredVolume,
    why: &str,
    report: bool,
) {
    tracing::info!(policy = %p.id, claim = %format!("{}/{}", v.namespace, v.claim), why, "claim's policy paused");
    if let Err(e) = policies.set_status(&p.id, PolicyStatus::VolumeGone, Some(why.to_string())) {
        tracing::warn!(error = %e, "cannot pause the policy");
    }
    if report {
        reporter.claim_paused(&v.namespace, &v.claim, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm};

    fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn node_selectors_match_the_whole_term_not_only_the_hostname() {
        let labels: BTreeMap<String, String> = [("kubernetes.io/hostname", "host-a"), ("zone", "z1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let sel = |exprs: Vec<NodeSelectorRequirement>| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm { match_expressions: Some(exprs), match_fields: None }],
        };
        assert!(selector_matches(&sel(vec![req("kubernetes.io/hostname", "In", &["host-a"])]), "node-a", &labels));
        assert!(!selector_matches(&sel(vec![req("kubernetes.io/hostname", "In", &["host-b"])]), "node-a", &labels));
        assert!(!selector_matches(
            &sel(vec![req("kubernetes.io/hostname", "In", &["host-a"]), req("zone", "NotIn", &["z1"])]),
            "node-a",
            &labels
        ));
        assert!(selector_matches(&sel(vec![req("gpu", "DoesNotExist", &[])]), "node-a", &labels));
        let by_field = NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: None,
                match_fields: Some(vec![req("metadata.name", "In", &["node-a"])]),
            }],
        };
        assert!(selector_matches(&by_field, "node-a", &labels));
        assert!(!selector_matches(&by_field, "node-b", &labels));
        // An empty term matches nothing.
        assert!(!selector_matches(&sel(vec![]), "node-a", &labels));
    }
}
