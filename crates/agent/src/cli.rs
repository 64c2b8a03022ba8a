//! The command-line client. Most commands talk to a running agent over
//! HTTP; `snapshots --repo` and `restore --repo` talk to restic directly, for
//! when the node, the agent and its database are gone. Exit codes: 0 ok,
//! 1 failed, 2 bad usage, 3 partial (a run that saved a snapshot but not
//! everything, or one that looks suspicious).

use crate::direct::DirectRepo;
use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

use crate::config::ServeArgs;

#[derive(Debug, Parser)]
#[command(
    name = "soda-syncer",
    version,
    about = "Scheduled, consistent restic backups of Kubernetes local volumes: the node agent and its client."
)]
pub struct Cli {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The agent's URL [default: the URL a local agent wrote to its state directory, else http://127.0.0.1:50030].
    #[arg(long, global = true, env = "SODA_SYNCER_SERVER")]
    pub server: Option<String>,
    /// State directory of a local agent (to find its URL).
    #[arg(long = "agent-state-dir", global = true, env = "SODA_SYNCER_STATE_DIR", hide_env_values = true)]
    pub agent_state_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// CA certificate (PEM) to verify an https agent with.
    #[arg(long, global = true, env = "SODA_SYNCER_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Bearer token for the agent's API.
    #[arg(long, global = true, env = "SODA_SYNCER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent.
    // The client's global flags are shadowed here by hidden flags that
    // refuse, so `serve --help` lists only the server's flags.
    #[command(
        arg = agent_flag_refused("server", "server", None, "serve listens on --listen"),
        arg = agent_flag_refused("agent_state_dir", "agent-state-dir", None, "serve takes --state-dir"),
        arg = agent_flag_refused("output", "output", Some('o'), "serve prints only its log"),
        arg = agent_flag_refused("ca_file", "ca-file", None, "serve takes --tls-cert and --tls-key"),
        arg = agent_flag_refused("token", "token", None, "serve reads its tokens from --token-file"),
    )]
    Serve(Box<ServeArgs>),
    /// Apply retention, prune and check append-only repositories with delete rights the nodes lack.
    ///
    /// Learns each repository's policies from the agents' APIs; see "Immutable backups" in the README.
    #[command(
        arg = agent_flag_refused("server", "server", None, "maintain reads its agents from --config"),
        arg = agent_flag_refused("agent_state_dir", "agent-state-dir", None, "maintain takes --state-dir"),
        arg = agent_flag_refused("output", "output", Some('o'), "maintain prints only its log"),
        arg = agent_flag_refused("ca_file", "ca-file", None, "each agent's caFile goes in --config"),
        arg = agent_flag_refused("token", "token", None, "each agent's tokenFile goes in --config"),
    )]
    Maintain(Box<crate::maintainer::MaintainArgs>),
    /// Manage backup policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Start a backup of a policy now.
    Run {
        /// Policy id or name.
        policy: String,
        /// Wait for the run to end, showing its progress; the exit code is the run's.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Restore-drill a policy now: restore a sample of its newest snapshot, verify it, clean up.
    Drill {
        /// Policy id or name.
        policy: String,
        /// Wait for the drill to end, showing its progress; the exit code is the drill's.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// List a policy's snapshots (from the agent), or a repository's (with --repo, no agent needed).
    Snapshots(SnapshotsArgs),
    /// Restore a snapshot: through the agent (a policy), or straight from a repository (--repo).
    Restore(Box<RestoreArgs>),
    /// Repository maintenance for a policy's repository: forget, prune, check.
    Maintenance {
        /// Policy id or name.
        policy: String,
        /// Apply the policy's retention now.
        #[arg(long)]
        forget: bool,
        /// Remove unreferenced data.
        #[arg(long)]
        prune: bool,
        /// Verify the repository.
        #[arg(long)]
        check: bool,
        /// With --check: also read this much data (5%, 1/10, 500M).
        #[arg(long, requires = "check")]
        read_data_subset: Option<String>,
        /// Wait for the run to end.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Show the agent's state: node, version, and the SODA sync (leader, lag, pending changes, last error).
    Status,
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Every claim of the cluster: protected or why not, deadline, overdue (from the API server).
    ///
    /// Reads the claims, volumes, storage classes and the agents' liveness Leases, so it answers
    /// while agents are down. Exit code 0 only when no claim is past its backup deadline.
    // It asks the API server, not an agent: the agent's connection flags are refused, as for serve.
    #[command(
        arg = agent_flag_refused("server", "server", None, "cluster asks the API server: --kubeconfig"),
        arg = agent_flag_refused("agent_state_dir", "agent-state-dir", None, "cluster asks the API server"),
        arg = agent_flag_refused("ca_file", "ca-file", None, "the kubeconfig holds the cluster's CA"),
        arg = agent_flag_refused("token", "token", None, "the kubeconfig holds the credentials"),
    )]
    Cluster(crate::kube::cluster::ClusterArgs),
    /// List runs, newest first.
    Runs {
        /// Only runs of this policy (id or name).
        #[arg(long)]
        policy: Option<String>,
        /// Only runs in this state.
        #[arg(long)]
        state: Option<String>,
        /// Only runs of this kind.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// A hidden flag in place of a global flag for talking to an agent, on a
/// command that talks to none (`serve`, `cluster`); it says what to use.
fn agent_flag_refused(id: &'static str, long: &'static str, short: Option<char>, instead: &'static str) -> clap::Arg {
    let arg = clap::Arg::new(id).long(long).hide(true).num_args(1).value_parser(move |_: &str| {
        Err::<String, String>(format!("--{long} is for the commands that talk to an agent, not this one ({instead})"))
    });
    match short {
        Some(c) => arg.short(c),
        None => arg,
    }
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// List policies.
    List,
    /// Show one policy.
    Get { policy: String },
    /// Create a policy from flags, or from a JSON file with --file.
    Create(Box<CreateArgs>),
    /// Change a policy: flags for common fields, or --file with a JSON merge patch.
    Edit(Box<EditArgs>),
    /// Delete a policy (its snapshots stay in the repository).
    Delete { policy: String },
    /// Stop scheduling a policy's backups.
    Pause { policy: String },
    /// Schedule a paused policy again.
    Resume { policy: String },
}

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Policy id or name (through the agent).
    #[arg(required_unless_present = "repo")]
    pub policy: Option<String>,
    #[command(flatten)]
    pub direct: DirectRepo,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Policy id or name (through the agent).
    #[arg(required_unless_present = "repo")]
    pub policy: Option<String>,
    #[command(flatten)]
    pub direct: DirectRepo,
    /// `latest` or a snapshot id.
    #[arg(long, default_value = "latest")]
    pub snapshot: String,
    /// An empty or new directory [through the agent, default: under its state directory].
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Only these sub-paths of the volume (repeatable).
    #[arg(long)]
    pub include: Vec<String>,
    /// Restore over the live source (through the agent only). On a
    /// terminal the CLI first shows what would change (restic 0.18+) and
    /// asks.
    #[arg(long, conflicts_with_all = ["target", "repo"])]
    pub in_place: bool,
    /// With --in-place: also delete what the snapshot does not hold, so the
    /// volume becomes exactly the snapshot (restic 0.18+ on the node).
    /// Without a terminal, --yes is required.
    #[arg(long, requires = "in_place")]
    pub delete: bool,
    /// With --in-place: only show what the restore would overwrite,
    /// restore and delete; write nothing.
    #[arg(long, requires = "in_place")]
    pub dry_run: bool,
    /// Do not ask before an in-place restore (for scripts).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Read restored files back and compare them with the repository.
    #[arg(long)]
    pub verify: bool,
    /// Wait for the agent's restore run to end, showing progress.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct EditArgs {
    pub policy: String,
    /// A JSON merge patch (RFC 7396); "-" reads standard input.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// A new source directory.
    #[arg(long)]
    pub source: Option<String>,
    #[command(flatten)]
    pub schedule: ScheduleFlags,
    #[command(flatten)]
    pub keep: KeepFlags,
}

/// When a policy runs (create and edit).
#[derive(Debug, Args)]
pub struct ScheduleFlags {
    /// Run every N seconds.
    #[arg(long, conflicts_with = "cron")]
    pub interval: Option<u64>,
    /// Cron expression (5 fields), e.g. "0 */6 * * *".
    #[arg(long)]
    pub cron: Option<String>,
    /// IANA timezone for --cron.
    #[arg(long, requires = "cron")]
    pub timezone: Option<String>,
    /// Spread runs by up to this many seconds.
    #[arg(long)]
    pub jitter: Option<u64>,
}

/// Retention rules (create and edit).
#[derive(Debug, Args)]
pub struct KeepFlags {
    #[arg(long)]
    pub keep_last: Option<u32>,
    #[arg(long)]
    pub keep_hourly: Option<u32>,
    #[arg(long)]
    pub keep_daily: Option<u32>,
    #[arg(long)]
    pub keep_weekly: Option<u32>,
    #[arg(long)]
    pub keep_monthly: Option<u32>,
    #[arg(long)]
    pub keep_yearly: Option<u32>,
    /// A restic duration, e.g. 48h or 1y2m.
    #[arg(long)]
    pub keep_within: Option<String>,
}

impl ScheduleFlags {
    /// The `schedule` object, if a schedule was given; in a merge patch
    /// the other kind's fields are cleared.
    fn json(&self, patch: bool) -> Option<Value> {
        let clear = |v: &mut Value, keys: &[&str]| {
            if patch {
                for k in keys {
                    v[*k] = Value::Null;
                }
            }
        };
        match (self.interval, &self.cron) {
            (Some(i), _) => {
                let mut v = json!({ "intervalSeconds": i });
                clear(&mut v, &["cron", "timezone"]);
                Some(v)
            }
            (None, Some(c)) => {
                let mut v = json!({ "cron": c });
                if let Some(tz) = &self.timezone {
                    v["timezone"] = json!(tz);
                } else {
                    clear(&mut v, &["timezone"]);
                }
                clear(&mut v, &["intervalSeconds"]);
                Some(v)
            }
            _ => None,
        }
    }
}

impl KeepFlags {
    fn json(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("keepLast", self.keep_last),
            ("keepHourly", self.keep_hourly),
            ("keepDaily", self.keep_daily),
            ("keepWeekly", self.keep_weekly),
            ("keepMonthly", self.keep_monthly),
            ("keepYearly", self.keep_yearly),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        if let Some(w) = &self.keep_within {
            m.insert("keepWithin".into(), json!(w));
        }
        m
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A JSON policy body (as in POST /v1/policies); "-" reads standard input.
    #[arg(long, short = 'f', conflicts_with_all = ["name", "source"])]
    pub file: Option<PathBuf>,
    #[arg(long, required_unless_present = "file")]
    pub name: Option<String>,
    /// The directory to back up (absolute).
    #[arg(long, required_unless_present = "file")]
    pub source: Option<String>,
    /// restic repository URL [default: the agent's default repository].
    #[arg(long)]
    pub repo: Option<String>,
    /// File holding the repository password [default: $RESTIC_PASSWORD when --repo is given].
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Pass this variable from your environment to restic (e.g. AWS_SECRET_ACCESS_KEY); repeatable. Values never go on the command line.
    #[arg(long = "env-from")]
    pub env_from: Vec<String>,
    #[command(flatten)]
    pub schedule: ScheduleFlags,
    #[command(flatten)]
    pub keep: KeepFlags,
    #[arg(long)]
    pub exclude: Vec<String>,
    #[arg(long)]
    pub tag: Vec<String>,
    /// Create it paused.
    #[arg(long)]
    pub paused: bool,
}

struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    fn new(args: &ClientArgs) -> Client {
        let base = args.server.clone().unwrap_or_else(|| {
            let dir = args.agent_state_dir.clone().unwrap_or_else(crate::config::default_state_dir);
            std::fs::read_to_string(crate::config::url_file(&dir))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "http://127.0.0.1:50030".into())
        });
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60)).use_rustls_tls();
        if let Some(ca) = &args.ca_file {
            match std::fs::read(ca)
                .map_err(|e| e.to_string())
                .and_then(|pem| reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string()))
            {
                Ok(cert) => builder = builder.add_root_certificate(cert),
                Err(e) => eprintln!("warning: --ca-file {}: {e}", ca.display()),
            }
        }
        let http = builder.build().expect("HTTP client");
        // No --token: the token a local agent generated, when readable.
        let token = args.token.clone().or_else(|| {
            let dir = args.agent_state_dir.clone().unwrap_or_else(crate::config::default_state_dir);
            std::fs::read_to_string(crate::config::token_file(&dir))
                .ok()
                .and_then(|t| t.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).map(String::from))
        });
        Client { base: base.trim_end_matches('/').to_string(), token, http }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the agent at {}: is it running? (set --server)", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if !status.is_success() {
            let code = value["error"]["code"].as_str().unwrap_or("error");
            let msg = value["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
            bail!("{msg} ({code}, HTTP {})", status.as_u16());
        }
        Ok(value)
    }
}

