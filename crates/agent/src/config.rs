//! The agent's configuration: command-line flags, `SODA_SYNCER_*`
//! environment variables, an optional TOML file, then built-in defaults, in
//! that order of precedence.

use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Flags of `soda-syncer serve`. Every flag has an environment fallback.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// A TOML file with the same keys as the long flags (snake_case).
    #[arg(long, env = "SODA_SYNCER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:50030, the upstream port].
    #[arg(long, env = "SODA_SYNCER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the database, restic caches and the default repository live
    /// [default: /var/lib/soda-syncer as root, else $XDG_STATE_HOME/soda-syncer].
    #[arg(long, env = "SODA_SYNCER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// This node's name, used as restic's --host [default: $NODE_NAME, else the hostname].
    #[arg(long, env = "SODA_SYNCER_NODE_NAME")]
    pub node_name: Option<String>,
    /// The restic binary [default: restic from PATH].
    #[arg(long, env = "SODA_SYNCER_RESTIC")]
    pub restic: Option<PathBuf>,
    /// The kubelet's root directory, where CSI volumes are mounted [default: /var/lib/kubelet].
    #[arg(long, env = "SODA_SYNCER_KUBELET_DIR")]
    pub kubelet_dir: Option<PathBuf>,
    /// Also allow sources and restore targets below these directories (repeat, or comma-separated); the kubelet directory is always allowed.
    #[arg(long = "allowed-root", env = "SODA_SYNCER_ALLOWED_ROOTS", value_delimiter = ',')]
    pub allowed_roots: Vec<PathBuf>,
    /// How many runs may execute at once; the rest wait in order [default: 2].
    #[arg(long, env = "SODA_SYNCER_MAX_CONCURRENT_RUNS")]
    pub max_concurrent_runs: Option<usize>,
    /// How often to look for CSI volumes that appeared or went away [default: 30].
    #[arg(long, env = "SODA_SYNCER_RESCAN_SECONDS")]
    pub rescan_seconds: Option<u64>,
    /// Repository for policies that name none [default: a local repository in the state directory].
    #[arg(long, env = "SODA_SYNCER_DEFAULT_REPOSITORY")]
    pub default_repository: Option<String>,
    /// Longest a single restic command may run before it is killed [default: 86400].
    #[arg(long, env = "SODA_SYNCER_RUN_TIMEOUT_SECONDS")]
    pub run_timeout_seconds: Option<u64>,
    /// Stop a run whose repository restic has kept retrying for this long [default: 300].
    #[arg(long, env = "SODA_SYNCER_REPOSITORY_TIMEOUT_SECONDS")]
    pub repository_timeout_seconds: Option<u64>,
    /// Prune each repository this often [default: 604800, weekly].
    #[arg(long, env = "SODA_SYNCER_PRUNE_EVERY_SECONDS")]
    pub prune_every_seconds: Option<u64>,
    /// Check each repository this often [default: 604800, weekly].
    #[arg(long, env = "SODA_SYNCER_CHECK_EVERY_SECONDS")]
    pub check_every_seconds: Option<u64>,
    /// Every repository this agent writes refuses its deletes (append-only credentials): never forget or prune, leave retention to `soda-syncer maintain`.
    #[arg(long, env = "SODA_SYNCER_APPEND_ONLY")]
    pub append_only: bool,
    /// This repository refuses the agent's deletes (its URL without user and password, or secret:NS/NAME, soda-profile:ID); repeat or separate with commas.
    #[arg(long = "append-only-repository", env = "SODA_SYNCER_APPEND_ONLY_REPOSITORIES", value_delimiter = ',')]
    pub append_only_repositories: Vec<String>,
    /// Scheduled checks also read this much data (e.g. 5%, 1/10, 500M) [default: structure only].
    #[arg(long, env = "SODA_SYNCER_CHECK_READ_DATA_SUBSET")]
    pub check_read_data_subset: Option<String>,
    /// Spread each repository's maintenance by up to this many seconds [default: 3600].
    #[arg(long, env = "SODA_SYNCER_MAINTENANCE_JITTER_SECONDS")]
    pub maintenance_jitter_seconds: Option<u64>,
    /// Start a prune or check only when no backup of the repository runs or is due within this many seconds [default: 300].
    #[arg(long, env = "SODA_SYNCER_MAINTENANCE_GAP_SECONDS")]
    pub maintenance_gap_seconds: Option<u64>,
    /// Keep this many finished runs per policy in the database [default: 1000].
    #[arg(long, env = "SODA_SYNCER_KEEP_RUNS")]
    pub keep_runs: Option<usize>,
    /// Bearer tokens for /v1, one per line, re-read when the file changes [default: <state-dir>/token, created at first start].
    #[arg(long, env = "SODA_SYNCER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// How the legacy POST /snapshot is guarded: from allowed networks only, with the token, or not at all [default: network].
    #[arg(long, env = "SODA_SYNCER_LEGACY", value_enum)]
    pub legacy: Option<LegacyMode>,
    /// Networks allowed to call the legacy route (repeat, or comma-separated) [default: 127.0.0.0/8, ::1/128].
    #[arg(long = "legacy-allow-cidr", env = "SODA_SYNCER_LEGACY_ALLOW_CIDRS", value_delimiter = ',')]
    pub legacy_allow_cidrs: Vec<String>,
    /// Key that seals repository secrets in the database (64 hex digits) [default: <state-dir>/secrets.key, created at first start].
    #[arg(long, env = "SODA_SYNCER_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM); re-read when it changes.
    #[arg(long, env = "SODA_SYNCER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) for --tls-cert.
    #[arg(long, env = "SODA_SYNCER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// An executable that policies may run as a consistency hook, by this
    /// absolute path (repeat, or comma-separated). Unset: hooks are refused.
    #[arg(long = "hook-allow", env = "SODA_SYNCER_HOOK_ALLOW", value_delimiter = ',')]
    pub hook_allow: Vec<PathBuf>,
    /// A directory below which local restic repositories may lie, besides
    /// the state directory (repeat, or comma-separated).
    #[arg(long = "repository-root", env = "SODA_SYNCER_REPOSITORY_ROOTS", value_delimiter = ',')]
    pub repository_roots: Vec<PathBuf>,
    /// Kill a consistency hook that runs longer than this [default: 60].
    #[arg(long, env = "SODA_SYNCER_HOOK_TIMEOUT_SECONDS")]
    pub hook_timeout_seconds: Option<u64>,
    /// Close a connection whose request headers, or whose request body, take longer than this to arrive [default: 20].
    #[arg(long, env = "SODA_SYNCER_REQUEST_READ_TIMEOUT_SECONDS")]
    pub request_read_timeout_seconds: Option<u64>,
    /// A policy's backup deadline (metrics) is its next slot plus jitter plus this [default: one period of its schedule].
    #[arg(long, env = "SODA_SYNCER_DEADLINE_GRACE_SECONDS")]
    pub deadline_grace_seconds: Option<u64>,
    /// A scheduled backup of a volume proven unchanged (see the policy's
    /// verifyUnchanged) still runs restic when the last real backup is this
    /// old: 24h, 90m, 3600s or 2d [default: 24h].
    #[arg(long, env = "SODA_SYNCER_FULL_BACKUP_EVERY", value_parser = parse_full_backup_every)]
    pub full_backup_every: Option<Duration>,
    /// Log lines as JSON instead of text.
    #[arg(long, env = "SODA_SYNCER_LOG_JSON")]
    pub log_json: bool,
    /// When another agent holds the state directory, wait for it to exit
    /// (not ready meanwhile) instead of exiting with code 75.
    #[arg(long, env = "SODA_SYNCER_WAIT_FOR_STATE_LOCK")]
    pub wait_for_state_lock: bool,
    /// The whole time a stop may take, SIGTERM to exit: set it to the pod's
    /// terminationGracePeriodSeconds. Runs get this minus a margin (10 s,
    /// or half of it when shorter) to stop [default: 30].
    #[arg(long, env = "SODA_SYNCER_SHUTDOWN_GRACE_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_grace_seconds: Option<u64>,
    /// Kubernetes discovery of annotated claims: `auto` uses the in-cluster
    /// service account inside a pod (or --kubeconfig if given), `on`
    /// requires one of them, `off` never connects [default: auto].
    #[arg(long, env = "SODA_SYNCER_KUBERNETES", value_enum)]
    pub kubernetes: Option<KubeMode>,
    /// A kubeconfig file to use outside a cluster (never read implicitly).
    #[arg(long, env = "SODA_SYNCER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace the agent runs in, for its own objects [default: $POD_NAMESPACE, else soda-syncer].
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// The SODA API server (hotpot), e.g. http://soda:50040: mirror CSI
    /// volumes there and take backup policy from its profiles (needs
    /// Kubernetes). Auth from OPENSDS_AUTH_STRATEGY, OPENSDS_TENANT_ID and
    /// the OS_* variables [default: off].
    #[arg(long, env = "OPENSDS_ENDPOINT")]
    pub soda_endpoint: Option<String>,
    /// How often SODA's profiles are read and its volumes brought up to
    /// date, 1 to 3600 [default: 30].
    #[arg(long, env = "SODA_SYNCER_SODA_POLL_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub soda_poll_seconds: Option<u64>,
}

