//! The simulated runtime (being written).
