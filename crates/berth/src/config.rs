//! Berth's configuration, loaded in layers: built-in defaults, then the TOML
//! file, then `BERTH_…` environment variables, then command-line flags. Every
//! error names its source (file or variable), the key and the rule broken.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_core::size::ByteSize;
use berth_store::Synchronous;
use berth_worker::{Policies, WorkersConfig};
use serde::{Deserialize, Serialize};

/// The whole configuration. `berth config dump` prints the effective one.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of Berth's state; the SQLite file is `<data_dir>/berth.db`.
    pub data_dir: PathBuf,
    /// Address the HTTP API listens on (`--listen`, `BERTH_LISTEN`); port 0
    /// picks a free one.
    pub listen: SocketAddr,
    /// The admin token (`BERTH_ADMIN_TOKEN`), which creates orgs. Unset: one
    /// is generated at first start, printed once, and kept hashed. Never
    /// printed by `berth config dump`.
    #[serde(skip_serializing)]
    pub admin_token: Option<Secret>,
    /// What this process runs (`--role`, `BERTH_ROLE`): `all` (the
    /// default), `api` or `worker`.
    pub role: Role,
    pub api: ApiSection,
    pub store: StoreConfig,
    pub bus: BusConfig,
    pub runtime: RuntimeConfig,
    pub hosts: HostsConfig,
    pub reconciler: ReconcilerSection,
    pub limits: LimitsSection,
    /// Notification providers, one worker each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookSection>,
    /// Retry policies: `[workers.default]` and `[workers."<name>"]`.
    pub workers: WorkersConfig,
}

/// Which container runtime runs instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// The in-memory simulated engine (no containers run): for trying Berth
    /// out and for benchmarks.
    Sim,
    /// The local Docker engine.
    Docker,
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sim" => Ok(RuntimeKind::Sim),
            "docker" => Ok(RuntimeKind::Docker),
            other => Err(format!("unknown runtime '{other}': expected docker or sim")),
        }
    }
}

/// What one `berth serve` process runs. Several processes share one
/// database: any number with `api`; on SQLite one process dispatches (the
/// dispatcher's lock file), so one `worker` or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The HTTP API, the workers, the engine-event listeners and the
    /// reconciler.
    #[default]
    All,
    /// The HTTP API only: its publishes commit in transactions of their
    /// own and another process's workers handle them.
    Api,
    /// The workers, the engine-event listeners and the reconciler; no HTTP
    /// API.
    Worker,
}

impl Role {
    pub fn serves_api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }

    pub fn runs_workers(self) -> bool {
        matches!(self, Role::All | Role::Worker)
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Role::All),
            "api" => Ok(Role::Api),
            "worker" => Ok(Role::Worker),
            other => Err(format!(
                "unknown role '{other}': expected all, api or worker"
            )),
        }
    }
}

/// A secret setting: compared and used, never shown (`Debug` prints `***`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The shortest admin token accepted: shorter ones can be guessed.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub kind: RuntimeKind,
    /// The local engine's endpoint (`unix:///…` or `tcp://…`); unset:
    /// `DOCKER_HOST`, else the local socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_host: Option<String>,
    /// Base images the simulated engine pretends to have on every host.
    pub sim_base_images: Vec<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            kind: RuntimeKind::Docker,
            docker_host: None,
            sim_base_images: vec!["busybox".into(), "berth-test-base:latest".into()],
        }
    }
}

/// `[reconciler]`: the safety net under the flows.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcilerSection {
    /// Time between passes.
    #[serde(with = "berth_core::duration::human")]
    pub period: std::time::Duration,
    /// How long a Berth-labelled resource without a live record may stay
    /// before it is removed.
    #[serde(with = "berth_core::duration::human")]
    pub grace: std::time::Duration,
    /// How long an instance may stay in a non-terminal state without change
    /// before its flow is nudged.
    #[serde(with = "berth_core::duration::human")]
    pub flow_deadline: std::time::Duration,
    /// Nudges before the flow fails with `flow_timeout`.
    pub max_republish: u32,
    /// How long one engine call of a pass may take before the pass treats
    /// the engine as unavailable and goes on.
    #[serde(with = "berth_core::duration::human")]
    pub call_timeout: std::time::Duration,
}

