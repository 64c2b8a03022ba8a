//! Starting and stopping the agent. [`Agent::start`] takes the state
//! directory's lock (or waits for it, serving only "not ready"), brings
//! everything up and returns once the API listens; cancelling the token
//! shuts down in order: stop scheduling, cancel runs and wait for restic
//! (within the shutdown grace), stop the rescan, close the database, stop
//! HTTP, and release the state directory's lock last.

use anyhow::Context;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{router, AppState};
use crate::legacy::Legacy;
use crate::policies::Policies;
use crate::restic::Restic;
use crate::scheduler::Scheduler;
use crate::state_lock::{LockHolder, StateLock, StateLockError, TryLock};
use crate::store::Store;

pub struct Agent {
    pub addr: SocketAddr,
    join: JoinHandle<anyhow::Result<()>>,
}

/// Run the agent until `shutdown` is cancelled. A stop while it waits for
/// the state directory's lock is a clean exit.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    match Agent::start(config, shutdown).await {
        Ok(agent) => agent.wait().await,
        Err(e) if matches!(e.downcast_ref(), Some(StateLockError::StoppedWhileWaiting)) => {
            tracing::info!("stopped while waiting for the state directory lock");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn create_state_dir(config: &Config) -> anyhow::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&config.state_dir).with_context(|| {
        format!("cannot create the state directory {}: choose another with --state-dir", config.state_dir.display())
    })
}

/// Everything in the state directory besides the lock: only with the lock held.
fn prepare_state_dir(config: &Config) -> anyhow::Result<()> {
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
        let started_at = chrono::Utc::now();
        let started = Instant::now();
        create_state_dir(&config)?;
        let restic =
            Restic::new(config.restic.clone(), config.cache_dir(), config.node_name.clone(), config.run_timeout)
                .with_unreachable_after(config.repository_timeout)
                // SIGKILL a moment before the stop gives up on the run, so
                // the run still records its end itself.
                .with_stop_grace(
                    config
                        .run_stop_grace()
                        .saturating_sub(std::time::Duration::from_secs(1))
                        .max(std::time::Duration::from_secs(1)),
                );
        // Before the database, the freeze recovery, anything: a second agent
        // on this directory would take the first one's runs for a crash's.
        let me = LockHolder::this_process(&config.node_name, config.pod_name.as_deref(), started_at);
        let (lock, early_listener) = match StateLock::try_acquire(&config.state_dir, me.clone())? {
            TryLock::Acquired(lock) => (lock, None),
            TryLock::Held(holder) if !config.wait_for_state_lock => {
                return Err(StateLockError::Held {
                    dir: config.state_dir.clone(),
                    holder: crate::state_lock::describe(holder.as_ref()),
                }
                .into())
            }
            TryLock::Held(holder) => wait_for_state_lock(&config, &restic, me, holder, started, &shutdown).await?,
        };
        tracing::info!(file = %lock.path().display(), pid = lock.holder().pid, "holding the state directory lock");
        prepare_state_dir(&config)?;
        let store = open_store(&config)?;
        // Start-up (and the scheduler's first pass) read every policy a few
        // times: give that memory back once it has settled, then now and then.
        store.release_memory_every(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
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
        let sched = Scheduler::new(store.clone(), restic.clone(), config.clone(), sched_cancel.clone());
        crate::consistency::recover_at_start(sched.consistency()); // thaw and remove what a crash left
        let policies = Policies::new(store.clone(), config.clone(), sched.clone());
        let legacy = Legacy::new(policies.clone(), store.clone(), config.clone());
        let interrupted = sched.recover_after_start()?;
        if interrupted > 0 {
            tracing::warn!(
                count = interrupted,
                "runs were interrupted by the last stop (an upgrade, a restart or a crash); their policies run again now"
            );
        }
        if let Err(e) = legacy.rescan_volumes() {
            tracing::warn!(error = %e, "first volume scan failed");
        }

        let kube_cancel = CancellationToken::new();
        let deps = crate::kube::Deps {
            sched: sched.clone(),
            policies: policies.clone(),
            legacy: legacy.clone(),
            store: store.clone(),
            restic: restic.clone(),
            config: config.clone(),
        };
        let kube = crate::kube::start(&deps, kube_cancel.clone()).await.context("Kubernetes")?;

        let token_path = config.token_path();
        if crate::http::auth::Auth::ensure_token_file(&token_path)
            .with_context(|| format!("cannot create the token file {}", token_path.display()))?
        {
            tracing::info!(file = %token_path.display(), "generated an API token; the CLI on this node reads it from there");
        }
        let listener = match early_listener {
            Some(l) => l,
            None => bind(&config).await?,
        };
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && config.tls_cert.is_none() {
            tracing::warn!(%addr, "listening on a non-loopback address over plain HTTP: tokens and repository secrets in requests cross the network unencrypted; put the agent behind TLS or listen on loopback");
        }
        let scheme = if config.tls_cert.is_some() { "https" } else { "http" };
        let url = format!(
            "{scheme}://{}",
            if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr }
        );
        // The scheduler's loop runs before anyone is told where the agent
        // is: readiness needs it, and a client (or a probe) that finds the
        // URL must not see a ready agent turn "scheduler stopped" for a
        // moment.
        let sched_task = tokio::spawn(sched.clone().run());
        while !sched.is_running() && !sched_task.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Write-then-rename, so a reader never sees a half-written file.
        let tmp = config.url_file().with_extension("url.tmp");
        std::fs::write(&tmp, &url)?;
        std::fs::rename(&tmp, config.url_file())?;
        tracing::info!(%addr, node = %config.node_name, state_dir = %config.state_dir.display(), "soda-syncer listening");

        let auth = crate::http::auth::Auth::new(token_path, config.legacy.clone(), config.legacy_allow_cidrs.clone());
        let state = AppState {
            sched: sched.clone(),
            store: store.clone(),
            restic: restic.clone(),
            config: config.clone(),
            policies: policies.clone(),
            legacy: legacy.clone(),
            restic_version: Arc::new(Mutex::new(version)),
            started,
            auth: Arc::new(auth),
            state_lock: Some(lock.holder().clone()),
            soda_sync: kube.as_ref().and_then(|k| k.soda_status.clone()),
            cluster: kube.as_ref().map(|k| Arc::new(k.cluster.clone())),
        };
        let app = router(state);
        let http_stop = CancellationToken::new();
        let http = serve(listener, app, &config, http_stop.clone()).await?;
        let rescan_cancel = CancellationToken::new();
        let rescan = tokio::spawn(legacy.clone().rescan_loop(rescan_cancel.clone()));
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
            let consistency = sched.consistency().clone();
            let _ = tokio::task::spawn_blocking(move || crate::consistency::discard_all_kept(&consistency)).await;
            // The HTTP app's handles on the database go when it stops below.
            drop(sched);
            let _ = std::fs::remove_file(url_file);
            http_stop.cancel();
            let http_result = http.await;
            // Last: the next agent may start the moment this is released.
            drop(lock);
            tracing::info!(ms = t.elapsed().as_millis() as u64, "stopped");
            http_result.context("HTTP task")?.context("HTTP server")?;
            Ok(())
        });
        Ok(Agent { addr, join })
    }

    pub async fn wait(self) -> anyhow::Result<()> {
        self.join.await.context("agent task")?
    }
}

