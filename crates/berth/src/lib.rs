//! The berth application: configuration, telemetry and start-up, shared by
//! the `berth` binary, the benchmarks and the tests (which boot the same
//! [`App`] the binary does).

pub mod app;
pub mod config;
pub mod singleton;
pub mod telemetry;

pub use app::{App, Overrides, World, compose, deps, open_store, registry};
pub use config::{Config, ConfigError};
