//! Integration tests: the real soda-syncer binary (or its router
//! in-process), the real restic, real object stores on loopback (rclone
//! REST, moto S3), real bind mounts. One test binary keeps link time down.

mod api;
mod append_only;
mod auth;
mod backup;
mod claim_status;
mod cluster_view;
mod consistency;
mod deploy;
mod drill;
mod faults;
mod help;
mod image;
mod kube;
mod legacy;
mod lifecycle;
mod newuser;
mod ops;
mod page;
mod paths;
mod restic_versions;
mod restore;
mod rollout;
mod schema;
mod servers;
mod soda;
mod soda_sync;
mod support;
mod tls;
mod unchanged;
mod upgrade;
