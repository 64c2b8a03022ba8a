//! The soda-syncer node agent and its command-line client.
//!
//! Adapters are named after what they talk to: [`restic`] (the restic
//! binary), [`store`] (SQLite), [`kubelet`] (the kubelet's volume
//! directories), [`kube`] (the Kubernetes API server), [`btrfs`] (btrfs
//! ioctls: subvolume generations, changed inodes). [`scheduler`] orchestrates runs through them; [`http`] is
//! the API; [`daemon`] wires everything up and shuts it down in order;
//! [`cli`] is the client; [`state_lock`] keeps it to one agent per state
//! directory. Pure rules live in the `soda-syncer-domain` crate.

pub mod admission;
pub mod beneath;
pub mod btrfs;
pub mod cli;
pub mod config;
pub mod consistency;
pub mod daemon;
pub mod http;
pub mod ids;
pub mod kube;
pub mod kubelet;
pub mod legacy;
pub mod maintainer;
pub mod metrics;
pub mod output;
pub mod policies;
pub mod restic;
pub mod scheduler;
pub mod schedules;
pub mod sealed;
pub mod soda;
pub mod state_lock;
pub mod store;
pub mod tls;
pub mod unchanged;

pub use config::Config;
pub use daemon::{run, Agent};
