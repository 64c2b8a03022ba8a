//! The runs table: run records, saving and finishing them (with the
//! history trimmed in the same transaction), queries, counts for metrics,
//! and marking runs a previous process left unfinished.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, Row};
use soda_syncer_domain::run::{Progress, RunError, RunSummary};
use soda_syncer_domain::{RunKind, RunState, RunTrigger};

use super::{json_col, opt_time, to_json, Result, Store, StoreError};
use crate::ids::{fmt_time, parse_time};

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

const RUN_COLS: &str = "id, policy_id, kind, trigger, state, queued_at, started_at, finished_at, slot, due_at, snapshot_id, progress, summary, consistency, error, warning, params, repository_wait_ms, unchanged";

impl Store {
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
    use crate::store::tests::record;
    use crate::store::PolicyRecord;

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
}
