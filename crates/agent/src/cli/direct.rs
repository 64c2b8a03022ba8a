//! Repository-only access for the CLI: list and restore the agent's
//! snapshots with nothing but the repository and its password, for when
//! the node, the agent and its database are gone. Uses the same restic
//! adapter as the agent, so secrets travel the same way (the child's
//! environment only).

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde_json::{json, Value};
use soda_syncer_domain::policy::ALLOWED_ENV_PREFIXES;
use soda_syncer_domain::restic_json::Snapshot;
use soda_syncer_domain::Secret;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::beneath::{merge_into, Dir, PathError, Pin};
use crate::restic::{Repo, Restic, RestoreRequest};

/// Reading a repository without the agent.
#[derive(Debug, Clone, Args)]
pub struct DirectRepo {
    /// The restic repository URL; credentials (AWS_*, ...) come from your environment.
    #[arg(long, conflicts_with = "policy")]
    pub repo: Option<String>,
    /// File holding the repository password [default: $RESTIC_PASSWORD].
    #[arg(long, requires = "repo")]
    pub password_file: Option<PathBuf>,
    /// Only snapshots of this node (restic --host).
    #[arg(long, requires = "repo")]
    pub host: Option<String>,
    /// Only snapshots of this volume (the tag volume=PV the agent writes).
    #[arg(long, requires = "repo")]
    pub volume: Option<String>,
    /// Only snapshots of this policy id (the tag policy=ID).
    #[arg(long = "policy-id", requires = "repo")]
    pub policy_id: Option<String>,
}

fn open(d: &DirectRepo) -> anyhow::Result<(Restic, Repo, tempfile_dir::TempDir)> {
    let url = d.repo.clone().ok_or_else(|| anyhow!("--repo is required"))?;
    let password = match &d.password_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the password file {}", f.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        None => {
            std::env::var("RESTIC_PASSWORD").map_err(|_| anyhow!("give --password-file FILE or set RESTIC_PASSWORD"))?
        }
    };
    let env = std::env::vars()
        .filter(|(k, _)| ALLOWED_ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k, Secret::new(v)))
        .collect();
    let cache = tempfile_dir::TempDir::new()?;
    let host = d.host.clone().unwrap_or_default();
    let restic = Restic::new("restic".into(), cache.path().to_path_buf(), host, Duration::from_secs(7 * 86400));
    Ok((restic, Repo { url, password: Secret::new(password), env }, cache))
}

/// The agent's snapshots in the repository, narrowed by host, volume or policy.
async fn find(d: &DirectRepo, restic: &Restic, repo: &Repo) -> anyhow::Result<Vec<Snapshot>> {
    let cancel = CancellationToken::new();
    let tag = match (&d.volume, &d.policy_id) {
        (Some(v), _) => format!("volume={v}"),
        (None, Some(p)) => format!("policy={p}"),
        (None, None) => "soda-syncer".to_string(),
    };
    let mut snaps = restic.snapshots(repo, Some(&tag), d.host.as_deref(), &[], &cancel).await?;
    snaps.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(snaps)
}

pub async fn snapshots(d: &DirectRepo) -> anyhow::Result<Value> {
    let (restic, repo, _cache) = open(d)?;
    let snaps = find(d, &restic, &repo).await?;
    let views: Vec<Value> = snaps
        .iter()
        .rev()
        .map(|s| {
            json!({"id": s.id, "shortId": s.short_id, "time": s.time, "paths": s.paths, "hostname": s.hostname,
                   "tags": s.tags.clone().unwrap_or_default(), "volume": s.tag_value("volume"), "policy": s.tag_value("policy")})
        })
        .collect();
    Ok(json!({ "snapshots": views }))
}

pub async fn restore(
    d: &DirectRepo,
    snapshot: &str,
    target: &Path,
    include: &[String],
    verify: bool,
) -> anyhow::Result<Value> {
    let (restic, repo, cache) = open(d)?;
    let snaps = find(d, &restic, &repo).await?;
    let snap = if snapshot == "latest" {
        if d.volume.is_none() && d.policy_id.is_none() {
            let volumes: std::collections::BTreeSet<&str> =
                snaps.iter().filter_map(|s| s.tag_value("volume").or(s.tag_value("policy"))).collect();
            if volumes.len() > 1 {
                bail!(
                    "the repository holds several volumes ({}); say which with --volume or --policy-id",
                    volumes.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
        }
        snaps.last().cloned()
    } else {
        snaps.iter().find(|s| s.id.starts_with(snapshot) || s.short_id == snapshot).cloned()
    };
    let snap = snap
        .ok_or_else(|| anyhow!("no snapshot {snapshot:?} of the agent in {} (with these filters)", repo.display()))?;
    // The target is the operator's own choice (trusted as given); below
    // it, the agent follows no link: staging, restic's writes (through a
    // pin when running as root) and the move into place all go through
    // held directories.
    std::fs::create_dir_all(target).with_context(|| format!("cannot create {}", target.display()))?;
    let dir = Dir::open_trusted(target)?;
    if !dir.is_empty()? {
        bail!("{} exists and is not empty: choose a new or empty directory", target.display());
    }
    let staging_name = OsStr::new(".soda-syncer-restore");
    let staging = dir.create_new(staging_name, 0o700)?;
    let root = snap.paths.first().cloned().unwrap_or_default();
    let include: Vec<String> =
        include.iter().map(|i| format!("{}/{}", root.trim_end_matches('/'), i.trim_matches('/'))).collect();
    let cancel = CancellationToken::new();
    let (bytes, files) = restic.restore_size(&repo, &snap.id, &cancel).await.unwrap_or((0, 0));
    // SAFETY: geteuid has no preconditions.
    let pin = if unsafe { libc::geteuid() } == 0 {
        let at = Dir::open_trusted(cache.path())?.create(Path::new("restic-target"), 0o700)?;
        Some(Arc::new(Pin::writable(&staging, at.path())?))
    } else {
        None
    };
    let restic_target = pin.as_ref().map(|p| p.at().to_path_buf()).unwrap_or_else(|| staging.path().to_path_buf());
    let req = RestoreRequest {
        snapshot_id: snap.id.clone(),
        target: restic_target,
        include,
        verify,
        pin,
        ..Default::default()
    };
    let result = restic.restore(&repo, &req, &cancel).await;
    if let Err(e) = result {
        let _ = dir.remove(staging_name);
        return Err(e.into());
    }
    let moved = match staging.open(Path::new(root.trim_start_matches('/'))) {
        Ok(from) => merge_into(&from, &dir),
        Err(PathError::Missing { .. }) => Ok(()),
        Err(e) => Err(e),
    };
    let _ = dir.remove(staging_name);
    moved.with_context(|| format!("cannot move the restored files into {}", target.display()))?;
    Ok(json!({ "snapshotId": snap.id, "paths": snap.paths, "target": target, "bytes": bytes, "files": files }))
}

/// A temporary directory removed on drop (std only).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<TempDir> {
            let p = std::env::temp_dir().join(format!("soda-syncer-{}", crate::ids::random_hex(8)));
            std::fs::create_dir_all(&p)?;
            Ok(TempDir(p))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
