//! One agent per state directory. An agent holds an exclusive `flock(2)` on
//! `<state-dir>/agent.lock` from before it opens the database until it
//! exits. The kernel releases the lock when the holder's process dies,
//! however it dies (kill -9 included), so there is never a stale lock to
//! clean up and no liveness to guess.
//!
//! Why `flock` and not a PID file or POSIX (`fcntl`) locks: a PID means
//! nothing across PID namespaces (the agents of two pods are both PID 1),
//! and POSIX locks belong to the process, so a second open in the same
//! process would "succeed" and closing any descriptor of the file would
//! drop them. A `flock` belongs to the open file description.
//!
//! The file is never removed, truncated before the lock is held, or
//! replaced by a rename: the lock is on the inode, and an agent that locked
//! a file since unlinked would hold a lock nobody else sees. Who holds it
//! (pid, node, pod, start time, version) is written into it once the lock
//! is held, for agents waiting for it and for humans (`cat agent.lock`).
//! The descriptor is close-on-exec, so restic and hooks never inherit it
//! (an orphaned child would otherwise keep the lock).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "agent.lock";

/// How often a waiting agent says again who it is waiting for.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

/// The agent holding (or about to hold) a state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LockHolder {
    /// In the holder's PID namespace (in a pod, usually 1: see `pod`).
    pub pid: u32,
    pub node: String,
    /// The holder's pod, in Kubernetes (`POD_NAME`).
    #[schema(required = true)]
    pub pod: Option<String>,
    /// When the holder's agent started.
    pub started_at: DateTime<Utc>,
    /// When it took the lock.
    pub locked_at: DateTime<Utc>,
    /// The holder's soda-syncer version.
    pub version: String,
}

impl LockHolder {
    /// This process, as it will describe itself in the lock file.
    pub fn this_process(node: &str, pod: Option<&str>, started_at: DateTime<Utc>) -> LockHolder {
        LockHolder {
            pid: std::process::id(),
            node: node.to_string(),
            pod: pod.map(str::to_string),
            started_at,
            locked_at: started_at,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on node {}", self.pid, self.node)?;
        if let Some(pod) = &self.pod {
            write!(f, " in pod {pod}")?;
        }
        write!(
            f,
            ", soda-syncer {} started {}, holding the lock since {}",
            self.version,
            crate::ids::fmt_time(self.started_at),
            crate::ids::fmt_time(self.locked_at)
        )
    }
}

/// Who holds the lock, as far as its file says.
pub fn describe(holder: Option<&LockHolder>) -> String {
    match holder {
        Some(h) => h.to_string(),
        None => "an agent that has not written its details yet".into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error(
        "the state directory {} is in use by another soda-syncer agent ({holder}): one agent per state directory. \
         Stop that agent, choose another --state-dir, or pass --wait-for-state-lock to wait until it exits",
        dir.display()
    )]
    Held { dir: PathBuf, holder: String },
    #[error(
        "cannot lock {}: {source}; the state directory must be on a filesystem that supports flock(2) \
         (a local disk or hostPath)",
        path.display()
    )]
    Io { path: PathBuf, source: std::io::Error },
    #[error("stopped while waiting for the state directory lock")]
    StoppedWhileWaiting,
}

/// The lock, held until this is dropped (or the process dies).
#[derive(Debug)]
pub struct StateLock {
    file: File,
    path: PathBuf,
    holder: LockHolder,
}

/// The result of one attempt.
#[derive(Debug)]
pub enum TryLock {
    Acquired(StateLock),
    /// Held by another agent, as its file describes it (`None`: not
    /// written yet, or not readable).
    Held(Option<LockHolder>),
}

pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join(LOCK_FILE)
}