impl ReconcilerSection {
    /// The first rule broken, as (key, rule).
    fn check(&self) -> Option<(&'static str, String)> {
        // Zero would time every engine call out: the passes would see
        // nothing and remove nothing, silently.
        if self.call_timeout.is_zero() {
            return Some((
                "reconciler.call_timeout",
                "must be more than 0 (got 0s)".to_owned(),
            ));
        }
        None
    }
}

impl Default for ReconcilerSection {
    fn default() -> Self {
        let d = berth_flows::reconciler::ReconcilerConfig::default();
        ReconcilerSection {
            period: d.period,
            grace: d.grace,
            flow_deadline: d.flow_deadline,
            max_republish: d.max_republish,
            call_timeout: d.call_timeout,
        }
    }
}

/// One `[[webhooks]]` notification provider.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    /// Names its worker `notify.<name>`, whose policy is
    /// `[workers."notify.<name>"]`.
    pub name: String,
    /// `http://` URL receiving a POST per instance event.
    pub url: String,
    /// Key of the `Berth-Signature` HMAC-SHA256 header.
    pub secret: String,
}

/// Where orgs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// One engine for every org; isolation by network.
    Local,
    /// Each org claims a dedicated host from `pool`.
    Pool,
}

/// `[hosts]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostsConfig {
    pub provider: ProviderKind,
    /// The pool (with `provider = "pool"`): host names, or with the Docker
    /// runtime `name=endpoint` (e.g. `h1=tcp://10.0.0.5:2375`).
    pub pool: Vec<String>,
}

impl Default for HostsConfig {
    fn default() -> Self {
        HostsConfig {
            provider: ProviderKind::Local,
            pool: Vec::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("berth-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7077)),
            admin_token: None,
            role: Role::All,
            api: ApiSection::default(),
            store: StoreConfig::default(),
            bus: BusConfig::default(),
            runtime: RuntimeConfig::default(),
            hosts: HostsConfig::default(),
            reconciler: ReconcilerSection::default(),
            limits: LimitsSection::default(),
            webhooks: Vec::new(),
            workers: WorkersConfig::new(),
        }
    }
}

/// `[limits]`: what one container may use (the defaults of a request that
/// names no `limits`, and the most one may ask for), and what one org may
/// have. Several orgs share an engine: without these one could starve the
/// others.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Memory of a container (no swap beyond it).
    pub memory: ByteSize,
    /// CPUs of a container (fractions allowed).
    pub cpus: f64,
    /// Processes of a container.
    pub pids: i64,
    /// The most memory a request may ask for.
    pub max_memory: ByteSize,
    /// The most CPUs a request may ask for.
    pub max_cpus: f64,
    /// The most processes a request may ask for.
    pub max_pids: i64,
    /// Live (not deleted) instances per org; past it, creating answers 409
    /// `quota_exceeded`.
    pub max_instances_per_org: u32,
    /// Uploaded build contexts per org.
    pub max_builds_per_org: u32,
    /// The largest build context an upload may carry.
    pub max_build_context: ByteSize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let d = berth_api::Quotas::default();
        LimitsSection {
            memory: ByteSize(d.default.memory_bytes as u64),
            cpus: d.default.nano_cpus as f64 / 1e9,
            pids: d.default.pids,
            max_memory: ByteSize(d.max.memory_bytes as u64),
            max_cpus: d.max.nano_cpus as f64 / 1e9,
            max_pids: d.max.pids,
            max_instances_per_org: d.max_instances_per_org,
            max_builds_per_org: d.max_builds_per_org,
            max_build_context: ByteSize(d.max_build_context as u64),
        }
    }
}

