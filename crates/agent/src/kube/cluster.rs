//! `soda-syncer cluster`: one answer for the whole cluster, read from the
//! API server alone, so it works while agents are down: every claim's
//! `soda-syncer.io/` annotations (what the agents wrote, see `status`), the
//! PersistentVolumes (block mode, the node a local volume lives on), the
//! StorageClasses (opt-in by class) and the agents' liveness Leases
//! (`soda-syncer-host-<hostname>`, annotated with their node). One row per
//! claim: protected or why not, node, policy, last success, deadline,
//! overdue, last state, consistency. The exit code is 0 only when no claim
//! is past its backup deadline.

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use soda_syncer_domain::annotations::{keys, parse_bool, status_keys};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use super::lease::{HOST_LEASE_PREFIX, LIVENESS_GRACE, NODE_ANNOTATION};

/// `soda-syncer cluster`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Only claims in this namespace [default: every namespace].
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The kubeconfig [default: $KUBECONFIG, else ~/.kube/config; in a pod without either, its service account].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context [default: its current context].
    #[arg(long)]
    pub context: Option<String>,
    /// The namespace the agents run in (their liveness Leases are there).
    #[arg(long, default_value = "soda-syncer")]
    pub agent_namespace: String,
    /// Ask an agent (`--server`, else this node's) for its `/v1/cluster`
    /// instead of the API server: for a machine with no kubeconfig.
    #[arg(long, conflicts_with_all = ["kubeconfig", "context"])]
    pub via_agent: bool,
}

/// Why a claim is not protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum WhyNot {
    /// No `soda-syncer.io/backup` or profile on the claim or its class, and
    /// no agent backs it up for another reason (legacy call, `/v1`).
    NotOptedIn,
    /// A Block-mode volume: a file backup cannot read it.
    BlockMode,
    /// Its node (or, with no pod and no node affinity, any node) has no agent.
    NoAgentOnItsNode,
    /// Its node's agent stopped or has not renewed its Lease.
    AgentGone,
    /// The agent on its node cannot back it up (it says why).
    Unsupported,
    /// Its policy is paused (by a user, or because its volume is gone).
    Paused,
    /// Opted in, its agent is up, and no policy yet (the agent is picking it up).
    Pending,
}

impl WhyNot {
    fn text(self) -> &'static str {
        match self {
            WhyNot::NotOptedIn => "not opted in",
            WhyNot::BlockMode => "block mode",
            WhyNot::NoAgentOnItsNode => "no agent on its node",
            WhyNot::AgentGone => "agent gone",
            WhyNot::Unsupported => "unsupported",
            WhyNot::Paused => "paused",
            WhyNot::Pending => "pending",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRow {
    pub namespace: String,
    pub name: String,
    pub protected: bool,
    pub why_not: Option<WhyNot>,
    /// What the agent says, when it says something (`soda-syncer.io/status`).
    pub detail: Option<String>,
    pub node: Option<String>,
    pub policy: Option<String>,
    pub last_success: Option<String>,
    pub deadline: Option<String>,
    pub overdue: bool,
    pub last_state: Option<String>,
    pub consistency: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRow {
    pub node: String,
    pub lease: String,
    pub alive: bool,
    pub renewed_at: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub claims: usize,
    pub protected: usize,
    pub overdue: usize,
    pub failing: usize,
    pub unprotected: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterReport {
    pub at: String,
    pub summary: Summary,
    pub claims: Vec<ClaimRow>,
    pub agents: Vec<AgentRow>,
}

impl ClusterReport {
    /// 0 when no claim is past its deadline (cron and CI use it), else 1.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.summary.overdue > 0)
    }

    pub fn summary_line(&self) -> String {
        let s = &self.summary;
        format!(
            "{} of {} claims protected, {} overdue, {} failing, {} unprotected",
            s.protected, s.claims, s.overdue, s.failing, s.unprotected
        )
    }
}

/// What the API server says, as read.
pub struct Inventory {
    pub claims: Vec<PersistentVolumeClaim>,
    pub volumes: Vec<PersistentVolume>,
    pub classes: Vec<StorageClass>,
    pub leases: Vec<Lease>,
}

async fn client(args: &ClusterArgs) -> anyhow::Result<kube::Client> {
    let opts = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
    let cfg = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("cannot read the kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &opts).await?
        }
        None => match kube::Config::from_kubeconfig(&opts).await {
            Ok(c) => c,
            Err(kc_err) => kube::Config::incluster().map_err(|_| {
                anyhow::anyhow!(
                    "no Kubernetes configuration: {kc_err}; give --kubeconfig, set KUBECONFIG, or run in a pod"
                )
            })?,
        },
    };
    Ok(kube::Client::try_from(cfg)?)
}

/// Every object of a list, page by page.
async fn list_all<K>(api: Api<K>) -> Result<Vec<K>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(5000);
    loop {
        let page = api.list(&params).await?;
        let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        out.extend(page.items);
        match next {
            Some(c) => params = params.continue_token(&c),
            None => return Ok(out),
        }
    }
}

/// Read claims, volumes, classes and the agents' Leases, all at once.
pub async fn inventory(args: &ClusterArgs) -> anyhow::Result<Inventory> {
    let c = client(args).await?;
    inventory_with(&c, args.namespace.as_deref(), &args.agent_namespace).await
}

/// [`inventory`] with a client at hand: claims of `namespace` (or all),
/// the agents' Leases from `agent_namespace`.
pub async fn inventory_with(
    c: &kube::Client,
    namespace: Option<&str>,
    agent_namespace: &str,
) -> anyhow::Result<Inventory> {
    let claims: Api<PersistentVolumeClaim> = match namespace {
        Some(ns) => Api::namespaced(c.clone(), ns),
        None => Api::all(c.clone()),
    };
    let what = |w: &'static str| move |e: kube::Error| anyhow::anyhow!("cannot list {w}: {e}");
    let (claims, volumes, classes, leases) = tokio::try_join!(
        async { list_all(claims).await.map_err(what("PersistentVolumeClaims")) },
        async { list_all(Api::<PersistentVolume>::all(c.clone())).await.map_err(what("PersistentVolumes")) },
        async { list_all(Api::<StorageClass>::all(c.clone())).await.map_err(what("StorageClasses")) },
        async {
            list_all(Api::<Lease>::namespaced(c.clone(), agent_namespace)).await.map_err(what("the agents' Leases"))
        },
    )?;
    Ok(Inventory { claims, volumes, classes, leases })
}

/// The agent's `GET /v1/cluster`: the same report as `soda-syncer cluster`,
/// read with the agent's own Kubernetes client (its service account).
#[derive(Clone)]
pub struct ClusterReader {
    client: kube::Client,
    agent_namespace: String,
}

impl ClusterReader {
    pub fn new(client: kube::Client, agent_namespace: String) -> ClusterReader {
        ClusterReader { client, agent_namespace }
    }

