//! The unchanged_basis table: per policy, the digest of the volume's
//! metadata taken before its last clean real backup (issue 19).

use chrono::{DateTime, Utc};
use rusqlite::params;
use soda_syncer_domain::run::RunSummary;

use super::{json_col, to_json, Result, Store, StoreError};
use crate::ids::{fmt_time, parse_time};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::record;
    use crate::store::RunRecord;
    use soda_syncer_domain::{RunKind, RunTrigger};

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
}
