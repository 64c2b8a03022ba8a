//! Starting and stopping the agent. [`Agent::start`] brings everything up
//! and returns once the API listens; cancelling the token shuts down in
//! order: stop scheduling, cancel runs and wait for restic (with a
//! deadline), stop the rescan, close the database, stop HTTP last.

use anyhow::Context;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{router, AppState};
use crate::restic::Restic;
use crate::scheduler::Scheduler;
use crate::store::Store;

pub struct Agent {
    pub addr: SocketAddr,
    join: JoinHandle<anyhow::Result<()>>,
}

/// Run the agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Agent::start(config, shutdown).await?.wait().await
}

fn prepare_state_dir(config: &Config) -> anyhow::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&config.state_dir).with_context(|| {
        format!("cannot create the state directory {}: choose another with --state-dir", config.state_dir.display())
    })?;
    std::fs::create_dir_all(config.cache_dir())?;
    // The local repository's password: generated once, readable by root only.
    let pw = config.local_repository_password_file();
    if config.default_repository.is_none() && !pw.exists() {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pw)
            .with_context(|| format!("cannot create {}", pw.display()))?;
        f.write_all(crate::ids::random_hex(32).as_bytes())?;
        f.sync_all()?;
        tracing::info!(file = %pw.display(), repository = %config.local_repository().display(), "generated the local repository's password; keep a copy of it somewhere safe: without it, backups cannot be restored");
    }
    Ok(())
}

/// The database, with secrets sealed under the key from
/// `SODA_SYNCER_SECRETS_KEY` (hex) or the key file.
fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::open(&config.db_path())?;
    let key = match std::env::var("SODA_SYNCER_SECRETS_KEY") {
        Ok(hex) => crate::sealed::SealKey::from_hex(&hex, "$SODA_SYNCER_SECRETS_KEY")?,
        Err(_) => {
            let path = config.secrets_key_path();
            let (key, created) = crate::sealed::SealKey::load_or_create(&path)?;
            if created {
                tracing::info!(file = %path.display(), "generated the key that seals repository secrets in the database; without it they must be entered again");
            }
            key
        }
    };
    let store = store.with_seal_key(key)?;
    let locked = store.list_policies()?.iter().filter(|p| p.secrets_error.is_some()).count();
    if locked > 0 {
        tracing::error!(policies = locked, "secrets of some policies cannot be unsealed with this secrets key; their runs fail until their passwords are given again (PUT or PATCH)");
    }
    Ok(store)
}

