//! A Kubernetes API server stand-in (to be written).
