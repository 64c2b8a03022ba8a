//! SQLite state: policies (with their scheduling bookkeeping), runs and
//! legacy subscriptions. WAL mode, versioned migrations, one connection
//! behind a mutex (every statement is short; the scheduler and the API
//! share it).

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, Row};
use serde::{Deserialize, Serialize};
use soda_syncer_domain::run::{Progress, RunError, RunSummary};
use soda_syncer_domain::{Origin, PolicySpec, RunKind, RunState, RunTrigger, Secret};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::ids::{fmt_time, parse_time};

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

/// The agent's own view of a policy's health, beside the user's `paused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyStatus {
    Active,
    /// A discovered volume is no longer mounted on this node: the policy is
    /// paused by the agent (not deleted) until it comes back.
    VolumeGone,
}

impl PolicyStatus {
    fn as_str(self) -> &'static str {
        match self {
            PolicyStatus::Active => "active",
            PolicyStatus::VolumeGone => "volumeGone",
        }
    }
    fn parse(s: &str) -> PolicyStatus {
        if s == "volumeGone" {
            PolicyStatus::VolumeGone
        } else {
            PolicyStatus::Active
        }
    }
}

#[derive(Debug, Clone)]
pub struct PolicyRecord {
    pub id: String,
    pub origin: Origin,
    /// The spec with its secrets (the store keeps them in their own column).
    pub spec: PolicySpec,
    pub volume: Option<String>,
    pub legacy_key: Option<String>,
    pub status: PolicyStatus,
    pub status_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_slot: Option<DateTime<Utc>>,
    /// The schedule slot the next run serves (`next_run_at` is it plus jitter).
    pub next_slot: Option<DateTime<Utc>>,
    pub next_run_at: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    pub last_failed_at: Option<DateTime<Utc>>,
    /// Why the stored secrets could not be unsealed, if they could not.
    pub secrets_error: Option<String>,
}

impl PolicyRecord {
    /// A new, active policy made now, not yet scheduled.
    pub fn new(
        origin: Origin,
        spec: PolicySpec,
        volume: Option<String>,
        legacy_key: Option<String>,
        now: DateTime<Utc>,
    ) -> PolicyRecord {
        PolicyRecord {
            id: crate::ids::new_id(),
            origin,
            spec,
            volume,
            legacy_key,
            status: PolicyStatus::Active,
            status_message: None,
            created_at: now,
            updated_at: now,
            last_slot: None,
            next_slot: None,
            next_run_at: None,
            consecutive_failures: 0,
            last_failed_at: None,
            secrets_error: None,
        }
    }

