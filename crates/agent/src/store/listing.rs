//! The policy listing page: each policy with its newest run and what may
//! be shown of its secrets, in one statement, and the data version a
//! listing was read at (for caches of it).

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use soda_syncer_domain::{RunKind, RunState};

use super::policies::PolicyRecord;
use super::runs::RunRecord;
use super::secrets::SecretsShown;
use super::{opt_time, Result, Store, StoreError};

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

impl Store {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::record;
    use soda_syncer_domain::RunTrigger;

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
}
