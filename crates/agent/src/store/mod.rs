//! SQLite state: the `Store` handle (one connection behind a mutex: every
//! statement is short; the scheduler and the API share it), opening it (WAL
//! mode), its error type, and the column codecs every table uses. One file
//! per table or concern below: `migrations` (schema versions), `secrets`
//! (sealing), `policies`, `listing` (the policy listing page), `runs`,
//! `repositories` (maintenance bookkeeping), `subscriptions` (legacy),
//! `resources` (the held-resources journal), `unchanged` and `drills`.

mod drills;
mod listing;
mod migrations;
mod policies;
mod repositories;
mod resources;
mod runs;
mod secrets;
mod subscriptions;
mod unchanged;

pub use listing::{DataVersion, LastRun, ListedPolicy};
pub use policies::{PolicyRecord, PolicyStatus};
pub use repositories::RepoMaintenance;
pub use resources::HeldResource;
pub use runs::{RunFilter, RunRecord};
pub use secrets::SecretsShown;
pub use subscriptions::Subscription;
pub use unchanged::UnchangedBasis;

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::ids::parse_time;
use secrets::ShownCache;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory full: the filesystem holding the agent's state directory (--state-dir) has no space left; free space there (or move --state-dir to a larger one) and retry; nothing already stored was lost")]
    DiskFull,
    #[error("cannot open the state database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("a policy named {0:?} exists already: choose another name or update that one")]
    NameTaken(String),
    #[error("not found")]
    NotFound,
    #[error("state database error: {0}")]
    Sqlite(String),
    #[error("a stored record could not be read: {0}")]
    Corrupt(String),
    #[error("the state database {path} has schema version {found}, written by a newer soda-syncer; this one knows versions up to {known}: run that newer soda-syncer (or a later one) on this state directory, or give this one another --state-dir. The database was left as it is")]
    NewerSchema { path: PathBuf, found: i64, known: usize },
}

impl StoreError {
    pub fn kind(&self) -> &'static str {
        match self {
            // Not `disk_full`: that is the repository's disk (restic).
            StoreError::DiskFull => "state_disk_full",
            StoreError::Open { .. } => "database_unavailable",
            StoreError::NameTaken(_) => "name_taken",
            StoreError::NotFound => "not_found",
            StoreError::Sqlite(_) => "database_error",
            StoreError::Corrupt(_) => "database_corrupt",
            StoreError::NewerSchema { .. } => "database_newer",
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            if f.code == rusqlite::ErrorCode::DiskFull {
                return StoreError::DiskFull;
            }
        }
        StoreError::Sqlite(e.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// Seals secrets before they are written (see `sealed`); without one
    /// they are stored as plain JSON (only in tests).
    seal: Option<Arc<crate::sealed::SealKey>>,
    /// What listings show of each policy's secrets, by policy id, with the
    /// secrets column it was read from: a listing unseals a policy's
    /// secrets once per change of that column, not on every request. It
    /// holds no secret (flags and redacted URLs only).
    shown: Arc<Mutex<ShownCache>>,
}

fn release_memory(conn: &Mutex<Connection>) {
    if let Err(e) = conn.lock().unwrap_or_else(|p| p.into_inner()).release_memory() {
        tracing::debug!(error = %e, "cannot release SQLite's page cache");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only works on glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn opt_time(s: Option<String>) -> Option<DateTime<Utc>> {
    s.as_deref().and_then(parse_time)
}

fn json_col<T: serde::de::DeserializeOwned>(s: Option<String>) -> Result<Option<T>> {
    match s {
        Some(s) => Ok(Some(serde_json::from_str(&s)?)),
        None => Ok(None),
    }
}

fn to_json<T: Serialize>(v: &Option<T>) -> Option<String> {
    v.as_ref().map(|v| serde_json::to_string(v).expect("serializable"))
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let open_err = |e: rusqlite::Error| StoreError::Open { path: path.to_path_buf(), message: e.to_string() };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        // Before anything that writes (the journal mode below, migrations):
        // a newer agent's database is refused untouched, so going back to
        // that agent loses nothing.
        migrations::refuse_newer(&conn, path)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        // Plans never depend on bound values (there are no statistics to
        // probe them against): without this, a statement with a range on a
        // bound value (`name > ?1`) is compiled again at each execution.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(open_err)?;
        let store = Store { conn: Arc::new(Mutex::new(conn)), seal: None, shown: Arc::default() };
        store.migrate()?;
        Ok(store)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent
        // (statements are atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Give back memory that is no longer used: SQLite's cached pages (read
    /// again from the OS's page cache when needed) and what the allocator
    /// keeps of freed allocations. Start-up reads every policy several
    /// times; without this, that stays in the process's memory.
    pub fn release_memory(&self) {
        release_memory(&self.conn);
    }

    /// [`Store::release_memory`] after `first`, then every `every`, until
    /// the store is closed (no handle on it is held in between). Needs a
    /// Tokio runtime.
    ///
    /// Also, for the whole process: glibc keeps what is freed at the top of
    /// each thread's heap up to a threshold it raises (up to 32 MiB) after
    /// large allocations, and `malloc_trim` does not shrink the heaps of
    /// threads other than the main one; the threshold is pinned at its
    /// 128 KiB default, so what the worker threads free goes back too.
    pub fn release_memory_every(&self, first: std::time::Duration, every: std::time::Duration) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: sets one of glibc's malloc parameters; no memory is touched.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        }
        let conn = Arc::downgrade(&self.conn);
        tokio::spawn(async move {
            tokio::time::sleep(first).await;
            loop {
                let Some(conn) = conn.upgrade() else { return };
                if tokio::task::spawn_blocking(move || release_memory(&conn)).await.is_err() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        });
    }

    pub fn integrity_ok(&self) -> Result<bool> {
        let r: String = self.conn().query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        Ok(r == "ok")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use soda_syncer_domain::{Origin, PolicySpec};

    pub(super) fn record(name: &str) -> PolicyRecord {
        let spec: PolicySpec = serde_json::from_value(json!({
            "name": name, "source": {"path": "/data"}, "schedule": {"intervalSeconds": 60},
            "repository": {"url": "/r", "password": "hunter2", "env": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}}
        }))
        .unwrap();
        let now = Utc::now();
        PolicyRecord {
            next_slot: Some(now),
            next_run_at: Some(now),
            ..PolicyRecord::new(Origin::Api, spec, None, None, now)
        }
    }
}
