//! Berth's test kit, one for every suite. A [`Kit`] composes a world with
//! [`berth::compose`] — the function `App::build` uses — from a TOML
//! configuration and the few things a test must inject (the engine: the
//! simulator behind the fault wrapper, or Docker; the clock; the workers).
//! Tests wait on the store's commits ([`wait_for`]) rather than sleeping
//! in loops, and a step can be tried alone ([`TestWorld::step`]: one
//! handler, one envelope, its declared writes and emitted events back).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod wait;
mod world;

pub use wait::{DEADLINE, Deadline, TimedOut, recv, wait_for, wait_for_within};
pub use world::{Kit, TestWorld};

/// Boots the real application as `berth serve` does ([`berth::App::build`],
/// which composes with [`berth::compose`]) from the configuration file text
/// `config` and `BERTH_…` variables `env`, its data in a temporary
/// directory; `adjust` changes the loaded configuration first (the admin
/// token). The directory lives as long as the returned guard.
pub async fn app(
    config: &str,
    env: Vec<(String, String)>,
    adjust: impl FnOnce(&mut berth::Config),
) -> (berth::App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    std::fs::write(&path, config).unwrap();
    let mut config = berth::Config::load(Some(&path), env).unwrap();
    config.data_dir = dir.path().join("data");
    world::on_test_store(&mut config).await;
    adjust(&mut config);
    let app = berth::App::build(config, "test config").await.unwrap();
    (app, dir)
}