/// Whether to connect to a Kubernetes API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeMode {
    #[default]
    Auto,
    On,
    Off,
}

/// The same keys in a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    node_name: Option<String>,
    restic: Option<PathBuf>,
    kubelet_dir: Option<PathBuf>,
    allowed_roots: Option<Vec<PathBuf>>,
    max_concurrent_runs: Option<usize>,
    rescan_seconds: Option<u64>,
    default_repository: Option<String>,
    run_timeout_seconds: Option<u64>,
    repository_timeout_seconds: Option<u64>,
    prune_every_seconds: Option<u64>,
    check_every_seconds: Option<u64>,
    check_read_data_subset: Option<String>,
    append_only: Option<bool>,
    append_only_repositories: Option<Vec<String>>,
    maintenance_jitter_seconds: Option<u64>,
    maintenance_gap_seconds: Option<u64>,
    keep_runs: Option<usize>,
    hook_allow: Option<Vec<PathBuf>>,
    repository_roots: Option<Vec<PathBuf>>,
    hook_timeout_seconds: Option<u64>,
    token_file: Option<PathBuf>,
    secrets_key_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    legacy: Option<LegacyMode>,
    legacy_allow_cidrs: Option<Vec<String>>,
    kubernetes: Option<KubeMode>,
    kubeconfig: Option<PathBuf>,
    namespace: Option<String>,
    request_read_timeout_seconds: Option<u64>,
    deadline_grace_seconds: Option<u64>,
    #[serde(default, deserialize_with = "full_backup_every_from_file")]
    full_backup_every: Option<Duration>,
    soda_endpoint: Option<String>,
    soda_poll_seconds: Option<u64>,
    wait_for_state_lock: Option<bool>,
    shutdown_grace_seconds: Option<u64>,
}

