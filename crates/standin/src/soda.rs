//! A SODA hotpot API server stand-in (to be written).