pub fn run_client(args: &ClientArgs, cmd: Command) -> i32 {
    if let Command::Completions { shell } = cmd {
        use clap::CommandFactory;
        clap_complete::generate(shell, &mut Cli::command(), "soda-syncer", &mut std::io::stdout());
        return 0;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let client = Client::new(args);
    match rt.block_on(dispatch(&client, args.output, cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

use crate::ids::percent_encode as enc;

async fn dispatch(c: &Client, out: Output, cmd: Command) -> anyhow::Result<i32> {
    use reqwest::Method;
    match cmd {
        Command::Serve(_) | Command::Maintain(_) => unreachable!("handled by main"),
        Command::Cluster(args) => {
            let report: crate::kube::cluster::ClusterReport = if args.via_agent {
                let query = args.namespace.as_deref().map(|n| format!("?namespace={}", enc(n))).unwrap_or_default();
                serde_json::from_value(c.call(Method::GET, &format!("/v1/cluster{query}"), None).await?)?
            } else {
                let inv = crate::kube::cluster::inventory(&args).await?;
                crate::kube::cluster::report(&inv, chrono::Utc::now())
            };
            match out {
                Output::Table => crate::kube::cluster::print_table(&report),
                _ => print_value(out, &serde_json::to_value(&report)?, |_| {}),
            }
            if out != Output::Table {
                eprintln!("{}", report.summary_line());
            }
            return Ok(report.exit_code());
        }
        Command::Policy(PolicyCommand::List) => {
            let all = all_policies(c).await?;
            print_policies(out, &json!({ "policies": all }));
        }
        Command::Policy(PolicyCommand::Get { policy }) => {
            let v = c.call(Method::GET, &format!("/v1/policies/{}", enc(&policy)), None).await?;
            print_value(out, &v, |v| print_policies(Output::Table, &json!({ "policies": [v] })));
        }
        Command::Policy(PolicyCommand::Create(a)) => {
            let body = create_body(&a)?;
            let v = c.call(Method::POST, "/v1/policies", Some(body)).await?;
            print_value(out, &v, |v| {
                println!("created policy {} ({})", v["name"].as_str().unwrap_or(""), v["id"].as_str().unwrap_or(""))
            });
        }
        Command::Policy(PolicyCommand::Delete { policy }) => {
            c.call(Method::DELETE, &format!("/v1/policies/{}", enc(&policy)), None).await?;
            if out == Output::Table {
                println!("deleted policy {policy} (its snapshots stay in the repository)");
            }
        }
        Command::Policy(PolicyCommand::Pause { policy }) => {
            let v = c.call(Method::POST, &format!("/v1/policies/{}/pause", enc(&policy)), None).await?;
            print_value(out, &v, |v| println!("paused policy {}", v["name"].as_str().unwrap_or("")));
        }
        Command::Policy(PolicyCommand::Resume { policy }) => {
            let v = c.call(Method::POST, &format!("/v1/policies/{}/resume", enc(&policy)), None).await?;
            print_value(out, &v, |v| {
                println!(
                    "resumed policy {}; next run at {}",
                    v["name"].as_str().unwrap_or(""),
                    v["nextRunAt"].as_str().unwrap_or("-")
                )
            });
        }
        Command::Run { policy, follow } => {
            let run = c.call(Method::POST, &format!("/v1/policies/{}/run", enc(&policy)), None).await?;
            return finish_run(c, out, run, follow).await;
        }
        Command::Drill { policy, follow } => {
            let run = c.call(Method::POST, &format!("/v1/policies/{}/drill", enc(&policy)), None).await?;
            return finish_run(c, out, run, follow).await;
        }
        Command::Completions { .. } => unreachable!("handled before"),
        Command::Status => {
            let v = c.call(Method::GET, "/v1/status", None).await?;
            print_value(out, &v, print_status);
        }
        Command::Policy(PolicyCommand::Edit(a)) => {
            let patch = edit_patch(&a)?;
            let v = c.call(Method::PATCH, &format!("/v1/policies/{}", enc(&a.policy)), Some(patch)).await?;
            print_value(out, &v, |v| println!("updated policy {}", v["name"].as_str().unwrap_or("")));
        }
        Command::Snapshots(a) => {
            let v = match (&a.policy, &a.direct.repo) {
                (_, Some(_)) => crate::direct::snapshots(&a.direct).await?,
                (Some(p), None) => c.call(Method::GET, &format!("/v1/policies/{}/snapshots", enc(p)), None).await?,
                (None, None) => bail!("name a policy, or a repository with --repo"),
            };
            print_value(out, &v, print_snapshots);
        }
        Command::Restore(a) => {
            if a.direct.repo.is_some() {
                let target = a.target.clone().ok_or_else(|| anyhow!("--repo needs --target DIR"))?;
                let v = crate::direct::restore(&a.direct, &a.snapshot, &target, &a.include, a.verify).await?;
                print_value(out, &v, |v| {
                    println!(
                        "restored snapshot {} ({} files, {} bytes) into {}",
                        s(&v["snapshotId"]).chars().take(8).collect::<String>(),
                        s(&v["files"]),
                        s(&v["bytes"]),
                        target.display()
                    )
                });
                return Ok(0);
            }
            let policy = a.policy.clone().ok_or_else(|| anyhow!("name a policy, or a repository with --repo"))?;
            let mut body =
                json!({ "snapshot": a.snapshot, "include": a.include, "inPlace": a.in_place, "verify": a.verify });
            if let Some(t) = &a.target {
                body["target"] = json!(t);
            }
            if a.delete {
                body["delete"] = json!(true);
            }
            let path = format!("/v1/policies/{}/restore", enc(&policy));
            if a.dry_run {
                body["dryRun"] = json!(true);
                let run = c.call(Method::POST, &path, Some(body)).await?;
                let end = follow_run(c, run["id"].as_str().unwrap_or_default()).await?;
                print_value(out, &end, |v| print_preview(&v["summary"]["restorePreview"]));
                if let Some(e) = end["error"]["message"].as_str() {
                    eprintln!("error: {e}");
                }
                return Ok(exit_code_for(end["state"].as_str().unwrap_or("")));
            }
            if a.in_place && !a.yes {
                let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
                if !interactive && a.delete {
                    bail!("an in-place restore with --delete removes files: add --yes to run it without a terminal to confirm on");
                }
                if interactive && !confirm_in_place(c, &path, &body, &policy).await? {
                    eprintln!("nothing was restored");
                    return Ok(1);
                }
            }
            let run = c.call(Method::POST, &path, Some(body)).await?;
            return finish_run(c, out, run, a.follow).await;
        }
        Command::Maintenance { policy, forget, prune, check, read_data_subset, follow } => {
            if !(forget || prune || check) {
                bail!("choose at least one of --forget, --prune, --check");
            }
            let body = json!({ "forget": forget, "prune": prune, "check": check, "readDataSubset": read_data_subset });
            let run = c.call(Method::POST, &format!("/v1/policies/{}/maintenance", enc(&policy)), Some(body)).await?;
            return finish_run(c, out, run, follow).await;
        }
        Command::Runs { policy, state, kind, limit } => {
            let mut q = vec![format!("limit={limit}")];
            if let Some(p) = policy {
                q.push(format!("policy={}", enc(&p)));
            }
            if let Some(s) = state {
                q.push(format!("state={}", enc(&s)));
            }
            if let Some(k) = kind {
                q.push(format!("kind={}", enc(&k)));
            }
            let mut v = c.call(Method::GET, &format!("/v1/runs?{}", q.join("&")), None).await?;
            if out == Output::Table {
                name_policies(c, &mut v).await?;
            }
            print_value(out, &v, print_runs);
        }
    }
    Ok(0)
}

/// Every page of `GET /v1/policies`, so the list is complete.
async fn all_policies(c: &Client) -> anyhow::Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let v = c.call(reqwest::Method::GET, &format!("/v1/policies?limit=1000&after={}", enc(&after)), None).await?;
        all.extend(v["policies"].as_array().cloned().unwrap_or_default());
        match v["next"].as_str() {
            Some(n) if !n.is_empty() => after = n.to_string(),
            _ => break,
        }
    }
    Ok(all)
}

/// Give each run of a `{"runs": [...]}` its policy's name (`policyName`),
/// for the table: people know their policies by name, not by id. A run of
/// a deleted policy keeps only its id.
async fn name_policies(c: &Client, v: &mut Value) -> anyhow::Result<()> {
    let names: std::collections::HashMap<String, Value> = all_policies(c)
        .await?
        .into_iter()
        .filter_map(|p| Some((p["id"].as_str()?.to_string(), p["name"].clone())))
        .collect();
    for r in v["runs"].as_array_mut().into_iter().flatten() {
        if let Some(name) = r["policyId"].as_str().and_then(|id| names.get(id)) {
            r["policyName"] = name.clone();
        }
    }
    Ok(())
}

/// 0 succeeded, 3 partial or suspicious, 1 anything else.
pub fn exit_code_for(state: &str) -> i32 {
    match state {
        "succeeded" => 0,
        "partial" | "suspicious" => 3,
        _ => 1,
    }
}

/// Print a queued run, or follow it to its end; the exit code is the run's.
async fn finish_run(c: &Client, out: Output, run: Value, follow: bool) -> anyhow::Result<i32> {
    if !follow {
        print_value(out, &run, |v| println!("queued {} run {}", s(&v["kind"]), s(&v["id"])));
        return Ok(0);
    }
    let id = run["id"].as_str().unwrap_or_default().to_string();
    let end = follow_run(c, &id).await?;
    let mut shown = json!({ "runs": [end.clone()] });
    if out == Output::Table {
        // The run's outcome matters more than the name: print it anyway.
        let _ = name_policies(c, &mut shown).await;
    }
    print_value(out, &end, |_| print_runs(&shown));
    if let Some(e) = end["error"]["message"].as_str() {
        eprintln!("error: {e}");
    }
    if let Some(w) = end["warning"].as_str() {
        eprintln!("warning: {w}");
    }
    Ok(exit_code_for(end["state"].as_str().unwrap_or("")))
}

/// Show what an in-place restore would change (a dry run, where restic
/// can) and ask on the terminal; true to go on.
async fn confirm_in_place(c: &Client, path: &str, body: &Value, policy: &str) -> anyhow::Result<bool> {
    let mut dry = body.clone();
    dry["dryRun"] = json!(true);
    match c.call(reqwest::Method::POST, path, Some(dry)).await {
        Ok(run) => {
            let end = follow_run(c, run["id"].as_str().unwrap_or_default()).await?;
            if end["state"] != "succeeded" {
                bail!("the preview failed: {}", s(&end["error"]["message"]));
            }
            print_preview(&end["summary"]["restorePreview"]);
        }
        // restic too old for a preview: ask without one.
        Err(e) if e.to_string().contains("dryRun") => {
            eprintln!("(no preview: {e})");
        }
        Err(e) => return Err(e),
    }
    eprint!("restore over the live volume of {policy}? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn print_preview(p: &Value) {
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    eprintln!(
        "the restore would overwrite {} files, restore {} missing, delete {}, leave {} unchanged ({} bytes to write)",
        n("filesToOverwrite"),
        n("filesToRestore"),
        n("filesToDelete"),
        n("filesUnchanged"),
        n("bytesToWrite")
    );
    for (key, label) in [("overwrite", "overwrite"), ("restore", "restore"), ("delete", "delete")] {
        for item in p[key].as_array().into_iter().flatten() {
            eprintln!("  {label:9} {}", item.as_str().unwrap_or_default());
        }
    }
    if p["truncated"].as_bool() == Some(true) {
        eprintln!("  (more not listed)");
    }
}

/// Follow `GET /v1/runs/{id}/events` (server-sent events) until the `end`
/// event, drawing a progress bar on a terminal (nothing otherwise).
async fn follow_run(c: &Client, id: &str) -> anyhow::Result<Value> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut resp = c.request(reqwest::Method::GET, &format!("/v1/runs/{}/events", enc(id))).send().await?;
    if !resp.status().is_success() {
        bail!("cannot follow run {id}: HTTP {}", resp.status().as_u16());
    }
    let mut buf = String::new();
    let mut last: Option<Value> = None;
    while let Some(chunk) = resp.chunk().await? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let event =
                frame.lines().find_map(|l| l.strip_prefix("event:")).map(str::trim).unwrap_or("message").to_string();
            let data: String = frame.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect();
            let Ok(run) = serde_json::from_str::<Value>(&data) else { continue };
            let p = &run["progress"];
            bar.set_length(p["totalBytes"].as_u64().unwrap_or(0));
            bar.set_position(p["bytesDone"].as_u64().unwrap_or(0));
            bar.set_message(format!(
                "{} {}/{}",
                s(&run["state"]),
                p["filesDone"].as_u64().unwrap_or(0),
                p["totalFiles"].as_u64().unwrap_or(0)
            ));
            bar.tick();
            if event == "end" {
                bar.finish_and_clear();
                return Ok(run);
            }
            last = Some(run);
        }
    }
    bar.finish_and_clear();
    // The stream ended early (agent restarted?): ask once more.
    match c.call(reqwest::Method::GET, &format!("/v1/runs/{}", enc(id)), None).await {
        Ok(v) => Ok(v),
        Err(e) => last.ok_or(e),
    }
}

