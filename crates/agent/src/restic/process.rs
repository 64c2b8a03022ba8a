//! Running one restic child: spawning it (its own process group, a null
//! stdin, a cleared environment, the namespaces it asks for), its pipes,
//! the select loop that reads stdout, drains stderr and watches for
//! cancellation, the fence, the timeout and endless retries; stopping it
//! (`kill_group`), and the gates in front of a run (the node's fence, the
//! fresh-cache gate).

use soda_syncer_domain::restic_json::{parse_backup_line, BackupMessage};
use soda_syncer_domain::secret::scrub;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::errors::{hopeless_retry, Exec, HopelessRetry, ResticError};
use super::{Repo, Restic};

const STDERR_LINES: usize = 40;
const STDERR_LINE_CHARS: usize = 400;
const MAX_ERROR_ITEMS: usize = 200;

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
pub(super) struct CacheGate {
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
pub(super) struct Fence {
    reason: Mutex<Option<String>>,
    token: Mutex<CancellationToken>,
}

impl Fence {
    fn state(&self) -> (Option<String>, CancellationToken) {
        let reason = self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (reason, self.token.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

impl Restic {
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

    pub(super) fn spawn_error(&self, e: std::io::Error) -> ResticError {
        if e.kind() == std::io::ErrorKind::NotFound {
            ResticError::NotInstalled { path: self.bin.display().to_string() }
        } else {
            ResticError::Spawn { message: e.to_string() }
        }
    }

    pub(super) fn cache_dir(&self, repo: &Repo) -> PathBuf {
        self.cache_root.join(crate::ids::short_hash(&[&repo.url]))
    }

    /// Run one restic command to the end, in the namespaces `isolation`
    /// asks for, feeding each stdout line to `on_line`. Cancellation and the
    /// timeout kill the whole process group.
    pub(super) async fn exec_in(
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

    pub(super) async fn simple(
        &self,
        repo: &Repo,
        args: Vec<OsString>,
        cancel: &CancellationToken,
    ) -> Result<String, ResticError> {
        self.simple_in(repo, args, cancel, Isolation::None).await
    }

    /// As `simple`, in the namespaces `isolation` asks for.
    pub(super) async fn simple_in(
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
}

/// The namespaces a restic child runs in.
#[derive(Clone, Copy)]
pub(super) enum Isolation<'a> {
    None,
    /// A private mount namespace with a held directory mounted at a fixed
    /// path (see [`crate::beneath::Pin`]).
    Pinned(&'a Arc<crate::beneath::Pin>),
    /// A UTS namespace with this host name (to unlock a dead host's locks).
    AsHost(&'a str),
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

/// The parts of the agent's environment restic may see: the search path,
/// temp dir, proxies and CA settings. Never a secret of the agent's own.
pub(super) fn passthrough_env() -> Vec<(String, String)> {
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
}
