//! A frozen filesystem, as a guard. The freeze is written to the database
//! before FIFREEZE (so a crash is undone at the next start), a watchdog
//! thread thaws it when it outlasts its limit whatever the rest of the agent
//! is doing, `thaw()` is the normal way out, and `Drop` thaws as a logged
//! fallback (panics, aborted tasks).

use chrono::Utc;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::{sys, ConsistencyError, Deps};
use soda_syncer_domain::consistency::HeldResource;

struct State {
    frozen: bool,
    /// Set when the watchdog thawed.
    expired: bool,
    frozen_for: Duration,
}

struct Inner {
    mount_point: PathBuf,
    dir: File,
    deps: Deps,
    record_id: String,
    started: Instant,
    state: Mutex<State>,
    wake: Condvar,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Thaw if still frozen; returns whether this call thawed.
    fn thaw(&self, why: &str) -> Result<bool, ConsistencyError> {
        let mut st = self.state();
        if !st.frozen {
            return Ok(false);
        }
        let result = sys::thaw(&self.dir);
        st.frozen = false;
        st.frozen_for = self.started.elapsed();
        drop(st);
        self.wake.notify_all();
        match result {
            // EINVAL: someone else thawed it already; either way it is thawed.
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => {
                tracing::error!(mount = %self.mount_point.display(), error = %e, "cannot thaw the filesystem");
                return Err(ConsistencyError::Thaw {
                    mount: self.mount_point.display().to_string(),
                    message: e.to_string(),
                });
            }
        }
        if let Err(e) = self.deps.records.clear_held(&self.record_id) {
            tracing::warn!(error = %e, "cannot clear the freeze record; the next start thaws again, which is harmless");
        }
        tracing::debug!(mount = %self.mount_point.display(), ms = self.started.elapsed().as_millis() as u64, why, "filesystem thawed");
        Ok(true)
    }
}

pub struct Freeze {
    inner: Arc<Inner>,
}

impl Freeze {
    /// Freeze the filesystem mounted at `mount_point` for at most `limit`.
    /// When the limit passes, the watchdog thaws and cancels `on_expiry`.
    pub fn start(
        mount_point: &Path,
        deps: &Deps,
        run_id: &str,
        limit: Duration,
        on_expiry: CancellationToken,
    ) -> Result<Freeze, ConsistencyError> {
        if mount_point == Path::new("/") {
            return Err(ConsistencyError::FreezeRefused {
                mount: "/".into(),
                reason: "is the root filesystem, which the agent never freezes".into(),
            });
        }
        let err = |e: std::io::Error| ConsistencyError::Freeze {
            mount: mount_point.display().to_string(),
            message: e.to_string(),
        };
        let dir = sys::open_dir(mount_point).map_err(err)?;
        // Flush while writers still run, so the freeze has little left to write.
        let _ = sys::syncfs(&dir);
        let record_id = crate::ids::new_id();
        deps.records
            .record_held(&HeldResource {
                id: record_id.clone(),
                run_id: run_id.to_string(),
                kind: "freeze".into(),
                path: mount_point.display().to_string(),
                created_at: Utc::now(),
            })
            .map_err(|message| ConsistencyError::Store { message })?;
        let started = Instant::now();
        if let Err(e) = sys::freeze(&dir) {
            let _ = deps.records.clear_held(&record_id);
            return Err(if e.raw_os_error() == Some(libc::EBUSY) {
                ConsistencyError::Freeze {
                    mount: mount_point.display().to_string(),
                    message: "it is frozen already (by another program, or an fsfreeze left over)".into(),
                }
            } else {
                err(e)
            });
        }
        tracing::info!(mount = %mount_point.display(), limit_ms = limit.as_millis() as u64, "filesystem frozen");
        let inner = Arc::new(Inner {
            mount_point: mount_point.to_path_buf(),
            dir,
            deps: deps.clone(),
            record_id,
            started,
            state: Mutex::new(State { frozen: true, expired: false, frozen_for: Duration::ZERO }),
            wake: Condvar::new(),
        });
        let watch = inner.clone();
        // A thread of its own: the thaw must not wait for a busy runtime.
        let spawned = std::thread::Builder::new().name("freeze-watchdog".into()).spawn(move || {
            let deadline = watch.started + limit;
            let mut st = watch.state();
            while st.frozen {
                let now = Instant::now();
                if now >= deadline {
                    st.expired = true;
                    drop(st);
                    tracing::warn!(mount = %watch.mount_point.display(), limit_ms = limit.as_millis() as u64, "the freeze reached maxFreezeMs: thawing");
                    let _ = watch.thaw("maxFreezeMs reached");
                    watch.deps.metrics.freeze_expired();
                    on_expiry.cancel();
                    return;
                }
                st = watch.wake.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            }
        });
        let freeze = Freeze { inner };
        if let Err(e) = spawned {
            // No watchdog, no freeze.
            let _ = freeze.thaw();
            return Err(ConsistencyError::Freeze {
                mount: mount_point.display().to_string(),
                message: format!("cannot start the watchdog: {e}"),
            });
        }
        Ok(freeze)
    }

