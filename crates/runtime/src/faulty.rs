//! The fault-injecting wrapper (being written).
