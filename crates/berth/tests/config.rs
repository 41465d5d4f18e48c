//! Configuration loading: the example file equals the defaults, and every
//! error names its source, the key and the rule broken.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth::Config;
use berth_store::Synchronous;
use berth_worker::{Ctx, Registry};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../berth.example.toml")
}

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn registry(names: &[&str]) -> Registry {
    let mut r = Registry::new();
    for n in names {
        r.register(n, &["test.ping"], |ctx: Ctx| async move { Ok(ctx.done()) })
            .unwrap();
    }
    r
}

#[test]
fn the_example_file_states_the_defaults() {
    let loaded = Config::load(Some(&example()), no_env()).unwrap();
    let names = ["network.attach", "image.build"];
    let from_example = loaded.policies(names, "example").unwrap();
    let from_defaults = Config::default().policies(names, "defaults").unwrap();
    for n in names {
        assert_eq!(from_example.get(n), from_defaults.get(n), "policy of {n}");
    }
    let mut rest = loaded.clone();
    rest.workers.clear();
    assert_eq!(rest, Config::default(), "every other key");
}

#[test]
fn a_wrong_type_names_the_file_and_the_key() {
    let (_d, path) = write("[workers.default]\nmax_attempts = \"five\"\n");
    let err = Config::load(Some(&path), no_env()).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("workers.default.max_attempts"), "{err}");
    assert!(err.contains("invalid type"), "{err}");
}

#[test]
fn an_unknown_key_is_an_error() {
    let (_d, path) = write("[store]\nsyncronous = \"full\"\n");
    let err = Config::load(Some(&path), no_env()).unwrap_err().to_string();
    assert!(err.contains("unknown field `syncronous`"), "{err}");
    assert!(err.contains("store"), "{err}");
}

#[test]
fn a_syntax_error_names_the_file_and_line() {
    let (_d, path) = write("[bus\nmax_batch = 3\n");
    let err = Config::load(Some(&path), no_env()).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn a_bad_duration_says_how_to_write_one() {
    let (_d, path) = write("[workers.default]\ntimeout = \"soon\"\n");
    let err = Config::load(Some(&path), no_env()).unwrap_err().to_string();
    assert!(err.contains("workers.default.timeout"), "{err}");
    assert!(err.contains("\"30s\""), "{err}");
}

#[test]
fn policy_rules_are_checked_against_the_registered_workers() {
    let (_d, path) = write(
        r#"
        [workers."netwrk.attach"]
        max_attempts = 3
        [workers."network.attach"]
        max_attempts = 0
        backoff = { initial = "1s", max = "10ms" }
        "#,
    );
    let config = Config::load(Some(&path), no_env()).unwrap();
    let reg = registry(&["network.attach"]);
    let err = config
        .policies(reg.names(), &path.display().to_string())
        .unwrap_err()
        .to_string();
    let file = path.display().to_string();
    assert!(
        err.contains(&format!(
            "{file}: workers.\"netwrk.attach\": no worker is named"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}: workers.\"network.attach\".max_attempts: must be"
        )),
        "{err}"
    );
    assert!(
        err.contains(
            "workers.\"network.attach\".backoff.max: must be ≥ backoff.initial (1s), got 10ms"
        ),
        "{err}"
    );
}

#[test]
fn environment_variables_override_the_file() {
    let (_d, path) = write("[store]\nsynchronous = \"full\"\n[bus]\nmax_batch = 100\n");
    let env = vec![
        ("BERTH_STORE__SYNCHRONOUS".to_owned(), "normal".to_owned()),
        ("BERTH_BUS__SHUTDOWN_GRACE".to_owned(), "3s".to_owned()),
        ("BERTH_DATA_DIR".to_owned(), "/tmp/elsewhere".to_owned()),
        ("BERTH_LOG".to_owned(), "debug".to_owned()),
        ("UNRELATED".to_owned(), "x".to_owned()),
    ];
    let c = Config::load(Some(&path), env).unwrap();
    assert_eq!(c.store.synchronous, Synchronous::Normal);
    assert_eq!(c.bus.shutdown_grace, Duration::from_secs(3));
    assert_eq!(c.bus.max_batch, 100, "file value kept");
    assert_eq!(c.data_dir, PathBuf::from("/tmp/elsewhere"));
}

#[test]
fn a_bad_environment_value_names_the_variable() {
    let env = vec![("BERTH_BUS__MAX_BATCH".to_owned(), "lots".to_owned())];
    let err = Config::load(None, env).unwrap_err().to_string();
    assert!(
        err.contains("environment variable BERTH_BUS__MAX_BATCH"),
        "{err}"
    );
    assert!(err.contains("bus.max_batch"), "{err}");
}

#[test]
fn the_effective_configuration_round_trips() {
    let (_d, path) = write("[workers.default]\nmax_attempts = 9\n");
    let c = Config::load(Some(&path), no_env()).unwrap();
    let (_d2, again) = write(&c.to_toml());
    assert_eq!(Config::load(Some(&again), no_env()).unwrap(), c);
}

#[test]
fn a_zero_reconciler_call_timeout_is_refused_with_its_key() {
    let (_d, path) = write("[reconciler]\ncall_timeout = \"0s\"\n");
    let err = Config::load(Some(&path), no_env()).unwrap_err().to_string();
    assert!(err.contains("reconciler.call_timeout"), "{err}");
    assert!(err.contains("more than 0"), "{err}");
    let ok = Config::load(None, no_env()).unwrap();
    assert_eq!(ok.reconciler.call_timeout, Duration::from_secs(30));
}
