//! The held-resources journal (`consistency_resources`): what the
//! consistency methods hold while a backup runs, written before each is
//! made, so the next start can undo what a crash left.

use rusqlite::params;

use super::{Result, Store};
use crate::ids::{fmt_time, parse_time};

pub use soda_syncer_domain::consistency::HeldResource;

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
