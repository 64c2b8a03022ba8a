//! The drills table: when each policy's next restore drill is due.

use chrono::{DateTime, Utc};
use rusqlite::params;
use std::collections::HashMap;

use super::{Result, Store};
use crate::ids::{fmt_time, parse_time};

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
