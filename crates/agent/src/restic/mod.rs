//! The restic adapter: runs the real `restic` binary, never through a
//! shell. This file holds the `Restic` handle and its public commands
//! (version, init, backup, forget, snapshots, restore, prune, check); how a
//! child is run is in `process` (its own process group, a null stdin, a
//! cleared environment holding only what restic needs: secrets reach
//! restic only there, never argv, never the agent's own environment;
//! stdout read line by line, stderr drained at the same time into a
//! bounded buffer), what its failures mean in `errors`, repository locks in
//! `locks`, and what the agent reads or deletes in a repository without
//! restic in `backend`.

mod backend;
mod errors;
mod locks;
mod process;

pub use errors::{ResticError, Retry};
pub use locks::{own_hostname, LockHolders};

use soda_syncer_domain::restic_json::{
    parse_backup_line, BackupMessage, BackupStatus, BackupSummary, ForgetGroup, Snapshot,
};
use soda_syncer_domain::restic_version::{Features, ResticVersion, Support};
use soda_syncer_domain::secret::{redact_url, url_password};
use soda_syncer_domain::Secret;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use errors::refused_a_delete;
use locks::{LockPatience, LockRule, LockWait};
use process::{passthrough_env, CacheGate, Fence, Isolation};

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
}