impl LimitsSection {
    /// The limits as the API applies them, or the rule a value breaks.
    pub fn quotas(&self) -> Result<berth_api::Quotas, String> {
        let limits = |what: &str, memory: ByteSize, cpus: f64, pids: i64| {
            let memory_bytes = i64::try_from(memory.bytes())
                .map_err(|_| format!("limits.{what}memory: {memory} is too large"))?;
            if memory.bytes() < berth_api::validate::MIN_MEMORY {
                return Err(format!(
                    "limits.{what}memory: {memory} is under the 6MiB the engine needs"
                ));
            }
            if !(cpus.is_finite() && (0.01..=1024.0).contains(&cpus)) {
                return Err(format!("limits.{what}cpus: {cpus} must be 0.01 to 1024"));
            }
            if pids < 1 {
                return Err(format!("limits.{what}pids: {pids} must be at least 1"));
            }
            Ok(berth_store::instances::ResourceLimits {
                memory_bytes,
                nano_cpus: (cpus * 1e9).round() as i64,
                pids,
            })
        };
        let default = limits("", self.memory, self.cpus, self.pids)?;
        let max = limits("max_", self.max_memory, self.max_cpus, self.max_pids)?;
        if default.memory_bytes > max.memory_bytes {
            return Err(format!(
                "limits.memory: {} is over limits.max_memory ({})",
                self.memory, self.max_memory
            ));
        }
        if default.nano_cpus > max.nano_cpus {
            return Err(format!(
                "limits.cpus: {} is over limits.max_cpus ({})",
                self.cpus, self.max_cpus
            ));
        }
        if default.pids > max.pids {
            return Err(format!(
                "limits.pids: {} is over limits.max_pids ({})",
                self.pids, self.max_pids
            ));
        }
        Ok(berth_api::Quotas {
            default,
            max,
            max_instances_per_org: self.max_instances_per_org,
            max_builds_per_org: self.max_builds_per_org,
            max_build_context: usize::try_from(self.max_build_context.bytes())
                .map_err(|_| "limits.max_build_context: too large".to_owned())?,
        })
    }
}

/// `[store]`: the database — the SQLite file `berth.db` in the data dir,
/// or the PostgreSQL database `url` names.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user:password@host:port/database`: the store on
    /// PostgreSQL, shared by any number of `berth serve` processes. Unset:
    /// SQLite in the data dir. Shown with its password hidden.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "redacted_url"
    )]
    pub url: Option<String>,
    /// `full` (every commit synced: survives power loss) or `normal` (synced
    /// at checkpoints: survives a crash of Berth, not of the machine).
    pub synchronous: Synchronous,
    /// Connections for handlers' transactions and reads.
    pub max_connections: u32,
    /// How long a writer waits for SQLite's write lock.
    #[serde(with = "berth_core::duration::human")]
    pub busy_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let d = berth_store::StoreOptions::default();
        StoreConfig {
            url: None,
            synchronous: d.synchronous,
            max_connections: d.max_connections,
            busy_timeout: d.busy_timeout,
        }
    }
}

/// A database URL as `config show` prints it: without its password.
fn redacted_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&berth_store::postgres::redact(u)),
        None => s.serialize_none(),
    }
}

impl StoreConfig {
    /// The first broken rule, with its key.
    pub fn check(&self) -> Option<(&'static str, String)> {
        let url = self.url.as_deref()?;
        if !berth_store::postgres::is_postgres_url(url) {
            return Some((
                "store.url",
                format!(
                    "must be a postgres:// URL (got '{}'; for SQLite leave it unset: the file is berth.db in data_dir)",
                    berth_store::postgres::redact(url)
                ),
            ));
        }
        if let Err(e) = berth_store::postgres::check_url(url) {
            return Some(("store.url", format!("{e:#}")));
        }
        None
    }
}

