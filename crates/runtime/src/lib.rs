//! The container runtime seam. Workers talk to engines only through
//! [`ContainerRuntime`]; implementations: the simulated runtime ([`sim`]), a
//! fault-injecting wrapper around any runtime ([`faulty`]), and (a later
//! crate) Docker through bollard. Host providers decide which host an org's
//! resources live on.
//!
//! Every operation names its host, so one runtime value can front several
//! engines. "Create" operations fail with [`RuntimeError::Conflict`] when the
//! name is taken; callers look first with `find_*` (idempotent workers), and
//! removal of something already gone is `Ok` so compensations can repeat.

pub mod context;
pub mod faulty;
pub mod hosts;
pub mod sim;
mod types;

pub use types::*;

use async_trait::async_trait;
use futures::stream::BoxStream;

/// The operations Berth needs from a container engine.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Checks that the host's engine answers.
    async fn ping(&self, host: &HostId) -> Result<(), RuntimeError>;

    async fn find_network(
        &self,
        host: &HostId,
        name: &str,
    ) -> Result<Option<NetworkInfo>, RuntimeError>;
    /// Creates a private bridge network; `Conflict` if the name is taken.
    async fn create_network(
        &self,
        host: &HostId,
        spec: &NetworkSpec,
    ) -> Result<NetworkInfo, RuntimeError>;
    /// Removes a network; `Ok` if it does not exist, `InUse` while
    /// containers are attached.
    async fn remove_network(&self, host: &HostId, name: &str) -> Result<(), RuntimeError>;

    /// The image known by the name `reference` (`name[:tag]`, `name@digest`;
    /// a bare name means `:latest`) — by that name only: engines also match
    /// an id or an id prefix, and such a match is `None` here, so that no
    /// one can reach an image by guessing at its id.
    async fn find_image(
        &self,
        host: &HostId,
        reference: &str,
    ) -> Result<Option<ImageInfo>, RuntimeError>;
    /// Builds `spec.tag` from the context, with no network and nothing
    /// pulled. A `FROM` the host does not have is `NotFound` (what = image);
    /// a failing instruction is `BuildFailed` with the step and log tail.
    async fn build_image(
        &self,
        host: &HostId,
        spec: &BuildSpec,
    ) -> Result<BuildOutput, RuntimeError>;
    /// Removes an image; `Ok` if it does not exist.
    async fn remove_image(&self, host: &HostId, tag: &str) -> Result<(), RuntimeError>;

    async fn find_container(
        &self,
        host: &HostId,
        name: &str,
    ) -> Result<Option<ContainerInfo>, RuntimeError>;
    /// Creates (does not start) a container; `Conflict` if the name is taken,
    /// `NotFound` if the image is missing.
    async fn create_container(
        &self,
        host: &HostId,
        spec: &ContainerSpec,
    ) -> Result<ContainerInfo, RuntimeError>;
    /// Starts a created or exited container; `Ok` if already running.
    async fn start_container(&self, host: &HostId, name: &str) -> Result<(), RuntimeError>;
    /// Stops a running container (SIGTERM, then SIGKILL after `grace`); `Ok`
    /// if not running.
    async fn stop_container(
        &self,
        host: &HostId,
        name: &str,
        grace: std::time::Duration,
    ) -> Result<(), RuntimeError>;
    /// Removes a container, stopping it first if needed; `Ok` if it does not
    /// exist.
    async fn remove_container(&self, host: &HostId, name: &str) -> Result<(), RuntimeError>;

    /// Attaches a container to a network with `alias` as its DNS name there;
    /// returns its IP on that network. Attaching twice returns the same IP.
    async fn connect_network(
        &self,
        host: &HostId,
        network: &str,
        container: &str,
        alias: &str,
    ) -> Result<String, RuntimeError>;
    /// Detaches; `Ok` if not attached or either side is gone.
    async fn disconnect_network(
        &self,
        host: &HostId,
        network: &str,
        container: &str,
    ) -> Result<(), RuntimeError>;

    /// Every network, image and container on the host carrying label `key`
    /// (for the reconciler's sweep).
    async fn list_labelled(&self, host: &HostId, key: &str) -> Result<Vec<Resource>, RuntimeError>;

    /// Engine events (start, die, oom) of containers carrying label `key`,
    /// from `since` on (events at or after it), then live. The stream ends
    /// when the engine connection drops; callers resubscribe from the last
    /// seen time.
    fn events(
        &self,
        host: &HostId,
        key: &str,
        since: Option<berth_core::Timestamp>,
    ) -> BoxStream<'static, Result<EngineEvent, RuntimeError>>;

    /// The last `tail` lines of a container's output, then, with `follow`,
    /// new lines as they come.
    fn logs(
        &self,
        host: &HostId,
        container: &str,
        tail: usize,
        follow: bool,
    ) -> BoxStream<'static, Result<String, RuntimeError>>;
}
