//! The compact copy of the cluster that this node's agent decides from:
//! the Pods of this node, every claim, PersistentVolume and StorageClass, and
//! this Node, each cut down to the few fields a decision needs. `discovery`
//! fills it from its watches; `discovery`, `status`, `profiles` and `exec`
//! read it.

use k8s_openapi::api::core::v1::NodeSelector;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use tokio::sync::Notify;

/// The prefix of the store key that ties a policy to its claim.
pub(super) const KEY_PREFIX: &str = "kube:";

#[derive(Debug, Clone, PartialEq)]
pub(super) struct PodInfo {
    pub(super) uid: String,
    pub(super) namespace: String,
    pub(super) active: bool,
    pub(super) claims: Vec<String>,
    /// For application hooks (`exec`): the pod's name, its first
    /// container, and its `pre.hook.`/`post.hook.soda-syncer.io/` annotations.
    pub(super) name: String,
    pub(super) first_container: String,
    pub(super) hooks: BTreeMap<String, String>,
}

/// A pod on this node that uses a claim, as application hooks need it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PodUser {
    pub namespace: String,
    pub name: String,
    pub first_container: String,
    pub hooks: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct ClaimInfo {
    pub uid: String,
    pub annotations: BTreeMap<String, String>,
    pub class: Option<String>,
    pub volume: Option<String>,
    pub bound: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum PvSource {
    Csi { driver: String },
    Local { path: String },
    HostPath { path: String },
    Other { plugin: String },
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct PvInfo {
    pub(super) source: PvSource,
    pub(super) block: bool,
    pub(super) affinity: Option<NodeSelector>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct ClassInfo {
    pub(super) annotations: BTreeMap<String, String>,
    pub(super) profile: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct NodeInfo {
    pub(super) labels: BTreeMap<String, String>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) pods: HashMap<String, PodInfo>,
    pub(super) claims: HashMap<String, ClaimInfo>,
    pub(super) pvs: HashMap<String, PvInfo>,
    pub(super) classes: HashMap<String, ClassInfo>,
    pub(super) node: HashMap<String, NodeInfo>,
    /// One bit per watch whose first list is complete.
    pub(super) synced: u8,
}
pub(super) const ALL_SYNCED: u8 = 0b11111;

/// The compact cluster view the reconciler decides from.
#[derive(Default)]
pub struct View {
    pub(super) state: Mutex<State>,
    /// Wakes the reconciler (a watch saw a change, or SODA's profiles did).
    pub(super) changed: Notify,
}

impl View {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub(super) fn claim(&self, key: &str) -> Option<ClaimInfo> {
        self.lock().claims.get(key).cloned()
    }
    /// The claim (`namespace/claim`) bound to a PersistentVolume.
    pub(super) fn claim_of_volume(&self, pv: &str) -> Option<String> {
        let st = self.lock();
        st.claims.iter().find(|(_, c)| c.volume.as_deref() == Some(pv)).map(|(k, _)| k.clone())
    }
    /// Every bound claim by its PersistentVolume, and every local or
    /// hostPath PersistentVolume by its path (for many lookups at once).
    pub(super) fn claim_index(&self) -> (HashMap<String, String>, HashMap<String, String>) {
        let st = self.lock();
        let by_volume = st.claims.iter().filter_map(|(k, c)| Some((c.volume.clone()?, k.clone()))).collect();
        let by_path = st
            .pvs
            .iter()
            .filter_map(|(k, v)| match &v.source {
                PvSource::Local { path } | PvSource::HostPath { path } => Some((path.clone(), k.clone())),
                _ => None,
            })
            .collect();
        (by_volume, by_path)
    }
    /// The local or hostPath PersistentVolume whose path on the node is `path`.
    pub(super) fn volume_at_path(&self, path: &str) -> Option<String> {
        let st = self.lock();
        st.pvs
            .iter()
            .find(
                |(_, v)| matches!(&v.source, PvSource::Local { path: p } | PvSource::HostPath { path: p } if p == path),
            )
            .map(|(k, _)| k.clone())
    }
    /// The running pods on this node that use a claim (`namespace/claim`), by name.
    pub(super) fn pods_using(&self, claim: &str) -> Vec<PodUser> {
        let (namespace, name) = claim.split_once('/').unwrap_or(("", claim));
        let mut out: Vec<PodUser> = self
            .lock()
            .pods
            .values()
            .filter(|p| p.active && p.namespace == namespace && p.claims.iter().any(|c| c == name))
            .map(|p| PodUser {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                first_container: p.first_container.clone(),
                hooks: p.hooks.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
