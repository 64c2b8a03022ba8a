//! The command-line client: its clap definitions and the dispatch of each
//! command. Most commands talk to a running agent over HTTP (`client`);
//! `snapshots --repo` and `restore --repo` talk to restic directly
//! (`direct`), for when the node, the agent and its database are gone.
//! `request` builds the API's request bodies from flags, `show` prints
//! what comes back. Exit codes: 0 ok, 1 failed, 2 bad usage, 3 partial (a
//! run that saved a snapshot but not everything, or one that looks
//! suspicious).

mod client;
pub mod direct;
mod request;
mod show;

pub use show::to_yaml;

use anyhow::{anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::path::PathBuf;

use crate::config::ServeArgs;
use crate::ids::percent_encode as enc;
use client::{all_policies, follow_run, name_policies, Client};
use direct::DirectRepo;
use request::{create_body, edit_patch};
use show::{print_policies, print_preview, print_runs, print_snapshots, print_status, print_value, s};

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
                (_, Some(_)) => direct::snapshots(&a.direct).await?,
                (Some(p), None) => c.call(Method::GET, &format!("/v1/policies/{}/snapshots", enc(p)), None).await?,
                (None, None) => bail!("name a policy, or a repository with --repo"),
            };
            print_value(out, &v, print_snapshots);
        }
        Command::Restore(a) => {
            if a.direct.repo.is_some() {
                let target = a.target.clone().ok_or_else(|| anyhow!("--repo needs --target DIR"))?;
                let v = direct::restore(&a.direct, &a.snapshot, &target, &a.include, a.verify).await?;
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