/// `[bus]`: the embedded dispatcher.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// Added to a worker's timeout to make the lease on a delivery.
    #[serde(with = "berth_core::duration::human")]
    pub lease_grace: Duration,
    /// How long shutdown waits for attempts in flight before returning them.
    #[serde(with = "berth_core::duration::human")]
    pub shutdown_grace: Duration,
    /// Most events and finished attempts in one group commit.
    pub max_batch: usize,
    /// How often an idle dispatcher looks for work committed by another
    /// process (a `berth admin redrive`); work from this process wakes it at once.
    #[serde(with = "berth_core::duration::human")]
    pub poll_interval: Duration,
    /// How often the WAL is checkpointed in the background while Berth
    /// writes to the database (never while it does not), so that no commit
    /// stalls on a checkpoint.
    #[serde(with = "berth_core::duration::human")]
    pub checkpoint_interval: Duration,
    /// Seed of the random generator (back-off jitter); unset: from entropy.
    /// Set it to replay an incident's exact retry timings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Default for BusConfig {
    fn default() -> Self {
        let d = berth_worker::BusOptions::default();
        BusConfig {
            lease_grace: d.lease_grace,
            shutdown_grace: d.shutdown_grace,
            max_batch: d.max_batch,
            poll_interval: d.poll_interval,
            checkpoint_interval: d
                .checkpoint_interval
                .unwrap_or(std::time::Duration::from_millis(50)),
            seed: None,
        }
    }
}

/// `[api]`: what the HTTP server lets one client or org hold.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Time a connection has to send a whole request head, from its first
    /// byte and again between requests (idle keep-alive connections close
    /// after it too). More than 0, at most 10s.
    #[serde(with = "berth_core::duration::human")]
    pub header_read_timeout: Duration,
    /// Most connections open at once; the server lowers it to the soft
    /// descriptor limit (`ulimit -n`) less a reserve.
    pub max_connections: usize,
    /// Most event streams and log followers one org holds at once.
    pub max_streams_per_org: u32,
    /// Most requests one org has waiting at once (`?wait=true`, `/wait`).
    pub max_waits_per_org: u32,
}

/// The longest `api.header_read_timeout` accepted: a slow client must not
/// hold a connection longer than this without having sent a request.
pub const MAX_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ApiSection {
    fn default() -> Self {
        let d = berth_api::ServerOptions::default();
        ApiSection {
            header_read_timeout: d.header_read_timeout,
            max_connections: d.max_connections,
            max_streams_per_org: d.max_streams_per_org,
            max_waits_per_org: d.max_waits_per_org,
        }
    }
}

impl ApiSection {
    /// The server's options.
    pub fn options(&self) -> berth_api::ServerOptions {
        berth_api::ServerOptions {
            header_read_timeout: self.header_read_timeout,
            max_connections: self.max_connections,
            max_streams_per_org: self.max_streams_per_org,
            max_waits_per_org: self.max_waits_per_org,
        }
    }

    /// The first rule broken, as (key, rule).
    fn check(&self) -> Option<(&'static str, String)> {
        let t = self.header_read_timeout;
        if t.is_zero() || t > MAX_HEADER_READ_TIMEOUT {
            return Some((
                "api.header_read_timeout",
                format!(
                    "must be more than 0 and at most 10s (got {})",
                    humantime::format_duration(t)
                ),
            ));
        }
        for (key, n) in [
            ("api.max_connections", self.max_connections as u64),
            (
                "api.max_streams_per_org",
                u64::from(self.max_streams_per_org),
            ),
            ("api.max_waits_per_org", u64::from(self.max_waits_per_org)),
        ] {
            if n == 0 {
                return Some((key, "must be at least 1 (got 0)".to_owned()));
            }
        }
        None
    }
}

/// A configuration that could not be loaded; the message says where and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Environment variables that are not configuration keys.
/// `BERTH_URL` and `BERTH_TOKEN` are the CLI's (the server a client talks
/// to, and as whom): a shell that has them set can still run `berth serve`.
/// `BERTH_TEST_POSTGRES_URL` is the test suites' PostgreSQL server and
/// `BERTH_TEST_STORE` the database they run on (`scripts/test`), set for
/// every process a suite starts.
const ENV_NOT_KEYS: &[&str] = &[
    "BERTH_LOG",
    "BERTH_LOG_FORMAT",
    "BERTH_CONFIG",
    "BERTH_URL",
    "BERTH_TOKEN",
    "BERTH_TEST_POSTGRES_URL",
    "BERTH_TEST_STORE",
];