    /// Claims of `namespace` (or every namespace), as of now.
    pub async fn report(&self, namespace: Option<&str>) -> anyhow::Result<ClusterReport> {
        let inv = inventory_with(&self.client, namespace, &self.agent_namespace).await?;
        Ok(report(&inv, Utc::now()))
    }
}

fn time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// The node a local volume is pinned to (`kubernetes.io/hostname In [node]`).
fn pinned_node(pv: &PersistentVolume) -> Option<String> {
    let terms = &pv.spec.as_ref()?.node_affinity.as_ref()?.required.as_ref()?.node_selector_terms;
    terms.iter().flat_map(|t| t.match_expressions.iter().flatten()).find_map(|e| {
        (e.key == "kubernetes.io/hostname" && e.operator == "In").then(|| e.values.as_ref()?.first().cloned()).flatten()
    })
}

/// Opted in by `soda-syncer.io/backup` (or a profile) on the claim or its class.
fn opted_in(claim: &BTreeMap<String, String>, class: Option<&BTreeMap<String, String>>) -> bool {
    let says = |a: &BTreeMap<String, String>| a.get(keys::BACKUP).and_then(|v| parse_bool(keys::BACKUP, v).ok());
    match says(claim) {
        Some(b) => b,
        None => claim.contains_key(keys::PROFILE) || class.and_then(says).unwrap_or(false),
    }
}

/// The cluster's answer from what was read, at `now`.
pub fn report(inv: &Inventory, now: DateTime<Utc>) -> ClusterReport {
    let volumes: HashMap<String, &PersistentVolume> = inv.volumes.iter().map(|v| (v.name_any(), v)).collect();
    let classes: HashMap<String, &BTreeMap<String, String>> =
        inv.classes.iter().map(|c| (c.name_any(), c.annotations())).collect();
    let mut agents: Vec<AgentRow> = Vec::new();
    for l in inv.leases.iter().filter(|l| l.name_any().starts_with(HOST_LEASE_PREFIX)) {
        let Some(node) = l.annotations().get(NODE_ANNOTATION).cloned() else { continue };
        let spec = serde_json::to_value(&l.spec).unwrap_or_default();
        let holder = spec["holderIdentity"].as_str().unwrap_or("");
        let renewed = spec["renewTime"].as_str().and_then(time);
        let lasts = chrono::Duration::seconds(spec["leaseDurationSeconds"].as_i64().unwrap_or(0))
            + chrono::Duration::from_std(LIVENESS_GRACE).unwrap_or_default();
        let alive = !holder.is_empty() && renewed.is_some_and(|t| t + lasts >= now);
        agents.push(AgentRow { node, lease: l.name_any(), alive, renewed_at: renewed.map(|t| t.to_rfc3339()) });
    }
    agents.sort_by(|a, b| (&a.node, !a.alive).cmp(&(&b.node, !b.alive)));
    // A node counts as alive if any of its Leases is (a pod replaced keeps the old one a while).
    let mut node_alive: HashMap<&str, bool> = HashMap::new();
    for a in &agents {
        *node_alive.entry(a.node.as_str()).or_default() |= a.alive;
    }

    let mut rows = Vec::with_capacity(inv.claims.len());
    let mut sum = Summary::default();
    for c in &inv.claims {
        let ann = c.annotations();
        let get = |k: &str| ann.get(k).filter(|v| !v.is_empty()).cloned();
        let spec = c.spec.as_ref();
        let pv = spec.and_then(|s| s.volume_name.as_deref()).and_then(|v| volumes.get(v)).copied();
        let block = spec.and_then(|s| s.volume_mode.as_deref()) == Some("Block")
            || pv.and_then(|p| p.spec.as_ref()).and_then(|s| s.volume_mode.as_deref()) == Some("Block");
        let class = spec.and_then(|s| s.storage_class_name.as_deref()).and_then(|n| classes.get(n)).copied();
        let backed_by_agent = ann.contains_key(status_keys::POLICY);
        let status = get(status_keys::STATUS);
        let node = get(status_keys::NODE)
            .or_else(|| pv.and_then(pinned_node))
            .or_else(|| get("volume.kubernetes.io/selected-node"));
        let deadline = get(status_keys::BACKUP_DEADLINE);
        let overdue = deadline.as_deref().and_then(time).is_some_and(|d| d < now);
        let why_not = if block {
            Some(WhyNot::BlockMode)
        } else if !backed_by_agent && !opted_in(ann, class) {
            Some(WhyNot::NotOptedIn)
        } else {
            match node.as_deref().map(|n| node_alive.get(n).copied()) {
                None | Some(None) => Some(WhyNot::NoAgentOnItsNode),
                Some(Some(false)) => Some(WhyNot::AgentGone),
                Some(Some(true)) => match status.as_deref() {
                    Some(s) if s.starts_with("error:") => Some(WhyNot::Unsupported),
                    Some(s) if s.starts_with("paused") => Some(WhyNot::Paused),
                    _ if !backed_by_agent => Some(WhyNot::Pending),
                    _ => None,
                },
            }
        };
        let last_state = get(status_keys::LAST_BACKUP_STATE);
        let row = ClaimRow {
            namespace: c.namespace().unwrap_or_default(),
            name: c.name_any(),
            protected: why_not.is_none(),
            why_not,
            detail: status.filter(|s| s != "active"),
            node,
            policy: get(status_keys::POLICY_NAME).or_else(|| get(status_keys::POLICY)),
            last_success: get(status_keys::LAST_SUCCESS_TIME),
            deadline,
            overdue,
            consistency: get(status_keys::CONSISTENCY_USED).or_else(|| get(keys::CONSISTENCY)),
            last_state,
        };
        sum.claims += 1;
        sum.protected += usize::from(row.protected);
        sum.overdue += usize::from(row.overdue);
        sum.failing += usize::from(row.last_state.as_deref() == Some("failed"));
        rows.push(row);
    }
    sum.unprotected = sum.claims - sum.protected;
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    ClusterReport { at: now.to_rfc3339(), summary: sum, claims: rows, agents }
}

/// The table: one row per claim, then the summary line.
pub fn print_table(r: &ClusterReport) {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows = r
        .claims
        .iter()
        .map(|c| {
            vec![
                c.namespace.clone(),
                c.name.clone(),
                match c.why_not {
                    None => "yes".into(),
                    Some(w) => format!("no: {}", w.text()),
                },
                dash(&c.node),
                dash(&c.policy),
                dash(&c.last_success),
                dash(&c.deadline),
                if c.overdue { "OVERDUE".into() } else { "-".into() },
                dash(&c.last_state),
                dash(&c.consistency),
            ]
        })
        .collect();
    crate::output::table(
        &[
            "NAMESPACE",
            "CLAIM",
            "PROTECTED",
            "NODE",
            "POLICY",
            "LAST SUCCESS",
            "DEADLINE",
            "OVERDUE",
            "LAST STATE",
            "CONSISTENCY",
        ],
        rows,
    );
    println!("{}", r.summary_line());
}
