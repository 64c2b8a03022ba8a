//! `soda-syncer maintain`: the one process that holds the delete rights of
//! append-only repositories (see "Immutable backups" in the README). The
//! node agents write with credentials that cannot delete; this applies the
//! retention of every policy that writes to a repository (learned from the
//! agents' APIs, so no policy is configured twice), then prunes and checks
//! it, one repository at a time, holding the repository's maintenance Lease
//! when it runs in a cluster. It keeps no policies of its own.

use crate::restic::{Repo, Restic, ResticError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use soda_syncer_domain::location::without_userinfo;
use soda_syncer_domain::retention::Retention;
use soda_syncer_domain::Secret;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `soda-syncer maintain`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct MaintainArgs {
    /// The maintainer's configuration (YAML): the agents to ask for policies and this maintainer's credentials per repository.
    #[arg(long, env = "SODA_SYNCER_MAINTAINER_CONFIG")]
    pub config: PathBuf,
    /// One pass over every repository (forget, prune, check, whether due or not), then exit: 0 when all succeeded.
    #[arg(long)]
    pub once: bool,
    /// Serve /metrics and /healthz here (not with --once).
    #[arg(long, env = "SODA_SYNCER_MAINTAINER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The restic binary.
    #[arg(long, env = "SODA_SYNCER_RESTIC", default_value = "restic")]
    pub restic: PathBuf,
    /// restic's caches and the record of the last prune and check of each repository.
    #[arg(long, env = "SODA_SYNCER_MAINTAINER_STATE_DIR", default_value = "/var/lib/soda-syncer-maintainer")]
    pub state_dir: PathBuf,
    /// Hold each repository's maintenance Lease (soda-syncer-maint-…) in this namespace while working on it (in-cluster or --kubeconfig credentials).
    #[arg(long, env = "SODA_SYNCER_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Kubeconfig for --lease-namespace [default: in-cluster, else ~/.kube/config].
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "SODA_SYNCER_LOG_JSON")]
    pub log_json: bool,
}

/// The configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintainerFile {
    /// The node agents whose policies say what to keep.
    pub agents: Vec<AgentSource>,
    /// This maintainer's credentials for each repository it maintains.
    pub repositories: Vec<RepositoryCredentials>,
    #[serde(default = "default_prune_every")]
    pub prune_every_seconds: u64,
    #[serde(default = "default_check_every")]
    pub check_every_seconds: u64,
    #[serde(default)]
    pub check_read_data_subset: Option<String>,
    /// Start a repository's work only when none of its policies' backups is due within this many seconds.
    #[serde(default = "default_gap")]
    pub gap_seconds: u64,
    /// How often to look for due work.
    #[serde(default = "default_poll")]
    pub poll_seconds: u64,
    /// How long a prune waits for the backups that hold the repository's lock.
    #[serde(default = "default_lock_wait")]
    pub lock_wait_seconds: u64,
    /// Whatever an agent reports, keep every snapshot younger than this
    /// (restic's `--keep-within`, e.g. `30d`): a compromised node that
    /// reports `keepLast: 1` cannot make the maintainer delete its history.
    #[serde(default)]
    pub keep_within_at_least: Option<String>,
}

