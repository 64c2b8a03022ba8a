//! Sealing: the secrets column of policies and subscriptions (sealed with
//! the agent's key, see `crate::sealed`), splitting a spec into what is
//! stored in the clear and what is sealed, and what listings may show of
//! the secrets (cached per column, never a secret).

use serde::{Deserialize, Serialize};
use soda_syncer_domain::{PolicySpec, Secret};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Result, Store};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct StoredSecrets {
    #[serde(default)]
    pub(super) password: Option<Secret>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, Secret>,
    /// The repository URL, when it carries a password (`rest:http://u:p@...`);
    /// the spec column then holds it redacted.
    #[serde(default)]
    pub(super) url: Option<Secret>,
}

/// Policy id -> (its secrets column, what may be shown of it).
pub(super) type ShownCache = HashMap<String, (String, Arc<ShownSecrets>)>;

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

pub(super) type ShownSecrets = std::result::Result<SecretsShown, String>;

impl SecretsShown {
    fn of(s: &StoredSecrets) -> SecretsShown {
        SecretsShown {
            password_set: s.password.as_ref().is_some_and(|p| !p.is_empty()),
            env_set: s.env.iter().map(|(k, v)| (k.clone(), !v.is_empty())).collect(),
            url: s.url.as_ref().map(|u| soda_syncer_domain::secret::redact_url(u.expose())),
        }
    }
}

impl Store {
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

    pub(super) fn seal_secrets(&self, s: &StoredSecrets) -> Result<String> {
        let json = serde_json::to_string(s)?;
        Ok(match &self.seal {
            Some(k) => k.seal(json.as_bytes()),
            None => json,
        })
    }

    pub(super) fn unseal_secrets(&self, text: &str) -> std::result::Result<StoredSecrets, String> {
        let json = if crate::sealed::is_sealed(text) {
            let key = self.seal.as_ref().ok_or_else(|| crate::sealed::SealError::NoKey.to_string())?;
            String::from_utf8(key.open(text).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?
        } else {
            text.to_string()
        };
        serde_json::from_str(&json).map_err(|e| format!("stored secrets are unreadable: {e}"))
    }

    pub(super) fn shown_cache(&self) -> std::sync::MutexGuard<'_, ShownCache> {
        self.shown.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What may be shown of the secrets column `text` of policy `id`, or
    /// why it cannot be unsealed: unsealed only when the column changed
    /// since the last call. (A column in the clear, only without a key, is
    /// read each time: the cache keeps sealed text only.)
    pub(super) fn secrets_shown(&self, id: &str, text: &str) -> Arc<ShownSecrets> {
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

    pub(super) fn split_secrets(spec: &PolicySpec) -> (PolicySpec, StoredSecrets) {
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
}
