//! The legacy call on a real cluster. soda-proxy POSTs `/snapshot` to the
//! agent on the proxy's own node, not the volume's. The receiving agent
//! stores the request as a Secret (it carries the repository password) in
//! the agents' namespace, labelled `soda-syncer.io/legacy-request`, one per
//! repository; every agent watches those Secrets and applies each one on
//! its own node, so every node's volumes are backed up. Applying is
//! idempotent (one policy per repository and volume), so a relist or a
//! repeated call changes nothing but the interval.

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Api;
use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::legacy::{Legacy, LegacyPublisher};
use soda_syncer_domain::legacy::LegacySnapshotRequest;

pub const LABEL: &str = "soda-syncer.io/legacy-request";

#[derive(Clone)]
pub struct LegacyFanout {
    api: Api<KubeSecret>,
    namespace: String,
}

impl LegacyFanout {
    pub fn new(client: kube::Client, config: &Config) -> LegacyFanout {
        LegacyFanout { api: Api::namespaced(client, &config.namespace), namespace: config.namespace.clone() }
    }

    async fn store(&self, fields: BTreeMap<String, String>) -> Result<String, kube::Error> {
        let repo = fields.get("RESTIC_REPOSITORY").map_or("<default>", String::as_str);
        let name = format!("soda-syncer-legacy-{}", &crate::ids::short_hash(&[repo])[..12]);
        let data: BTreeMap<String, ByteString> =
            fields.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect();
        let secret = KubeSecret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some([(LABEL.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            data: Some(data.clone()),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match self.api.get_opt(&name).await? {
            None => {
                self.api.create(&PostParams::default(), &secret).await?;
            }
            Some(old) if old.data.as_ref() == Some(&data) => {}
            Some(old) => {
                let mut s = secret;
                s.metadata.resource_version = old.metadata.resource_version;
                self.api.replace(&name, &PostParams::default(), &s).await?;
            }
        }
        Ok(name)
    }

    /// Apply every stored request on this node, now and whenever one changes.
    pub async fn watch(self, legacy: Legacy, cancel: CancellationToken) {
        let config = watcher::Config::default().labels(&format!("{LABEL}=true"));
        let mut stream = std::pin::pin!(watcher(self.api.clone(), config).default_backoff().applied_objects());
        loop {
            let secret = tokio::select! {
                _ = cancel.cancelled() => return,
                s = stream.next() => match s {
                    None => return,
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cannot watch the shared legacy requests; retrying");
                        continue;
                    }
                },
            };
            let name = secret.metadata.name.clone().unwrap_or_default();
            let fields = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect();
            let req = match LegacySnapshotRequest::from_fields(fields) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "a shared legacy request is not a valid body; ignored");
                    continue;
                }
            };
            let l = legacy.clone();
            match tokio::task::spawn_blocking(move || l.apply(req)).await {
                Ok(Ok(resp)) => {
                    tracing::info!(secret = %name, policies = resp.policies.len(), "shared legacy request applied on this node")
                }
                Ok(Err(e)) => tracing::warn!(secret = %name, error = %e, "cannot apply a shared legacy request"),
                Err(e) => tracing::error!(error = %e, "applying a shared legacy request panicked"),
            }
        }
    }
}

impl LegacyPublisher for LegacyFanout {
    fn publish(&self, fields: BTreeMap<String, String>) {
        let me = self.clone();
        tokio::spawn(async move {
            match me.store(fields).await {
                Ok(name) => tracing::info!(secret = %name, "legacy request shared with the other nodes' agents"),
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot share the legacy request with the other nodes (Secret in namespace {}): only this node's volumes are backed up",
                    me.namespace
                ),
            }
        });
    }
}
