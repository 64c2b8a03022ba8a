//! The legacy subscriptions table (`POST /snapshot` with an empty source),
//! their secrets sealed like a policy's.

use chrono::{DateTime, Utc};
use rusqlite::params;
use soda_syncer_domain::Secret;
use std::collections::BTreeMap;

use super::secrets::StoredSecrets;
use super::{Result, Store};
use crate::ids::{fmt_time, parse_time};

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

impl Store {
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
