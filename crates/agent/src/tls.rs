//! HTTPS for the API with rustls: certificate and key from PEM files,
//! re-read when either file changes (certificates rotate without a
//! restart; a bad new pair is logged and the old one kept).

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    config: RustlsConfig,
}

fn mtimes(a: &PathBuf, b: &PathBuf) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(a), m(b))
}

impl TlsFiles {
    pub async fn load(cert: PathBuf, key: PathBuf) -> anyhow::Result<TlsFiles> {
        // One crypto provider for the process (ring; no aws-lc build).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = RustlsConfig::from_pem_file(&cert, &key).await.with_context(|| {
            format!(
                "cannot use the TLS certificate {} with the key {}: both must be PEM files",
                cert.display(),
                key.display()
            )
        })?;
        tracing::info!(cert = %cert.display(), "serving HTTPS");
        Ok(TlsFiles { cert, key, config })
    }

    pub fn config(&self) -> RustlsConfig {
        self.config.clone()
    }

    /// Poll the files every 2 s until `stop`; reload when they change.
    pub fn watch(&self, stop: CancellationToken) {
        let (cert, key, config) = (self.cert.clone(), self.key.clone(), self.config.clone());
        tokio::spawn(async move {
            let mut seen = mtimes(&cert, &key);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                let now = mtimes(&cert, &key);
                if now == seen {
                    continue;
                }
                seen = now;
                match config.reload_from_pem_file(&cert, &key).await {
                    Ok(()) => tracing::info!(cert = %cert.display(), "TLS certificate reloaded"),
                    Err(e) => {
                        tracing::error!(cert = %cert.display(), error = %e, "the new TLS certificate or key is unusable; still serving the previous one")
                    }
                }
            }
        });
    }
}
