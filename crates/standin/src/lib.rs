//! Stand-ins for the servers the agent talks to that cannot be installed
//! here. Each speaks the real wire protocol of the server it replaces (see
//! the module docs for which behaviours are reproduced) and binds
//! 127.0.0.1 on port 0.

pub mod kube;
pub mod soda;
