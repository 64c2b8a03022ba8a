//! Repository locks: the one rule for a command that meets a lock
//! (`LockRule`: remove the locks whose holder is provably gone, then wait
//! for a live holder up to `--lock-wait`), the waits (`LockWait`), removing
//! stale locks (restic's own `unlock`, and other hosts' locks whose agent
//! is gone, see `LockHolders`), and the clean-up after a stopped restic.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::backend::LockRemover;
use super::errors::{ResticError, Retry};
use super::process::Isolation;
use super::{Repo, Restic};

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

impl Restic {
    /// Set once, by the Kubernetes adapter.
    pub fn set_lock_holders(&self, holders: Arc<dyn LockHolders>) {
        let _ = self.lock_holders.set(holders);
    }

    /// restic before 0.17 has a window right after it writes its lock
    /// (before it records the lock for its own clean-up) in which even
    /// SIGINT leaves the lock behind (measured with 0.14: a stop within
    /// ~0.3 s of the lock file appearing). 0.18 and 0.19 never did in the
    /// same probe.
    pub(super) fn may_leave_lock_when_stopped(&self, args: &[OsString]) -> bool {
        let takes_lock = !matches!(args.first().and_then(|a| a.to_str()), Some("version" | "init" | "unlock") | None)
            && !args.iter().any(|a| a == "--no-lock");
        takes_lock && !self.features().cleans_up_on_sigterm
    }

    /// After this agent stopped a restic that may have left its lock:
    /// `restic unlock` removes exactly the locks whose process is dead on
    /// this host (the one just stopped among them), never a live one. Not
    /// cancellable by the run (it was just cancelled); bounded instead.
    pub(super) fn remove_own_stale_locks<'a>(&'a self, repo: &'a Repo) -> futures_util::future::BoxFuture<'a, ()> {
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
pub(super) struct LockRule {
    recovered: bool,
    patience: LockPatience,
    /// Handed to each try, to pass restic `--retry-lock`.
    pub(super) wait: LockWait,
}

impl LockRule {
    pub(super) fn new(restic: &Restic, patience: LockPatience) -> LockRule {
        LockRule { recovered: false, patience, wait: LockWait::new(restic.lock_wait, restic.features().retry_lock) }
    }

    /// After a failed try: `Ok(())` to try again, or the error to give up with.
    pub(super) async fn after(
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
pub(super) enum LockPatience {
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
pub(super) struct LockWait {
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
    pub(super) fn add_retry_lock(&self, args: &mut Vec<OsString>) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