    /// Thaw (if the watchdog has not); returns how long it was frozen.
    pub fn thaw(&self) -> Result<Duration, ConsistencyError> {
        self.inner.thaw("released")?;
        Ok(self.inner.state().frozen_for)
    }

    /// The watchdog thawed because the limit passed.
    pub fn expired(&self) -> bool {
        self.inner.state().expired
    }

    pub fn frozen_for(&self) -> Duration {
        let st = self.inner.state();
        if st.frozen {
            self.inner.started.elapsed()
        } else {
            st.frozen_for
        }
    }

    pub fn mount_point(&self) -> &Path {
        &self.inner.mount_point
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        if self.inner.state().frozen {
            tracing::error!(mount = %self.inner.mount_point.display(), "a frozen filesystem was left without release(): thawing it now (fallback)");
            self.inner.deps.metrics.drop_thaw();
            let _ = self.inner.thaw("dropped");
        }
    }
}

/// Thaw a filesystem a previous process left frozen. Not frozen (EINVAL)
/// or no longer mounted counts as done.
pub fn thaw_left_over(mount_point: &Path) -> Result<bool, std::io::Error> {
    let dir = match sys::open_dir(mount_point) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match sys::thaw(&dir) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consistency::testfs::{writable_within, LoopFs};

    fn store(dir: &Path) -> (crate::store::Store, Deps) {
        let store = crate::store::Store::open(&dir.join("state.db")).unwrap();
        let deps = Deps::new(Arc::new(store.clone()));
        (store, deps)
    }

    #[test]
    fn the_root_filesystem_is_never_frozen() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            Freeze::start(Path::new("/"), &store(dir.path()).1, "r", Duration::from_secs(1), CancellationToken::new())
                .err()
                .unwrap();
        assert_eq!(err.kind(), "freeze_refused");
    }

    #[test]
    fn a_freeze_dropped_by_a_panic_is_thawed_and_its_record_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = LoopFs::new(dir.path(), &["mkfs.xfs", "-q"]) else { return };
        let (store, deps) = store(dir.path());
        let (mnt, s, d) = (fs.mnt.clone(), store.clone(), deps.clone());
        let panicked = std::thread::spawn(move || {
            let _f = Freeze::start(&mnt, &d, "run1", Duration::from_secs(60), CancellationToken::new()).unwrap();
            assert_eq!(s.held_resources().unwrap().len(), 1, "recorded while frozen");
            assert!(!writable_within(&mnt, Duration::from_millis(200)));
            panic!("injected");
        })
        .join();
        assert!(panicked.is_err());
        assert!(writable_within(&fs.mnt, Duration::from_secs(2)), "thawed by Drop during the unwind");
        assert!(store.held_resources().unwrap().is_empty());
    }

    #[test]
    fn the_watchdog_thaws_at_the_limit_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = LoopFs::new(dir.path(), &["mkfs.xfs", "-q"]) else { return };
        let (store, deps) = store(dir.path());
        let expiry = CancellationToken::new();
        let f = Freeze::start(&fs.mnt, &deps, "run1", Duration::from_millis(150), expiry.clone()).unwrap();
        let t = Instant::now();
        while !expiry.is_cancelled() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(expiry.is_cancelled() && f.expired());
        assert!(writable_within(&fs.mnt, Duration::from_secs(2)));
        let frozen = f.thaw().unwrap();
        assert!(frozen >= Duration::from_millis(150) && frozen < Duration::from_secs(2), "{frozen:?}");
        assert!(store.held_resources().unwrap().is_empty());
    }

    #[test]
    fn a_second_freeze_of_one_filesystem_is_refused_and_the_first_stays() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = LoopFs::new(dir.path(), &["mkfs.xfs", "-q"]) else { return };
        let (store, deps) = store(dir.path());
        let first = Freeze::start(&fs.mnt, &deps, "a", Duration::from_secs(60), CancellationToken::new()).unwrap();
        let err = Freeze::start(&fs.mnt, &deps, "b", Duration::from_secs(60), CancellationToken::new()).err().unwrap();
        assert!(err.to_string().contains("frozen already"), "{err}");
        assert_eq!(store.held_resources().unwrap().len(), 1);
        first.thaw().unwrap();
        assert!(writable_within(&fs.mnt, Duration::from_secs(2)));
    }
}