fn default_prune_every() -> u64 {
    86_400
}
fn default_check_every() -> u64 {
    7 * 86_400
}
fn default_gap() -> u64 {
    300
}
fn default_poll() -> u64 {
    60
}
fn default_lock_wait() -> u64 {
    600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSource {
    /// The agent's API, e.g. `https://node-a:50030`.
    pub url: String,
    /// A file with a bearer token of the agent's API (its first line).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify an https agent with.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The node this agent must say it runs on (its /v1/status `node`,
    /// restic's `--host` of its snapshots); a different answer fails.
    #[serde(default)]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepositoryCredentials {
    /// The repository as the agents' policies name it, without user and
    /// password: `rest:http://rest:8000/r/`, `s3:host/bucket/prefix`,
    /// `secret:NAMESPACE/NAME` or `soda-profile:ID`.
    pub agent_repository: String,
    /// This maintainer's URL of the same repository (with delete rights).
    /// A URL with a password in it goes in `urlFile`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// The restic password of the repository.
    pub password_file: PathBuf,
    /// Storage keys (AWS_*, B2_*, ...), each read from a file.
    #[serde(default)]
    pub env_files: BTreeMap<String, PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum MaintainerError {
    #[error("cannot read the maintainer's configuration {path}: {message}")]
    Config { path: String, message: String },
    #[error("cannot ask the agent at {url} for its policies: {message}")]
    Agent { url: String, message: String },
}

/// A policy as the agents' API shows it: only what the maintainer needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentPolicy {
    id: String,
    name: String,
    repository: AgentRepository,
    #[serde(default)]
    retention: Retention,
    #[serde(default)]
    paused: bool,
    #[serde(default)]
    next_run_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    maintenance_lease: Option<String>,
    /// Which of `agents` listed it.
    #[serde(skip)]
    agent: usize,
    /// That agent's node: the maintainer forgets only that host's snapshots.
    #[serde(skip)]
    node: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentRepository {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    secret_ref: Option<soda_syncer_domain::SecretRef>,
    #[serde(default)]
    soda_profile: Option<String>,
}

impl AgentRepository {
    /// The repository named the way `agentRepository` names it.
    fn ident(&self) -> Option<String> {
        match (&self.url, &self.secret_ref, &self.soda_profile) {
            (Some(u), _, _) => Some(without_userinfo(u)),
            (None, Some(r), _) => Some(format!("secret:{}/{}", r.namespace, r.name)),
            (None, None, Some(p)) => Some(format!("soda-profile:{p}")),
            // The agent's default repository: local to its node.
            (None, None, None) => None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RepoState {
    last_prune_at: Option<chrono::DateTime<chrono::Utc>>,
    last_check_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepoLabel {
    repository: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    repository: String,
    operation: String,
    kind: String,
}

#[derive(Default)]
struct Metrics {
    last_prune: Family<RepoLabel, Gauge>,
    last_check: Family<RepoLabel, Gauge>,
    last_forget: Family<RepoLabel, Gauge>,
    forgotten: Family<RepoLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    policies: Family<RepoLabel, Gauge>,
}

impl Metrics {
    fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "soda_syncer_repository_last_prune_timestamp",
            "When the maintainer last pruned the repository successfully, in Unix seconds (0: never).",
            self.last_prune.clone(),
        );
        r.register(
            "soda_syncer_repository_last_check_timestamp",
            "When the maintainer last checked the repository successfully, in Unix seconds (0: never).",
            self.last_check.clone(),
        );
        r.register(
            "soda_syncer_repository_last_retention_timestamp",
            "When the maintainer last applied the retention of every policy writing to the repository, in Unix seconds.",
            self.last_forget.clone(),
        );
        r.register(
            "soda_syncer_maintainer_snapshots_forgotten",
            "Snapshots the maintainer removed by the policies' retention.",
            self.forgotten.clone(),
        );
        r.register(
            "soda_syncer_maintainer_failures",
            "Failed maintainer operations (forget, prune, check, policies), by error kind.",
            self.failures.clone(),
        );
        r.register(
            "soda_syncer_maintainer_policies",
            "Policies (from the agents) writing to the repository at the last look.",
            self.policies.clone(),
        );
        r
    }

    fn failed(&self, repository: &str, operation: &str, kind: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                repository: repository.into(),
                operation: operation.into(),
                kind: kind.into(),
            })
            .inc();
    }
}

/// What `maintain` works with once started.
pub struct Maintainer {
    file: MaintainerFile,
    restic: Restic,
    http: reqwest::Client,
    state_path: PathBuf,
    state: BTreeMap<String, RepoState>,
    metrics: Arc<Metrics>,
    leases: Option<(kube::Client, String)>,
}

impl Maintainer {
    pub fn load(path: &Path) -> Result<MaintainerFile, MaintainerError> {
        let err = |message: String| MaintainerError::Config { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: MaintainerFile = serde_yaml_ng::from_str(&text).map_err(|e| err(e.to_string()))?;
        if file.repositories.is_empty() {
            return Err(err("repositories is empty: list each repository with this maintainer's credentials".into()));
        }
        for r in &file.repositories {
            if r.url.is_some() == r.url_file.is_some() {
                return Err(err(format!("repository {:?}: give exactly one of url and urlFile", r.agent_repository)));
            }
            if let Some(u) = &r.url {
                if soda_syncer_domain::secret::url_password(u).is_some() {
                    return Err(err(format!(
                        "repository {:?}: the url holds a password; put the URL in a file and name it in urlFile",
                        r.agent_repository
                    )));
                }
            }
            if let Some(k) = r
                .env_files
                .keys()
                .find(|k| !soda_syncer_domain::policy::ALLOWED_ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
            {
                return Err(err(format!(
                    "repository {:?}: envFiles.{k} is not a storage key (AWS_*, B2_*, AZURE_*, GOOGLE_*, OS_*, ST_*)",
                    r.agent_repository
                )));
            }
        }
        if let Some(w) = &file.keep_within_at_least {
            let ok = !w.is_empty()
                && w.split_inclusive(|c: char| c.is_ascii_alphabetic()).all(|part| {
                    let (num, unit) = part.split_at(part.len() - 1);
                    !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) && "ymdh".contains(unit)
                });
            if !ok {
                return Err(err(format!("keepWithinAtLeast {w:?} is not a restic duration such as 30d or 1y6m")));
            }
        }
        if file.agents.is_empty() {
            return Err(err("agents is empty: list the node agents whose policies write to these repositories".into()));
        }
        Ok(file)
    }

    pub async fn new(args: &MaintainArgs) -> anyhow::Result<Maintainer> {
        let file = Self::load(&args.config)?;
        std::fs::create_dir_all(args.state_dir.join("cache"))?;
        let restic = Restic::new(
            args.restic.clone(),
            args.state_dir.join("cache"),
            crate::restic::own_hostname(),
            Duration::from_secs(86_400),
        )
        .with_lock_wait(Duration::from_secs(file.lock_wait_seconds));
        restic.version().await?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60)).use_rustls_tls();
        for a in &file.agents {
            if let Some(ca) = &a.ca_file {
                let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("caFile {}: {e}", ca.display()))?;
                builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
            }
        }
        let leases = match &args.lease_namespace {
            Some(ns) => {
                let config = match &args.kubeconfig {
                    Some(p) => {
                        let kc = kube::config::Kubeconfig::read_from(p)?;
                        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
                    }
                    None => kube::Config::infer().await?,
                };
                Some((kube::Client::try_from(config)?, ns.clone()))
            }
            None => None,
        };
        let state_path = args.state_dir.join("maintainer-state.json");
        let state = std::fs::read(&state_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Ok(Maintainer { file, restic, http: builder.build()?, state_path, state, metrics: Arc::default(), leases })
    }

    /// Every policy of every agent. An agent that does not answer fails
    /// the whole look: retention applied from a partial list would be
    /// right, but a prune's timing would ignore that agent's backups.
    fn token(&self, a: &AgentSource) -> Result<Option<String>, String> {
        let Some(p) = &a.token_file else { return Ok(None) };
        let text = std::fs::read_to_string(p).map_err(|e| format!("tokenFile {}: {e}", p.display()))?;
        Ok(Some(text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or_default().into()))
    }

    /// The Lease name of a policy's repository: in the policy's own GET
    /// only (a listing does not unseal the URL it is derived from).
    async fn maintenance_lease(&self, p: &AgentPolicy) -> Result<String, MaintainerError> {
        let a = &self.file.agents[p.agent];
        let err = |message: String| MaintainerError::Agent { url: a.url.clone(), message };
        let mut req = self.http.get(format!("{}/v1/policies/{}", a.url.trim_end_matches('/'), p.id));
        if let Some(t) = self.token(a).map_err(err)? {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.map_err(|e| err(e.without_url().to_string()))?;
        if !r.status().is_success() {
            return Err(err(format!("the agent answered {} for policy {}", r.status(), p.name)));
        }
        let one: AgentPolicy = r.json().await.map_err(|e| err(e.without_url().to_string()))?;
        one.maintenance_lease
            .ok_or_else(|| err(format!("policy {} shows no maintenanceLease (an older agent?)", p.name)))
    }

    async fn policies(&self) -> Result<Vec<AgentPolicy>, MaintainerError> {
        let mut all = Vec::new();
        let mut nodes = std::collections::BTreeSet::new();
        for (i, a) in self.file.agents.iter().enumerate() {
            let err = |message: String| MaintainerError::Agent { url: a.url.clone(), message };
            let token = self.token(a).map_err(err)?;
            // Its node, the host of its snapshots: the maintainer forgets
            // only that host's, so an agent cannot name another node's.
            let mut req = self.http.get(format!("{}/v1/status", a.url.trim_end_matches('/')));
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.map_err(|e| err(e.without_url().to_string()))?;
            if !r.status().is_success() {
                return Err(err(format!("the agent answered {} for /v1/status", r.status())));
            }
            #[derive(Deserialize)]
            struct Status {
                node: String,
            }
            let node = r.json::<Status>().await.map_err(|e| err(e.without_url().to_string()))?.node;
            if a.node.as_ref().is_some_and(|want| *want != node) {
                return Err(err(format!("the agent says it runs on node {node:?}, not {:?} as configured", a.node)));
            }
            if node.is_empty() || !nodes.insert(node.clone()) {
                return Err(err(format!("a second agent says it runs on node {node:?}: refusing both's policies")));
            }
            let mut after = String::new();
            loop {
                let mut req = self
                    .http
                    .get(format!("{}/v1/policies", a.url.trim_end_matches('/')))
                    .query(&[("limit", "1000"), ("after", after.as_str())]);
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let r = req.send().await.map_err(|e| err(e.without_url().to_string()))?;
                if !r.status().is_success() {
                    return Err(err(format!("the agent answered {}", r.status())));
                }
                #[derive(Deserialize)]
                struct Page {
                    policies: Vec<AgentPolicy>,
                    #[serde(default)]
                    next: Option<String>,
                }
                let page: Page = r.json().await.map_err(|e| err(e.without_url().to_string()))?;
                all.extend(page.policies.into_iter().map(|p| AgentPolicy { agent: i, node: node.clone(), ..p }));
                match page.next {
                    Some(n) if !n.is_empty() => after = n,
                    _ => break,
                }
            }
        }
        Ok(all)
    }

    fn repo(&self, c: &RepositoryCredentials) -> Result<Repo, String> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read {} for the repository {}: {e}", p.display(), c.agent_repository))
        };
        let url = match (&c.url, &c.url_file) {
            (Some(u), _) => u.clone(),
            (None, Some(p)) => read(p)?,
            (None, None) => unreachable!("checked when loaded"),
        };
        let mut env = BTreeMap::new();
        for (k, p) in &c.env_files {
            env.insert(k.clone(), Secret::new(read(p)?));
        }
        Ok(Repo { url, password: Secret::new(read(&c.password_file)?), env })
    }

    /// One look at every repository: forget by each policy's retention,
    /// then prune and check when due (`force`: now, whether due or not).
    /// Returns whether everything that ran succeeded.
    pub async fn pass(&mut self, force: bool, cancel: &CancellationToken) -> bool {
        let policies = match self.policies().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot learn the policies; nothing maintained this time");
                self.metrics.failed("", "policies", "agent_unreachable");
                return false;
            }
        };
        let mut ok = true;
        for c in self.file.repositories.clone() {
            if cancel.is_cancelled() {
                return false;
            }
            let ident = without_userinfo(&c.agent_repository);
            let mine: Vec<&AgentPolicy> =
                policies.iter().filter(|p| p.repository.ident().as_deref() == Some(ident.as_str())).collect();
            self.metrics.policies.get_or_create(&RepoLabel { repository: ident.clone() }).set(mine.len() as i64);
            ok &= self.maintain_one(&c, &ident, &mine, force, cancel).await;
        }
        ok
    }

    async fn maintain_one(
        &mut self,
        c: &RepositoryCredentials,
        ident: &str,
        policies: &[&AgentPolicy],
        force: bool,
        cancel: &CancellationToken,
    ) -> bool {
        let now = chrono::Utc::now();
        let st = self.state.get(ident).cloned().unwrap_or_default();
        let due = |last: Option<chrono::DateTime<chrono::Utc>>, every: u64| {
            force || last.is_none_or(|t| now - t >= chrono::Duration::seconds(every as i64))
        };
        let (prune_due, check_due) = (
            due(st.last_prune_at, self.file.prune_every_seconds),
            due(st.last_check_at, self.file.check_every_seconds),
        );
        if !(prune_due || check_due) {
            return true;
        }
        // A gap between backups: no policy's next run within the gap (asked
        // for with --once, it goes now; restic's locks keep it safe anyway).
        if !force {
            let gap = chrono::Duration::seconds(self.file.gap_seconds as i64);
            if let Some(p) = policies.iter().find(|p| !p.paused && p.next_run_at.is_some_and(|t| t - now < gap)) {
                tracing::info!(repository = ident, policy = %p.name, "a backup is due soon; maintaining after it");
                return true;
            }
        }
        let repo = match self.repo(c) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(repository = ident, error = %e, "cannot read this maintainer's credentials");
                self.metrics.failed(ident, "credentials", "secrets_unavailable");
                return false;
            }
        };
        let _leases = match self.hold_leases(ident, policies).await {
            Some(l) => l,
            None => return true,
        };
        let label = RepoLabel { repository: ident.to_string() };
        let mut ok = true;
        // Retention first, so the prune frees what it removed.
        let mut forget_ok = true;
        let mut seen = std::collections::BTreeSet::new();
        for p in policies {
            if !seen.insert((&p.node, &p.id)) || p.retention.keeps_everything() {
                continue;
            }
            let mut keep = p.retention.forget_args();
            if let Some(w) = &self.file.keep_within_at_least {
                keep.extend(["--keep-within".to_string(), w.clone()]);
            }
            match self.restic.forget_on_host(&repo, &p.node, &format!("policy={}", p.id), &keep, cancel).await {
                Ok(groups) => {
                    let n: u64 = groups.iter().map(|g| g.removed().len() as u64).sum();
                    self.metrics.forgotten.get_or_create(&label).inc_by(n);
                    tracing::info!(repository = ident, policy = %p.name, forgotten = n, "applied the policy's retention");
                }
                Err(e) => {
                    forget_ok = false;
                    self.failed(ident, "forget", &e);
                }
            }
        }
        if forget_ok {
            self.metrics.last_forget.get_or_create(&label).set(chrono::Utc::now().timestamp());
        }
        ok &= forget_ok;
        let mut st = st;
        if prune_due {
            let started = std::time::Instant::now();
            match self.restic.prune(&repo, cancel).await {
                Ok(_) => {
                    st.last_prune_at = Some(chrono::Utc::now());
                    tracing::info!(repository = ident, seconds = started.elapsed().as_secs_f64(), "pruned");
                }
                Err(e) => {
                    ok = false;
                    self.failed(ident, "prune", &e);
                }
            }
        }
        if check_due {
            match self.restic.check(&repo, self.file.check_read_data_subset.as_deref(), cancel).await {
                Ok(_) => {
                    st.last_check_at = Some(chrono::Utc::now());
                    tracing::info!(repository = ident, "checked");
                }
                Err(e) => {
                    ok = false;
                    self.failed(ident, "check", &e);
                }
            }
        }
        let ts = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.timestamp()).unwrap_or(0);
        self.metrics.last_prune.get_or_create(&label).set(ts(st.last_prune_at));
        self.metrics.last_check.get_or_create(&label).set(ts(st.last_check_at));
        self.state.insert(ident.to_string(), st);
        self.save_state();
        ok
    }

    fn failed(&self, ident: &str, operation: &str, e: &ResticError) {
        tracing::warn!(repository = ident, operation, error = %e, "maintenance failed");
        self.metrics.failed(ident, operation, e.kind());
    }

    /// Each maintenance Lease the repository's policies name, held for the
    /// work (as an agent that maintains it would). `None`: another holder
    /// (an agent still maintaining it) has one; try again later.
    async fn hold_leases(&self, ident: &str, policies: &[&AgentPolicy]) -> Option<Vec<crate::kube::lease::LeaseLock>> {
        let Some((client, ns)) = &self.leases else { return Some(Vec::new()) };
        let mut names = std::collections::BTreeSet::new();
        for p in policies {
            match self.maintenance_lease(p).await {
                Ok(n) => {
                    names.insert(n);
                }
                Err(e) => {
                    // Unknown Lease: safer not to prune beside an agent that may.
                    tracing::warn!(repository = ident, error = %e, "cannot learn the repository's Lease; skipping it");
                    return None;
                }
            }
        }
        let holder = format!("maintainer-{}", crate::restic::own_hostname());
        let period = Duration::from_secs(self.file.prune_every_seconds.max(self.file.check_every_seconds) + 86_400);
        let mut held = Vec::new();
        for name in names {
            let lock = crate::kube::lease::LeaseLock::new(client.clone(), ns, &name, &holder, period);
            match lock.try_hold().await {
                Ok(true) => {
                    tracing::info!(repository = ident, lease = %name, "holding the repository's maintenance Lease");
                    held.push(lock)
                }
                Ok(false) => {
                    tracing::info!(repository = ident, lease = %name, holder = ?lock.last_holder(), "another maintainer holds the repository's Lease; skipping it");
                    return None;
                }
                Err(e) => {
                    // As the agents do: two maintainers are safe (restic's
                    // exclusive lock keeps prunes apart), none is not.
                    tracing::warn!(repository = ident, lease = %name, error = %e, "cannot ask who maintains the repository; maintaining it");
                }
            }
        }
        Some(held)
    }

    fn save_state(&self) {
        let tmp = self.state_path.with_extension("tmp");
        let written = serde_json::to_vec_pretty(&self.state)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|_| std::fs::rename(&tmp, &self.state_path));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %self.state_path.display(), "cannot record the last prune and check");
        }
    }

    fn metrics_router(&self) -> axum::Router {
        let metrics = self.metrics.clone();
        axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = metrics.clone();
                    async move {
                        let mut out = String::new();
                        let _ = prometheus_client::encoding::text::encode(&mut out, &metrics.registry());
                        ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
                    }
                }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok" }))
    }
}

