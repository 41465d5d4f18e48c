//! The values that cross the runtime seam.

use std::collections::BTreeMap;
use std::fmt;

use berth_core::Timestamp;
use serde::{Deserialize, Serialize};

/// Which engine: `local`, or a pool host's configured name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostId(pub String);

impl HostId {
    pub fn new(s: impl Into<String>) -> Self {
        HostId(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Labels = BTreeMap<String, String>;

/// Label keys Berth puts on everything it creates.
pub mod label {
    pub const ORG: &str = "berth.org";
    pub const INSTANCE: &str = "berth.instance";
    pub const FLOW: &str = "berth.flow";
    pub const GENERATION: &str = "berth.generation";
    /// Present on every Berth resource; the reconciler lists by it.
    pub const MANAGED: &str = "berth.managed";
    /// Which Berth installation made the resource: an engine may be shared,
    /// and an installation only ever removes or follows its own.
    pub const INSTALL: &str = "berth.install";
    /// On an image built from an org's uploaded context: the build's id.
    pub const BUILD: &str = "berth.build";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    pub id: String,
    pub name: String,
    pub labels: Labels,
}

/// What to build: a context (a tar archive with a `Dockerfile` at its root
/// and the files it copies) made into the image `tag`. Nothing is pulled:
/// every `FROM` must name an image already on the host, and the caller pins
/// each to an image id before building (see [`crate::context`]). The build
/// has no network. Env values never go into a build: they belong to the
/// container's configuration ([`ContainerSpec::env`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    /// The image to produce, e.g. `berth/<org>/build:<digest>`.
    pub tag: String,
    /// The build context, a tar archive.
    pub context: std::sync::Arc<[u8]>,
    pub labels: Labels,
}

impl BuildSpec {
    /// A context holding only `dockerfile`.
    pub fn dockerfile_only(
        tag: impl Into<String>,
        dockerfile: &str,
        labels: Labels,
    ) -> std::io::Result<BuildSpec> {
        Ok(BuildSpec {
            tag: tag.into(),
            context: crate::context::tar_of(&[("Dockerfile", dockerfile.as_bytes())])?.into(),
            labels,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The engine's image id (`sha256:…`): what a container is made from,
    /// so that a later retag of the name changes no instance.
    pub id: String,
    /// The name it was found by (or built as).
    pub tag: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    pub image: ImageInfo,
    /// The last lines of the build's output.
    pub log_tail: Vec<String>,
}

/// Resource limits; `None` means the engine's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    /// An image id (or a name); Berth passes the id it pinned.
    pub image: String,
    pub labels: Labels,
    pub limits: Limits,
    /// The container's environment: only here, never in an image layer.
    pub env: Vec<(String, String)>,
    /// Overrides the image's command.
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ContainerState {
    Created,
    Running,
    Exited { exit_code: i64, oom_killed: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: Labels,
    pub state: ContainerState,
    /// Network name → this container's IP on it.
    pub networks: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Network,
    Image,
    Container,
}

/// Something on a host that carries Berth's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub kind: ResourceKind,
    pub name: String,
    pub labels: Labels,
    /// A container the listing says is running (false for anything else):
    /// lets a caller skip inspecting each container it expects running.
    pub running: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EngineEventKind {
    Start,
    Die { exit_code: i64 },
    Oom,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEvent {
    pub at: Timestamp,
    pub host: HostId,
    pub container: String,
    pub labels: Labels,
    pub kind: EngineEventKind,
}

/// A runtime failure, classified for the worker framework.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be reached or failed in a way that may pass
    /// (connection refused, 5xx): retry.
    #[error("engine unavailable on host {host}: {message}")]
    Unavailable { host: HostId, message: String },
    /// The operation did not answer in time: retry.
    #[error("engine timed out on host {host} during {op}")]
    Timeout { host: HostId, op: String },
    /// Something named does not exist (a base image, a container to start).
    #[error("{what} '{name}' not found on host {host}")]
    NotFound {
        host: HostId,
        what: String,
        name: String,
    },
    /// The name is taken by something that is not ours to reuse.
    #[error("{what} '{name}' already exists on host {host}")]
    Conflict {
        host: HostId,
        what: String,
        name: String,
    },
    /// It cannot be removed while something uses it (a network with
    /// containers attached). Not retryable as such: waiting detaches
    /// nothing; the caller decides.
    #[error("{what} '{name}' is still in use on host {host}")]
    InUse {
        host: HostId,
        what: String,
        name: String,
    },
    /// The engine refused the request as invalid (bad reference, bad spec).
    #[error("invalid request to host {host}: {message}")]
    Invalid { host: HostId, message: String },
    /// A build whose own instructions failed (a `RUN` that exits non-zero,
    /// a `COPY` of a missing file): building again fails the same way.
    #[error("the build failed at {step}: {message}")]
    BuildFailed {
        host: HostId,
        /// The failing instruction as the builder numbered it (`Step 2/3 :
        /// RUN make`), or `unknown step`.
        step: String,
        message: String,
        /// The last lines of the build's output.
        log_tail: Vec<String>,
    },
}

impl RuntimeError {
    pub fn unavailable(host: &HostId, message: impl Into<String>) -> Self {
        RuntimeError::Unavailable {
            host: host.clone(),
            message: message.into(),
        }
    }

    pub fn timeout(host: &HostId, op: impl Into<String>) -> Self {
        RuntimeError::Timeout {
            host: host.clone(),
            op: op.into(),
        }
    }

    pub fn not_found(host: &HostId, what: &str, name: &str) -> Self {
        RuntimeError::NotFound {
            host: host.clone(),
            what: what.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn conflict(host: &HostId, what: &str, name: &str) -> Self {
        RuntimeError::Conflict {
            host: host.clone(),
            what: what.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn in_use(host: &HostId, what: &str, name: &str) -> Self {
        RuntimeError::InUse {
            host: host.clone(),
            what: what.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn invalid(host: &HostId, message: impl Into<String>) -> Self {
        RuntimeError::Invalid {
            host: host.clone(),
            message: message.into(),
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RuntimeError::Unavailable { .. } | RuntimeError::Timeout { .. }
        )
    }

    /// A stable code for users.
    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::Unavailable { .. } => "engine_unavailable",
            RuntimeError::Timeout { .. } => "engine_timeout",
            RuntimeError::NotFound { what, .. } if what == "image" => "image_not_found",
            RuntimeError::NotFound { .. } => "not_found",
            RuntimeError::Conflict { .. } => "conflict",
            RuntimeError::InUse { .. } => "in_use",
            RuntimeError::Invalid { .. } => "invalid_request",
            RuntimeError::BuildFailed { .. } => "build_failed",
        }
    }
}

/// A reference as engines list it (`RepoTags`, `RepoDigests`), so that two
/// spellings of one name compare equal: Docker Hub's implicit prefixes
/// dropped, `:latest` added to a bare name; with a digest, the digest alone
/// names it (`RepoDigests` carry no tag).
pub fn normal_reference(r: &str) -> String {
    let r = r
        .strip_prefix("docker.io/library/")
        .or_else(|| r.strip_prefix("docker.io/"))
        .or_else(|| r.strip_prefix("index.docker.io/library/"))
        .unwrap_or(r);
    if let Some((name, digest)) = r.split_once('@') {
        let slash = name.rfind('/').map_or(0, |i| i + 1);
        let repo = match name[slash..].rfind(':') {
            Some(i) => &name[..slash + i],
            None => name,
        };
        return format!("{repo}@{digest}");
    }
    let last = r.rsplit('/').next().unwrap_or(r);
    if last.contains(':') {
        r.to_owned()
    } else {
        format!("{r}:latest")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn references_are_compared_as_the_engine_lists_them() {
        for (a, b) in [
            ("busybox", "busybox:latest"),
            ("docker.io/library/busybox:1", "busybox:1"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("app:1@sha256:ab", "app@sha256:ab"),
            (
                "localhost:5000/app@sha256:ab",
                "localhost:5000/app@sha256:ab",
            ),
        ] {
            assert_eq!(
                super::normal_reference(a),
                super::normal_reference(b),
                "{a} ~ {b}"
            );
        }
        assert_ne!(
            super::normal_reference("busybox:1"),
            super::normal_reference("busybox:2")
        );
        assert_ne!(
            super::normal_reference("ab"),
            super::normal_reference("abc")
        );
    }
}
