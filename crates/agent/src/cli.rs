//! The command-line client: talks to a running agent over HTTP. Exit codes:
//! 0 ok, 1 failed, 2 bad usage, 3 partial (a run that saved a snapshot but
//! not everything, or one that looks suspicious).

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent.
    Serve(ServeArgs),
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

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// List policies.
    List,
    /// Show one policy.
    Get { policy: String },
    /// Create a policy from flags, or from a JSON file with --file.
    Create(Box<CreateArgs>),
    /// Delete a policy (its snapshots stay in the repository).
    Delete { policy: String },
    /// Stop scheduling a policy's backups.
    Pause { policy: String },
    /// Schedule a paused policy again.
    Resume { policy: String },
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
    /// Run every N seconds.
    #[arg(long, conflicts_with = "cron")]
    pub interval: Option<u64>,
    /// Cron expression (5 fields), e.g. "0 */6 * * *".
    #[arg(long)]
    pub cron: Option<String>,
    /// IANA timezone for --cron.
    #[arg(long, requires = "cron")]
    pub timezone: Option<String>,
    #[arg(long)]
    pub jitter: Option<u64>,
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
    #[arg(long)]
    pub keep_within: Option<String>,
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
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("HTTP client");
        Client { base: base.trim_end_matches('/').to_string(), http }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
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

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn dispatch(c: &Client, out: Output, cmd: Command) -> anyhow::Result<i32> {
    use reqwest::Method;
    match cmd {
        Command::Serve(_) => unreachable!("handled by main"),
        Command::Policy(PolicyCommand::List) => {
            let v = c.call(Method::GET, "/v1/policies", None).await?;
            print_policies(out, &v);
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
            let id = run["id"].as_str().unwrap_or_default().to_string();
            if !follow {
                print_value(out, &run, |v| {
                    println!("queued run {} of policy {policy}", v["id"].as_str().unwrap_or(""))
                });
                return Ok(0);
            }
            let end = follow_run(c, &id, out == Output::Table).await?;
            print_value(out, &end, |v| print_runs(&json!({ "runs": [v] })));
            return Ok(exit_code_for(end["state"].as_str().unwrap_or("")));
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
            let v = c.call(Method::GET, &format!("/v1/runs?{}", q.join("&")), None).await?;
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

async fn follow_run(c: &Client, id: &str, show: bool) -> anyhow::Result<Value> {
    loop {
        let run = c.call(reqwest::Method::GET, &format!("/v1/runs/{}", enc(id)), None).await?;
        let state = run["state"].as_str().unwrap_or("");
        if !matches!(state, "queued" | "running") {
            if show {
                eprintln!();
            }
            return Ok(run);
        }
        if show {
            let p = &run["progress"];
            eprint!(
                "\r{state:<8} {:>5.1}%  files {}/{}  bytes {}/{}   ",
                p["percentDone"].as_f64().unwrap_or(0.0) * 100.0,
                p["filesDone"].as_u64().unwrap_or(0),
                p["totalFiles"].as_u64().unwrap_or(0),
                p["bytesDone"].as_u64().unwrap_or(0),
                p["totalBytes"].as_u64().unwrap_or(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
    let schedule = match (a.interval, &a.cron) {
        (Some(i), None) => json!({ "intervalSeconds": i }),
        (None, Some(c)) => {
            let mut s = json!({ "cron": c });
            if let Some(tz) = &a.timezone {
                s["timezone"] = json!(tz);
            }
            s
        }
        _ => bail!("give --interval SECONDS or --cron EXPR"),
    };
    let mut body = json!({
        "name": a.name,
        "source": { "path": a.source },
        "schedule": schedule,
        "exclude": a.exclude,
        "tags": a.tag,
        "paused": a.paused,
    });
    if let Some(j) = a.jitter {
        body["jitterSeconds"] = json!(j);
    }
    let mut retention = serde_json::Map::new();
    for (k, v) in [
        ("keepLast", a.keep_last),
        ("keepHourly", a.keep_hourly),
        ("keepDaily", a.keep_daily),
        ("keepWeekly", a.keep_weekly),
        ("keepMonthly", a.keep_monthly),
        ("keepYearly", a.keep_yearly),
    ] {
        if let Some(v) = v {
            retention.insert(k.into(), json!(v));
        }
    }
    if let Some(w) = &a.keep_within {
        retention.insert("keepWithin".into(), json!(w));
    }
    body["retention"] = Value::Object(retention);
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
        Output::Table => table(v),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
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
    table(&["ID", "NAME", "ORIGIN", "SOURCE", "SCHEDULE", "STATE", "NEXT RUN", "LAST RUN"], rows);
}

fn print_runs(v: &Value) {
    let rows = v["runs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let snap: String = s(&r["snapshotId"]).chars().take(8).collect();
                    vec![
                        s(&r["id"]),
                        s(&r["policyId"]),
                        s(&r["kind"]),
                        s(&r["trigger"]),
                        s(&r["state"]),
                        s(&r["startedAt"]),
                        s(&r["finishedAt"]),
                        snap,
                        s(&r["error"]["code"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["ID", "POLICY", "KIND", "TRIGGER", "STATE", "STARTED", "FINISHED", "SNAPSHOT", "ERROR"], rows);
}
