//! The legacy `POST /snapshot` body (what soda-proxy sends): parsing,
//! validation and its application to a fresh store, as the agent does it.
//! Properties: no panic; the body handed on to other nodes parses back to
//! the same body; a store error never comes out of valid or invalid input;
//! the same body applied twice changes nothing; what is stored validates.

#![no_main]

use libfuzzer_sys::fuzz_target;
use soda_syncer::legacy::Legacy;
use soda_syncer::policies::{Policies, PolicyError};
use soda_syncer::restic::Restic;
use soda_syncer::scheduler::Scheduler;
use soda_syncer::store::Store;
use soda_syncer::Config;
use soda_syncer_domain::legacy::LegacySnapshotRequest;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// A fixed directory (the seed corpus names it): `allowed/data` is a source
/// the agent accepts, `kubelet` an empty kubelet directory.
const ROOT: &str = "/tmp/soda-syncer-fuzz";

fn root() -> &'static Path {
    static ROOT_DIR: OnceLock<PathBuf> = OnceLock::new();
    ROOT_DIR.get_or_init(|| {
        let root = PathBuf::from(ROOT);
        for d in ["allowed/data", "kubelet/pods", "state"] {
            std::fs::create_dir_all(root.join(d)).expect("create the fuzz directories");
        }
        std::fs::write(root.join("state/repository.password"), "fuzz-pw").expect("write the password file");
        root
    })
}

fn legacy() -> (Legacy, Store) {
    let root = root();
    let mut config = Config::with_state_dir(root.join("state"));
    config.allowed_roots = vec![root.join("allowed")];
    config.kubelet_dir = root.join("kubelet");
    let store = Store::open(Path::new(":memory:")).expect("in-memory store");
    let restic = Restic::new("restic".into(), config.cache_dir(), "fuzz".into(), Duration::from_secs(60));
    let sched = Scheduler::new(store.clone(), restic, config.clone(), tokio_util::sync::CancellationToken::new());
    let policies = Policies::new(store.clone(), config.clone(), sched);
    (Legacy::new(policies, store.clone(), config), store)
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<LegacySnapshotRequest>(data) else {
        return;
    };
    let fields = req.to_fields();
    let again = LegacySnapshotRequest::from_fields(fields.clone()).expect("the handed-on body parses");
    assert_eq!(again.to_fields(), fields, "the handed-on body is the same body");

    let (legacy, store) = legacy();
    match legacy.apply(req) {
        Ok(first) => {
            let second = legacy.apply(again).expect("the same body applies twice");
            assert!(second.policies.iter().all(|p| p.action == "updated"), "{second:?}");
            let stored = store.list_policies().expect("list");
            assert_eq!(stored.len(), first.policies.len(), "the same body twice never makes two schedules");
            for p in stored {
                p.spec.validate(chrono::Utc::now()).expect("a stored legacy policy is valid");
            }
        }
        Err(PolicyError::Invalid(e)) => assert!(!e.message.is_empty() && !e.field.is_empty()),
        Err(PolicyError::Body(m)) => assert!(!m.is_empty()),
        Err(PolicyError::Store(e)) => panic!("a store error from a legacy body: {e}"),
        Err(PolicyError::ManagedByKubernetes(m)) => panic!("a legacy body met a policy of a claim: {m}"),
    }
});
