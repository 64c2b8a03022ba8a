//! The policies table: records, inserts and updates (secrets split off
//! and sealed), lookups, due policies and the scheduler's next wake.

use chrono::{DateTime, Utc};
use rusqlite::{params, Row};
use serde::{Deserialize, Serialize};
use soda_syncer_domain::{Origin, PolicySpec};

use super::secrets::StoredSecrets;
use super::{opt_time, Result, Store, StoreError};
use crate::ids::{fmt_time, parse_time};

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

pub(super) const POLICY_COLS: &str = "id, origin, spec, secrets, volume, legacy_key, status, status_message, created_at, updated_at, last_slot, next_slot, next_run_at, consecutive_failures, last_failed_at";

impl Store {
    pub(super) fn policy_from_row(row: &Row) -> rusqlite::Result<(PolicyRecordRaw,)> {
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
}

pub(super) struct PolicyRecordRaw {
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
    pub(super) fn into_stored_record(self) -> Result<(PolicyRecord, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::record;

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
