//! Helpers for integration tests: the real `soda-syncer` binary as a child
//! process, HTTP calls against it, polling with deadlines, bind mounts that
//! clean up after themselves, and direct restic calls for checking results.

#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_soda-syncer");

/// A running agent binary with its own state directory and log file.
pub struct AgentProc {
    pub child: Child,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub url: String,
    pub args: Vec<String>,
    /// The API token the agent generated in its state directory.
    pub token: String,
}

impl AgentProc {
    /// Start `soda-syncer serve` on 127.0.0.1:0 with `state_dir` and extra flags.
    pub fn start(state_dir: &Path, extra: &[&str]) -> Result<AgentProc> {
        Self::start_as(state_dir, extra, None)
    }

    /// As `start`, with these variables added to the agent's environment
    /// (`restart` does not keep them).
    pub fn start_with_env(state_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<AgentProc> {
        Self::spawn(state_dir, extra.iter().map(|s| s.to_string()).collect(), env, None)
    }

    /// As `start`, but as another user (by uid; its group is the same number).
    pub fn start_as(state_dir: &Path, extra: &[&str], uid: Option<u32>) -> Result<AgentProc> {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(uid) = uid {
            std::fs::create_dir_all(state_dir)?;
            std::os::unix::fs::chown(state_dir, Some(uid), Some(uid))?;
            args.push(format!("--as-uid={uid}"));
        }
        Self::spawn(state_dir, args, &[], None)
    }

    fn spawn(state_dir: &Path, args: Vec<String>, env: &[(&str, &str)], log: Option<PathBuf>) -> Result<AgentProc> {
        let url_file = state_dir.join("agent.url");
        let _ = std::fs::remove_file(&url_file);
        let mut agent = Self::spawn_only(state_dir, args, env, log)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(u) = std::fs::read_to_string(&url_file).ok().filter(|u| u.starts_with("http")) {
                agent.url = u.trim().to_string();
                agent.token = std::fs::read_to_string(state_dir.join("token")).unwrap_or_default().trim().to_string();
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!("soda-syncer exited with {status} before listening; log:\n{}", agent.log_text());
            }
            if Instant::now() > deadline {
                bail!("soda-syncer did not write its URL within 20 s; log:\n{}", agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start `soda-syncer serve` as `start` does, but return at once: for an
    /// agent that may have to wait for another's state directory lock (the
    /// URL file then names the other agent). `url` and `token` stay empty
    /// until [`AgentProc::wait_until_holding`].
    pub fn start_without_waiting(state_dir: &Path, extra: &[&str]) -> Result<AgentProc> {
        Self::spawn_only(state_dir, extra.iter().map(|s| s.to_string()).collect(), &[], None)
    }

    /// `log`: append to this log (a restart); `None`: a log of its own.
    fn spawn_only(
        state_dir: &Path,
        args: Vec<String>,
        env: &[(&str, &str)],
        log: Option<PathBuf>,
    ) -> Result<AgentProc> {
        std::fs::create_dir_all(state_dir)?;
        // `--as-uid` is ours, not the agent's: it becomes setpriv in front.
        let as_uid = args.iter().find_map(|a| a.strip_prefix("--as-uid=").map(str::to_string));
        // `--uts-hostname=` is ours too: the agent runs in its own UTS
        // namespace with that host name, as each DaemonSet pod has its own.
        let uts_hostname = args.iter().find_map(|a| a.strip_prefix("--uts-hostname=").map(str::to_string));
        let agent_args: Vec<String> =
            args.iter().filter(|a| !a.starts_with("--as-uid=") && !a.starts_with("--uts-hostname=")).cloned().collect();
        // Several agents may share a state directory: one log each.
        let log = log.unwrap_or_else(|| unused_log_path(state_dir));
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let mut cmd = match &as_uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into(), BIN.into()]);
                c
            }
            None => match &uts_hostname {
                Some(h) => {
                    let mut c = Command::new("unshare");
                    c.args([
                        "--uts",
                        "--",
                        "sh",
                        "-c",
                        "echo \"$1\" > /proc/sys/kernel/hostname && shift && exec \"$@\"",
                    ]);
                    c.args(["sh", h.as_str(), BIN]);
                    c
                }
                None => Command::new(BIN),
            },
        };
        let child = cmd
            .arg("serve")
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--listen", "127.0.0.1:0", "--allowed-root", "/tmp", "--repository-root", "/tmp"])
            .args(if agent_args.iter().any(|a| a.starts_with("--node-name")) {
                &[][..]
            } else {
                &["--node-name", "test-node"]
            })
            .args(&agent_args)
            .env("SODA_SYNCER_LOG", "info,soda_syncer=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawning soda-syncer")?;
        Ok(AgentProc { child, state_dir: state_dir.to_path_buf(), log, url: String::new(), args, token: String::new() })
    }