fn edit_patch(a: &EditArgs) -> anyhow::Result<Value> {
    if let Some(f) = &a.file {
        let text = if f.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        };
        return serde_json::from_str(&text).with_context(|| format!("{} is not JSON", f.display()));
    }
    let mut patch = serde_json::Map::new();
    if let Some(schedule) = a.schedule.json(true) {
        patch.insert("schedule".into(), schedule);
    }
    if let Some(j) = a.schedule.jitter {
        patch.insert("jitterSeconds".into(), json!(j));
    }
    let retention = a.keep.json();
    if !retention.is_empty() {
        patch.insert("retention".into(), Value::Object(retention));
    }
    if let Some(src) = &a.source {
        patch.insert("source".into(), json!({ "path": src }));
    }
    if patch.is_empty() {
        bail!("nothing to change: give --file or a flag such as --interval");
    }
    Ok(Value::Object(patch))
}

fn create_body(a: &CreateArgs) -> anyhow::Result<Value> {
    if let Some(f) = &a.file {
        let text = if f.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        };
        return serde_json::from_str(&text).with_context(|| format!("{} is not JSON", f.display()));
    }
    let schedule = a.schedule.json(false).ok_or_else(|| anyhow!("give --interval SECONDS or --cron EXPR"))?;
    let mut body = json!({
        "name": a.name,
        "source": { "path": a.source },
        "schedule": schedule,
        "exclude": a.exclude,
        "tags": a.tag,
        "paused": a.paused,
        "retention": Value::Object(a.keep.json()),
    });
    if let Some(j) = a.schedule.jitter {
        body["jitterSeconds"] = json!(j);
    }
    let mut repo = serde_json::Map::new();
    if let Some(url) = &a.repo {
        repo.insert("url".into(), json!(url));
        let pw = match &a.password_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the password file {}", f.display()))?
                .trim_end_matches('\n')
                .to_string(),
            None => std::env::var("RESTIC_PASSWORD").map_err(|_| {
                anyhow!("--repo needs a password: --password-file FILE or RESTIC_PASSWORD in the environment")
            })?,
        };
        repo.insert("password".into(), json!(pw));
    }
    let mut env = serde_json::Map::new();
    for k in &a.env_from {
        let v = std::env::var(k).map_err(|_| anyhow!("--env-from {k}: {k} is not set in your environment"))?;
        env.insert(k.clone(), json!(v));
    }
    if !env.is_empty() {
        repo.insert("env".into(), Value::Object(env));
    }
    if !repo.is_empty() {
        body["repository"] = Value::Object(repo);
    }
    Ok(body)
}