    /// Whether the scheduler may start runs of it on its own.
    pub fn schedulable(&self) -> bool {
        !self.spec.paused && self.status == PolicyStatus::Active
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoredSecrets {
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    env: BTreeMap<String, Secret>,
    /// The repository URL, when it carries a password (`rest:http://u:p@...`);
    /// the spec column then holds it redacted.
    #[serde(default)]
    url: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: String,
    pub policy_id: String,
    pub kind: RunKind,
    pub trigger: RunTrigger,
    pub state: RunState,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The schedule slot this run serves (for catch-up bookkeeping).
    pub slot: Option<DateTime<Utc>>,
    /// When the scheduler meant it to start (slot plus jitter, or a retry time).
    pub due_at: Option<DateTime<Utc>>,
    pub snapshot_id: Option<String>,
    pub progress: Option<Progress>,
    pub summary: Option<RunSummary>,
    pub consistency: Option<serde_json::Value>,
    pub error: Option<RunError>,
    pub warning: Option<String>,
    /// Restore, maintenance: the request that started the run.
    pub params: Option<serde_json::Value>,
    /// How long the run waited for this agent's lock on its repository
    /// (a prune, check or forget holds it alone); None before it asked.
    pub repository_wait_ms: Option<u64>,
    /// A scheduled backup proven unchanged: no restic ran, and
    /// `snapshot_id` is the snapshot the volume still matches.
    pub unchanged: Option<soda_syncer_domain::unchanged::UnchangedRun>,
}

impl RunRecord {
    pub fn new(id: String, policy_id: &str, kind: RunKind, trigger: RunTrigger, now: DateTime<Utc>) -> RunRecord {
        RunRecord {
            id,
            policy_id: policy_id.to_string(),
            kind,
            trigger,
            state: RunState::Queued,
            queued_at: now,
            started_at: None,
            finished_at: None,
            slot: None,
            due_at: None,
            snapshot_id: None,
            progress: None,
            summary: None,
            consistency: None,
            error: None,
            warning: None,
            params: None,
            repository_wait_ms: None,
            unchanged: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub policy_id: Option<String>,
    pub state: Option<RunState>,
    pub kind: Option<RunKind>,
    pub before: Option<String>,
    pub limit: usize,
}

/// A legacy `POST /snapshot` with an empty source: "every CSI volume on
/// this node, into this repository, every N seconds".
#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: String,
    pub repository: String,
    pub password: Secret,
    pub env: BTreeMap<String, Secret>,
    pub interval_seconds: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE policies (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        origin TEXT NOT NULL,
        spec TEXT NOT NULL,
        secrets TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        volume TEXT,
        legacy_key TEXT UNIQUE,
        status TEXT NOT NULL DEFAULT 'active',
        status_message TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        last_slot TEXT,
        next_slot TEXT,
        next_run_at TEXT,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        last_failed_at TEXT
    );
    CREATE INDEX policies_due ON policies(next_run_at) WHERE paused = 0 AND status = 'active';
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        policy_id TEXT NOT NULL REFERENCES policies(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        trigger TEXT NOT NULL,
        state TEXT NOT NULL,
        queued_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        slot TEXT,
        due_at TEXT,
        snapshot_id TEXT,
        progress TEXT,
        summary TEXT,
        consistency TEXT,
        error TEXT,
        warning TEXT,
        params TEXT
    );
    CREATE INDEX runs_by_policy ON runs(policy_id, id);
    CREATE INDEX runs_by_state ON runs(state);
    CREATE TABLE subscriptions (
        id TEXT PRIMARY KEY,
        repository TEXT NOT NULL UNIQUE,
        secrets TEXT NOT NULL,
        interval_seconds INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    "#,
    // 2: per-repository maintenance bookkeeping.
    r#"
    CREATE TABLE repositories (
        key TEXT PRIMARY KEY,
        next_prune_at TEXT,
        last_prune_at TEXT,
        next_check_at TEXT,
        last_check_at TEXT
    );
    "#,
    // 3: what the consistency methods hold while a backup runs (a frozen
    // filesystem, snapshots, clones, loop devices, mounts), written before
    // each is made, so the next start can undo what a crash left.
    r#"
    CREATE TABLE consistency_resources (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    "#,
    // 4: when each policy's next restore drill is due.
    r#"
    CREATE TABLE drills (
        policy_id TEXT PRIMARY KEY REFERENCES policies(id) ON DELETE CASCADE,
        next_at TEXT NOT NULL
    );
    "#,
    // 5: how long each run waited for the agent's own repository lock.
    r#"
    ALTER TABLE runs ADD COLUMN repository_wait_ms INTEGER;
    "#,
    // 6: scheduled runs proven unchanged (issue 19): the marker on the run,
    // and per policy the digest of the volume's metadata taken before its
    // last clean real backup.
    r#"
    ALTER TABLE runs ADD COLUMN unchanged TEXT;
    CREATE TABLE unchanged_basis (
        policy_id TEXT PRIMARY KEY REFERENCES policies(id) ON DELETE CASCADE,
        digest TEXT NOT NULL,
        entries INTEGER NOT NULL,
        spec_fingerprint TEXT NOT NULL,
        agent_instance TEXT NOT NULL,
        run_id TEXT NOT NULL,
        snapshot_id TEXT NOT NULL,
        path TEXT NOT NULL,
        backed_up_at TEXT NOT NULL,
        summary TEXT
    );
    "#,
];

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

/// Policy id -> (its secrets column, what may be shown of it).
type ShownCache = HashMap<String, (String, Arc<ShownSecrets>)>;

/// What the API may say about a policy's stored secrets: whether each is
/// set, and the repository URL with its password replaced by `***`. Never
/// a secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretsShown {
    pub password_set: bool,
    /// Each stored variable: whether it is non-empty.
    pub env_set: BTreeMap<String, bool>,
    /// The stored URL (one with a password in it), redacted.
    pub url: Option<String>,
}

type ShownSecrets = std::result::Result<SecretsShown, String>;

impl SecretsShown {
    fn of(s: &StoredSecrets) -> SecretsShown {
        SecretsShown {
            password_set: s.password.as_ref().is_some_and(|p| !p.is_empty()),
            env_set: s.env.iter().map(|(k, v)| (k.clone(), !v.is_empty())).collect(),
            url: s.url.as_ref().map(|u| soda_syncer_domain::secret::redact_url(u.expose())),
        }
    }
}

/// See [`Store::data_version`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataVersion {
    own: u64,
    others: i64,
}

/// The newest run of a policy, as the policy listing shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LastRun {
    pub id: String,
    pub kind: RunKind,
    pub state: RunState,
    pub finished_at: Option<DateTime<Utc>>,
    pub snapshot_id: Option<String>,
}

impl From<&RunRecord> for LastRun {
    fn from(r: &RunRecord) -> LastRun {
        LastRun {
            id: r.id.clone(),
            kind: r.kind,
            state: r.state,
            finished_at: r.finished_at,
            snapshot_id: r.snapshot_id.clone(),
        }
    }
}

/// One policy of a listing page: its record without secrets (`spec` as
/// stored: no password, env values null, a URL with a password redacted;
/// `secrets_error` set when they cannot be unsealed), what may be said
/// about its secrets, and its newest run.
#[derive(Debug, Clone)]
pub struct ListedPolicy {
    pub policy: PolicyRecord,
    pub secrets: SecretsShown,
    pub last_run: Option<LastRun>,
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

const POLICY_COLS: &str = "id, origin, spec, secrets, volume, legacy_key, status, status_message, created_at, updated_at, last_slot, next_slot, next_run_at, consecutive_failures, last_failed_at";
const RUN_COLS: &str = "id, policy_id, kind, trigger, state, queued_at, started_at, finished_at, slot, due_at, snapshot_id, progress, summary, consistency, error, warning, params, repository_wait_ms, unchanged";

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let open_err = |e: rusqlite::Error| StoreError::Open { path: path.to_path_buf(), message: e.to_string() };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        // Before anything that writes (the journal mode below, migrations):
        // a newer agent's database is refused untouched, so going back to
        // that agent loses nothing.
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(open_err)?;
        if found > MIGRATIONS.len() as i64 {
            return Err(StoreError::NewerSchema { path: path.to_path_buf(), found, known: MIGRATIONS.len() });
        }
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

    /// Seal secrets with `key` from now on, and re-seal any stored in the
    /// clear (by an older version).
    pub fn with_seal_key(mut self, key: crate::sealed::SealKey) -> Result<Store> {
        self.seal = Some(Arc::new(key));
        self.shown_cache().clear();
        // Only rows an older version stored in the clear need sealing.
        let clear = |table: &str| -> Result<Vec<String>> {
            let conn = self.conn();
            let mut stmt = conn.prepare(&format!("SELECT id FROM {table} WHERE secrets NOT LIKE 'sealed:%'"))?;
            let ids = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(ids)
        };
        for id in clear("policies")? {
            let p = self.get_policy(&id)?;
            if p.secrets_error.is_none() {
                self.update_policy(&p)?;
            }
        }
        let unsealed_subs = clear("subscriptions")?;
        if !unsealed_subs.is_empty() {
            for sub in self.list_subscriptions()?.into_iter().filter(|s| unsealed_subs.contains(&s.id)) {
                self.conn().execute("DELETE FROM subscriptions WHERE id = ?1", [&sub.id])?;
                self.upsert_subscription(&sub)?;
            }
        }
        Ok(self)
    }

    fn seal_secrets(&self, s: &StoredSecrets) -> Result<String> {
        let json = serde_json::to_string(s)?;
        Ok(match &self.seal {
            Some(k) => k.seal(json.as_bytes()),
            None => json,
        })
    }

    fn unseal_secrets(&self, text: &str) -> std::result::Result<StoredSecrets, String> {
        let json = if crate::sealed::is_sealed(text) {
            let key = self.seal.as_ref().ok_or_else(|| crate::sealed::SealError::NoKey.to_string())?;
            String::from_utf8(key.open(text).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?
        } else {
            text.to_string()
        };
        serde_json::from_str(&json).map_err(|e| format!("stored secrets are unreadable: {e}"))
    }

    fn shown_cache(&self) -> std::sync::MutexGuard<'_, ShownCache> {
        self.shown.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What may be shown of the secrets column `text` of policy `id`, or
    /// why it cannot be unsealed: unsealed only when the column changed
    /// since the last call. (A column in the clear, only without a key, is
    /// read each time: the cache keeps sealed text only.)
    fn secrets_shown(&self, id: &str, text: &str) -> Arc<ShownSecrets> {
        let shown = |text| Arc::new(self.unseal_secrets(text).map(|s| SecretsShown::of(&s)));
        if !crate::sealed::is_sealed(text) {
            return shown(text);
        }
        if let Some((seen, cached)) = self.shown_cache().get(id) {
            if seen == text {
                return cached.clone();
            }
        }
        let fresh = shown(text);
        self.shown_cache().insert(id.to_string(), (text.to_string(), fresh.clone()));
        fresh
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

    fn migrate(&self) -> Result<()> {
        let mut conn = self.conn();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn integrity_ok(&self) -> Result<bool> {
        let r: String = self.conn().query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        Ok(r == "ok")
    }

    /// At start: every run left queued or running by a previous process is
    /// `interrupted`. Returns the ids of their policies.
    pub fn interrupt_unfinished_runs(&self, now: DateTime<Utc>) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT DISTINCT policy_id FROM runs WHERE state IN ('queued','running')")?;
        let ids = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<std::result::Result<Vec<_>, _>>()?;
        let err = serde_json::to_string(&RunError {
            code: "agent_stopped".into(),
            message: "the agent stopped while this run was in progress; it will be run again".into(),
        })?;
        conn.execute(
            "UPDATE runs SET state = 'interrupted', finished_at = ?1, error = ?2 WHERE state IN ('queued','running')",
            params![fmt_time(now), err],
        )?;
        Ok(ids)
    }

    // ---- policies ----

    fn policy_from_row(row: &Row) -> rusqlite::Result<(PolicyRecordRaw,)> {
        Ok((PolicyRecordRaw {
            id: row.get(0)?,
            origin: row.get(1)?,
            spec: row.get(2)?,
            secrets: row.get(3)?,
            volume: row.get(4)?,
            legacy_key: row.get(5)?,
            status: row.get(6)?,
            status_message: row.get(7)?,
            created_at: row.get(8)?,
            updated_at: row.get(9)?,
            last_slot: row.get(10)?,
            next_slot: row.get(11)?,
            next_run_at: row.get(12)?,
            consecutive_failures: row.get(13)?,
            last_failed_at: row.get(14)?,
        },))
    }

    fn split_secrets(spec: &PolicySpec) -> (PolicySpec, StoredSecrets) {
        let mut public = spec.clone();
        let url_with_password =
            public.repository.url.clone().filter(|u| soda_syncer_domain::secret::url_password(u).is_some());
        let secrets = StoredSecrets {
            password: public.repository.password.take(),
            env: public.repository.env.iter().filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v))).collect(),
            url: url_with_password.map(Secret::new),
        };
        for v in public.repository.env.values_mut() {
            *v = None;
        }
        if secrets.url.is_some() {
            public.repository.url = public.repository.url.as_deref().map(soda_syncer_domain::secret::redact_url);
        }
        (public, secrets)
    }

    pub fn insert_policy(&self, p: &PolicyRecord) -> Result<()> {
        let (public, secrets) = Self::split_secrets(&p.spec);
        let r = self.conn().execute(
            &format!("INSERT INTO policies ({POLICY_COLS}, name, paused) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)"),
            params![
                p.id,
                p.origin.as_str(),
                serde_json::to_string(&public)?,
                self.seal_secrets(&secrets)?,
                p.volume,
                p.legacy_key,
                p.status.as_str(),
                p.status_message,
                fmt_time(p.created_at),
                fmt_time(p.updated_at),
                p.last_slot.map(fmt_time),
                p.next_slot.map(fmt_time),
                p.next_run_at.map(fmt_time),
                p.consecutive_failures,
                p.last_failed_at.map(fmt_time),
                p.spec.name,
                p.spec.paused,
            ],
        );
        match r {
            Err(rusqlite::Error::SqliteFailure(f, Some(msg)))
                if f.code == rusqlite::ErrorCode::ConstraintViolation && msg.contains("policies.name") =>
            {
                Err(StoreError::NameTaken(p.spec.name.clone()))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Rewrite a policy (spec, status, bookkeeping).
    pub fn update_policy(&self, p: &PolicyRecord) -> Result<()> {
        let (public, secrets) = Self::split_secrets(&p.spec);
        let r = self.conn().execute(
            "UPDATE policies SET name=?2, spec=?3, secrets=?4, paused=?5, volume=?6, status=?7, status_message=?8, updated_at=?9,
             last_slot=?10, next_slot=?14, next_run_at=?11, consecutive_failures=?12, last_failed_at=?13 WHERE id=?1",
            params![
                p.id,
                p.spec.name,
                serde_json::to_string(&public)?,
                self.seal_secrets(&secrets)?,
                p.spec.paused,
                p.volume,
                p.status.as_str(),
                p.status_message,
                fmt_time(p.updated_at),
                p.last_slot.map(fmt_time),
                p.next_run_at.map(fmt_time),
                p.consecutive_failures,
                p.last_failed_at.map(fmt_time),
                p.next_slot.map(fmt_time),
            ],
        );
        match r {
            Ok(0) => Err(StoreError::NotFound),
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(f, Some(msg)))
                if f.code == rusqlite::ErrorCode::ConstraintViolation && msg.contains("policies.name") =>
            {
                Err(StoreError::NameTaken(p.spec.name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Only the scheduling bookkeeping (cheap, frequent).
    pub fn set_policy_schedule(&self, p: &PolicyRecord) -> Result<()> {
        self.conn().execute(
            "UPDATE policies SET last_slot=?2, next_slot=?3, next_run_at=?4, consecutive_failures=?5, last_failed_at=?6 WHERE id=?1",
            params![
                p.id,
                p.last_slot.map(fmt_time),
                p.next_slot.map(fmt_time),
                p.next_run_at.map(fmt_time),
                p.consecutive_failures,
                p.last_failed_at.map(fmt_time)
            ],
        )?;
        Ok(())
    }

    fn query_policies(&self, where_sql: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<PolicyRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {POLICY_COLS} FROM policies {where_sql}"))?;
        let raws = stmt.query_map(args, Self::policy_from_row)?.collect::<std::result::Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(conn);
        raws.into_iter().map(|(r,)| r.into_record(self)).collect()
    }

    pub fn get_policy(&self, id: &str) -> Result<PolicyRecord> {
        self.query_policies("WHERE id = ?1", &[&id])?.pop().ok_or(StoreError::NotFound)
    }

    pub fn get_policy_by_name(&self, name: &str) -> Result<PolicyRecord> {
        self.query_policies("WHERE name = ?1", &[&name])?.pop().ok_or(StoreError::NotFound)
    }

    pub fn get_policy_by_legacy_key(&self, key: &str) -> Result<Option<PolicyRecord>> {
        Ok(self.query_policies("WHERE legacy_key = ?1", &[&key])?.pop())
    }

    pub fn list_policies(&self) -> Result<Vec<PolicyRecord>> {
        self.query_policies("ORDER BY name", &[])
    }

    /// Up to `limit` policies by name, after the name `after`.
    pub fn list_policies_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<PolicyRecord>> {
        let after = after.unwrap_or("");
        self.query_policies("WHERE name > ?1 ORDER BY name LIMIT ?2", &[&after, &(limit as i64)])
    }

    /// Changes whenever the database may have changed: a write by this
    /// store or a commit by another connection. What was read at one
    /// version is still what the database holds while it is unchanged.
    pub fn data_version(&self) -> Result<DataVersion> {
        Self::data_version_of(&self.conn())
    }

    /// [`Store::data_version`], or None at once if the database is busy
    /// (for callers that must not wait, such as async tasks).
    pub fn try_data_version(&self) -> Option<DataVersion> {
        let conn = match self.conn.try_lock() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Self::data_version_of(&conn).ok()
    }

    fn data_version_of(conn: &Connection) -> Result<DataVersion> {
        // total_changes counts this connection's rows written (rolled back
        // or not); data_version changes with other connections' commits.
        let others: i64 = conn.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
        Ok(DataVersion { own: conn.total_changes(), others })
    }

    /// Up to `limit` policies by name, after the name `after` (`""`: from
    /// the first), each with its newest run, for listings, and the
    /// [`DataVersion`] they were read at: one statement (one index probe
    /// per policy for its last run), and no secret is unsealed unless it
    /// changed since the last listing.
    pub fn list_policies_page_shown(&self, after: &str, limit: usize) -> Result<(DataVersion, Vec<ListedPolicy>)> {
        let conn = self.conn();
        // Before the read, under the same lock: a later change shows as a
        // newer version, never the other way round.
        let version = Self::data_version_of(&conn)?;
        let mut stmt = conn.prepare_cached(
            "SELECT p.id, p.origin, p.spec, p.secrets, p.volume, p.legacy_key, p.status, p.status_message,
                    p.created_at, p.updated_at, p.last_slot, p.next_slot, p.next_run_at, p.consecutive_failures,
                    p.last_failed_at, r.id, r.kind, r.state, r.finished_at, r.snapshot_id
             FROM policies p
             LEFT JOIN runs r ON r.rowid = (SELECT rowid FROM runs WHERE policy_id = p.id ORDER BY id DESC LIMIT 1)
             WHERE p.name > ?1 ORDER BY p.name LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![after, limit as i64], |row| {
                let (raw,) = Self::policy_from_row(row)?;
                let last = match row.get::<_, Option<String>>(15)? {
                    Some(id) => Some(LastRunRaw {
                        id,
                        kind: row.get(16)?,
                        state: row.get(17)?,
                        finished_at: row.get(18)?,
                        snapshot_id: row.get(19)?,
                    }),
                    None => None,
                };
                Ok((raw, last))
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(conn);
        let listed = rows
            .into_iter()
            .map(|(raw, last)| {
                let (mut policy, secrets_text) = raw.into_stored_record()?;
                let secrets = match &*self.secrets_shown(&policy.id, &secrets_text) {
                    Ok(s) => s.clone(),
                    Err(e) => {
                        policy.secrets_error = Some(e.clone());
                        SecretsShown::default()
                    }
                };
                Ok(ListedPolicy { policy, secrets, last_run: last.map(LastRunRaw::into_last_run).transpose()? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((version, listed))
    }

    pub fn delete_policy(&self, id: &str) -> Result<()> {
        let n = self.conn().execute("DELETE FROM policies WHERE id = ?1", params![id])?;
        self.shown_cache().remove(id);
        match n {
            0 => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }

    /// Policies whose next run is due at `now`, oldest first.
    pub fn due_policy_ids(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id FROM policies WHERE paused = 0 AND status = 'active' AND next_run_at IS NOT NULL AND next_run_at <= ?1
             ORDER BY next_run_at LIMIT ?2",
        )?;
        let ids = stmt
            .query_map(params![fmt_time(now), limit as i64], |r| r.get(0))?
            .collect::<std::result::Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    /// The earliest next run of any schedulable policy after `now` (runs
    /// due already are handled, or blocked by a run in flight whose end
    /// wakes the scheduler anyway).
    pub fn next_wake(&self, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        let v: Option<String> = self.conn().query_row(
            "SELECT MIN(next_run_at) FROM policies WHERE paused = 0 AND status = 'active' AND next_run_at > ?1",
            [fmt_time(now)],
            |r| r.get(0),
        )?;
        Ok(opt_time(v))
    }

    pub fn count_policies(&self) -> Result<u64> {
        Ok(self.conn().query_row("SELECT COUNT(*) FROM policies", [], |r| r.get::<_, i64>(0))? as u64)
    }

    // ---- runs ----

    fn run_from_row(row: &Row) -> rusqlite::Result<RunRaw> {
        Ok(RunRaw {
            id: row.get(0)?,
            policy_id: row.get(1)?,
            kind: row.get(2)?,
            trigger: row.get(3)?,
            state: row.get(4)?,
            queued_at: row.get(5)?,
            started_at: row.get(6)?,
            finished_at: row.get(7)?,
            slot: row.get(8)?,
            due_at: row.get(9)?,
            snapshot_id: row.get(10)?,
            progress: row.get(11)?,
            summary: row.get(12)?,
            consistency: row.get(13)?,
            error: row.get(14)?,
            warning: row.get(15)?,
            params: row.get(16)?,
            repository_wait_ms: row.get(17)?,
            unchanged: row.get(18)?,
        })
    }

    /// Insert or replace a run.
    pub fn save_run(&self, r: &RunRecord) -> Result<()> {
        write_run(&self.conn(), r)
    }

    /// Record a run's end and keep only the newest `keep` finished runs of
    /// its policy, in one transaction under the connection's lock: no
    /// reader ever sees more than `keep` finished runs. Returns how many
    /// were deleted.
    pub fn finish_run(&self, r: &RunRecord, keep: usize) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        write_run(&tx, r)?;
        let n = tx.execute(TRIM_RUNS, params![r.policy_id, keep as i64])?;
        tx.commit()?;
        Ok(n)
    }

    fn query_runs(&self, sql_tail: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<RunRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {RUN_COLS} FROM runs {sql_tail}"))?;
        let raws = stmt.query_map(args, Self::run_from_row)?.collect::<std::result::Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(conn);
        raws.into_iter().map(RunRaw::into_record).collect()
    }

    pub fn get_run(&self, id: &str) -> Result<RunRecord> {
        self.query_runs("WHERE id = ?1", &[&id])?.pop().ok_or(StoreError::NotFound)
    }

    /// Runs newest first.
    pub fn list_runs(&self, f: &RunFilter) -> Result<Vec<RunRecord>> {
        let mut clauses = Vec::new();
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if let Some(p) = &f.policy_id {
            args.push(Box::new(p.clone()));
            clauses.push(format!("policy_id = ?{}", args.len()));
        }
        if let Some(s) = f.state {
            args.push(Box::new(s.as_str()));
            clauses.push(format!("state = ?{}", args.len()));
        }
        if let Some(k) = f.kind {
            args.push(Box::new(k.as_str()));
            clauses.push(format!("kind = ?{}", args.len()));
        }
        if let Some(b) = &f.before {
            args.push(Box::new(b.clone()));
            clauses.push(format!("id < ?{}", args.len()));
        }
        let where_sql = if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
        args.push(Box::new(f.limit.max(1) as i64));
        let tail = format!("{where_sql} ORDER BY id DESC LIMIT ?{}", args.len());
        let refs: Vec<&dyn rusqlite::ToSql> = args.iter().map(|b| b.as_ref()).collect();
        self.query_runs(&tail, &refs)
    }

    /// The newest run of each policy, keyed by policy id.
    pub fn last_runs(&self) -> Result<std::collections::HashMap<String, RunRecord>> {
        // One index probe per policy; a GROUP BY over all runs scanned the
        // whole index on every listing (20 ms at 100,000 runs).
        let runs = self.query_runs(
            "WHERE id IN (SELECT (SELECT r.id FROM runs r WHERE r.policy_id = p.id ORDER BY r.id DESC LIMIT 1) FROM policies p)",
            &[],
        )?;
        Ok(runs.into_iter().map(|r| (r.policy_id.clone(), r)).collect())
    }

    pub fn last_run_of(&self, policy_id: &str) -> Result<Option<RunRecord>> {
        Ok(self.query_runs("WHERE policy_id = ?1 ORDER BY id DESC LIMIT 1", &[&policy_id])?.pop())
    }

    /// The newest backup of a policy that ended `succeeded`: the yardstick
    /// for judging the next one.
    /// The backup run that wrote this snapshot, if this agent recorded it.
    pub fn backup_of_snapshot(&self, policy_id: &str, snapshot_id: &str) -> Result<Option<RunRecord>> {
        Ok(self
            .query_runs(
                "WHERE policy_id = ?1 AND kind = 'backup' AND snapshot_id = ?2 ORDER BY id DESC LIMIT 1",
                &[&policy_id, &snapshot_id],
            )?
            .pop())
    }

    /// The newest backup run of the policy that wrote a snapshot (whatever
    /// its state: a partial or suspicious snapshot is still restic's latest).
    pub fn last_snapshot_backup(&self, policy_id: &str) -> Result<Option<RunRecord>> {
        Ok(self
            .query_runs(
                "WHERE policy_id = ?1 AND kind = 'backup' AND snapshot_id IS NOT NULL ORDER BY id DESC LIMIT 1",
                &[&policy_id],
            )?
            .pop())
    }

    /// Every snapshot id a backup run of this agent recorded, of any policy.
    pub fn recorded_snapshot_ids(&self) -> Result<std::collections::HashSet<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT snapshot_id FROM runs WHERE kind = 'backup' AND snapshot_id IS NOT NULL")?;
        let ids = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<std::result::Result<_, _>>()?;
        Ok(ids)
    }

    pub fn last_clean_backup(&self, policy_id: &str) -> Result<Option<RunRecord>> {
        Ok(self
            .query_runs(
                "WHERE policy_id = ?1 AND kind = 'backup' AND state = 'succeeded' ORDER BY id DESC LIMIT 1",
                &[&policy_id],
            )?
            .pop())
    }

    /// Runs counted by kind and state (for metrics).
    pub fn run_counts(&self) -> Result<Vec<(String, String, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT kind, state, COUNT(*) FROM runs GROUP BY kind, state")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    // ---- repositories ----

    /// Make sure each repository key has a maintenance row; new ones get
    /// their first prune and check at the given times.
    pub fn ensure_repository(&self, key: &str, first_prune: DateTime<Utc>, first_check: DateTime<Utc>) -> Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO repositories (key, next_prune_at, next_check_at) VALUES (?1, ?2, ?3)",
            params![key, fmt_time(first_prune), fmt_time(first_check)],
        )?;
        Ok(())
    }

    pub fn repository_maintenance(&self, key: &str) -> Result<Option<RepoMaintenance>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT key, next_prune_at, last_prune_at, next_check_at, last_check_at FROM repositories WHERE key = ?1",
        )?;
        let mut rows = stmt.query_map([key], RepoMaintenance::from_row)?;
        Ok(rows.next().transpose()?)
    }

    /// Repositories whose prune or check is due.
    /// Every repository's maintenance bookkeeping (for /metrics).
    pub fn repositories(&self) -> Result<Vec<RepoMaintenance>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT key, next_prune_at, last_prune_at, next_check_at, last_check_at FROM repositories ORDER BY key",
        )?;
        let rows = stmt.query_map([], RepoMaintenance::from_row)?.collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn due_repositories(&self, now: DateTime<Utc>) -> Result<Vec<RepoMaintenance>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT key, next_prune_at, last_prune_at, next_check_at, last_check_at FROM repositories
             WHERE next_prune_at <= ?1 OR next_check_at <= ?1",
        )?;
        let rows =
            stmt.query_map([fmt_time(now)], RepoMaintenance::from_row)?.collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn save_repository_maintenance(&self, m: &RepoMaintenance) -> Result<()> {
        self.conn().execute(
            "UPDATE repositories SET next_prune_at = ?2, last_prune_at = ?3, next_check_at = ?4, last_check_at = ?5 WHERE key = ?1",
            params![m.key, m.next_prune_at.map(fmt_time), m.last_prune_at.map(fmt_time), m.next_check_at.map(fmt_time), m.last_check_at.map(fmt_time)],
        )?;
        Ok(())
    }

    // ---- legacy subscriptions ----

    pub fn upsert_subscription(&self, s: &Subscription) -> Result<()> {
        // The URL itself may carry a password: the column holds it redacted
        // plus a hash (unique per URL), the secrets hold it whole.
        let secrets = StoredSecrets {
            password: Some(s.password.clone()),
            env: s.env.clone(),
            url: Some(Secret::new(&s.repository)),
        };
        let key = format!(
            "{}#{}",
            soda_syncer_domain::secret::redact_url(&s.repository),
            crate::ids::short_hash(&[&s.repository])
        );
        self.conn().execute(
            "INSERT INTO subscriptions (id, repository, secrets, interval_seconds, created_at, updated_at) VALUES (?1,?2,?3,?4,?5,?6)
             ON CONFLICT(repository) DO UPDATE SET secrets = excluded.secrets, interval_seconds = excluded.interval_seconds, updated_at = excluded.updated_at",
            params![s.id, key, self.seal_secrets(&secrets)?, s.interval_seconds as i64, fmt_time(s.created_at), fmt_time(s.updated_at)],
        )?;
        Ok(())
    }

    pub fn list_subscriptions(&self) -> Result<Vec<Subscription>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, repository, secrets, interval_seconds, created_at, updated_at FROM subscriptions ORDER BY created_at",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, column, secrets, interval, c, u)| {
                let secrets = match self.unseal_secrets(&secrets) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(subscription = %column, error = %e, "a legacy subscription cannot be used until soda-proxy sends it again");
                        return None;
                    }
                };
                Some(Subscription {
                    id,
                    repository: secrets.url.map(|u| u.expose().to_string()).unwrap_or(column),
                    password: secrets.password.unwrap_or_default(),
                    env: secrets.env,
                    interval_seconds: interval as u64,
                    created_at: parse_time(&c).unwrap_or_default(),
                    updated_at: parse_time(&u).unwrap_or_default(),
                })
            })
            .collect())
    }
}

/// When a repository was last and is next pruned and checked.
#[derive(Debug, Clone)]
pub struct RepoMaintenance {
    pub key: String,
    pub next_prune_at: Option<DateTime<Utc>>,
    pub last_prune_at: Option<DateTime<Utc>>,
    pub next_check_at: Option<DateTime<Utc>>,
    pub last_check_at: Option<DateTime<Utc>>,
}

impl RepoMaintenance {
    fn from_row(r: &Row) -> rusqlite::Result<RepoMaintenance> {
        Ok(RepoMaintenance {
            key: r.get(0)?,
            next_prune_at: opt_time(r.get(1)?),
            last_prune_at: opt_time(r.get(2)?),
            next_check_at: opt_time(r.get(3)?),
            last_check_at: opt_time(r.get(4)?),
        })
    }
}

/// Something a consistency method holds for a run (see `consistency`):
/// recorded before it exists, cleared once it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldResource {
    pub id: String,
    pub run_id: String,
    /// `freeze`, `btrfs_snapshot`, `clone_tree`, `clone_file`, `loop`, `mount`, `lvm_snapshot`.
    pub kind: String,
    pub path: String,
    pub created_at: DateTime<Utc>,
}

impl Store {
    pub fn record_resource(&self, r: &HeldResource) -> Result<()> {
        self.conn().execute(
            "INSERT INTO consistency_resources (id, run_id, kind, path, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![r.id, r.run_id, r.kind, r.path, fmt_time(r.created_at)],
        )?;
        Ok(())
    }

