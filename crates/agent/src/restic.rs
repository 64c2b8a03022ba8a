//! The restic adapter: runs the real `restic` binary, never through a
//! shell. Each child gets its own process group (so cancelling kills
//! everything it started), a null stdin, a cleared environment holding only
//! what restic needs (secrets reach restic only here: never argv, never the
//! agent's own environment), stdout read line by line, and stderr drained at
//! the same time into a bounded buffer.

use soda_syncer_domain::location::RepositoryLocation;
use soda_syncer_domain::restic_json::{
    parse_backup_line, BackupMessage, BackupStatus, BackupSummary, ForgetGroup, Snapshot,
};
use soda_syncer_domain::restic_version::{Features, ResticVersion, Support};
use soda_syncer_domain::secret::{redact_url, scrub, url_password};
use soda_syncer_domain::Secret;
use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// How to reach one repository.
#[derive(Debug, Clone)]
pub struct Repo {
    pub url: String,
    pub password: Secret,
    pub env: BTreeMap<String, Secret>,
}

impl Repo {
    /// Every string that must not appear in an error or a log line.
    fn secrets(&self) -> Vec<&str> {
        let mut v: Vec<&str> = vec![self.password.expose()];
        v.extend(self.env.values().map(|s| s.expose()));
        v.extend(url_password(&self.url));
        v
    }
    pub fn display(&self) -> String {
        redact_url(&self.url)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResticError {
    #[error("restic was not found at {path}: install it (apt-get install restic) or point --restic at it")]
    NotInstalled { path: String },
    #[error("cannot start restic: {message}")]
    Spawn { message: String },
    #[error("{message}")]
    Unsupported { message: String },
    #[error("wrong password for the repository {repo}: check the policy's repository.password")]
    WrongPassword { repo: String },
    #[error("there is no restic repository at {repo}: {stderr}")]
    RepositoryNotFound { repo: String, stderr: String },
    #[error("the repository {repo} refused our credentials: check the access keys in repository.env (or the user and password in a REST URL): {stderr}")]
    AccessDenied { repo: String, stderr: String },
    #[error("the repository {repo} refuses this node's deletes (it is append-only): retention and prune are left to the maintainer that holds the delete rights (soda-syncer maintain): {stderr}")]
    DeletesRefused { repo: String, stderr: String },
    #[error("the repository {repo} is locked by another process; stale locks are removed automatically, this one is held by a live process: {stderr}")]
    RepositoryLocked { repo: String, stderr: String },
    #[error("cannot reach the repository {repo}: is the server up and the address right? {stderr}")]
    RepositoryUnreachable { repo: String, stderr: String },
    #[error("the source path {path} does not exist or is not a directory: restic would record an empty snapshot, so the run was refused; check that the volume is mounted")]
    SourceMissing { path: String },
    #[error(
        "no space left on a device restic writes to (the repository, or the cache under the state directory): {stderr}"
    )]
    DiskFull { stderr: String },
    #[error("the repository {repo} is in a format restic {version} no longer opens (the legacy index or the s3legacy layout): migrate it once with restic 0.17 (`restic migrate` / `restic repair index`) or run the agent with restic 0.17: {stderr}")]
    LegacyFormat { repo: String, version: String, stderr: String },
    #[error("restic {command} was interrupted by a signal the agent did not send (exit 130): {stderr}")]
    Interrupted { command: String, stderr: String },
    #[error("restic {command} was cancelled")]
    Cancelled { command: String },
    #[error("restic {command} was not run or was stopped: {reason}")]
    Fenced { command: String, reason: String },
    #[error("restic {command} ran longer than {seconds} s and was killed; raise --run-timeout-seconds if the volume is that large")]
    TimedOut { command: String, seconds: u64 },
    #[error("{0}")]
    Credentials(String),
    #[error("restic {command} failed with exit code {code}: {stderr}")]
    Failed { command: String, code: i32, stderr: String },
}

impl ResticError {
    /// A short stable code: the API error code and the metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ResticError::NotInstalled { .. } => "restic_missing",
            ResticError::Spawn { .. } => "restic_spawn_failed",
            ResticError::Unsupported { .. } => "restic_unsupported",
            ResticError::WrongPassword { .. } => "wrong_password",
            ResticError::RepositoryNotFound { .. } => "repository_not_found",
            ResticError::AccessDenied { .. } => "repository_access_denied",
            ResticError::DeletesRefused { .. } => "repository_append_only",
            ResticError::RepositoryLocked { .. } => "repository_locked",
            ResticError::RepositoryUnreachable { .. } => "repository_unreachable",
            ResticError::SourceMissing { .. } => "source_missing",
            ResticError::DiskFull { .. } => "disk_full",
            ResticError::LegacyFormat { .. } => "repository_format_unsupported",
            ResticError::Interrupted { .. } => "restic_interrupted",
            ResticError::Cancelled { .. } => "cancelled",
            ResticError::Fenced { .. } => "node_fenced",
            ResticError::TimedOut { .. } => "timed_out",
            ResticError::Failed { .. } => "restic_failed",
            ResticError::Credentials(_) => "secrets_unavailable",
        }
    }

    /// Whether trying again can help, and when (as rustic_core's errors
    /// say): the one place that retries (`LockRule`) asks
    /// this, nothing else decides it.
    pub fn retry(&self) -> Retry {
        match self {
            ResticError::RepositoryLocked { .. } => Retry::WhenUnlocked,
            ResticError::RepositoryUnreachable { .. }
            | ResticError::DiskFull { .. }
            | ResticError::Interrupted { .. }
            | ResticError::TimedOut { .. }
            | ResticError::Fenced { .. }
            | ResticError::Spawn { .. }
            | ResticError::Failed { .. } => Retry::Later,
            ResticError::NotInstalled { .. }
            | ResticError::Unsupported { .. }
            | ResticError::WrongPassword { .. }
            | ResticError::RepositoryNotFound { .. }
            | ResticError::AccessDenied { .. }
            | ResticError::DeletesRefused { .. }
            | ResticError::SourceMissing { .. }
            | ResticError::LegacyFormat { .. }
            | ResticError::Cancelled { .. }
            | ResticError::Credentials(_) => Retry::Never,
        }
    }
}

/// Whether a failed command is worth trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Not until someone changes something (a password, the source, the
    /// installed restic, the repository's rights); a repository that does
    /// not exist yet is made once by `backup`, which is not a retry.
    Never,
    /// Another process holds the repository's lock: remove it if its holder
    /// is provably gone, else wait for it (`LockWait`, up to `--lock-wait`).
    WhenUnlocked,
    /// The server, the disk or the process may be fine at the next
    /// scheduled run; trying again at once would only fail the same way.
    Later,
}

/// What a finished command left behind.
struct Exec {
    code: i32,
    stderr_tail: String,
    error_items: Vec<String>,
}

/// One backup request.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    pub path: PathBuf,
    pub tags: Vec<String>,
    pub exclude: Vec<String>,
    /// The held volume, or a point-in-time view of it (a snapshot or a
    /// copy), that restic reads at `path` itself: mounted over it in a
    /// private mount namespace of the restic child only (read-only, no
    /// symlink followed), so the snapshot lists the volume's own path and
    /// finds its parent, and nothing swapped in under that name is read.
    pub pin: Option<Arc<crate::beneath::Pin>>,
    /// The view's inode numbers and ctimes are new (a file copy): compare
    /// files by size and mtime only (`--ignore-inode`).
    pub ignore_inode: bool,
}

#[derive(Debug, Clone)]
pub struct BackupOutcome {
    pub summary: BackupSummary,
    /// restic exited 3: some files could not be read.
    pub partial: bool,
    pub unreadable: Vec<String>,
}

const STDERR_LINES: usize = 40;
const STDERR_LINE_CHARS: usize = 400;
const MAX_ERROR_ITEMS: usize = 200;

#[derive(Clone)]
pub struct Restic {
    bin: PathBuf,
    cache_root: PathBuf,
    host: String,
    timeout: Duration,
    /// Give up on a repository restic has kept retrying for this long.
    unreachable_after: Duration,
    /// How long a stopped restic gets between SIGINT and SIGKILL.
    stop_grace: Duration,
    /// How long to wait for a lock a live process holds.
    lock_wait: Duration,
    /// Serialises `init`, so two policies that share a new repository do
    /// not race to create it.
    init_lock: Arc<tokio::sync::Mutex<()>>,
    /// The same across the agents of a cluster (a Lease per repository), so
    /// two nodes never both create one repository: the loser's key would
    /// not open the winner's config, and restic may pick either key.
    init_guard: Arc<std::sync::OnceLock<Arc<dyn InitGuard>>>,
    /// How often a lock conflict was met and stale locks were removed.
    lock_recoveries: Arc<std::sync::atomic::AtomicU64>,
    /// Says whether another host's agent is gone (Kubernetes: its Lease).
    lock_holders: Arc<std::sync::OnceLock<Arc<dyn LockHolders>>>,
    fence: Arc<Fence>,
    /// The version `version()` detected; what newer restic offers is used
    /// only when it is known to be there.
    detected: Arc<std::sync::OnceLock<ResticVersion>>,
    /// Repositories (`short_hash` of the URL) seen refusing a delete since
    /// the agent started: no forget or prune is tried on them again.
    deletes_refused: Arc<Mutex<std::collections::BTreeSet<String>>>,
    /// The first command on a repository's fresh cache runs alone until
    /// restic has written the cache's version file (see [`CacheGate`]).
    cache_gate: Arc<CacheGate>,
}