/// The resolved configuration the daemon runs with. Tests build it directly.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub node_name: String,
    pub restic: PathBuf,
    pub kubelet_dir: PathBuf,
    pub allowed_roots: Vec<PathBuf>,
    pub max_concurrent_runs: usize,
    pub rescan_interval: Duration,
    pub default_repository: Option<String>,
    pub run_timeout: Duration,
    /// How long restic may keep retrying an unreachable repository.
    pub repository_timeout: Duration,
    pub prune_every: Duration,
    pub check_every: Duration,
    pub check_read_data_subset: Option<String>,
    /// Every repository of this agent is append-only (`--append-only`).
    pub append_only: bool,
    /// These repositories are (`--append-only-repository`).
    pub append_only_repositories: Vec<String>,
    pub maintenance_jitter: Duration,
    /// A prune or check waits for a gap this long between the repository's backups.
    pub maintenance_gap: Duration,
    /// Finished runs kept per policy.
    pub keep_runs: usize,
    pub token_file: Option<PathBuf>,
    pub secrets_key_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub legacy: LegacyMode,
    pub legacy_allow_cidrs: Vec<Cidr>,
    /// Executables policies may name as consistency hooks.
    pub hook_allow: Vec<PathBuf>,
    /// Where local repositories may lie besides the state directory.
    pub repository_roots: Vec<PathBuf>,
    pub hook_timeout: Duration,
    /// A backup whose file count or size falls by more than this fraction
    /// against the last good one is `suspicious`.
    pub suspicious_drop_fraction: f64,
    pub kubernetes: KubeMode,
    pub kubeconfig: Option<PathBuf>,
    pub kubelet_dir_source: crate::kubelet::RootSource,
    /// The agent's own namespace (legacy fan-out Secrets live there).
    pub namespace: String,
    /// This pod's name, for the events' reporting instance.
    pub pod_name: Option<String>,
    /// The whole time a stop may take, from SIGTERM to exit (the pod's
    /// terminationGracePeriodSeconds); see [`Config::run_stop_grace`].
    pub shutdown_grace: Duration,
    /// Wait for the state directory lock instead of exiting when another
    /// agent holds it.
    pub wait_for_state_lock: bool,
    /// Only CSI volume directories that are mount points count as volumes.
    pub require_mountpoints: bool,
    /// How long a client may take to send a request's headers, and
    /// (counted from then) its body.
    pub request_read_timeout: Duration,
    /// Added to a policy's next slot and jitter to give its backup
    /// deadline; `None`: one period of its schedule.
    pub deadline_grace: Option<Duration>,
    /// The longest a policy goes without a real restic backup while its
    /// volume is proven unchanged.
    pub full_backup_every: Duration,
    /// The SODA API server; `None`: no SODA sync.
    pub soda_endpoint: Option<String>,
    /// How often SODA's profiles are polled and its volumes synced.
    pub soda_poll: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the config file {path} is not valid TOML for soda-syncer: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Defaults for a given state directory: what tests and `serve` without
    /// flags start from.
    pub fn with_state_dir(state_dir: PathBuf) -> Config {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 50030)),
            state_dir,
            node_name: default_node_name(),
            restic: PathBuf::from("restic"),
            kubelet_dir: PathBuf::from("/var/lib/kubelet"),
            allowed_roots: Vec::new(),
            max_concurrent_runs: 2,
            rescan_interval: Duration::from_secs(30),
            default_repository: None,
            run_timeout: Duration::from_secs(86400),
            repository_timeout: Duration::from_secs(300),
            prune_every: Duration::from_secs(7 * 86400),
            check_every: Duration::from_secs(7 * 86400),
            check_read_data_subset: None,
            append_only: false,
            append_only_repositories: Vec::new(),
            maintenance_jitter: Duration::from_secs(3600),
            maintenance_gap: Duration::from_secs(300),
            keep_runs: 1000,
            token_file: None,
            secrets_key_file: None,
            tls_cert: None,
            tls_key: None,
            legacy: LegacyMode::Network,
            legacy_allow_cidrs: vec!["127.0.0.0/8".parse().expect("static"), "::1/128".parse().expect("static")],
            hook_allow: Vec::new(),
            repository_roots: Vec::new(),
            hook_timeout: Duration::from_secs(60),
            suspicious_drop_fraction: 0.5,
            kubernetes: KubeMode::Off,
            kubeconfig: None,
            kubelet_dir_source: crate::kubelet::RootSource::Configured,
            namespace: "soda-syncer".into(),
            pod_name: std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()),
            shutdown_grace: Duration::from_secs(30),
            wait_for_state_lock: false,
            require_mountpoints: true,
            request_read_timeout: Duration::from_secs(20),
            deadline_grace: None,
            full_backup_every: Duration::from_secs(24 * 3600),
            soda_endpoint: None,
            soda_poll: Duration::from_secs(30),
        }
    }

    pub fn from_args(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.message().to_string() })?
            }
            None => FileConfig::default(),
        };
        let state_dir = args.state_dir.clone().or(file.state_dir).unwrap_or_else(default_state_dir);
        let mut c = Config::with_state_dir(state_dir);
        if let Some(v) = args.listen.or(file.listen) {
            c.listen = v;
        }
        if let Some(v) = args.node_name.clone().or(file.node_name) {
            c.node_name = v;
        }
        if let Some(v) = args.restic.clone().or(file.restic) {
            c.restic = v;
        }
        match args.kubelet_dir.clone().or(file.kubelet_dir) {
            Some(v) => c.kubelet_dir = v,
            None => match crate::kubelet::detect_root(&crate::kubelet::KNOWN_ROOTS) {
                Some((root, distribution)) => {
                    c.kubelet_dir = root;
                    c.kubelet_dir_source = crate::kubelet::RootSource::Detected(distribution);
                }
                None => c.kubelet_dir_source = crate::kubelet::RootSource::Default,
            },
        }
        c.allowed_roots = if args.allowed_roots.is_empty() {
            file.allowed_roots.unwrap_or_default()
        } else {
            args.allowed_roots.clone()
        };
        if let Some(v) = args.max_concurrent_runs.or(file.max_concurrent_runs) {
            c.max_concurrent_runs = v;
        }
        if let Some(v) = args.rescan_seconds.or(file.rescan_seconds) {
            c.rescan_interval = Duration::from_secs(v);
        }
        c.default_repository = args.default_repository.clone().or(file.default_repository);
        c.append_only = args.append_only || file.append_only.unwrap_or(false);
        c.append_only_repositories = if args.append_only_repositories.is_empty() {
            file.append_only_repositories.unwrap_or_default()
        } else {
            args.append_only_repositories.clone()
        };
        if let Some(v) = args.run_timeout_seconds.or(file.run_timeout_seconds) {
            c.run_timeout = Duration::from_secs(v);
        }
        if let Some(v) = args.repository_timeout_seconds.or(file.repository_timeout_seconds) {
            c.repository_timeout = Duration::from_secs(v);
        }
        if let Some(v) = args.prune_every_seconds.or(file.prune_every_seconds) {
            c.prune_every = Duration::from_secs(v);
        }
        if let Some(v) = args.check_every_seconds.or(file.check_every_seconds) {
            c.check_every = Duration::from_secs(v);
        }
        c.check_read_data_subset = args.check_read_data_subset.clone().or(file.check_read_data_subset);
        if let Some(v) = args.maintenance_gap_seconds.or(file.maintenance_gap_seconds) {
            c.maintenance_gap = Duration::from_secs(v);
        }
        if let Some(v) = args.maintenance_jitter_seconds.or(file.maintenance_jitter_seconds) {
            c.maintenance_jitter = Duration::from_secs(v);
        }
        if let Some(v) = args.keep_runs.or(file.keep_runs) {
            c.keep_runs = v;
        }
        c.token_file = args.token_file.clone().or(file.token_file);
        c.secrets_key_file = args.secrets_key_file.clone().or(file.secrets_key_file);
        c.tls_cert = args.tls_cert.clone().or(file.tls_cert);
        c.tls_key = args.tls_key.clone().or(file.tls_key);
        if let Some(v) = args.legacy.clone().or(file.legacy) {
            c.legacy = v;
        }
        let cidrs = if args.legacy_allow_cidrs.is_empty() {
            file.legacy_allow_cidrs
        } else {
            Some(args.legacy_allow_cidrs.clone())
        };
        if let Some(list) = cidrs {
            c.legacy_allow_cidrs = list
                .iter()
                .map(|s| {
                    s.trim().parse().map_err(|e: String| ConfigError::Invalid(format!("--legacy-allow-cidr: {e}")))
                })
                .collect::<Result<_, _>>()?;
        }
        c.hook_allow =
            if args.hook_allow.is_empty() { file.hook_allow.unwrap_or_default() } else { args.hook_allow.clone() };
        c.repository_roots = if args.repository_roots.is_empty() {
            file.repository_roots.unwrap_or_default()
        } else {
            args.repository_roots.clone()
        };
        if let Some(v) = args.hook_timeout_seconds.or(file.hook_timeout_seconds) {
            c.hook_timeout = Duration::from_secs(v);
        }
        c.kubernetes = args.kubernetes.or(file.kubernetes).unwrap_or_default();
        c.kubeconfig = args.kubeconfig.clone().or(file.kubeconfig);
        if let Some(v) = args.namespace.clone().or(file.namespace) {
            c.namespace = v;
        }
        if let Some(v) = args.request_read_timeout_seconds.or(file.request_read_timeout_seconds) {
            c.request_read_timeout = Duration::from_secs(v);
        }
        c.deadline_grace = args.deadline_grace_seconds.or(file.deadline_grace_seconds).map(Duration::from_secs);
        if let Some(v) = args.full_backup_every.or(file.full_backup_every) {
            c.full_backup_every = v;
        }
        c.soda_endpoint =
            args.soda_endpoint.clone().or(file.soda_endpoint).map(|e| e.trim().to_string()).filter(|e| !e.is_empty());
        if let Some(v) = args.soda_poll_seconds.or(file.soda_poll_seconds) {
            c.soda_poll = Duration::from_secs(v);
        }
        c.wait_for_state_lock = args.wait_for_state_lock || file.wait_for_state_lock.unwrap_or(false);
        if let Some(v) = args.shutdown_grace_seconds.or(file.shutdown_grace_seconds) {
            c.shutdown_grace = Duration::from_secs(v);
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.max_concurrent_runs) {
            return Err(ConfigError::Invalid(format!(
                "--max-concurrent-runs must be between 1 and 64; got {}",
                self.max_concurrent_runs
            )));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid("--tls-cert and --tls-key go together".into()));
        }
        if self.keep_runs == 0 {
            return Err(ConfigError::Invalid("--keep-runs must be at least 1".into()));
        }
        if self.prune_every.is_zero() || self.check_every.is_zero() {
            return Err(ConfigError::Invalid(
                "--prune-every-seconds and --check-every-seconds must be at least 1".into(),
            ));
        }
        if self.rescan_interval.is_zero() {
            return Err(ConfigError::Invalid("--rescan-seconds must be at least 1".into()));
        }
        if self.node_name.is_empty() || self.node_name.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid(
                "the node name is empty or has spaces: set --node-name or NODE_NAME".into(),
            ));
        }
        if !soda_syncer_domain::field::is_dns_subdomain(&self.namespace) {
            return Err(ConfigError::Invalid(format!(
                "--namespace {:?} is not a Kubernetes namespace name",
                self.namespace
            )));
        }
        if self.kubernetes == KubeMode::Off && self.kubeconfig.is_some() {
            return Err(ConfigError::Invalid("--kubeconfig was given but --kubernetes is off".into()));
        }
        if let Some(r) = self.repository_roots.iter().find(|r| !r.is_absolute()) {
            return Err(ConfigError::Invalid(format!("--repository-root {} must be an absolute path", r.display())));
        }
        if let Some(h) = self.hook_allow.iter().find(|h| !h.is_absolute()) {
            return Err(ConfigError::Invalid(format!("--hook-allow {} must be an absolute path", h.display())));
        }
        if self.request_read_timeout.is_zero() {
            return Err(ConfigError::Invalid("--request-read-timeout-seconds must be at least 1".into()));
        }
        if !(1..=3600).contains(&self.soda_poll.as_secs()) {
            return Err(ConfigError::Invalid("--soda-poll-seconds must be between 1 and 3600".into()));
        }
        if let Some(e) = &self.soda_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "--soda-endpoint {:?} is not an http:// or https:// URL",
                    soda_syncer_domain::secret::redact_url(e)
                )));
            }
        }
        if self.hook_timeout.is_zero() {
            return Err(ConfigError::Invalid("--hook-timeout-seconds must be at least 1".into()));
        }
        if !(1..=3600).contains(&self.shutdown_grace.as_secs()) {
            return Err(ConfigError::Invalid(format!(
                "--shutdown-grace-seconds must be between 1 and 3600 (the pod's terminationGracePeriodSeconds); got {}",
                self.shutdown_grace.as_secs()
            )));
        }
        for root in &self.allowed_roots {
            if !root.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "--allowed-root {} must be an absolute path",
                    root.display()
                )));
            }
        }
        Ok(())
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }
    /// How long a stop waits for running runs to end (restic gets SIGINT at
    /// once, SIGKILL 5 s later) before it gives up on them: the shutdown
    /// grace minus what the steps after them need (closing the database,
    /// releasing snapshots, draining HTTP for up to 5 s), so the whole stop
    /// ends before Kubernetes kills the pod.
    pub fn run_stop_grace(&self) -> Duration {
        self.shutdown_grace - (self.shutdown_grace / 2).min(SHUTDOWN_MARGIN)
    }
    /// What the consistency methods follow of this configuration.
    pub fn consistency(&self) -> crate::consistency::Settings {
        crate::consistency::Settings {
            hook_allow: self.hook_allow.clone(),
            hook_timeout: self.hook_timeout,
            state_dir: self.state_dir.clone(),
        }
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.state_dir.join("cache")
    }
    pub fn local_repository(&self) -> PathBuf {
        self.state_dir.join("repository")
    }
    pub fn local_repository_password_file(&self) -> PathBuf {
        self.state_dir.join("repository.password")
    }
    /// Where sources and restore targets may lie: the kubelet directory
    /// (where volumes are) and the roots the operator listed.
    pub fn allowed_roots_in_effect(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.kubelet_dir.clone()];
        roots.extend(self.allowed_roots.iter().cloned());
        roots
    }
    /// Where local restic repositories may lie: the state directory and
    /// the roots the operator listed.
    pub fn repository_roots_in_effect(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.state_dir.clone()];
        roots.extend(self.repository_roots.iter().cloned());
        roots
    }
    /// The key that seals secrets in the database.
    pub fn secrets_key_path(&self) -> PathBuf {
        self.secrets_key_file.clone().unwrap_or_else(|| self.state_dir.join("secrets.key"))
    }
    /// The bearer token file.
    pub fn token_path(&self) -> PathBuf {
        self.token_file.clone().unwrap_or_else(|| token_file(&self.state_dir))
    }
    /// Where restores go when a request names no target.
    pub fn restore_dir(&self) -> PathBuf {
        self.state_dir.join("restores")
    }
    /// Where a running agent writes the URL it serves on, for the CLI.
    pub fn url_file(&self) -> PathBuf {
        url_file(&self.state_dir)
    }
}