    pub fn clear_resource(&self, id: &str) -> Result<()> {
        self.conn().execute("DELETE FROM consistency_resources WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Everything recorded and not cleared, oldest first.
    pub fn held_resources(&self) -> Result<Vec<HeldResource>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, run_id, kind, path, created_at FROM consistency_resources ORDER BY created_at, rowid",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(HeldResource {
                id: r.get(0)?,
                run_id: r.get(1)?,
                kind: r.get(2)?,
                path: r.get(3)?,
                created_at: parse_time(&r.get::<_, String>(4)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
    }
}

struct PolicyRecordRaw {
    id: String,
    origin: String,
    spec: String,
    secrets: String,
    volume: Option<String>,
    legacy_key: Option<String>,
    status: String,
    status_message: Option<String>,
    created_at: String,
    updated_at: String,
    last_slot: Option<String>,
    next_slot: Option<String>,
    next_run_at: Option<String>,
    consecutive_failures: u32,
    last_failed_at: Option<String>,
}

impl PolicyRecordRaw {
    fn into_record(self, store: &Store) -> Result<PolicyRecord> {
        let (mut p, secrets) = self.into_stored_record()?;
        // A secret that cannot be unsealed leaves the policy readable; its
        // runs fail with the reason.
        let secrets = match store.unseal_secrets(&secrets) {
            Ok(s) => s,
            Err(e) => {
                p.secrets_error = Some(e);
                StoredSecrets::default()
            }
        };
        let repo = &mut p.spec.repository;
        repo.password = secrets.password;
        for (k, v) in secrets.env {
            repo.env.insert(k, Some(v));
        }
        if let Some(url) = secrets.url {
            repo.url = Some(url.expose().to_string());
        }
        Ok(p)
    }

    /// The record with its spec as stored (without secrets), and the
    /// secrets column.
    fn into_stored_record(self) -> Result<(PolicyRecord, String)> {
        let spec: PolicySpec = serde_json::from_str(&self.spec)?;
        let record = PolicyRecord {
            secrets_error: None,
            origin: Origin::parse(&self.origin)
                .ok_or_else(|| StoreError::Corrupt(format!("origin {:?}", self.origin)))?,
            id: self.id,
            spec,
            volume: self.volume,
            legacy_key: self.legacy_key,
            status: PolicyStatus::parse(&self.status),
            status_message: self.status_message,
            created_at: parse_time(&self.created_at).unwrap_or_default(),
            updated_at: parse_time(&self.updated_at).unwrap_or_default(),
            last_slot: opt_time(self.last_slot),
            next_slot: opt_time(self.next_slot),
            next_run_at: opt_time(self.next_run_at),
            consecutive_failures: self.consecutive_failures,
            last_failed_at: opt_time(self.last_failed_at),
        };
        Ok((record, self.secrets))
    }
}

struct LastRunRaw {
    id: String,
    kind: String,
    state: String,
    finished_at: Option<String>,
    snapshot_id: Option<String>,
}

impl LastRunRaw {
    fn into_last_run(self) -> Result<LastRun> {
        let bad = |what: &str, v: &str| StoreError::Corrupt(format!("run {} has {what} {v:?}", self.id));
        Ok(LastRun {
            kind: RunKind::parse(&self.kind).ok_or_else(|| bad("kind", &self.kind))?,
            state: RunState::parse(&self.state).ok_or_else(|| bad("state", &self.state))?,
            finished_at: opt_time(self.finished_at),
            snapshot_id: self.snapshot_id,
            id: self.id,
        })
    }
}

struct RunRaw {
    id: String,
    policy_id: String,
    kind: String,
    trigger: String,
    state: String,
    queued_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    slot: Option<String>,
    due_at: Option<String>,
    snapshot_id: Option<String>,
    progress: Option<String>,
    summary: Option<String>,
    consistency: Option<String>,
    error: Option<String>,
    warning: Option<String>,
    params: Option<String>,
    repository_wait_ms: Option<i64>,
    unchanged: Option<String>,
}

impl RunRaw {
    fn into_record(self) -> Result<RunRecord> {
        let bad = |what: &str, v: &str| StoreError::Corrupt(format!("run {} has {what} {v:?}", self.id));
        Ok(RunRecord {
            kind: RunKind::parse(&self.kind).ok_or_else(|| bad("kind", &self.kind))?,
            trigger: RunTrigger::parse(&self.trigger).ok_or_else(|| bad("trigger", &self.trigger))?,
            state: RunState::parse(&self.state).ok_or_else(|| bad("state", &self.state))?,
            queued_at: parse_time(&self.queued_at).unwrap_or_default(),
            started_at: opt_time(self.started_at),
            finished_at: opt_time(self.finished_at),
            slot: opt_time(self.slot),
            due_at: opt_time(self.due_at),
            snapshot_id: self.snapshot_id,
            progress: json_col(self.progress)?,
            summary: json_col(self.summary)?,
            consistency: json_col(self.consistency)?,
            error: json_col(self.error)?,
            warning: self.warning,
            params: json_col(self.params)?,
            repository_wait_ms: self.repository_wait_ms.map(|v| v.max(0) as u64),
            unchanged: json_col(self.unchanged)?,
            policy_id: self.policy_id,
            id: self.id,
        })
    }
}

/// What a clean real backup left for "unchanged" runs to compare with.
#[derive(Debug, Clone)]
pub struct UnchangedBasis {
    pub policy_id: String,
    pub digest: String,
    pub entries: u64,
    pub spec_fingerprint: String,
    pub agent_instance: String,
    pub run_id: String,
    pub snapshot_id: String,
    /// The path the snapshot holds.
    pub path: String,
    pub backed_up_at: DateTime<Utc>,
    pub summary: Option<RunSummary>,
}

/// Digests for unchanged runs (see `crate::unchanged`).
impl Store {
    pub fn unchanged_basis(&self, policy_id: &str) -> Result<Option<UnchangedBasis>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT digest, entries, spec_fingerprint, agent_instance, run_id, snapshot_id, path, backed_up_at, summary
             FROM unchanged_basis WHERE policy_id = ?1",
        )?;
        let mut rows = stmt.query(params![policy_id])?;
        let Some(r) = rows.next()? else { return Ok(None) };
        let at: String = r.get(7)?;
        Ok(Some(UnchangedBasis {
            policy_id: policy_id.to_string(),
            digest: r.get(0)?,
            entries: r.get::<_, i64>(1)?.max(0) as u64,
            spec_fingerprint: r.get(2)?,
            agent_instance: r.get(3)?,
            run_id: r.get(4)?,
            snapshot_id: r.get(5)?,
            path: r.get(6)?,
            backed_up_at: parse_time(&at).ok_or_else(|| StoreError::Corrupt(format!("unchanged basis time {at:?}")))?,
            summary: json_col(r.get(8)?)?,
        }))
    }