/// Variables whose value is always a string, whatever it looks like (a
/// token of digits must not become an integer).
const ENV_STRINGS: &[&str] = &["BERTH_ADMIN_TOKEN"];

impl Config {
    /// Loads defaults ← `file` (if given) ← `BERTH_…` variables from `env`.
    /// Variables map to keys with `__` between levels:
    /// `BERTH_STORE__SYNCHRONOUS=normal`, `BERTH_DATA_DIR=/var/lib/berth`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config file {}: {e}", path.display()))
                })?;
                Config::from_toml_str(&text, &path.display().to_string(), env)
            }
            // No file reads like an empty one.
            None => Config::from_toml_str("", "defaults", env),
        }
    }

    /// [`Config::load`] of a file whose text is `text`; `source` names it
    /// in errors. Separate from the reading so that the parsing can be
    /// exercised without files (the `config` fuzz target).
    pub fn from_toml_str(
        text: &str,
        source: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| ConfigError(format!("{source}: {e}")))?;
        let source = source.to_owned();
        let mut from_env: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("BERTH_") else {
                continue;
            };
            if ENV_NOT_KEYS.contains(&name.as_str()) || rest.is_empty() {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            let value = if ENV_STRINGS.contains(&name.as_str()) {
                toml::Value::String(value)
            } else {
                parse_env_value(&value)
            };
            set_path(&mut table, &path, value);
            from_env.insert(path.join("."), name);
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let origin = from_env
                    .get(&key)
                    .map(|var| format!("environment variable {var}"))
                    .unwrap_or(source.clone());
                ConfigError(format!("{origin}: {key}: {}", e.into_inner()))
            })?;
        if let Some((key, rule)) = config
            .api
            .check()
            .or_else(|| config.reconciler.check())
            .or_else(|| config.store.check())
        {
            let origin = from_env
                .get(key)
                .map(|var| format!("environment variable {var}"))
                .unwrap_or(source.clone());
            return Err(ConfigError(format!("{origin}: {key}: {rule}")));
        }
        if let Some(t) = &config.admin_token {
            let t = t.expose();
            if t.len() < MIN_ADMIN_TOKEN
                || t.len() > 512
                || !t.bytes().all(|b| b.is_ascii_graphic())
            {
                let origin = from_env
                    .get("admin_token")
                    .map(|var| format!("environment variable {var}"))
                    .unwrap_or(source.clone());
                return Err(ConfigError(format!(
                    "{origin}: admin_token: must be {MIN_ADMIN_TOKEN} to 512 visible ASCII characters \
                     (got {} characters; the value is not shown)",
                    t.chars().count()
                )));
            }
        }
        if let Err(rule) = config.limits.quotas() {
            return Err(ConfigError(format!("{source}: {rule}")));
        }
        Ok(config)
    }

    /// Resolves the worker policies for the registered `workers`; each broken
    /// rule is reported with the file and the key.
    pub fn policies<'a>(
        &self,
        workers: impl IntoIterator<Item = &'a str>,
        source: &str,
    ) -> Result<Policies, ConfigError> {
        Policies::resolve(&self.workers, workers).map_err(|errs| {
            ConfigError(
                errs.iter()
                    .map(|e| format!("{source}: {e}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        })
    }

    /// The SQLite file, when the store is not on PostgreSQL.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("berth.db")
    }

    /// Where the store is: `store.url`, else the SQLite file in the data
    /// dir.
    pub fn database_location(&self) -> berth_store::Location {
        match &self.store.url {
            Some(url) => berth_store::Location::Postgres(url.clone()),
            None => berth_store::Location::File(self.database_path()),
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// Environment values are strings; read numbers and booleans as such so that
/// `BERTH_BUS__MAX_BATCH=512` sets an integer.
fn parse_env_value(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(f) = v.parse::<f64>()
        && v.contains('.')
    {
        return toml::Value::Float(f);
    }
    match v {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(v.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(t) = entry else {
            return;
        };
        cur = t;
    }
    cur.insert(last.clone(), value);
}
