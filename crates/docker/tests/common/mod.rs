//! What the Docker runtime's tests share: the engine of this machine (a skip
//! without one, a failure under CI=true), the base image made by
//! `scripts/test-image.sh`, names unique to a run, a sweep of everything a
//! test made even when it panics, `docker exec`, and polling with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_docker::DockerRuntime;
use berth_docker::bollard::Docker;
use berth_docker::bollard::exec::{CreateExecOptions, StartExecResults};
use berth_runtime::{ContainerRuntime, HostId, ResourceKind};
use futures::StreamExt;

/// The base image every test image is built from.
pub const BASE: &str = "berth-test-base:latest";

pub fn local() -> HostId {
    HostId::new(berth_runtime::hosts::LOCAL)
}

/// The local engine, with the base image on it; `None` (after saying why)
/// when no engine answers, which under `CI=true` fails the test instead.
pub async fn engine() -> Option<Arc<DockerRuntime>> {
    let rt = match DockerRuntime::local().await {
        Ok(rt) => rt,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the Docker runtime cannot be tested: {e}"
            );
            eprintln!("SKIPPED: {e} (these tests need a Docker engine)");
            return None;
        }
    };
    ensure_base_image(&rt).await;
    Some(Arc::new(rt))
}

/// Runs `scripts/test-image.sh` if the base image is missing (it is
/// idempotent and serializes concurrent runs).
async fn ensure_base_image(rt: &DockerRuntime) {
    if rt.find_image(&local(), BASE).await.unwrap().is_some() {
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-image.sh");
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(&script).output())
        .await
        .unwrap();
    let found = rt.find_image(&local(), BASE).await.unwrap().is_some();
    assert!(
        found,
        "the base image {BASE} is missing and scripts/test-image.sh did not make it \
         (run it by hand to see why): {out:?}"
    );
}

/// A lowercase name no other run (or test process) uses: `prefix` + 8 hex.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mixed = t.subsec_nanos()
        ^ (t.as_secs() as u32).rotate_left(7)
        ^ std::process::id().rotate_left(16)
        ^ N.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9);
    format!("{prefix}{mixed:08x}")
}

/// Polls `probe` until it returns `Some`, failing with `what` after
/// `deadline`.
pub async fn until<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `cmd` in a running container; returns its exit code and output.
pub async fn exec(docker: &Docker, container: &str, cmd: &[&str]) -> (i64, String) {
    let created = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(cmd.to_vec()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut output = String::new();
    if let StartExecResults::Attached {
        output: mut out, ..
    } = docker.start_exec(&created.id, None).await.unwrap()
    {
        while let Some(frame) = out.next().await {
            output.push_str(&frame.unwrap().to_string());
        }
    }
    // The output ends when the process does; its exit code may lag a little.
    let code = until(Duration::from_secs(10), "the exec's exit code", || async {
        let i = docker.inspect_exec(&created.id).await.unwrap();
        if i.running == Some(true) {
            None
        } else {
            i.exit_code
        }
    })
    .await;
    (code, output)
}

/// Whether a TCP connection from `from` to `target:port` succeeds within 2 s
/// (busybox `nc`, which exits 1 on refusal, timeout or unknown name).
pub async fn reaches(docker: &Docker, from: &str, target: &str, port: u16) -> bool {
    let port = port.to_string();
    exec(docker, from, &["nc", "-w", "2", target, &port])
        .await
        .0
        == 0
}

/// On drop (so also when a test panics), removes every container, image
/// and network of the local engine whose label `key` has one of `values`.
pub struct Sweep {
    pub key: String,
    pub values: Vec<String>,
}

impl Sweep {
    pub fn new(key: &str, values: &[&str]) -> Self {
        Sweep {
            key: key.to_owned(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        let key = self.key.clone();
        let values = self.values.clone();
        // Drop cannot await, and the test's runtime may be the one
        // unwinding: sweep from a thread with a runtime of its own.
        let swept = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(sweep(&key, &values));
        })
        .join();
        if swept.is_err() {
            eprintln!("the sweep of {} failed", self.key);
        }
    }
}

/// Everything labelled `key` ∈ `values` on the local engine, containers
/// first (they hold networks and images).
pub async fn sweep(key: &str, values: &[String]) {
    let Ok(rt) = DockerRuntime::local().await else {
        return;
    };
    let host = local();
    let Ok(found) = rt.list_labelled(&host, key).await else {
        return;
    };
    let mine: Vec<_> = found
        .into_iter()
        .filter(|r| r.labels.get(key).is_some_and(|v| values.contains(v)))
        .collect();
    for kind in [
        ResourceKind::Container,
        ResourceKind::Image,
        ResourceKind::Network,
    ] {
        for r in mine.iter().filter(|r| r.kind == kind) {
            let done = match kind {
                ResourceKind::Container => rt.remove_container(&host, &r.name).await,
                ResourceKind::Image => rt.remove_image(&host, &r.name).await,
                ResourceKind::Network => rt.remove_network(&host, &r.name).await,
            };
            if let Err(e) = done {
                eprintln!("sweep: could not remove {:?} {}: {e}", r.kind, r.name);
            }
        }
    }
}