    pub fn set_unchanged_basis(&self, b: &UnchangedBasis) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO unchanged_basis
             (policy_id, digest, entries, spec_fingerprint, agent_instance, run_id, snapshot_id, path, backed_up_at, summary)
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
            params![
                b.policy_id,
                b.digest,
                b.entries as i64,
                b.spec_fingerprint,
                b.agent_instance,
                b.run_id,
                b.snapshot_id,
                b.path,
                fmt_time(b.backed_up_at),
                to_json(&b.summary),
            ],
        )?;
        Ok(())
    }

    /// A real backup starts: until it ends clean, nothing may be proven
    /// unchanged against the one before.
    pub fn clear_unchanged_basis(&self, policy_id: &str) -> Result<()> {
        self.conn().execute("DELETE FROM unchanged_basis WHERE policy_id = ?1", params![policy_id])?;
        Ok(())
    }
}

/// Restore drill bookkeeping.
impl Store {
    /// policy id -> when its next drill is due.
    pub fn drill_times(&self) -> Result<HashMap<String, DateTime<Utc>>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT policy_id, next_at FROM drills")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = HashMap::new();
        for row in rows {
            let (id, at) = row?;
            if let Some(at) = parse_time(&at) {
                out.insert(id, at);
            }
        }
        Ok(out)
    }

    pub fn set_drill_time(&self, policy_id: &str, at: Option<DateTime<Utc>>) -> Result<()> {
        match at {
            Some(at) => self.conn().execute(
                "INSERT INTO drills (policy_id, next_at) VALUES (?1, ?2) ON CONFLICT(policy_id) DO UPDATE SET next_at = excluded.next_at",
                params![policy_id, fmt_time(at)],
            )?,
            None => self.conn().execute("DELETE FROM drills WHERE policy_id = ?1", params![policy_id])?,
        };
        Ok(())
    }
}

