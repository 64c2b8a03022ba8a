//! What the agent reads or deletes in a repository's storage without
//! restic, where it can reach it (a local directory, a REST server): the
//! list of snapshot ids (milliseconds, no key derivation), and deleting one
//! lock file. The REST calls speak restic's REST protocol.

use soda_syncer_domain::location::RepositoryLocation;
use std::path::PathBuf;
use std::time::Duration;

use super::{Repo, Restic};

impl Restic {
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

/// Deletes one lock file of a repository, for the backends the agent can
/// reach without restic.
pub(super) enum LockRemover {
    Local(PathBuf),
    Rest(reqwest::Url),
}

impl LockRemover {
    pub(super) fn for_url(url: &str) -> Option<LockRemover> {
        match RepositoryLocation::parse(url) {
            RepositoryLocation::Rest(rest) => {
                let u = reqwest::Url::parse(rest).ok()?;
                matches!(u.scheme(), "http" | "https").then_some(LockRemover::Rest(u))
            }
            RepositoryLocation::Local(dir) => Some(LockRemover::Local(dir.to_path_buf())),
            _ => None,
        }
    }

    pub(super) async fn remove(&self, id: &str) -> Result<(), String> {
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
