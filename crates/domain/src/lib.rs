//! The pure domain of soda-syncer: what a backup policy is and when it is
//! valid, when a schedule fires next, how retention rules become restic
//! arguments, which run states exist and how they may change, and the shapes
//! of restic's JSON output. Nothing here touches the clock, the disk, the
//! network or a process: callers pass `now` in, so everything is testable.

pub mod annotations;
pub mod consistency;
pub mod drill;
pub mod field;
pub mod legacy;
pub mod location;
pub mod policy;
pub mod restic_json;
pub mod restic_version;
pub mod restore;
pub mod retention;
pub mod run;
pub mod schedule;
pub mod secret;
pub mod soda;
pub mod unchanged;

pub use field::FieldError;
pub use policy::*;
pub use retention::Retention;
pub use run::{RunKind, RunState, RunTrigger};
pub use schedule::Schedule;
pub use secret::Secret;