/// restic (0.19 at least) fails a command outright when its cache's
/// `version` file exists but is still empty: two processes that open a
/// repository with a fresh cache directory at once can meet this, one
/// reading the file the other has just created ("unable to open cache:
/// readVersion: strconv.ParseUint: parsing \"\""; seen with concurrent
/// backups of one repository on a new node, 1 in ~200 tries). So until a
/// cache directory holds a written version file, the commands using it go
/// one at a time, each only until the file is there (or it ends); after
/// that they run side by side as before.
#[derive(Default)]
struct CacheGate {
    gates: Mutex<std::collections::HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl CacheGate {
    /// Wait (or be cancelled) until a command may open `dir`: `None` when
    /// the cache is ready, else a guard to hold until [`cache_ready`].
    async fn enter(
        &self,
        dir: &std::path::Path,
        cancel: &CancellationToken,
    ) -> Option<Option<tokio::sync::OwnedMutexGuard<()>>> {
        if cache_ready(dir) {
            return Some(None);
        }
        let gate = self.gates.lock().unwrap_or_else(|p| p.into_inner()).entry(dir.to_path_buf()).or_default().clone();
        let guard = tokio::select! {
            g = gate.lock_owned() => g,
            _ = cancel.cancelled() => return None,
        };
        Some((!cache_ready(dir)).then_some(guard))
    }
}

/// Whether a repository's cache below `dir` has its version written
/// (`<dir>/<repository id>/version`, not empty).
fn cache_ready(dir: &std::path::Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        std::fs::symlink_metadata(e.path().join("version")).map(|m| m.is_file() && m.len() > 0).unwrap_or(false)
    })
}

/// While this node cannot prove it is alive (its liveness Lease could not
/// be renewed), other nodes may remove its restic locks; so no restic runs
/// here then: running ones are stopped, new ones refused, until the Lease
/// is renewed again.
#[derive(Default)]
struct Fence {
    reason: Mutex<Option<String>>,
    token: Mutex<CancellationToken>,
}