/// What a stop keeps back, after its runs ended, for the steps that follow.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(10);

/// Where the agent keeps its generated API token.
pub fn token_file(state_dir: &Path) -> PathBuf {
    state_dir.join("token")
}

pub fn url_file(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.url")
}

pub fn default_state_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/soda-syncer");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("soda-syncer");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/soda-syncer")
}

fn default_node_name() -> String {
    if let Some(n) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
        return n;
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..end]) {
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    "localhost".into()
}

/// How the legacy route is guarded (enforced by `http::auth`).
#[derive(Debug, Clone, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LegacyMode {
    /// Refuse `POST /snapshot`.
    Off,
    /// Accept it from `--legacy-allow-cidr` networks only.
    Network,
    /// Require the bearer token, like `/v1`.
    Token,
}

/// An IP network such as `10.244.0.0/16` or `::1/128`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not an address or network (e.g. 10.244.0.0/16)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() { max } else { p.parse().map_err(|_| format!("{s:?}: bad prefix length"))? };
        if prefix > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_their_networks_only() {
        let net: Cidr = "10.244.0.0/16".parse().unwrap();
        assert!(net.contains("10.244.3.4".parse().unwrap()));
        assert!(!net.contains("10.245.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.244.0.9".parse().unwrap()), "v4-mapped v6 peers");
        let lo: Cidr = "::1/128".parse().unwrap();
        assert!(lo.contains("::1".parse().unwrap()));
        assert!(!lo.contains("127.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        assert_eq!("192.168.1.7".parse::<Cidr>().unwrap().to_string(), "192.168.1.7/32");
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\nmax_concurrent_runs = 5\nnode_name = \"from-file\"\n")
            .unwrap();
        let args = ServeArgs {
            config: Some(file),
            node_name: Some("from-flag".into()),
            state_dir: Some(dir.path().into()),
            ..Default::default()
        };
        let c = Config::from_args(&args).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.max_concurrent_runs, 5);
        assert_eq!(c.node_name, "from-flag");
        assert_eq!(c.kubelet_dir, PathBuf::from("/var/lib/kubelet"));
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::from_args(&ServeArgs { config: Some(file), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn runs_get_the_shutdown_grace_less_a_margin_that_never_takes_more_than_half() {
        let mut c = Config::with_state_dir("/x".into());
        for (grace, runs) in [(30, 20.0), (60, 50.0), (10, 5.0), (1, 0.5)] {
            c.shutdown_grace = Duration::from_secs(grace);
            assert_eq!(c.run_stop_grace().as_secs_f64(), runs, "grace {grace}");
        }
    }

    #[test]
    fn the_shutdown_grace_and_the_lock_wait_come_from_the_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "wait_for_state_lock = true\nshutdown_grace_seconds = 60\n").unwrap();
        let args = ServeArgs { config: Some(file), state_dir: Some(dir.path().into()), ..Default::default() };
        let c = Config::from_args(&args).unwrap();
        assert!(c.wait_for_state_lock);
        assert_eq!(c.shutdown_grace, Duration::from_secs(60));
        let args = ServeArgs { state_dir: Some(dir.path().into()), ..Default::default() };
        let c = Config::from_args(&args).unwrap();
        assert!(!c.wait_for_state_lock, "exit, not wait, unless asked");
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn zero_concurrency_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let args = ServeArgs { state_dir: Some(dir.path().into()), max_concurrent_runs: Some(0), ..Default::default() };
        assert!(Config::from_args(&args).unwrap_err().to_string().contains("--max-concurrent-runs"));
    }
}