/// `soda-syncer maintain`: returns the exit code.
pub async fn run(args: MaintainArgs, shutdown: CancellationToken) -> i32 {
    let mut m = match Maintainer::new(&args).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("soda-syncer maintain: {e:#}");
            return 2;
        }
    };
    if args.once {
        return if m.pass(true, &shutdown).await { 0 } else { 1 };
    }
    let mut server = None;
    if let Some(addr) = args.listen {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("soda-syncer maintain: cannot listen on {addr}: {e}");
                return 2;
            }
        };
        if let Ok(a) = listener.local_addr() {
            tracing::info!(address = %a, "serving /metrics and /healthz");
        }
        let router = m.metrics_router();
        let stop = shutdown.clone();
        server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
        }));
    }
    let poll = Duration::from_secs(m.file.poll_seconds.max(1));
    loop {
        m.pass(false, &shutdown).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(poll) => {}
        }
    }
    if let Some(s) = server {
        let _ = s.await;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_with_a_password_in_the_file_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        std::fs::write(
            &p,
            "agents: [{url: 'http://127.0.0.1:1'}]\nrepositories:\n- agentRepository: rest:http://h/r/\n  url: rest:http://admin:secret@h/r/\n  passwordFile: /x\n",
        )
        .unwrap();
        let e = Maintainer::load(&p).unwrap_err().to_string();
        assert!(e.contains("urlFile") && !e.contains("secret@"), "{e}");
    }

    #[test]
    fn a_retention_floor_must_be_a_restic_duration() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        let with = |w: &str| {
            std::fs::write(
                &p,
                format!("agents: [{{url: 'http://127.0.0.1:1'}}]\nrepositories:\n- agentRepository: /r\n  url: /r\n  passwordFile: /x\nkeepWithinAtLeast: {w:?}\n"),
            )
            .unwrap();
            Maintainer::load(&p)
        };
        assert!(with("30d").is_ok() && with("1y6m").is_ok() && with("48h").is_ok());
        for bad in ["30", "d", "30 days", "-1d", ""] {
            assert!(with(bad).unwrap_err().to_string().contains("keepWithinAtLeast"), "{bad}");
        }
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        std::fs::write(&p, "agents: []\nrepositories: []\npruneEvery: 1\n").unwrap();
        let e = Maintainer::load(&p).unwrap_err().to_string();
        assert!(e.contains("pruneEvery"), "{e}");
    }
}