    /// Wait until this agent holds its state directory's lock and serves
    /// the full API on the URL in the URL file (its `/readyz` names it as
    /// the holder); then `url` and `token` are set.
    pub async fn wait_until_holding(&mut self, secs: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        loop {
            if let Ok(url) = std::fs::read_to_string(self.state_dir.join("agent.url")) {
                let url = url.trim().to_string();
                if let Ok(resp) = http.get(format!("{url}/readyz")).send().await {
                    let v: Value = resp.json().await.unwrap_or_default();
                    if v["stateLock"]["held"] == true && v["stateLock"]["holder"]["pid"] == self.pid() {
                        self.url = url;
                        self.token = std::fs::read_to_string(self.state_dir.join("token"))
                            .unwrap_or_default()
                            .trim()
                            .to_string();
                        return Ok(());
                    }
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("soda-syncer exited with {status} before it held the state directory; log:\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("soda-syncer did not take over its state directory within {secs} s; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait")
    }

    /// Start again with the same state directory and flags.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let new = Self::spawn(&self.state_dir.clone(), self.args.clone(), &[], Some(self.log.clone()))?;
        // The old child was reaped by kill9; dropping it again is harmless.
        drop(std::mem::replace(self, new));
        Ok(())
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_with_token(method, path, body, Some(&self.token.clone())).await
    }

    /// As `call`, with the given bearer token (or none).
    pub async fn call_with_token(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let client = reqwest::Client::new();
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = client.request(m, format!("{}{}", self.url, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}\nagent log:\n{}", self.log_text()));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call("GET", path, None).await;
        assert!(status < 300, "GET {path}: {status} {v}\nagent log:\n{}", self.log_text());
        v
    }

    pub async fn create_policy(&self, body: Value) -> Value {
        let (status, v) = self.call("POST", "/v1/policies", Some(body)).await;
        assert_eq!(status, 201, "{v}\nagent log:\n{}", self.log_text());
        v
    }

    /// Poll the runs of a policy until `pred` holds for the list (newest
    /// first, never empty).
    pub async fn wait_runs(&self, policy: &str, secs: u64, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.get(&format!("/v1/runs?policy={policy}&limit=100")).await;
            let runs = v["runs"].as_array().cloned().unwrap_or_default();
            // Nothing waits for "no runs": the predicate only sees a list
            // with at least one run, so `r[0]` in it cannot race the first
            // run's insertion.
            if !runs.is_empty() && pred(&runs) {
                return runs;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {secs} s waiting for {what}; runs:\n{}\nagent log:\n{}",
                    serde_json::to_string_pretty(&runs).unwrap(),
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `<state-dir>.log` for the first agent, `<state-dir>.2.log` and so on for
/// agents started beside it.
fn unused_log_path(state_dir: &Path) -> PathBuf {
    let first = state_dir.with_extension("log");
    if !first.exists() {
        return first;
    }
    (2..).map(|n| state_dir.with_extension(format!("{n}.log"))).find(|p| !p.exists()).expect("a free name")
}

/// The pid the state directory's lock file names (its holder while one
/// holds it; the last holder otherwise).
pub fn lock_holder_pid(state_dir: &Path) -> Option<u32> {
    let v: Value = serde_json::from_slice(&std::fs::read(state_dir.join("agent.lock")).ok()?).ok()?;
    v["pid"].as_u64().map(|p| p as u32)
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn count_state(runs: &[Value], state: &str) -> usize {
    runs.iter().filter(|r| r["state"] == state).count()
}

/// Run restic directly (to check what the agent wrote).
pub fn restic(repo: &str, password: &str, env: &[(String, String)], args: &[&str]) -> Result<String> {
    let cache = tempfile::tempdir()?;
    let out = Command::new("restic")
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", password)
        .env("RESTIC_CACHE_DIR", cache.path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("restic {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bind mount that is undone on drop (also when the test fails).
pub struct BindMount {
    pub target: PathBuf,
    mounted: bool,
}

impl BindMount {
    pub fn new(source: &Path, target: &Path) -> Result<BindMount> {
        std::fs::create_dir_all(target)?;
        let st = Command::new("mount").arg("--bind").arg(source).arg(target).status()?;
        if !st.success() {
            bail!("mount --bind {} {} failed (the tests run as root)", source.display(), target.display());
        }
        Ok(BindMount { target: target.to_path_buf(), mounted: true })
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.target).status();
            self.mounted = false;
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Fill `dir` with `n` files of `size` bytes of pseudo-random content.
pub fn fill(dir: &Path, n: usize, size: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15 ^ n as u64;
    for i in 0..n {
        let mut buf = vec![0u8; size];
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(dir.join(format!("f{i:05}")), buf).unwrap();
    }
}

/// The pids of processes whose parent is `ppid` and whose comm is `name`.
pub fn children_named(ppid: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // comm is in parentheses; ppid is the 2nd field after it.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').map(|i| i + 1).unwrap_or(0)..close];
        let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
        if comm == name && rest.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// Wait until `repo` (a local restic repository) holds a lock file.
pub async fn wait_for_a_lock(repo: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(repo.join("locks")).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "no lock in {} within 30 s", repo.display());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Wait until the agent's log contains `needle`.
pub async fn wait_for_log(agent: &AgentProc, needle: &str, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !agent.log_text().contains(needle) {
        assert!(std::time::Instant::now() < deadline, "no {needle:?} in the log within {secs} s\n{}", agent.log_text());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The restic first on PATH, as an absolute path (wrappers exec it).
pub fn real_restic() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("restic"))
        .find(|p| p.is_file())
        .expect("restic on PATH")
}

/// A shell script standing in for restic: `version` answers `version_line`
/// (when given), everything else runs the real restic with `extra` flags
/// first. `exec` keeps the pid, so the agent's signals reach restic itself.
pub fn wrapper(dir: &Path, name: &str, version_line: Option<&str>, extra: &str) -> PathBuf {
    let path = dir.join(name);
    let version =
        version_line.map(|l| format!("if [ \"$1\" = version ]; then echo '{l}'; exit 0; fi\n")).unwrap_or_default();
    let script = format!("#!/bin/sh\n{version}exec {} {extra} \"$@\"\n", real_restic().display());
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A restic that appends each command line it is given (one line each,
/// arguments joined by spaces) to `log`, then runs the real one: tests count
/// which restic commands a run started, or that it started none.
pub fn logging_restic(dir: &Path, log: &Path) -> PathBuf {
    let path = dir.join("logging-restic");
    let script = format!("#!/bin/sh\necho \"$*\" >> '{}'\nexec {} \"$@\"\n", log.display(), real_restic().display());
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}