/// The holder the lock file names. Only meaningful while someone holds the
/// lock: the last holder's details stay in it after it exits.
pub fn read_holder(state_dir: &Path) -> Option<LockHolder> {
    let text = std::fs::read(lock_path(state_dir)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn open(path: &Path) -> Result<File, StateLockError> {
    // No truncate: the holder's details must stay readable to those who
    // fail to get the lock. std opens with O_CLOEXEC.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| StateLockError::Io { path: path.to_path_buf(), source })
}

/// `flock(LOCK_EX)`, blocking or not. `Ok(false)`: held by someone else.
fn flock(file: &File, block: bool) -> std::io::Result<bool> {
    let op = if block { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    loop {
        // SAFETY: flock on a descriptor this File owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !block => return Ok(false),
            _ => return Err(e),
        }
    }
}

impl StateLock {
    /// Take the lock if it is free.
    pub fn try_acquire(state_dir: &Path, me: LockHolder) -> Result<TryLock, StateLockError> {
        let path = lock_path(state_dir);
        let file = open(&path)?;
        match flock(&file, false) {
            Ok(true) => Ok(TryLock::Acquired(Self::held(file, path, me)?)),
            Ok(false) => Ok(TryLock::Held(read_holder(state_dir))),
            Err(source) => Err(StateLockError::Io { path, source }),
        }
    }

    /// Wait until the lock is free and take it; `None` when `cancel` fires
    /// first. Says who holds it now and then. The kernel wakes the waiter
    /// the moment the holder's descriptor closes (a blocking `flock` in a
    /// thread of its own, not polling).
    pub async fn wait(
        state_dir: &Path,
        me: LockHolder,
        cancel: &CancellationToken,
    ) -> Result<Option<StateLock>, StateLockError> {
        let path = lock_path(state_dir);
        let file = open(&path)?;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        // A plain thread, not the blocking pool: the runtime waits for
        // blocking tasks when it shuts down, and this one may never end.
        // If the wait is abandoned, `send` fails, the file is dropped and a
        // lock taken too late is released at once.
        std::thread::Builder::new()
            .name("state-lock".into())
            .spawn(move || {
                let r = flock(&file, true).map(|_| file);
                let _ = tx.send(r);
            })
            .map_err(|source| StateLockError::Io { path: path.clone(), source })?;
        let waiting_since = std::time::Instant::now();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + WAIT_LOG_EVERY, WAIT_LOG_EVERY);
        let file = loop {
            tokio::select! {
                r = &mut rx => match r {
                    Ok(Ok(file)) => break file,
                    Ok(Err(source)) => return Err(StateLockError::Io { path, source }),
                    Err(_) => return Err(StateLockError::Io { path, source: std::io::Error::other("the lock thread ended") }),
                },
                _ = cancel.cancelled() => return Ok(None),
                _ = tick.tick() => {
                    let holder = read_holder(state_dir);
                    tracing::warn!(
                        waited_s = waiting_since.elapsed().as_secs(),
                        holder = %describe(holder.as_ref()),
                        "still waiting for the state directory lock; not ready meanwhile"
                    );
                }
            }
        };
        tracing::info!(waited_ms = waiting_since.elapsed().as_millis() as u64, "the state directory lock is free");
        Self::held(file, path, me).map(Some)
    }

    /// The lock is ours: write who we are into the file.
    fn held(file: File, path: PathBuf, mut me: LockHolder) -> Result<StateLock, StateLockError> {
        me.locked_at = Utc::now();
        let mut text = serde_json::to_vec(&me).expect("a LockHolder serializes");
        text.push(b'\n');
        let io = |source| StateLockError::Io { path: path.clone(), source };
        // Same inode, rewritten in place (see the module docs).
        file.set_len(0).map_err(io)?;
        file.write_all_at(&text, 0).map_err(io)?;
        Ok(StateLock { file, path, holder: me })
    }

    pub fn holder(&self) -> &LockHolder {
        &self.holder
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the lock; say so first, since the
        // next agent may log its start in the same instant.
        tracing::info!(file = %self.path.display(), fd = self.file.as_raw_fd(), "releasing the state directory lock");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(node: &str) -> LockHolder {
        LockHolder::this_process(node, Some("pod-1"), Utc::now())
    }

    #[test]
    fn a_second_lock_in_the_same_process_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let TryLock::Acquired(first) = StateLock::try_acquire(dir.path(), me("n1")).unwrap() else {
            panic!("the first lock must be free")
        };
        match StateLock::try_acquire(dir.path(), me("n2")).unwrap() {
            TryLock::Held(Some(h)) => assert_eq!(h, *first.holder()),
            other => panic!("expected held by the first, got {other:?}"),
        }
        drop(first);
        assert!(matches!(StateLock::try_acquire(dir.path(), me("n2")).unwrap(), TryLock::Acquired(_)));
        assert_eq!(read_holder(dir.path()).unwrap().node, "n2");
    }

    #[tokio::test]
    async fn a_waiter_gets_the_lock_when_the_holder_lets_go_and_gives_up_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let TryLock::Acquired(first) = StateLock::try_acquire(dir.path(), me("n1")).unwrap() else { panic!() };
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let gives_up = tokio::spawn({
            let d = dir.path().to_path_buf();
            async move { StateLock::wait(&d, me("n3"), &c2).await }
        });
        cancel.cancel();
        assert!(gives_up.await.unwrap().unwrap().is_none(), "a cancelled wait returns no lock");

        let waiter = tokio::spawn({
            let d = dir.path().to_path_buf();
            async move { StateLock::wait(&d, me("n2"), &CancellationToken::new()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the lock is still held");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap().unwrap().unwrap();
        assert_eq!(second.holder().node, "n2");
        assert_eq!(read_holder(dir.path()).unwrap(), *second.holder());
    }

    #[test]
    fn the_holder_reads_as_a_sentence_with_pid_node_pod_and_times() {
        let h = me("node-a");
        let s = h.to_string();
        assert!(s.starts_with(&format!("pid {} on node node-a in pod pod-1, soda-syncer ", std::process::id())), "{s}");
        assert!(s.contains("holding the lock since"), "{s}");
    }
}