impl Fence {
    fn state(&self) -> (Option<String>, CancellationToken) {
        let reason = self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (reason, self.token.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Whether the agent that ran restic on another host is provably gone, so
/// the locks its restic left can be removed without waiting for restic's
/// own 30-minute staleness rule.
pub trait LockHolders: Send + Sync {
    fn is_gone<'a>(&'a self, hostname: &'a str) -> futures_util::future::BoxFuture<'a, bool>;
}

/// A lock file as `restic cat lock` shows it.
#[derive(Debug, serde::Deserialize)]
struct LockInfo {
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    pid: u64,
    #[serde(default)]
    exclusive: bool,
}

/// The host name restic writes into its locks (this UTS namespace's).
pub fn own_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// A lock held across the agents of a cluster while a repository is
/// created; dropping the returned value releases it.
pub trait InitGuard: Send + Sync {
    fn hold<'a>(
        &'a self,
        repo_key: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Option<Box<dyn std::any::Any + Send>>>;
}

impl Restic {
    pub fn new(bin: PathBuf, cache_root: PathBuf, host: String, timeout: Duration) -> Restic {
        Restic {
            bin,
            cache_root,
            host,
            timeout,
            unreachable_after: Duration::from_secs(300),
            stop_grace: Duration::from_secs(5),
            lock_wait: Duration::from_secs(600),
            init_lock: Arc::default(),
            init_guard: Arc::default(),
            lock_recoveries: Arc::default(),
            lock_holders: Arc::default(),
            fence: Arc::default(),
            detected: Arc::default(),
            deletes_refused: Arc::default(),
            cache_gate: Arc::default(),
        }
    }

    /// The version found at start, if `version()` ran and understood it.
    pub fn detected_version(&self) -> Option<ResticVersion> {
        self.detected.get().copied()
    }

    /// What the detected restic offers (nothing beyond 0.14 when unknown).
    pub fn features(&self) -> Features {
        self.detected_version().map(ResticVersion::features).unwrap_or_default()
    }

    /// Stop every restic command and refuse new ones (`Some(why)`), or
    /// allow them again (`None`).
    pub fn set_fenced(&self, why: Option<String>) {
        let mut reason = self.fence.reason.lock().unwrap_or_else(|p| p.into_inner());
        let mut token = self.fence.token.lock().unwrap_or_else(|p| p.into_inner());
        match &why {
            Some(w) if reason.is_none() => {
                tracing::error!(reason = %w, "restic fenced: running commands are stopped, new ones refused");
                token.cancel();
            }
            None if reason.is_some() => {
                tracing::info!("restic allowed again");
                *token = CancellationToken::new();
            }
            _ => {}
        }
        *reason = why;
    }

    /// Set once, by the Kubernetes adapter.
    pub fn set_lock_holders(&self, holders: Arc<dyn LockHolders>) {
        let _ = self.lock_holders.set(holders);
    }

    /// Set once, by the Kubernetes adapter.
    pub fn set_init_guard(&self, guard: Arc<dyn InitGuard>) {
        let _ = self.init_guard.set(guard);
    }

    /// restic retries a failing backend for up to 15 minutes, silently as
    /// far as its exit code goes; past `after` of continuous retrying the
    /// run is stopped and reported as `repository_unreachable`.
    pub fn with_unreachable_after(mut self, after: Duration) -> Restic {
        self.unreachable_after = after;
        self
    }

    /// A stopped restic removes its lock only once a backend connection is
    /// free, so on a slow link it may need longer than the default 5 s
    /// (measured: 6 s at 1 MiB/s with both connections uploading).
    pub fn with_stop_grace(mut self, grace: Duration) -> Restic {
        self.stop_grace = grace;
        self
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// `restic version`, e.g. "0.14.0"; remembered for [`Restic::features`].
    /// A version older than the oldest supported is an error (the agent is
    /// then not ready); one newer than the newest tested is not.
    pub async fn version(&self) -> Result<String, ResticError> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("version").env_clear().envs(passthrough_env()).stdin(Stdio::null()).kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
            .await
            .map_err(|_| ResticError::Spawn { message: "restic version did not answer within 20 s".into() })?
            .map_err(|e| self.spawn_error(e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed = ResticVersion::from_version_output(&text).filter(|_| out.status.success());
        let version = parsed.ok_or_else(|| ResticError::Spawn {
            message: format!("unexpected output from restic version: {text:?}"),
        })?;
        let _ = self.detected.set(version);
        if version.support() == Support::TooOld {
            return Err(ResticError::Unsupported { message: version.support().message(version).unwrap_or_default() });
        }
        Ok(text.split_whitespace().nth(1).unwrap_or_default().to_string())
    }

    fn spawn_error(&self, e: std::io::Error) -> ResticError {
        if e.kind() == std::io::ErrorKind::NotFound {
            ResticError::NotInstalled { path: self.bin.display().to_string() }
        } else {
            ResticError::Spawn { message: e.to_string() }
        }
    }

    fn cache_dir(&self, repo: &Repo) -> PathBuf {
        self.cache_root.join(crate::ids::short_hash(&[&repo.url]))
    }

    /// Run one restic command to the end, in the namespaces `isolation`
    /// asks for, feeding each stdout line to `on_line`. Cancellation and the
    /// timeout kill the whole process group.
    async fn exec_in(
        &self,
        repo: &Repo,
        args: &[OsString],
        cancel: &CancellationToken,
        mut on_line: impl FnMut(&str),
        isolation: Isolation<'_>,
    ) -> Result<Exec, ResticError> {
        let pinned = match isolation {
            Isolation::Pinned(pin) => Some(pin),
            _ => None,
        };
        let command = args.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
        let (fenced, fence) = self.fence.state();
        if let Some(reason) = fenced {
            return Err(ResticError::Fenced { command, reason });
        }
        let cache_dir = self.cache_dir(repo);
        let Some(mut first_on_cache) = self.cache_gate.enter(&cache_dir, cancel).await else {
            return Err(ResticError::Cancelled { command });
        };
        let ((stdout_read, stdout_write), (stderr_read, stderr_write)) = (output_pipe()?, output_pipe()?);
        let kept_by_child = [stdout_read.as_raw_fd(), stderr_read.as_raw_fd()];
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env_clear()
            .envs(passthrough_env())
            .env("RESTIC_REPOSITORY", &repo.url)
            .env("RESTIC_PASSWORD", repo.password.expose())
            .env("RESTIC_CACHE_DIR", &cache_dir)
            .env("RESTIC_PROGRESS_FPS", "2")
            .envs(repo.env.iter().map(|(k, v)| (k, v.expose())))
            .stdin(Stdio::null())
            .stdout(stdout_write)
            .stderr(stderr_write)
            .process_group(0)
            .kill_on_drop(true);
        // If the agent dies (even by SIGKILL), restic gets SIGINT and
        // removes its lock instead of running on as an orphan (SIGINT, not
        // SIGTERM: restic before 0.17 dies on SIGTERM and leaves its lock).
        // restic then prints "cleaning up" to stderr; were the agent's read
        // end of that pipe its only one, the write would kill restic with
        // SIGPIPE before it removed its lock (seen with 0.14 and 0.19). So
        // the child keeps a read end of both pipes open itself (nothing
        // reads it; the 64 KiB pipe buffer takes what restic prints while
        // it stops).
        // SAFETY: prctl and fcntl are async-signal-safe and touch only the
        // child (FD_CLOEXEC is a flag of the child's own descriptor table).
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT, 0, 0, 0);
                for fd in kept_by_child {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        if let Some(pin) = pinned {
            // Resolved again now; held only until the child has its mounts.
            let opened =
                pin.open().map_err(|e| ResticError::Spawn { message: format!("restic was not started: {e}") })?;
            // SAFETY: `enter` makes only system calls, on memory allocated
            // before the fork (see its doc).
            unsafe {
                cmd.pre_exec(move || opened.enter());
            }
        }
        if let Isolation::AsHost(host) = isolation {
            let name = std::ffi::CString::new(host)
                .map_err(|_| ResticError::Spawn { message: "a host name with a NUL byte".into() })?;
            // SAFETY: unshare and sethostname are system calls (async-signal-
            // safe); the name was allocated before the fork and is only read.
            unsafe {
                cmd.pre_exec(move || {
                    let bytes = name.as_bytes();
                    if libc::unshare(libc::CLONE_NEWUTS) != 0 || libc::sethostname(name.as_ptr(), bytes.len()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| match pinned {
            Some(pin) if e.kind() != std::io::ErrorKind::NotFound => ResticError::Spawn {
                message: if e.raw_os_error() == Some(libc::EXDEV) {
                    format!("{} no longer leads to the directory the agent checked (it was swapped while restic started): refused", pin.at().display())
                } else {
                    format!("cannot mount the checked directory at {} in a private mount namespace for restic: {e}", pin.at().display())
                },
            },
            _ => self.spawn_error(e),
        })?;
        let pid = child.id();
        drop(cmd); // our copies of the write ends: EOF comes when restic's close
        let stdout = receiver(stdout_read)?;
        let stderr = receiver(stderr_read)?;
        let tail = Arc::new(Mutex::new(StderrTail::default()));
        let hopeless = Arc::new(tokio::sync::Notify::new());
        let stderr_task = tokio::spawn(drain_stderr(stderr, tail.clone(), hopeless.clone()));
        let mut lines = BufReader::new(stdout).lines();
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);

        enum End {
            Exited(std::io::Result<std::process::ExitStatus>),
            Cancelled,
            Fenced,
            TimedOut,
            Unreachable(Duration),
            Hopeless,
        }
        let mut stdout_open = true;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut cache_tick = tokio::time::interval(Duration::from_millis(20));
        let end = loop {
            tokio::select! {
                line = lines.next_line(), if stdout_open => match line {
                    Ok(Some(l)) => on_line(&l),
                    _ => stdout_open = false,
                },
                status = child.wait(), if !stdout_open => break End::Exited(status),
                _ = cancel.cancelled() => break End::Cancelled,
                _ = fence.cancelled() => break End::Fenced,
                _ = &mut deadline => break End::TimedOut,
                _ = hopeless.notified() => break End::Hopeless,
                _ = cache_tick.tick(), if first_on_cache.is_some() => {
                    if cache_ready(&cache_dir) {
                        first_on_cache = None; // the others may open the cache now
                    }
                }
                _ = tick.tick() => {
                    if let Some(d) = tail.lock().unwrap_or_else(|p| p.into_inner()).retrying_for() {
                        if d > self.unreachable_after {
                            break End::Unreachable(d);
                        }
                    }
                }
            }
        };
        // This command has ended or is being stopped: the next one may open
        // the cache (the clean-up `unlock` below among them, which would
        // otherwise wait on this very guard).
        drop(first_on_cache);
        let end = match end {
            End::Exited(s) => End::Exited(s),
            other => {
                kill_group(pid, &mut child, self.stop_grace).await;
                if !matches!(other, End::Fenced) && self.may_leave_lock_when_stopped(args) {
                    self.remove_own_stale_locks(repo).await;
                }
                other
            }
        };
        let _ = stderr_task.await;
        let tail = std::mem::take(&mut *tail.lock().unwrap_or_else(|p| p.into_inner()));
        let secrets = repo.secrets();
        let stderr_tail = scrub(&tail.lines.iter().cloned().collect::<Vec<_>>().join("\n"), &secrets);
        match end {
            End::Cancelled => Err(ResticError::Cancelled { command }),
            End::Fenced => {
                let reason = self.fence.state().0.unwrap_or_else(|| "this node was fenced".into());
                Err(ResticError::Fenced { command, reason })
            }
            End::TimedOut => Err(ResticError::TimedOut { command, seconds: self.timeout.as_secs() }),
            End::Unreachable(d) => Err(ResticError::RepositoryUnreachable {
                repo: repo.display(),
                stderr: format!("restic kept retrying for {} s and was stopped: {stderr_tail}", d.as_secs()),
            }),
            End::Hopeless => Err(match tail.hopeless {
                Some(HopelessRetry::Refused) => ResticError::AccessDenied {
                    repo: repo.display(),
                    stderr: format!("restic was retrying a refused request and was stopped: {stderr_tail}"),
                },
                _ => ResticError::RepositoryNotFound {
                    repo: repo.display(),
                    stderr: format!("the bucket does not exist (restic was retrying and was stopped): {stderr_tail}"),
                },
            }),
            End::Exited(Err(e)) => Err(ResticError::Spawn { message: e.to_string() }),
            End::Exited(Ok(status)) => Ok(Exec {
                code: status.code().unwrap_or(-1),
                stderr_tail,
                error_items: tail.error_items.iter().map(|i| scrub(i, &secrets)).collect(),
            }),
        }
    }

    /// restic before 0.17 has a window right after it writes its lock
    /// (before it records the lock for its own clean-up) in which even
    /// SIGINT leaves the lock behind (measured with 0.14: a stop within
    /// ~0.3 s of the lock file appearing). 0.18 and 0.19 never did in the
    /// same probe.
    fn may_leave_lock_when_stopped(&self, args: &[OsString]) -> bool {
        let takes_lock = !matches!(args.first().and_then(|a| a.to_str()), Some("version" | "init" | "unlock") | None)
            && !args.iter().any(|a| a == "--no-lock");
        takes_lock && !self.features().cleans_up_on_sigterm
    }

    /// After this agent stopped a restic that may have left its lock:
    /// `restic unlock` removes exactly the locks whose process is dead on
    /// this host (the one just stopped among them), never a live one. Not
    /// cancellable by the run (it was just cancelled); bounded instead.
    fn remove_own_stale_locks<'a>(&'a self, repo: &'a Repo) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            let bound = CancellationToken::new();
            let unlocked = tokio::time::timeout(Duration::from_secs(15), self.unlock(repo, &bound)).await;
            match unlocked {
                Ok(Ok(())) => {
                    tracing::debug!(repository = %repo.display(), "removed the lock a stopped restic may have left")
                }
                Ok(Err(e)) => {
                    tracing::warn!(repository = %repo.display(), error = %e, "cannot remove the lock a stopped restic may have left; the next run removes it")
                }
                Err(_) => {
                    bound.cancel();
                    tracing::warn!(repository = %repo.display(), "restic unlock after a stop took over 15 s; the next run removes the lock")
                }
            }
        })
    }

    /// Map a failed command to an error: by restic's exit code where the
    /// version has distinct ones (0.17+: 10 no repository, 11 lock failed,
    /// 12 wrong password, 130 interrupted), else by its stderr (0.14 exits 1
    /// for nearly everything; TESTING.md lists the texts). restic 0.18+
    /// states the reason as a JSON `exit_error` message; it is shown as text.
    fn classify(&self, repo: &Repo, command: &str, exec: Exec) -> ResticError {
        let s = readable_stderr(&exec.stderr_tail);
        let repo_s = repo.display();
        if self.features().exit_codes {
            match exec.code {
                10 => return ResticError::RepositoryNotFound { repo: repo_s, stderr: s },
                11 => return ResticError::RepositoryLocked { repo: repo_s, stderr: s },
                12 => return ResticError::WrongPassword { repo: repo_s },
                130 => return ResticError::Interrupted { command: command.to_string(), stderr: s },
                _ => {}
            }
        }
        let version = self.detected_version().map(|v| v.to_string()).unwrap_or_default();
        classify_text(repo_s, command, exec.code, s, &version)
    }

    async fn simple(
        &self,
        repo: &Repo,
        args: Vec<OsString>,
        cancel: &CancellationToken,
    ) -> Result<String, ResticError> {
        self.simple_in(repo, args, cancel, Isolation::None).await
    }

    /// As `simple`, in the namespaces `isolation` asks for.
    async fn simple_in(
        &self,
        repo: &Repo,
        args: Vec<OsString>,
        cancel: &CancellationToken,
        isolation: Isolation<'_>,
    ) -> Result<String, ResticError> {
        let command = args[0].to_string_lossy().into_owned();
        let mut out = String::new();
        let exec = self
            .exec_in(
                repo,
                &args,
                cancel,
                |l| {
                    out.push_str(l);
                    out.push('\n');
                },
                isolation,
            )
            .await?;
        if exec.code != 0 {
            return Err(self.classify(repo, &command, exec));
        }
        Ok(out)
    }

    pub async fn init(&self, repo: &Repo, cancel: &CancellationToken) -> Result<(), ResticError> {
        let _guard = self.init_lock.lock().await;
        let _cluster = match self.init_guard.get() {
            Some(g) => g.hold(&crate::ids::short_hash(&[&repo.url])).await,
            None => None,
        };
        match self.simple(repo, vec!["init".into()], cancel).await {
            Ok(_) => {
                tracing::info!(repository = %repo.display(), "initialised a new restic repository");
                Ok(())
            }
            // Someone else created it between our check and our init.
            Err(ResticError::Failed { stderr, .. })
                if stderr.contains("already exists") || stderr.contains("already initialized") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `restic unlock`: removes only stale locks (dead PID on this host, or
    /// older than 30 minutes); a live holder's lock stays.
    pub async fn unlock(&self, repo: &Repo, cancel: &CancellationToken) -> Result<(), ResticError> {
        self.simple(repo, vec!["unlock".into()], cancel).await.map(|_| ())
    }

    /// A command met a lock: remove stale ones (logged and counted), so
    /// the caller can try once more. A live holder's lock is left alone.
    async fn recover_lock(&self, repo: &Repo, command: &str, cancel: &CancellationToken) -> Result<(), ResticError> {
        self.lock_recoveries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(repository = %repo.display(), command, "repository locked: removing stale locks and trying once more");
        self.unlock(repo, cancel).await?;
        self.break_locks_of_gone_hosts(repo, cancel).await;
        Ok(())
    }

    /// Remove the locks left by restic on other hosts whose agent is gone
    /// (see [`LockHolders`]). In a local or REST repository the agent
    /// deletes each such lock file itself. In any other (S3, ...) it runs
    /// `restic unlock` as that host, in a UTS namespace of its own with the
    /// dead host's name: restic then counts that host's locks whose process
    /// does not run here as stale and removes them (a PID that happens to
    /// run here keeps its lock: the safe side), besides the locks older than
    /// 30 minutes that any `unlock` removes. Returns how many were removed;
    /// what cannot be read is left alone.
    pub async fn break_locks_of_gone_hosts(&self, repo: &Repo, cancel: &CancellationToken) -> usize {
        let Some(holders) = self.lock_holders.get() else { return 0 };
        let remover = LockRemover::for_url(&repo.url);
        let no_lock = || -> Vec<OsString> { vec!["--no-lock".into()] };
        let Ok(ids) = self.simple(repo, [vec!["list".into(), "locks".into()], no_lock()].concat(), cancel).await else {
            return 0;
        };
        let me = own_hostname();
        let mut removed = 0;
        let lock_ids = |text: &str| -> Vec<String> {
            text.lines()
                .map(str::trim)
                .filter(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_string)
                .collect()
        };
        // Other backends: each dead host's lock ids, to unlock as that host.
        let mut dead_hosts: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for id in lock_ids(&ids) {
            let id = id.as_str();
            let args = [vec!["cat".into(), "lock".into(), id.into()], no_lock()].concat();
            let Ok(text) = self.simple(repo, args, cancel).await else { continue };
            let Ok(lock) = serde_json::from_str::<LockInfo>(&text) else { continue };
            if lock.hostname.is_empty() || lock.hostname == me || !holders.is_gone(&lock.hostname).await {
                continue;
            }
            let Some(remover) = &remover else {
                dead_hosts.entry(lock.hostname).or_default().push(id.to_string());
                continue;
            };
            match remover.remove(id).await {
                Ok(()) => {
                    removed += 1;
                    tracing::warn!(
                        repository = %repo.display(),
                        lock = &id[..8],
                        host = %lock.hostname,
                        pid = lock.pid,
                        exclusive = lock.exclusive,
                        "removed a lock whose holder is gone: its host's agent lease expired"
                    );
                }
                Err(e) => {
                    tracing::warn!(repository = %repo.display(), lock = &id[..8], error = %e, "cannot remove a dead host's lock")
                }
            }
        }
        for (host, theirs) in dead_hosts {
            let unlocked = self.simple_in(repo, vec!["unlock".into()], cancel, Isolation::AsHost(&host)).await;
            if let Err(e) = unlocked {
                tracing::warn!(repository = %repo.display(), host = %host, error = %e, "cannot remove a dead host's locks");
                continue;
            }
            let args = [vec!["list".into(), "locks".into()], no_lock()].concat();
            let left = self.simple(repo, args, cancel).await.map(|t| lock_ids(&t)).unwrap_or_default();
            let gone = theirs.iter().filter(|id| !left.contains(id)).count();
            removed += gone;
            tracing::warn!(
                repository = %repo.display(),
                host = %host,
                removed = gone,
                kept = theirs.len() - gone,
                "removed a lock whose holder is gone: its host's agent lease expired (restic unlock run as that host)"
            );
        }
        removed
    }

    pub fn lock_recoveries(&self) -> u64 {
        self.lock_recoveries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One `backup --json` of `req.path`, without recovery.
    async fn backup_once(
        &self,
        repo: &Repo,
        req: &BackupRequest,
        cancel: &CancellationToken,
        progress: &mut (dyn FnMut(&BackupStatus) + Send),
        wait: &LockWait,
    ) -> Result<BackupOutcome, ResticError> {
        let mut args: Vec<OsString> = vec!["backup".into(), "--json".into(), "--host".into(), self.host.clone().into()];
        wait.add_retry_lock(&mut args);
        for t in &req.tags {
            args.push("--tag".into());
            args.push(t.into());
        }
        for e in &req.exclude {
            args.push("--exclude".into());
            args.push(e.into());
        }
        if req.ignore_inode {
            args.push("--ignore-inode".into());
        }
        args.push("--".into());
        args.push(req.path.clone().into());
        let mut summary = None;
        let bind = match &req.pin {
            Some(pin) => Isolation::Pinned(pin),
            None => Isolation::None,
        };
        let exec = self
            .exec_in(
                repo,
                &args,
                cancel,
                |line| match parse_backup_line(line) {
                    Some(BackupMessage::Status(s)) => progress(&s),
                    Some(BackupMessage::Summary(s)) => summary = Some(s),
                    _ => {}
                },
                bind,
            )
            .await?;
        match (exec.code, summary) {
            (0, Some(summary)) => Ok(BackupOutcome { summary, partial: false, unreadable: Vec::new() }),
            (3, Some(summary)) => Ok(BackupOutcome { summary, partial: true, unreadable: exec.error_items }),
            (0, None) => Err(ResticError::Failed {
                command: "backup".into(),
                code: 0,
                stderr: format!("restic printed no summary. {}", exec.stderr_tail),
            }),
            _ => Err(self.classify(repo, "backup", exec)),
        }
    }

    /// Back up one directory, recovering from what needs no human: a
    /// repository that does not exist yet is initialised, a stale lock is
    /// removed; each at most once, then the backup is tried again.
    pub async fn backup(
        &self,
        repo: &Repo,
        req: &BackupRequest,
        cancel: &CancellationToken,
        progress: &mut (dyn FnMut(&BackupStatus) + Send),
    ) -> Result<BackupOutcome, ResticError> {
        if !req.path.is_dir() {
            return Err(ResticError::SourceMissing { path: req.path.display().to_string() });
        }
        let mut initialised = false;
        let mut rule = LockRule::new(self, LockPatience::Wait);
        loop {
            match self.backup_once(repo, req, cancel, progress, &rule.wait).await {
                Err(ResticError::RepositoryNotFound { .. }) if !initialised => {
                    initialised = true;
                    self.init(repo, cancel).await?;
                }
                Err(e) => rule.after(self, repo, "backup", e, cancel).await?,
                done => return done,
            }
        }
    }

    /// `forget` with the given keep rules, limited to one policy's
    /// snapshots on this host (so policies sharing a repository never touch
    /// each other's). Grouped by host only, so a volume whose mount path
    /// changed keeps one retention history.
    pub async fn forget(
        &self,
        repo: &Repo,
        policy_tag: &str,
        keep_args: &[String],
        cancel: &CancellationToken,
    ) -> Result<Vec<ForgetGroup>, ResticError> {
        self.forget_of(repo, Some(&self.host), policy_tag, keep_args, cancel).await
    }

    /// `forget` of one policy's snapshots written by another host (the
    /// maintainer's, for the node whose agent reported the policy).
    pub async fn forget_on_host(
        &self,
        repo: &Repo,
        host: &str,
        policy_tag: &str,
        keep_args: &[String],
        cancel: &CancellationToken,
    ) -> Result<Vec<ForgetGroup>, ResticError> {
        self.forget_of(repo, Some(host), policy_tag, keep_args, cancel).await
    }

    async fn forget_of(
        &self,
        repo: &Repo,
        host: Option<&str>,
        policy_tag: &str,
        keep_args: &[String],
        cancel: &CancellationToken,
    ) -> Result<Vec<ForgetGroup>, ResticError> {
        let mut args: Vec<OsString> = vec!["forget".into(), "--json".into()];
        if let Some(h) = host {
            args.extend(["--host".into(), h.into()]);
        }
        args.extend(["--tag".into(), policy_tag.into(), "--group-by".into(), "host".into()]);
        args.extend(keep_args.iter().map(OsString::from));
        let mut rule = LockRule::new(self, LockPatience::RecoverOnly);
        let out = loop {
            match self.simple(repo, args.clone(), cancel).await {
                Err(e) => {
                    rule.after(self, repo, "forget", e, cancel).await.map_err(|e| self.deletes_refused_by(repo, e))?
                }
                Ok(out) => break out,
            }
        };
        let json = out.lines().find(|l| l.starts_with('[')).unwrap_or("[]");
        serde_json::from_str(json).map_err(|e| ResticError::Failed {
            command: "forget".into(),
            code: 0,
            stderr: format!("unreadable JSON from restic forget: {e}"),
        })
    }

    /// Snapshots, optionally limited to a tag and/or given ids.
    pub async fn snapshots(
        &self,
        repo: &Repo,
        tag: Option<&str>,
        host: Option<&str>,
        ids: &[&str],
        cancel: &CancellationToken,
    ) -> Result<Vec<Snapshot>, ResticError> {
        let mut args: Vec<OsString> = vec!["snapshots".into(), "--json".into()];
        if let Some(t) = tag {
            args.push("--tag".into());
            args.push(t.into());
        }
        if let Some(h) = host {
            args.push("--host".into());
            args.push(h.into());
        }
        args.extend(ids.iter().map(OsString::from));
        let out = self.simple(repo, args, cancel).await?;
        let json = out.lines().find(|l| l.starts_with('[')).unwrap_or("[]");
        serde_json::from_str(json).map_err(|e| ResticError::Failed {
            command: "snapshots".into(),
            code: 0,
            stderr: format!("unreadable JSON from restic snapshots: {e}"),
        })
    }
}

impl Restic {
    /// The full id of a snapshot known by its short id (restic 0.14's
    /// backup summary gives only that). A local or REST repository is asked
    /// directly (a directory listing, no key derivation: it costs
    /// milliseconds instead of restic's ~0.7 s); any other kind through
    /// `restic snapshots`.
    pub async fn resolve_snapshot_id(&self, repo: &Repo, short: &str, cancel: &CancellationToken) -> Option<String> {
        if let Some(names) = self.snapshot_ids(repo).await {
            let mut hits = names.into_iter().filter(|n| n.starts_with(short));
            if let (Some(one), None) = (hits.next(), hits.next()) {
                return Some(one);
            }
        }
        self.snapshots(repo, None, None, &[short], cancel).await.ok()?.into_iter().next().map(|s| s.id)
    }

    /// The full ids of every snapshot in a local or REST repository, from a
    /// directory listing (no key derivation, no lock); None for other kinds
    /// or when the listing fails.
    pub async fn snapshot_ids(&self, repo: &Repo) -> Option<Vec<String>> {
        let names = match RepositoryLocation::parse(&repo.url) {
            RepositoryLocation::Local(dir) => std::fs::read_dir(dir.join("snapshots"))
                .ok()?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            RepositoryLocation::Rest(url) => rest_list_snapshots(url).await?,
            _ => return None,
        };
        Some(names.into_iter().filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit())).collect())
    }
}

/// `GET <url>/snapshots/` of the restic REST protocol (v2, then v1 shape).
async fn rest_list_snapshots(url: &str) -> Option<Vec<String>> {
    let base = url.trim_end_matches('/');
    let (scheme, rest) = base.split_once("://")?;
    let (userinfo, hostpath) = match rest.split_once('@') {
        Some((u, h)) if !u.contains('/') => (Some(u), h),
        _ => (None, rest),
    };
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().ok()?;
    let mut req =
        client.get(format!("{scheme}://{hostpath}/snapshots/")).header("Accept", "application/vnd.x.restic.rest.v2");
    if let Some(u) = userinfo {
        let (user, pass) = u.split_once(':').unwrap_or((u, ""));
        req = req.basic_auth(user, Some(pass));
    }
    let resp = req.send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let v: serde_json::Value = resp.json().await.ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter_map(|e| e.get("name").and_then(|n| n.as_str()).or(e.as_str()).map(str::to_string))
            .collect(),
    )
}

/// One restore: a snapshot (by full or short id) into `target`.
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub snapshot_id: String,
    pub target: PathBuf,
    /// Absolute paths inside the snapshot to restore (all when empty);
    /// with `folder`, relative to it.
    pub include: Vec<String>,
    pub verify: bool,
    /// The held directory restic writes into, seen at `target` in the
    /// child's own mount namespace (see [`crate::beneath::Pin`]).
    pub pin: Option<Arc<crate::beneath::Pin>>,
    /// restic 0.17+: restore only this folder of the snapshot, at the
    /// target's root (`ID:folder`).
    pub folder: Option<String>,
    /// restic 0.17+: `--overwrite if-changed` (only files that differ are written).
    pub overwrite_if_changed: bool,
    /// restic 0.17+: `--delete` (remove what the snapshot does not hold).
    pub delete: bool,
    /// restic 0.17+: `--dry-run -vv`: write nothing, list what would change.
    pub dry_run: bool,
    /// Patterns restic neither restores nor deletes (0.17+).
    pub exclude: Vec<String>,
}

/// What `restore --json` said (0.16+; nothing with older restic).
#[derive(Debug, Clone, Default)]
pub struct RestoreOutcome {
    pub summary: Option<soda_syncer_domain::restore::RestoreStatus>,
    /// Every item of a dry run (`verbose_status`), in restic's order.
    pub items: Vec<soda_syncer_domain::restore::RestoreItem>,
}

impl Restic {
    /// The newest snapshot carrying `tag` (and `host`, when given).
    pub async fn latest_snapshot(
        &self,
        repo: &Repo,
        tag: Option<&str>,
        host: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Option<Snapshot>, ResticError> {
        let mut snaps = self.snapshots(repo, tag, host, &[], cancel).await?;
        snaps.sort_by(|a, b| a.time.cmp(&b.time));
        Ok(snaps.pop())
    }

    /// Every file, directory and link of a snapshot (`ls --json`).
    pub async fn ls(
        &self,
        repo: &Repo,
        snapshot_id: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<soda_syncer_domain::restic_json::LsNode>, ResticError> {
        let out = self.simple(repo, vec!["ls".into(), "--json".into(), snapshot_id.into()], cancel).await?;
        Ok(soda_syncer_domain::restic_json::parse_ls(&out))
    }

    /// Size and file count a restore of the snapshot writes: from the
    /// snapshot's own summary (`snapshots --json`, restic 0.17+, which
    /// reads one file), else `stats --mode restore-size` (which loads every
    /// tree of the snapshot).
    pub async fn restore_size(
        &self,
        repo: &Repo,
        snapshot_id: &str,
        cancel: &CancellationToken,
    ) -> Result<(u64, u64), ResticError> {
        if self.features().snapshot_summary {
            let snaps = self.snapshots(repo, None, None, &[snapshot_id], cancel).await?;
            if let Some(s) = snaps.into_iter().next().and_then(|s| s.summary) {
                return Ok((s.total_bytes_processed, s.total_files_processed));
            }
        }
        let out = self
            .simple(
                repo,
                vec!["stats".into(), "--json".into(), "--mode".into(), "restore-size".into(), snapshot_id.into()],
                cancel,
            )
            .await?;
        let v: serde_json::Value =
            out.lines().find(|l| l.starts_with('{')).and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default();
        Ok((v["total_size"].as_u64().unwrap_or(0), v["total_file_count"].as_u64().unwrap_or(0)))
    }

    /// `restic restore`, without progress.
    pub async fn restore(
        &self,
        repo: &Repo,
        req: &RestoreRequest,
        cancel: &CancellationToken,
    ) -> Result<(), ResticError> {
        self.restore_with_progress(repo, req, cancel, &mut |_| {}).await.map(|_| ())
    }

    /// `restic restore`. From 0.16 on with `--json`: `progress` gets each
    /// status line and the outcome carries restic's summary (restic 0.14
    /// prints nothing while it restores; the caller measures instead).
    pub async fn restore_with_progress(
        &self,
        repo: &Repo,
        req: &RestoreRequest,
        cancel: &CancellationToken,
        progress: &mut (dyn FnMut(&soda_syncer_domain::restore::RestoreStatus) + Send),
    ) -> Result<RestoreOutcome, ResticError> {
        use soda_syncer_domain::restore::{parse_restore_line, RestoreMessage};
        let features = self.features();
        let what = match &req.folder {
            Some(folder) => format!("{}:{}", req.snapshot_id, folder),
            None => req.snapshot_id.clone(),
        };
        let mut args: Vec<OsString> = vec!["restore".into(), what.into(), "--target".into(), req.target.clone().into()];
        if features.restore_json {
            args.push("--json".into());
        }
        for i in &req.include {
            args.push("--include".into());
            args.push(i.into());
        }
        for e in &req.exclude {
            args.push("--exclude".into());
            args.push(e.into());
        }
        if req.verify {
            args.push("--verify".into());
        }
        if req.overwrite_if_changed {
            args.push("--overwrite".into());
            args.push("if-changed".into());
        }
        if req.delete {
            args.push("--delete".into());
        }
        if req.dry_run {
            args.push("--dry-run".into());
            args.push("-vv".into());
        }
        let isolation = match &req.pin {
            Some(pin) => Isolation::Pinned(pin),
            None => Isolation::None,
        };
        let mut outcome = RestoreOutcome::default();
        let exec = self
            .exec_in(
                repo,
                &args,
                cancel,
                |line| match parse_restore_line(line) {
                    Some(RestoreMessage::Status(s)) => progress(&s),
                    Some(RestoreMessage::Summary(s)) => outcome.summary = Some(s),
                    Some(RestoreMessage::VerboseStatus(i)) if req.dry_run => outcome.items.push(i),
                    _ => {}
                },
                isolation,
            )
            .await?;
        if exec.code != 0 {
            return Err(self.classify(repo, "restore", exec));
        }
        Ok(outcome)
    }

    /// `restic prune`, after removing stale locks if the repository is locked.
    pub async fn prune(&self, repo: &Repo, cancel: &CancellationToken) -> Result<String, ResticError> {
        self.exclusive(repo, vec!["prune".into()], cancel).await
    }

    /// `restic check`, optionally reading a subset of the data (`5%`, `1/10`, `100M`).
    pub async fn check(
        &self,
        repo: &Repo,
        read_data_subset: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<String, ResticError> {
        let mut args: Vec<OsString> = vec!["check".into()];
        if let Some(s) = read_data_subset {
            args.push(format!("--read-data-subset={s}").into());
        }
        self.exclusive(repo, args, cancel).await
    }

    async fn exclusive(
        &self,
        repo: &Repo,
        args: Vec<OsString>,
        cancel: &CancellationToken,
    ) -> Result<String, ResticError> {
        let command = args[0].to_string_lossy().into_owned();
        let mut rule = LockRule::new(self, LockPatience::Wait);
        loop {
            let mut args = args.clone();
            rule.wait.add_retry_lock(&mut args);
            match self.simple(repo, args, cancel).await {
                Err(e) => {
                    rule.after(self, repo, &command, e, cancel).await.map_err(|e| self.deletes_refused_by(repo, e))?
                }
                done => return done,
            }
        }
    }

    /// A refused request that removed something (a snapshot, a pack, an
    /// index): the repository takes writes but no deletes from this
    /// node's credentials. Remembered, so no forget or prune is tried on it
    /// again. A refused lock removal is not that: restic removes its own
    /// locks on every command, so such a repository could not be used.
    fn deletes_refused_by(&self, repo: &Repo, e: ResticError) -> ResticError {
        let ResticError::AccessDenied { stderr, .. } = &e else { return e };
        if !refused_a_delete(stderr) {
            return e;
        }
        let key = crate::ids::short_hash(&[&repo.url]);
        let new = self.deletes_refused.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        if new {
            tracing::warn!(repository = %repo.display(), "the repository refused a delete: it is append-only for this node; retention is left to the maintainer from now on");
        }
        ResticError::DeletesRefused { repo: repo.display(), stderr: stderr.clone() }
    }

    /// Whether this repository refused one of our deletes since the agent started.
    pub fn deletes_refused(&self, repo: &Repo) -> bool {
        let key = crate::ids::short_hash(&[&repo.url]);
        self.deletes_refused.lock().unwrap_or_else(|p| p.into_inner()).contains(&key)
    }

    /// How long a command waits for a lock held by a live process (another
    /// node's backup, a prune) before it fails.
    pub fn with_lock_wait(mut self, wait: Duration) -> Restic {
        self.lock_wait = wait;
        self
    }
}

/// The one rule for a command that meets a repository lock (see
/// [`Retry::WhenUnlocked`]): the first time, remove the locks whose holder
/// is provably gone and try again; after that, with [`LockPatience::Wait`],
/// wait for the live holder (`LockWait`: the agent's sleeps on restic <
/// 0.16, restic's `--retry-lock` after) up to `--lock-wait`, else fail.
/// Every other error goes back to the caller as it is.
struct LockRule {
    recovered: bool,
    patience: LockPatience,
    /// Handed to each try, to pass restic `--retry-lock`.
    wait: LockWait,
}

impl LockRule {
    fn new(restic: &Restic, patience: LockPatience) -> LockRule {
        LockRule { recovered: false, patience, wait: LockWait::new(restic.lock_wait, restic.features().retry_lock) }
    }

    /// After a failed try: `Ok(())` to try again, or the error to give up with.
    async fn after(
        &mut self,
        restic: &Restic,
        repo: &Repo,
        command: &str,
        e: ResticError,
        cancel: &CancellationToken,
    ) -> Result<(), ResticError> {
        if e.retry() != Retry::WhenUnlocked {
            return Err(e);
        }
        if !self.recovered {
            self.recovered = true;
            return restic.recover_lock(repo, command, cancel).await;
        }
        match self.patience {
            LockPatience::Wait => self.wait.pause(restic, repo, command, e, cancel).await,
            LockPatience::RecoverOnly => Err(e),
        }
    }
}

/// What a command does about a lock held by a live process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockPatience {
    /// Wait for it, up to `--lock-wait` (backups, prune, check).
    Wait,
    /// Fail at once: `forget` after a backup is tried again after the next one.
    RecoverOnly,
}

/// Waiting out a lock that a live process holds, rather than failing the
/// run or breaking a lock that is in use: 2 s doubling to 30 s, up to the
/// limit. restic 0.14 and 0.15 have no `--retry-lock`, so the agent sleeps
/// between tries; from 0.16 on, restic waits itself (`--retry-lock` for the
/// same span) and takes the lock the moment it is free. Between tries,
/// either way, locks whose holder is provably dead are removed: that proof
/// (a dead PID here, another host's expired Lease) is the agent's, not
/// restic's.
struct LockWait {
    limit: Duration,
    waited: Duration,
    delay: Duration,
    /// restic has `--retry-lock`.
    restic_retries: bool,
    /// Pass `--retry-lock` for this long with the next try.
    handoff: Option<Duration>,
}

impl LockWait {
    fn new(limit: Duration, restic_retries: bool) -> LockWait {
        LockWait { limit, waited: Duration::ZERO, delay: Duration::from_secs(2), restic_retries, handoff: None }
    }

    /// `--retry-lock`, after the subcommand, when restic is to wait itself.
    fn add_retry_lock(&self, args: &mut Vec<OsString>) {
        if let Some(d) = self.handoff {
            args.splice(1..1, [OsString::from("--retry-lock"), format!("{}s", d.as_secs().max(1)).into()]);
        }
    }

    async fn pause(
        &mut self,
        restic: &Restic,
        repo: &Repo,
        command: &str,
        locked: ResticError,
        cancel: &CancellationToken,
    ) -> Result<(), ResticError> {
        if let Some(d) = self.handoff.take() {
            self.waited += d; // restic waited this long in the last try
        }
        if self.waited >= self.limit {
            return Err(locked);
        }
        tracing::info!(
            repository = %repo.display(),
            command,
            retry_in_s = self.delay.as_secs(),
            restic_waits = self.restic_retries,
            "the repository is locked by a live process; waiting for it"
        );
        if self.restic_retries {
            self.handoff = Some(self.delay);
        } else {
            tokio::select! {
                _ = cancel.cancelled() => return Err(ResticError::Cancelled { command: command.into() }),
                _ = tokio::time::sleep(self.delay) => {}
            }
            self.waited += self.delay;
        }
        self.delay = (self.delay * 2).min(Duration::from_secs(30));
        // The holder may have died meanwhile: `unlock` removes a lock only
        // when its process is provably gone (same host, dead PID) or it is
        // older than 30 minutes, never a live one; and another host's lock
        // goes once that host's agent is gone.
        restic.unlock(repo, cancel).await?;
        restic.break_locks_of_gone_hosts(repo, cancel).await;
        Ok(())
    }
}

/// Deletes one lock file of a repository, for the backends the agent can
/// reach without restic.
/// The namespaces a restic child runs in.
#[derive(Clone, Copy)]
enum Isolation<'a> {
    None,
    /// A private mount namespace with a held directory mounted at a fixed
    /// path (see [`crate::beneath::Pin`]).
    Pinned(&'a Arc<crate::beneath::Pin>),
    /// A UTS namespace with this host name (to unlock a dead host's locks).
    AsHost(&'a str),
}

enum LockRemover {
    Local(PathBuf),
    Rest(reqwest::Url),
}

impl LockRemover {
    fn for_url(url: &str) -> Option<LockRemover> {
        match RepositoryLocation::parse(url) {
            RepositoryLocation::Rest(rest) => {
                let u = reqwest::Url::parse(rest).ok()?;
                matches!(u.scheme(), "http" | "https").then_some(LockRemover::Rest(u))
            }
            RepositoryLocation::Local(dir) => Some(LockRemover::Local(dir.to_path_buf())),
            _ => None,
        }
    }

    async fn remove(&self, id: &str) -> Result<(), String> {
        match self {
            LockRemover::Local(dir) => match tokio::fs::remove_file(dir.join("locks").join(id)).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.to_string()),
            },
            LockRemover::Rest(base) => {
                let mut u = base.clone();
                let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
                let (user, pass) = (decode(u.username()), u.password().map(decode));
                let _ = u.set_username("");
                let _ = u.set_password(None);
                let path = format!("{}/locks/{id}", u.path().trim_end_matches('/'));
                u.set_path(&path);
                let mut req = reqwest::Client::new().delete(u).timeout(Duration::from_secs(30));
                if !user.is_empty() {
                    req = req.basic_auth(user, pass);
                }
                // The error names no URL (it could carry the password).
                let r = req.send().await.map_err(|e| e.without_url().to_string())?;
                match r.status() {
                    s if s.is_success() || s == reqwest::StatusCode::NOT_FOUND => Ok(()),
                    s => Err(format!("the REST server answered {s}")),
                }
            }
        }
    }
}

/// A pipe for a restic child's stdout or stderr (read end, write end),
/// both close-on-exec; the child keeps its read end anyway (see `exec_in`).
fn output_pipe() -> Result<(OwnedFd, OwnedFd), ResticError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors, owned from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(ResticError::Spawn { message: format!("cannot make a pipe: {}", std::io::Error::last_os_error()) });
    }
    // SAFETY: both were just created and are not owned elsewhere.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn receiver(read: OwnedFd) -> Result<tokio::net::unix::pipe::Receiver, ResticError> {
    tokio::net::unix::pipe::Receiver::from_owned_fd(read)
        .map_err(|e| ResticError::Spawn { message: format!("cannot read restic's output: {e}") })
}

/// A failed command's stderr for people: restic 0.18+'s JSON `exit_error`
/// line becomes its message; other lines stay as they are.
fn readable_stderr(tail: &str) -> String {
    tail.lines()
        .map(|l| match parse_backup_line(l) {
            Some(BackupMessage::ExitError(e)) => e.message,
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The error restic's stderr text names (every version prints these texts;
/// restic 0.14 has no other way to tell its failures apart).
fn classify_text(repo: String, command: &str, code: i32, s: String, version: &str) -> ResticError {
    let lower = s.to_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    if has(&["wrong password or no key found"]) {
        ResticError::WrongPassword { repo }
    } else if has(&["repository is already locked"]) {
        ResticError::RepositoryLocked { repo, stderr: s }
    } else if has(&["no space left on device", "disk quota exceeded"]) {
        ResticError::DiskFull { stderr: s }
    } else if has(&["s3 legacy layout", "s3legacy", "legacy index", "to migrate if necessary"]) {
        ResticError::LegacyFormat { repo, version: version.to_string(), stderr: s }
    } else if has(&ACCESS_DENIED) {
        ResticError::AccessDenied { repo, stderr: s }
    } else if has(&[
        "connection refused",
        "dial tcp",
        "no such host",
        "i/o timeout",
        "context deadline exceeded",
        "network is unreachable",
        "connection reset",
        "tls handshake",
        "server misbehaving",
        "unexpected eof",
        ": eof",
    ]) {
        ResticError::RepositoryUnreachable { repo, stderr: s }
    } else if has(&[
        "unable to open config file",
        "is there a repository at the following location",
        "repository does not exist",
        "nosuchbucket",
        "the specified bucket does not exist",
    ]) {
        ResticError::RepositoryNotFound { repo, stderr: s }
    } else {
        ResticError::Failed { command: command.to_string(), code, stderr: s }
    }
}

/// Whether restic's stderr shows a refused removal of a repository file
/// other than a lock: `Remove(<snapshot/…>) returned error, retrying after
/// …: … 403 Forbidden` (0.14's retries, stopped as hopeless) or
/// `Remove(<snapshot/…>) failed: unexpected HTTP response (403)` (0.19), and
/// S3's `Access Denied` for the same call.
fn refused_a_delete(stderr: &str) -> bool {
    let lower = stderr.to_lowercase();
    lower
        .lines()
        .any(|l| l.contains("remove(<") && !l.contains("remove(<lock/") && ACCESS_DENIED.iter().any(|n| l.contains(n)))
}

/// Texts of a refused login, in restic's errors from S3 and REST servers.
const ACCESS_DENIED: [&str; 9] = [
    "401 unauthorized",
    "403 forbidden",
    "(401)",
    "(403)",
    "accessdenied",
    "access denied",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "unauthorized",
];

/// What restic keeps retrying (0.18+ retries a missing bucket and a refused
/// login with backoff for many minutes) although no retry can help: the
/// command is stopped at once and the error returned, so a new bucket gets
/// its `init` and a wrong key fails loudly instead of a run that hangs.
fn hopeless_retry(line: &str) -> Option<HopelessRetry> {
    if !line.contains("retrying after") {
        return None;
    }
    let lower = line.to_lowercase();
    if ["the specified bucket does not exist", "nosuchbucket", "bucket does not exist"]
        .iter()
        .any(|n| lower.contains(n))
    {
        Some(HopelessRetry::NoBucket)
    } else if ACCESS_DENIED.iter().any(|n| lower.contains(n)) {
        Some(HopelessRetry::Refused)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HopelessRetry {
    NoBucket,
    Refused,
}

/// The parts of the agent's environment restic may see: the search path,
/// temp dir, proxies and CA settings. Never a secret of the agent's own.
fn passthrough_env() -> Vec<(String, String)> {
    const KEYS: [&str; 9] = [
        "PATH",
        "TMPDIR",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "NO_PROXY",
        "https_proxy",
        "http_proxy",
        "no_proxy",
        "SSL_CERT_FILE",
    ];
    let mut v: Vec<(String, String)> =
        KEYS.iter().filter_map(|k| std::env::var(k).ok().map(|val| (k.to_string(), val))).collect();
    if !v.iter().any(|(k, _)| k == "PATH") {
        v.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    v.push(("HOME".into(), std::env::var("HOME").unwrap_or_else(|_| "/".into())));
    v
}

#[derive(Default)]
struct StderrTail {
    lines: VecDeque<String>,
    error_items: Vec<String>,
    /// First and latest "retrying after" line of the current streak.
    retry_streak: Option<(std::time::Instant, std::time::Instant)>,
    /// restic retries something no retry can fix.
    hopeless: Option<HopelessRetry>,
}

/// restic's backoff waits at most a minute between tries; a quieter gap
/// than this ends a streak of retries.
const RETRY_STREAK_GAP: Duration = Duration::from_secs(120);

impl StderrTail {
    fn saw_retry(&mut self) {
        let now = std::time::Instant::now();
        self.retry_streak = match self.retry_streak {
            Some((first, last)) if now.duration_since(last) < RETRY_STREAK_GAP => Some((first, now)),
            _ => Some((now, now)),
        };
    }

    /// How long restic has been retrying without a pause.
    fn retrying_for(&self) -> Option<Duration> {
        let (first, last) = self.retry_streak?;
        (last.elapsed() < RETRY_STREAK_GAP).then(|| first.elapsed())
    }
}

async fn drain_stderr(
    stderr: impl AsyncRead + Unpin,
    tail: Arc<Mutex<StderrTail>>,
    hopeless: Arc<tokio::sync::Notify>,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
        if line.contains("returned error, retrying after") {
            t.saw_retry();
        }
        if let (None, Some(h)) = (t.hopeless, hopeless_retry(&line)) {
            t.hopeless = Some(h);
            hopeless.notify_one();
        }
        if let Some(BackupMessage::Error(e)) = parse_backup_line(&line) {
            if t.error_items.len() < MAX_ERROR_ITEMS {
                let item = if e.item.is_empty() { e.error.to_string() } else { e.item.clone() };
                t.error_items.push(item);
            }
        }
        let mut l = line;
        if l.len() > STDERR_LINE_CHARS {
            let cut = (0..=STDERR_LINE_CHARS).rev().find(|i| l.is_char_boundary(*i)).unwrap_or(0);
            l.truncate(cut);
            l.push('…');
        }
        t.lines.push_back(l);
        if t.lines.len() > STDERR_LINES {
            t.lines.pop_front();
        }
    }
}

/// Ask the process group to stop with SIGINT, then kill it if it has not
/// exited within `grace`. SIGINT because every restic from 0.14 on
/// removes its lock on it, while restic before 0.17 dies on SIGTERM without
/// cleaning up (measured: 0.14 leaves one lock file per stopped backup).
async fn kill_group(pid: Option<u32>, child: &mut tokio::process::Child, grace: Duration) {
    let Some(pid) = pid else { return };
    let pgid = -(pid as i32);
    // SAFETY: kill(2) with a negative pid signals that process group only; it is the group we created for this child.
    unsafe { libc::kill(pgid, libc::SIGINT) };
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        // SAFETY: as above.
        unsafe { libc::kill(pgid, libc::SIGKILL) };
        let _ = child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(version: &str, name: &str) -> String {
        let p = format!("{}/../domain/tests/fixtures/restic-{version}/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    fn restic_of(version: Option<&str>) -> Restic {
        let r = Restic::new("restic".into(), "/nonexistent".into(), "h".into(), Duration::from_secs(1));
        if let Some(v) = version {
            r.detected.set(ResticVersion::parse(v).unwrap()).unwrap();
        }
        r
    }

    #[tokio::test]
    async fn commands_on_a_fresh_cache_wait_for_the_first_until_its_version_file_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let gate = Arc::new(CacheGate::default());
        let cancel = CancellationToken::new();
        let first = gate.enter(&dir, &cancel).await.unwrap();
        assert!(first.is_some(), "the first command on a fresh cache holds the gate");
        let (g, c, d) = (gate.clone(), cancel.clone(), dir.clone());
        let second = tokio::spawn(async move { g.enter(&d, &c).await.map(|guard| guard.is_none()) });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "a second command waits while the cache has no version");
        // restic has created the file but not yet written it: still waiting.
        std::fs::create_dir_all(dir.join("0123abcd")).unwrap();
        std::fs::write(dir.join("0123abcd/version"), "").unwrap();
        assert!(!cache_ready(&dir));
        std::fs::write(dir.join("0123abcd/version"), "1\n").unwrap();
        assert!(cache_ready(&dir));
        drop(first); // what exec_in does once it sees the file
        assert_eq!(second.await.unwrap(), Some(true), "then the others run without holding anything");
        assert!(matches!(gate.enter(&dir, &cancel).await, Some(None)), "and later ones do not wait at all");
    }

    #[tokio::test]
    async fn a_command_waiting_for_a_fresh_cache_can_be_cancelled() {
        let tmp = tempfile::tempdir().unwrap();
        let gate = CacheGate::default();
        let held = gate.enter(tmp.path(), &CancellationToken::new()).await.unwrap();
        assert!(held.is_some());
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(gate.enter(tmp.path(), &cancel).await.is_none());
    }

    fn repo() -> Repo {
        Repo { url: "/tmp/fixture/repo".into(), password: Secret::new("fixture-pw"), env: BTreeMap::new() }
    }

    fn classify(version: &str, name: &str) -> ResticError {
        let code = fixture(version, &format!("{name}.code")).trim().parse().unwrap();
        let exec = Exec { code, stderr_tail: fixture(version, &format!("{name}.stderr")), error_items: Vec::new() };
        restic_of(Some(version)).classify(&repo(), "snapshots", exec)
    }

    #[test]
    fn every_version_s_failures_map_to_the_same_errors() {
        for v in ["0.14.0", "0.18.0", "0.19.1"] {
            assert_eq!(classify(v, "wrong-password").kind(), "wrong_password", "{v}");
            assert_eq!(classify(v, "no-repository").kind(), "repository_not_found", "{v}");
            assert_eq!(classify(v, "locked").kind(), "repository_locked", "{v}");
            // 0.18's JSON exit_error is shown as its message, not as JSON.
            let e = classify(v, "no-repository").to_string();
            assert!(!e.contains("message_type"), "{v}: {e}");
            assert!(e.contains("unable to open config file"), "{v}: {e}");
        }
    }

    #[test]
    fn exit_codes_decide_before_the_text_where_restic_has_them() {
        let exec = |code| Exec { code, stderr_tail: "Fatal: something new".into(), error_items: Vec::new() };
        let new = restic_of(Some("0.19.1"));
        assert_eq!(new.classify(&repo(), "backup", exec(10)).kind(), "repository_not_found");
        assert_eq!(new.classify(&repo(), "backup", exec(11)).kind(), "repository_locked");
        assert_eq!(new.classify(&repo(), "backup", exec(12)).kind(), "wrong_password");
        assert_eq!(new.classify(&repo(), "backup", exec(130)).kind(), "restic_interrupted");
        assert_eq!(new.classify(&repo(), "backup", exec(1)).kind(), "restic_failed");
        // 0.14 has no such codes: an exit 10 there means nothing special.
        assert_eq!(restic_of(Some("0.14.0")).classify(&repo(), "backup", exec(10)).kind(), "restic_failed");
    }

    #[test]
    fn a_repository_in_a_format_newer_restic_dropped_gets_its_own_error() {
        let exec = Exec {
            code: 1,
            stderr_tail: r#"{"message_type":"exit_error","code":1,"message":"Fatal: S3 legacy layout is no longer supported. Use restic 0.17.3 to migrate if necessary."}"#.into(),
            error_items: Vec::new(),
        };
        let e = restic_of(Some("0.18.0")).classify(&repo(), "backup", exec);
        assert_eq!(e.kind(), "repository_format_unsupported");
        assert!(e.to_string().contains("restic 0.18.0 no longer opens"), "{e}");
    }

    #[test]
    fn retries_that_cannot_help_are_recognised() {
        let bucket =
            "Stat(<config/>) returned error, retrying after 1.310531967s: Stat: The specified bucket does not exist";
        assert_eq!(hopeless_retry(bucket), Some(HopelessRetry::NoBucket));
        let denied = "Load(<lock/12ab>, 0, 0) returned error, retrying after 552ms: Access Denied.";
        assert_eq!(hopeless_retry(denied), Some(HopelessRetry::Refused));
        let network =
            "Save(<data/12ab>) returned error, retrying after 720ms: dial tcp 127.0.0.1:9: connection refused";
        assert_eq!(hopeless_retry(network), None, "a network error may heal: the unreachable timer decides");
        assert_eq!(hopeless_retry("Fatal: the specified bucket does not exist"), None, "not a retry");
    }

    #[test]
    fn a_refused_removal_of_a_snapshot_or_pack_means_append_only_and_a_refused_lock_removal_does_not() {
        // Recorded against `rclone serve restic --append-only` and rest-server --append-only.
        let v014 = "Remove(<snapshot/3be0aef49b>) returned error, retrying after 4.506218855s: blob not removed, server response: 403 Forbidden (403)";
        let v019 = "Remove(<snapshot/3be0aef49b>) failed: unexpected HTTP response (403): 403 Forbidden";
        // S3 (minio-go's message for a DeleteObject the bucket policy denies).
        let s3 = "Remove(<data/12ab34cd56>) returned error, retrying after 552ms: Access Denied.";
        for text in [v014, v019, s3] {
            assert!(refused_a_delete(&format!("some context\n{text}\nmore")), "{text}");
        }
        let lock = "Remove(<lock/12ab34cd56>) failed: unexpected HTTP response (403): 403 Forbidden";
        assert!(!refused_a_delete(lock), "a refused lock removal is not append-only, the repository is unusable");
        assert!(!refused_a_delete("Load(<config/>) failed: 403 Forbidden"), "a refused read is a wrong key");
    }

    #[test]
    fn retry_lock_goes_after_the_subcommand_only_when_restic_waits_itself() {
        let mut args: Vec<OsString> = vec!["prune".into()];
        let mut own = LockWait::new(Duration::from_secs(600), false);
        own.handoff = None;
        own.add_retry_lock(&mut args);
        assert_eq!(args, vec![OsString::from("prune")]);
        let mut theirs = LockWait::new(Duration::from_secs(600), true);
        theirs.handoff = Some(Duration::from_secs(4));
        theirs.add_retry_lock(&mut args);
        assert_eq!(args, ["prune", "--retry-lock", "4s"].map(OsString::from).to_vec());
    }
}