/// `--full-backup-every`: a number with a unit (`s`, `m`, `h`, `d`), or
/// plain seconds; more than zero.
pub fn parse_full_backup_every(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("{s:?} is not a duration: write a whole number with a unit, e.g. 24h, 90m, 3600s or 2d")
    })?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(|| format!("{s:?} is not a duration: use the unit s, m, h or d, e.g. 24h"))?;
    if secs == 0 {
        return Err(format!(
            "{s:?}: the time between real backups must be more than zero (to always run restic, set verifyUnchanged: false on the policy)"
        ));
    }
    Ok(Duration::from_secs(secs))
}

fn full_backup_every_from_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let v: Option<serde_json::Value> = serde::Deserialize::deserialize(d)?;
    match v {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => parse_full_backup_every(&s).map(Some).map_err(serde::de::Error::custom),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .filter(|n| *n > 0)
            .map(|n| Some(Duration::from_secs(n)))
            .ok_or_else(|| serde::de::Error::custom("full_backup_every must be more than zero seconds")),
        Some(_) => Err(serde::de::Error::custom("full_backup_every: write a duration such as \"24h\"")),
    }
}

#[cfg(test)]
mod full_backup_every_tests {
    use super::*;

    #[test]
    fn full_backup_every_takes_units_and_refuses_zero_and_nonsense() {
        assert_eq!(parse_full_backup_every("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_full_backup_every("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_full_backup_every("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_full_backup_every("45"), Ok(Duration::from_secs(45)));
        assert!(parse_full_backup_every("0h").unwrap_err().contains("more than zero"));
        assert!(parse_full_backup_every("1w").unwrap_err().contains("unit s, m, h or d"));
        assert!(parse_full_backup_every("soon").unwrap_err().contains("not a duration"));
    }
}