fn print_value(out: Output, v: &Value, table: impl FnOnce(&Value)) {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Yaml => print!("{}", to_yaml(v)),
        Output::Table => table(v),
    }
}

/// YAML for a JSON value, as people write it: plain keys, strings quoted
/// only where YAML would otherwise read them as something else.
pub fn to_yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_else(|e| format!("# cannot print as YAML: {e}\n"))
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_policies(out: Output, v: &Value) {
    if out == Output::Json {
        return print_value(out, v, |_| {});
    }
    let rows = v["policies"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let sched = if let Some(i) = p["schedule"]["intervalSeconds"].as_u64() {
                        format!("every {i}s")
                    } else {
                        s(&p["schedule"]["cron"])
                    };
                    let state =
                        if p["paused"].as_bool() == Some(true) { "paused".to_string() } else { "active".to_string() };
                    vec![
                        s(&p["id"]),
                        s(&p["name"]),
                        s(&p["origin"]),
                        s(&p["source"]["path"]),
                        sched,
                        state,
                        s(&p["nextRunAt"]),
                        s(&p["lastRun"]["state"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    crate::output::table(&["ID", "NAME", "ORIGIN", "SOURCE", "SCHEDULE", "STATE", "NEXT RUN", "LAST RUN"], rows);
}

fn print_status(v: &Value) {
    println!("node      {}  (soda-syncer {}, up {} s)", s(&v["node"]), s(&v["version"]), s(&v["uptimeSeconds"]));
    let r = &v["restic"];
    let features = r["features"].as_array().map(|f| f.iter().map(s).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    println!(
        "restic    {} ({}); newer features in use: {}",
        if r["version"].is_null() { "not found".to_string() } else { s(&r["version"]) },
        s(&r["support"]),
        if features.is_empty() { "none".to_string() } else { features }
    );
    if !r["message"].is_null() {
        println!("          {}", s(&r["message"]));
    }
    let sync = &v["sodaSync"];
    if sync.is_null() {
        println!("SODA sync off (no --soda-endpoint, or Kubernetes off)");
        return;
    }
    let or = |x: &Value, none: &str| if x.is_null() { none.to_string() } else { s(x) };
    println!("SODA      {}", s(&sync["endpoint"]));
    println!(
        "sync      {}  (leader {}, this agent {})",
        s(&sync["state"]),
        or(&sync["leader"], "none"),
        s(&sync["identity"])
    );
    if !sync["pendingChanges"].is_null() {
        println!(
            "pending   {} changes, lag {} s; last pass {} ({} ms), last success {}",
            s(&sync["pendingChanges"]),
            s(&sync["lagSeconds"]),
            or(&sync["lastPassAt"], "never"),
            or(&sync["lastPassMs"], "-"),
            or(&sync["lastSuccessAt"], "never")
        );
    }
    let p = &sync["profiles"];
    println!(
        "profiles  {} (last poll that worked {}{})",
        s(&p["count"]),
        or(&p["lastSuccessAt"], "never"),
        if p["failing"] == true { "; failing now" } else { "" }
    );
    for (what, e) in [("sync", &sync["lastError"]), ("poll", &p["lastError"])] {
        if !e.is_null() {
            println!("last {what} error  {} {}: {}", s(&e["at"]), s(&e["code"]), s(&e["message"]));
        }
    }
}

fn print_snapshots(v: &Value) {
    let rows = v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|sn| {
                    let tags: Vec<String> =
                        sn["tags"].as_array().map(|t| t.iter().map(s).collect()).unwrap_or_default();
                    let paths: Vec<String> =
                        sn["paths"].as_array().map(|t| t.iter().map(s).collect()).unwrap_or_default();
                    vec![
                        s(&sn["shortId"]),
                        s(&sn["time"]).chars().take(19).collect(),
                        s(&sn["hostname"]),
                        paths.join(","),
                        tags.join(","),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    crate::output::table(&["ID", "TIME", "HOST", "PATHS", "TAGS"], rows);
}

fn print_runs(v: &Value) {
    let rows = v["runs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let snap: String = s(&r["snapshotId"]).chars().take(8).collect();
                    let policy = if r["policyName"].is_string() { &r["policyName"] } else { &r["policyId"] };
                    vec![
                        s(&r["id"]),
                        s(policy),
                        s(&r["kind"]),
                        s(&r["trigger"]),
                        // "unchanged since snapshot X, verified at T": the snapshot column names X.
                        if r["unchanged"].is_object() { "unchanged".to_string() } else { s(&r["state"]) },
                        s(&r["startedAt"]),
                        s(&r["finishedAt"]),
                        snap,
                        s(&r["error"]["code"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    crate::output::table(
        &["ID", "POLICY", "KIND", "TRIGGER", "STATE", "STARTED", "FINISHED", "SNAPSHOT", "ERROR"],
        rows,
    );
}
