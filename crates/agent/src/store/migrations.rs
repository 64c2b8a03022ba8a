//! Schema versions: the migrations in order, applying the missing ones at
//! open, and refusing a database written by a newer agent.

use rusqlite::Connection;
use std::path::Path;

use super::{Result, Store, StoreError};

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

/// A database with a higher schema version than the migrations known
/// here (written by a newer agent) is refused.
pub(super) fn refuse_newer(conn: &Connection, path: &Path) -> Result<()> {
    let open_err = |e: rusqlite::Error| StoreError::Open { path: path.to_path_buf(), message: e.to_string() };
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(open_err)?;
    if found > MIGRATIONS.len() as i64 {
        return Err(StoreError::NewerSchema { path: path.to_path_buf(), found, known: MIGRATIONS.len() });
    }
    Ok(())
}

impl Store {
    pub(super) fn migrate(&self) -> Result<()> {
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
}