async fn bind(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!("cannot listen on {}: is another agent running? choose another address with --listen", config.listen)
    })
}

/// Serve `app` on `listener` (HTTPS with --tls-cert) until `stop`.
async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: &Config,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let read_timeout = config.request_read_timeout;
    Ok(match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls::TlsFiles::load(cert.clone(), key.clone()).await?;
            tls.watch(stop.clone());
            let std_listener = listener.into_std()?;
            let handle = axum_server::Handle::new();
            let h2 = handle.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                h2.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
            });
            let mut server = axum_server::from_tcp_rustls(std_listener, tls.config()).handle(handle);
            server.http_builder().http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(read_timeout);
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            tokio::spawn(async move { server.serve(app).await })
        }
        _ => tokio::spawn(crate::http::serve::serve_plain(listener, app, read_timeout, stop)),
    })
}

/// A second descriptor of the same listening socket: the waiting router
/// serves on it and closes it when it stops, the agent keeps the socket.
fn dup_listener(listener: &tokio::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    use std::os::fd::AsFd;
    let std_listener = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    std_listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std_listener)
}

/// Another agent holds the state directory: listen already (alive, not
/// ready, naming the holder), wait for the lock, then hand the socket on.
/// The URL file is left alone meanwhile: it names the holder, which the
/// CLI must keep finding.
async fn wait_for_state_lock(
    config: &Config,
    restic: &Restic,
    me: LockHolder,
    holder: Option<LockHolder>,
    started: Instant,
    shutdown: &CancellationToken,
) -> anyhow::Result<(StateLock, Option<tokio::net::TcpListener>)> {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => Some(l),
        Err(e) => {
            // The holder on the same address in the same network namespace:
            // listen once it has gone.
            tracing::warn!(listen = %config.listen, error = %e, "cannot listen while waiting for the state directory lock; listening once this agent holds it");
            None
        }
    };
    let stop = CancellationToken::new();
    let mut http = None;
    if let Some(l) = &listener {
        let state = crate::http::waiting::WaitingState {
            config: Arc::new(config.clone()),
            restic_version: restic.version().await.map_err(|e| e.to_string()),
            started,
        };
        let app = crate::http::waiting::waiting_router(state);
        http = Some(serve(dup_listener(l)?, app, config, stop.clone()).await?);
    }
    tracing::warn!(
        holder = %crate::state_lock::describe(holder.as_ref()),
        state_dir = %config.state_dir.display(),
        addr = %listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        "another agent holds the state directory lock; waiting for it to exit (alive, not ready meanwhile)"
    );
    let lock = StateLock::wait(&config.state_dir, me, shutdown).await;
    stop.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    let Some(lock) = lock? else {
        return Err(StateLockError::StoppedWhileWaiting.into());
    };
    let listener = match listener {
        Some(l) => l,
        // The holder's socket closes as it exits, maybe a moment after its lock.
        None => {
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match tokio::net::TcpListener::bind(config.listen).await {
                    Ok(l) => break l,
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await
                    }
                    Err(_) => break bind(config).await?,
                }
            }
        }
    };
    Ok((lock, Some(listener)))
}
