//! Repository keys from a Secret in the claim's namespace, read when a run
//! starts (so a rotated key is used at the next run) and never stored. The
//! keys have the names SODA profiles use: `RESTIC_REPOSITORY`,
//! `RESTIC_PASSWORD`, and the storage credentials (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, and any other `AWS_`, `B2_`, `AZURE_`,
//! `GOOGLE_`, `OS_`, `ST_` key restic reads).

use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::Api;
use soda_syncer_domain::run::RunError;
use soda_syncer_domain::{Secret, SecretRef, ALLOWED_ENV_PREFIXES};

use crate::restic::Repo;
use crate::scheduler::SecretSource;

pub struct Secrets {
    client: kube::Client,
}

impl Secrets {
    pub fn new(client: kube::Client) -> Secrets {
        Secrets { client }
    }

    async fn read(&self, r: &SecretRef) -> Result<Repo, RunError> {
        let fail = |message: String| RunError { code: "secrets_unavailable".into(), message };
        let api: Api<KubeSecret> = Api::namespaced(self.client.clone(), &r.namespace);
        let secret = match api.get_opt(&r.name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(fail(format!(
                    "Secret {}/{} does not exist: create it with RESTIC_REPOSITORY and RESTIC_PASSWORD (kubectl create secret generic {} -n {} --from-literal=RESTIC_REPOSITORY=... --from-literal=RESTIC_PASSWORD=...)",
                    r.namespace, r.name, r.name, r.namespace
                )))
            }
            Err(e) => return Err(fail(format!("cannot read Secret {}/{}: {e}", r.namespace, r.name))),
        };
        let mut data: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
        for (k, v) in secret.data.unwrap_or_default() {
            if let Ok(s) = String::from_utf8(v.0) {
                data.insert(k, s);
            }
        }
        for (k, v) in secret.string_data.unwrap_or_default() {
            data.insert(k, v);
        }
        let take = |k: &str| data.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let url = take("RESTIC_REPOSITORY")
            .ok_or_else(|| fail(format!("Secret {}/{} has no RESTIC_REPOSITORY key", r.namespace, r.name)))?;
        let password = take("RESTIC_PASSWORD")
            .ok_or_else(|| fail(format!("Secret {}/{} has no RESTIC_PASSWORD key", r.namespace, r.name)))?;
        if url.starts_with('-') || url.contains('\n') {
            return Err(fail(format!("Secret {}/{}: RESTIC_REPOSITORY is not a repository URL", r.namespace, r.name)));
        }
        let env = data
            .iter()
            .filter(|(k, _)| ALLOWED_ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.clone(), Secret::new(v.trim())))
            .collect();
        Ok(Repo { url, password: Secret::new(password), env })
    }
}

impl SecretSource for Secrets {
    fn repository<'a>(&'a self, r: &'a SecretRef) -> BoxFuture<'a, Result<Repo, RunError>> {
        Box::pin(self.read(r))
    }
}