/// Delete a policy's finished runs but the newest ?2 finished ones (queued
/// and running runs neither count nor go).
const TRIM_RUNS: &str = "DELETE FROM runs WHERE policy_id = ?1 AND state NOT IN ('queued','running')
     AND id NOT IN (SELECT id FROM runs WHERE policy_id = ?1 AND state NOT IN ('queued','running')
                    ORDER BY id DESC LIMIT ?2)";

/// Insert or replace one run (all columns).
fn write_run(conn: &Connection, r: &RunRecord) -> Result<()> {
    conn.execute(
        &format!("INSERT OR REPLACE INTO runs ({RUN_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19)"),
        params![
            r.id,
            r.policy_id,
            r.kind.as_str(),
            r.trigger.as_str(),
            r.state.as_str(),
            fmt_time(r.queued_at),
            r.started_at.map(fmt_time),
            r.finished_at.map(fmt_time),
            r.slot.map(fmt_time),
            r.due_at.map(fmt_time),
            r.snapshot_id,
            to_json(&r.progress),
            to_json(&r.summary),
            to_json(&r.consistency),
            to_json(&r.error),
            r.warning,
            to_json(&r.params),
            r.repository_wait_ms.map(|v| v as i64),
            to_json(&r.unchanged),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(name: &str) -> PolicyRecord {
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

    #[test]
    fn policies_round_trip_with_secrets_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let p = record("a");
        store.insert_policy(&p).unwrap();
        let back = store.get_policy(&p.id).unwrap();
        assert_eq!(back.spec.repository.password.as_ref().unwrap().expose(), "hunter2");
        assert_eq!(back.spec.repository.env["AWS_SECRET_ACCESS_KEY"].as_ref().unwrap().expose(), "s3cr3t");
        let spec_col: String =
            store.conn().query_row("SELECT spec FROM policies WHERE id=?1", [&p.id], |r| r.get(0)).unwrap();
        assert!(!spec_col.contains("hunter2") && !spec_col.contains("s3cr3t"), "{spec_col}");
        assert!(matches!(store.insert_policy(&record("a")), Err(StoreError::NameTaken(_))));
    }

    #[test]
    fn an_unchanged_basis_and_marker_round_trip_and_go_with_their_policy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let p = record("u");
        store.insert_policy(&p).unwrap();
        let now = Utc::now();
        let basis = UnchangedBasis {
            policy_id: p.id.clone(),
            digest: "ab".repeat(32),
            entries: 10_000,
            spec_fingerprint: "f".into(),
            agent_instance: "i".into(),
            run_id: "r".into(),
            snapshot_id: "cd".repeat(32),
            path: "/data".into(),
            backed_up_at: now,
            summary: Some(RunSummary { total_files_processed: 10_000, ..Default::default() }),
        };
        assert!(store.unchanged_basis(&p.id).unwrap().is_none());
        store.set_unchanged_basis(&basis).unwrap();
        let back = store.unchanged_basis(&p.id).unwrap().unwrap();
        assert_eq!(
            (back.digest, back.entries, back.snapshot_id),
            (basis.digest.clone(), 10_000, basis.snapshot_id.clone())
        );
        assert_eq!(back.summary.unwrap().total_files_processed, 10_000);
        let mut run = RunRecord::new(crate::ids::new_id(), &p.id, RunKind::Backup, RunTrigger::Schedule, now);
        run.unchanged = Some(soda_syncer_domain::unchanged::UnchangedRun {
            snapshot_id: basis.snapshot_id.clone(),
            backed_up_at: fmt_time(now),
            verified_at: fmt_time(now),
            entries: 10_000,
            walk_ms: 30,
            proof: Default::default(),
        });
        store.save_run(&run).unwrap();
        assert_eq!(store.get_run(&run.id).unwrap().unchanged, run.unchanged);
        store.clear_unchanged_basis(&p.id).unwrap();
        assert!(store.unchanged_basis(&p.id).unwrap().is_none());
        store.set_unchanged_basis(&basis).unwrap();
        store.delete_policy(&p.id).unwrap();
        assert!(store.unchanged_basis(&p.id).unwrap().is_none(), "deleted with its policy");
    }

    #[test]
    fn a_finished_run_trims_the_history_to_the_newest_finished_runs_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let (p, other) = (record("p"), record("other"));
        store.insert_policy(&p).unwrap();
        store.insert_policy(&other).unwrap();
        let now = Utc::now();
        let run = |id: &str, policy: &PolicyRecord, state: RunState| {
            let mut r = RunRecord::new(format!("{id:0>20}"), &policy.id, RunKind::Backup, RunTrigger::Manual, now);
            r.state = state;
            r
        };
        for (id, state) in [("01", RunState::Succeeded), ("02", RunState::Failed), ("03", RunState::Succeeded)] {
            store.save_run(&run(id, &p, state)).unwrap();
        }
        store.save_run(&run("09", &other, RunState::Succeeded)).unwrap();
        // The next run is queued already when this one ends: it neither
        // counts towards the kept runs nor goes.
        store.save_run(&run("05", &p, RunState::Queued)).unwrap();
        let deleted = store.finish_run(&run("04", &p, RunState::Succeeded), 2).unwrap();
        assert_eq!(deleted, 2);
        let ids = |policy: &PolicyRecord| -> Vec<(String, String)> {
            let conn = store.conn();
            let mut st = conn.prepare("SELECT id, state FROM runs WHERE policy_id = ?1 ORDER BY id").unwrap();
            st.query_map([&policy.id], |r| Ok((r.get::<_, String>(0)?[18..].to_string(), r.get(1)?)))
                .unwrap()
                .collect::<std::result::Result<_, _>>()
                .unwrap()
        };
        let kept = [("03", "succeeded"), ("04", "succeeded"), ("05", "queued")];
        assert_eq!(ids(&p), kept.map(|(a, b)| (a.to_string(), b.to_string())));
        assert_eq!(ids(&other).len(), 1, "another policy's history is its own");
    }

    #[test]
    fn a_listing_page_has_each_policys_newest_run_and_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let key = || crate::sealed::SealKey::from_hex(&"ab".repeat(32), "test").unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap().with_seal_key(key()).unwrap();
        let (a, b, c) = (record("a"), record("b"), record("c"));
        for p in [&c, &a, &b] {
            store.insert_policy(p).unwrap();
        }
        let now = Utc::now();
        // Saved out of order: the newest id wins, not the last saved.
        for (policy, id) in [(&a, "02"), (&a, "03"), (&a, "01"), (&c, "05")] {
            store
                .save_run(&RunRecord::new(format!("{id:0>20}"), &policy.id, RunKind::Backup, RunTrigger::Manual, now))
                .unwrap();
        }
        let v1 = store.data_version().unwrap();
        let (v, page) = store.list_policies_page_shown("", 10).unwrap();
        assert_eq!(v, v1);
        assert_eq!(page.iter().map(|l| l.policy.spec.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        for l in &page {
            assert_eq!(l.last_run, store.last_run_of(&l.policy.id).unwrap().as_ref().map(LastRun::from));
            assert!(l.policy.spec.repository.password.is_none(), "listings carry no secret");
            assert!(l.policy.spec.repository.env.values().all(Option::is_none));
            assert_eq!(
                l.secrets,
                SecretsShown {
                    password_set: true,
                    env_set: [("AWS_SECRET_ACCESS_KEY".to_string(), true)].into(),
                    url: None
                }
            );
        }
        assert_eq!(page[0].last_run.as_ref().unwrap().id, format!("{:0>20}", "03"));
        assert_eq!(page[1].last_run, None);
        let (_, after) = store.list_policies_page_shown("a", 1).unwrap();
        assert_eq!(after.iter().map(|l| l.policy.spec.name.as_str()).collect::<Vec<_>>(), ["b"]);
        store
            .save_run(&RunRecord::new(format!("{:0>20}", "04"), &b.id, RunKind::Backup, RunTrigger::Manual, now))
            .unwrap();
        assert_ne!(store.data_version().unwrap(), v1, "a write is a new version");

        // Reopened under another key: listed, with the reason and nothing set.
        drop(store);
        let other = crate::sealed::SealKey::from_hex(&"cd".repeat(32), "test").unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap().with_seal_key(other).unwrap();
        let (_, page) = store.list_policies_page_shown("", 10).unwrap();
        for l in &page {
            assert_eq!(l.policy.secrets_error, store.get_policy(&l.policy.id).unwrap().secrets_error);
            assert!(l.policy.secrets_error.is_some());
            assert_eq!(l.secrets, SecretsShown::default());
        }
    }

    #[test]
    fn unfinished_runs_become_interrupted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path).unwrap();
        let p = record("a");
        store.insert_policy(&p).unwrap();
        let mut run = RunRecord::new(crate::ids::new_id(), &p.id, RunKind::Backup, RunTrigger::Schedule, Utc::now());
        run.state = RunState::Running;
        store.save_run(&run).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.interrupt_unfinished_runs(Utc::now()).unwrap(), vec![p.id.clone()]);
        let r = store.get_run(&run.id).unwrap();
        assert_eq!(r.state, RunState::Interrupted);
        assert_eq!(r.error.unwrap().code, "agent_stopped");
        assert!(store.integrity_ok().unwrap());
    }

    #[test]
    fn due_policies_skip_paused_and_future_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let now = Utc::now();
        let mut due = record("due");
        // Made after `now`, maybe in a later millisecond: due at `now` exactly.
        due.next_run_at = Some(now);
        let mut paused = record("paused");
        paused.spec.paused = true;
        let mut later = record("later");
        later.next_run_at = Some(now + chrono::Duration::hours(1));
        for p in [&due, &paused, &later] {
            store.insert_policy(p).unwrap();
        }
        assert_eq!(store.due_policy_ids(now, 10).unwrap(), vec![due.id.clone()]);
        assert_eq!(
            store.next_wake(now - chrono::Duration::seconds(1)).unwrap().map(fmt_time),
            due.next_run_at.map(fmt_time)
        );
        assert_eq!(store.next_wake(now).unwrap().map(fmt_time), later.next_run_at.map(fmt_time));
    }
}
