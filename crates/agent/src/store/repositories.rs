//! The repositories table: when each repository was last and is next
//! pruned and checked.

use chrono::{DateTime, Utc};
use rusqlite::{params, Row};

use super::{opt_time, Result, Store};
use crate::ids::fmt_time;

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

impl Store {
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
}