impl Agent {
    pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Agent> {
        // With "restic found" below: which agent and which restic run, first thing in every log.
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "soda-syncer starting");
        config.validate()?;
        prepare_state_dir(&config)?;
        let store = open_store(&config)?;
        // Start-up (and the scheduler's first pass) read every policy a few
        // times: give that memory back once it has settled, then now and then.
        store.release_memory_every(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
        crate::consistency::recover_at_start(&store); // thaw and remove what a crash left
        let restic =
            Restic::new(config.restic.clone(), config.cache_dir(), config.node_name.clone(), config.run_timeout)
                .with_unreachable_after(config.repository_timeout);
        let version = restic.version().await.map_err(|e| e.to_string());
        match &version {
            Ok(v) => {
                let features = restic.features().names().join(",");
                tracing::info!(version = %v, features = %features, "restic found");
                if let Some(warning) = restic.detected_version().and_then(|d| d.support().message(d)) {
                    tracing::warn!("{warning}");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "restic is not usable: the agent stays up but is not ready, and runs fail until it is installed")
            }
        }
        let sched_cancel = CancellationToken::new();
        let sched = Scheduler::new(store, restic, config.clone(), sched_cancel.clone());
        let interrupted = sched.recover_after_start()?;
        if interrupted > 0 {
            tracing::warn!(count = interrupted, "runs were interrupted by the last stop; their policies run again now");
        }
        if let Err(e) = sched.rescan_volumes() {
            tracing::warn!(error = %e, "first volume scan failed");
        }

        let kube_cancel = CancellationToken::new();
        let kube = crate::kube::start(&sched, kube_cancel.clone()).await.context("Kubernetes")?;

        let token_path = config.token_path();
        if crate::http::auth::Auth::ensure_token_file(&token_path)
            .with_context(|| format!("cannot create the token file {}", token_path.display()))?
        {
            tracing::info!(file = %token_path.display(), "generated an API token; the CLI on this node reads it from there");
        }
        let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
            format!(
                "cannot listen on {}: is another agent running? choose another address with --listen",
                config.listen
            )
        })?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && config.tls_cert.is_none() {
            tracing::warn!(%addr, "listening on a non-loopback address over plain HTTP: tokens and repository secrets in requests cross the network unencrypted; put the agent behind TLS or listen on loopback");
        }
        let scheme = if config.tls_cert.is_some() { "https" } else { "http" };
        let url = format!(
            "{scheme}://{}",
            if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr }
        );
        // Write-then-rename, so a reader never sees a half-written file.
        let tmp = config.url_file().with_extension("url.tmp");
        std::fs::write(&tmp, &url)?;
        std::fs::rename(&tmp, config.url_file())?;
        tracing::info!(%addr, node = %config.node_name, state_dir = %config.state_dir.display(), "soda-syncer listening");

        let auth = crate::http::auth::Auth::new(token_path, config.legacy.clone(), config.legacy_allow_cidrs.clone());
        let state = AppState {
            sched: sched.clone(),
            restic_version: Arc::new(Mutex::new(version)),
            started: Instant::now(),
            auth: Arc::new(auth),
        };
        let app = router(state);
        let read_timeout = config.request_read_timeout;
        let http_stop = CancellationToken::new();
        let http_stop2 = http_stop.clone();
        let http = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let tls = crate::tls::TlsFiles::load(cert.clone(), key.clone()).await?;
                tls.watch(http_stop.clone());
                let std_listener = listener.into_std()?;
                let handle = axum_server::Handle::new();
                let h2 = handle.clone();
                tokio::spawn(async move {
                    http_stop2.cancelled().await;
                    h2.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
                });
                let mut server = axum_server::from_tcp_rustls(std_listener, tls.config()).handle(handle);
                server
                    .http_builder()
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(read_timeout);
                let app = app.into_make_service_with_connect_info::<SocketAddr>();
                tokio::spawn(async move { server.serve(app).await })
            }
            _ => tokio::spawn(crate::http::serve::serve_plain(listener, app, read_timeout, http_stop2)),
        };
        let sched_task = tokio::spawn(sched.clone().run());
        let rescan_cancel = CancellationToken::new();
        let rescan = tokio::spawn(sched.clone().rescan_loop(rescan_cancel.clone()));
        let url_file = config.url_file();

        let join = tokio::spawn(async move {
            shutdown.cancelled().await;
            let t = Instant::now();
            tracing::info!("shutting down: stopping the scheduler and cancelling runs");
            sched_cancel.cancel();
            let _ = sched_task.await;
            tracing::info!(ms = t.elapsed().as_millis() as u64, "scheduler stopped");
            rescan_cancel.cancel();
            let _ = rescan.await;
            kube_cancel.cancel();
            if let Some(mut k) = kube {
                while k.tasks.join_next().await.is_some() {}
            }
            let store = sched.store().clone();
            let _ = tokio::task::spawn_blocking(move || crate::consistency::discard_all_kept(&store)).await;
            drop(sched); // the last handle on the database closes it
            let _ = std::fs::remove_file(url_file);
            http_stop.cancel();
            http.await.context("HTTP task")?.context("HTTP server")?;
            tracing::info!(ms = t.elapsed().as_millis() as u64, "stopped");
            Ok(())
        });
        Ok(Agent { addr, join })
    }

    pub async fn wait(self) -> anyhow::Result<()> {
        self.join.await.context("agent task")?
    }
}
