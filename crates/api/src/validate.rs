//! The rules an instance request must keep, checked before anything is
//! written. Each refusal names the field, the value (never an env value:
//! those are secrets) and the rule.

use std::collections::{BTreeMap, HashSet};

use berth_core::domain::{InstanceName, RestartPolicy};
use berth_core::size::ByteSize;
use berth_store::instances::{InstanceSpec, ResourceLimits};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::error::ApiError;

pub const MAX_ENV_VARS: usize = 256;
pub const MAX_ENV_BYTES: usize = 64 * 1024;
const MAX_CMD_ARGS: usize = 256;
const MAX_CMD_BYTES: usize = 64 * 1024;
const MAX_PORTS: usize = 64;
const MAX_IMAGE_NAME: usize = 255;

/// The least memory the engine accepts for a container.
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// What containers may use and orgs may have (`[limits]` in the
/// configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct Quotas {
    /// Limits of a request that names none (each field separately).
    pub default: ResourceLimits,
    /// The most a request may ask for.
    pub max: ResourceLimits,
    pub max_instances_per_org: u32,
    pub max_builds_per_org: u32,
    /// Bytes of one uploaded build context.
    pub max_build_context: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            default: ResourceLimits::DEFAULT,
            max: ResourceLimits {
                memory_bytes: 4 << 30,
                nano_cpus: 4_000_000_000,
                pids: 4096,
            },
            max_instances_per_org: 500,
            max_builds_per_org: 100,
            max_build_context: 64 << 20,
        }
    }
}

/// `limits` of `POST /v1/instances`; each field omitted takes the
/// configured default.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// Memory, e.g. `"256MiB"`, `"1GiB"`, or bytes; at least 6MiB, at most
    /// the configured `limits.max_memory`. No swap beyond it.
    #[schema(value_type = Option<String>, example = "256MiB")]
    pub memory: Option<ByteSize>,
    /// CPUs, e.g. `0.5`; at least 0.01, at most `limits.max_cpus`.
    pub cpus: Option<f64>,
    /// Processes; at least 1, at most `limits.max_pids`.
    #[serde(default, deserialize_with = "whole_number")]
    pub pids: Option<i64>,
}

/// `POST /v1/instances`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    /// `^[a-z0-9][a-z0-9-]{0,62}$`, unique among the org's live instances.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// The base image, by reference: `busybox`, `busybox:1.36`,
    /// `registry.example.com:5000/team/app:v2`, `app@sha256:<digest>`.
    /// Never an image id (`sha256:…`). It must be on the org's host, found
    /// there by that name; images Berth made for other orgs never count.
    /// Exactly one of `image` and `build`.
    // The pattern is the common subset of references (no registry port,
    // no digest), stricter than the server, so that every reference it
    // allows is one the server takes; a registry is a host name of labels.
    #[serde(default)]
    #[schema(
        max_length = 255,
        pattern = r"^(?:[a-z0-9]+(?:(?:[._-]|__)[a-z0-9]+)*|(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+|[a-z0-9]+(?:(?:[_-]|__)[a-z0-9]+)*)(?:/[a-z0-9]+(?:(?:[._-]|__)[a-z0-9]+)*)+)(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$"
    )]
    pub image: Option<String>,
    /// The id of a build context the org uploaded (`POST /v1/builds`): the
    /// image is built from it (once per context; instances of the same
    /// context share it). Exactly one of `image` and `build`.
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9]{1,64}$")]
    pub build: Option<String>,
    /// Resource limits of the container.
    #[serde(default)]
    pub limits: Option<LimitsRequest>,
    /// Keys `^[A-Za-z_][A-Za-z0-9_]*$`; at most 256 variables and 64 KiB of
    /// keys and values in all. Values are secrets: shown as `***` later.
    #[serde(default)]
    #[schema(schema_with = env_schema)]
    pub env: BTreeMap<String, String>,
    /// Overrides the image's command: 1 to 256 arguments, no NUL, 64 KiB
    /// in all.
    #[serde(default)]
    #[schema(schema_with = cmd_schema)]
    pub cmd: Option<Vec<String>>,
    /// Container ports (1–65535), at most 64, each once.
    #[serde(default, deserialize_with = "ports")]
    #[schema(schema_with = ports_schema)]
    pub ports: Option<Vec<u16>>,
    /// `no` (default), `always`, `on-failure` or `on-failure:N`.
    #[serde(default)]
    #[schema(pattern = r"^(no|always|on-failure(:[1-9][0-9]{0,8})?)$")]
    pub restart: Option<String>,
}

/// Writes this server's configured ranges of `limits` into the document it
/// serves (the derived schema knows only the types): memory in bytes from
/// 6MiB, CPUs from 0.01, processes from 1, each up to `limits.max_…`.
/// Memory is declared in bytes only; the server also reads sizes such as
/// `"256MiB"`, whose range a pattern cannot state.
pub fn document_limits(doc: &mut utoipa::openapi::OpenApi, q: &Quotas) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
    let Some(RefOr::T(Schema::Object(limits))) = doc
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut("LimitsRequest"))
    else {
        return;
    };
    let number = |t: Type, min: f64, max: f64, what: &str| {
        RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([t, Type::Null]))
                .minimum(Some(min))
                .maximum(Some(max))
                .description(Some(what))
                .build(),
        ))
    };
    limits.properties.insert(
        "memory".into(),
        number(
            Type::Integer,
            MIN_MEMORY as f64,
            q.max.memory_bytes as f64,
            "Memory in bytes (the server also reads sizes such as \"256MiB\"); at least 6MiB, at most `limits.max_memory`. No swap beyond it.",
        ),
    );
    limits.properties.insert(
        "cpus".into(),
        number(
            Type::Number,
            0.01,
            q.max.nano_cpus as f64 / 1e9,
            "CPUs, e.g. 0.5; at least 0.01, at most `limits.max_cpus`.",
        ),
    );
    limits.properties.insert(
        "pids".into(),
        number(
            Type::Integer,
            1.0,
            q.max.pids as f64,
            "Processes; at least 1, at most `limits.max_pids`.",
        ),
    );
}

/// A string without NUL, as env values and command arguments must be.
fn no_nul() -> utoipa::openapi::schema::ObjectBuilder {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .pattern(Some("^[^\\u0000]*$"))
}

/// `env` as the document declares it: the rules `check_env` checks (but
/// the 64 KiB in all, which JSON Schema cannot count).
fn env_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::Object))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::String))
                .pattern(Some("^[A-Za-z_][A-Za-z0-9_]*$")),
        ))
        .additional_properties(Some(AdditionalProperties::RefOr(no_nul().build().into())))
        .max_properties(Some(MAX_ENV_VARS))
        .description(Some(
            "Keys `^[A-Za-z_][A-Za-z0-9_]*$`; at most 256 variables and 64 KiB of keys and values in all. Values are secrets: shown as `***` later.",
        ))
        .build()
}

/// `cmd` as the document declares it.
fn cmd_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::ArrayBuilder;
    ArrayBuilder::new()
        .items(no_nul())
        .min_items(Some(1))
        .max_items(Some(MAX_CMD_ARGS))
        .description(Some(
            "Overrides the image's command: 1 to 256 arguments, no NUL, 64 KiB in all.",
        ))
        .build()
}

/// `ports` as the document declares it: the rules `validate` checks.
fn ports_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::Integer))
                .minimum(Some(1))
                .maximum(Some(65535)),
        )
        .max_items(Some(MAX_PORTS))
        .unique_items(true)
        .description(Some("Container ports (1–65535), at most 64, each once."))
        .build()
}

/// Ports as JSON numbers: `80` and `80.0` alike, since JSON Schema's
/// `integer` (what the document promises) is any number without a
/// fraction. Each is read on its own, so an error names its index.
fn ports<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u16>>, D::Error> {
    let raw = Option::<Vec<PortNumber>>::deserialize(d)?;
    Ok(raw.map(|v| v.into_iter().map(|p| p.0).collect()))
}

/// A whole JSON number, `512` or `512.0` (see [`ports`]).
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Option<i64>, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Option<i64>, E> {
            Ok(None)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Option<i64>, E> {
            i64::try_from(v)
                .map(Some)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Option<i64>, E> {
            Ok(Some(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Option<i64>, E> {
            // Within ±2^53 a whole f64 is exact.
            if v.fract() == 0.0 && v.abs() <= 9_007_199_254_740_992.0 {
                Ok(Some(v as i64))
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(V)
}

struct PortNumber(u16);

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortNumber;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port from 1 to 65535")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortNumber, E> {
                u16::try_from(v)
                    .map(PortNumber)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortNumber, E> {
                u16::try_from(v)
                    .map(PortNumber)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<PortNumber, E> {
                if v.fract() == 0.0 && (0.0..=65535.0).contains(&v) {
                    // In range and whole: exact.
                    Ok(PortNumber(v as u16))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn show(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

impl CreateInstance {
    /// Checks every rule; the first broken one is the answer. The spec's
    /// `build` is left for the caller to resolve: the id given is returned.
    pub fn validate(
        self,
        quotas: &Quotas,
    ) -> Result<(InstanceName, InstanceSpec, Option<String>), ApiError> {
        let name = InstanceName::parse(&self.name).map_err(|e| {
            ApiError::invalid("name", format!("name {:?} {}", show(&e.value), e.rule))
        })?;
        let image = match (self.image, &self.build) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "build",
                    "give either image or build, not both",
                ));
            }
            (None, None) => {
                return Err(ApiError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "missing_field",
                    "image is required (a base image by reference), or build (an uploaded context's id)",
                )
                .field("image"));
            }
            (Some(image), None) => {
                check_image(&image).map_err(|rule| {
                    ApiError::invalid(
                        "image",
                        format!(
                            "image {:?} is not a valid image reference: {rule}",
                            show(&image)
                        ),
                    )
                })?;
                image
            }
            (None, Some(b)) => {
                let ok = !b.is_empty()
                    && b.len() <= 64
                    && b.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
                if !ok {
                    return Err(ApiError::invalid(
                        "build",
                        format!("build {:?} is not a build id", show(b)),
                    ));
                }
                String::new()
            }
        };
        let limits = check_limits(self.limits.unwrap_or_default(), quotas)?;
        check_env(&self.env)?;
        if let Some(cmd) = &self.cmd {
            if cmd.is_empty() {
                return Err(ApiError::invalid(
                    "cmd",
                    "cmd must have at least one element when given (omit it for the image's own)",
                ));
            }
            if cmd.len() > MAX_CMD_ARGS {
                return Err(ApiError::invalid(
                    "cmd",
                    format!("cmd has {} elements; at most {MAX_CMD_ARGS}", cmd.len()),
                ));
            }
            if cmd.iter().map(String::len).sum::<usize>() > MAX_CMD_BYTES {
                return Err(ApiError::invalid("cmd", "cmd is over 64 KiB in all"));
            }
            if let Some(i) = cmd.iter().position(|a| a.contains('\0')) {
                return Err(ApiError::invalid(
                    format!("cmd[{i}]"),
                    format!("cmd[{i}] must not contain a NUL character"),
                ));
            }
        }
        let ports = self.ports.unwrap_or_default();
        if ports.len() > MAX_PORTS {
            return Err(ApiError::invalid(
                "ports",
                format!("{} ports given; at most {MAX_PORTS}", ports.len()),
            ));
        }
        let mut seen = HashSet::new();
        for (i, p) in ports.iter().enumerate() {
            if *p == 0 {
                return Err(ApiError::invalid(
                    format!("ports[{i}]"),
                    format!("ports[{i}] is 0; a port is 1 to 65535"),
                ));
            }
            if !seen.insert(*p) {
                return Err(ApiError::invalid(
                    format!("ports[{i}]"),
                    format!("port {p} is listed twice"),
                ));
            }
        }
        let restart = match &self.restart {
            None => RestartPolicy::No,
            Some(r) => r.parse::<RestartPolicy>().map_err(|e| {
                ApiError::invalid("restart", format!("restart {:?} {}", show(r), e.rule))
            })?,
        };
        Ok((
            name,
            InstanceSpec {
                image,
                build: None,
                env: self.env,
                cmd: self.cmd,
                ports,
                restart,
                limits: Some(limits),
            },
            self.build,
        ))
    }
}

/// The request's limits, each missing one from the defaults, each within
/// its range.
fn check_limits(r: LimitsRequest, q: &Quotas) -> Result<ResourceLimits, ApiError> {
    let memory_bytes = match r.memory {
        None => q.default.memory_bytes,
        Some(m) => {
            let max = u64::try_from(q.max.memory_bytes).unwrap_or(0);
            if m.bytes() < MIN_MEMORY || m.bytes() > max {
                return Err(ApiError::invalid(
                    "limits.memory",
                    format!("limits.memory {m} must be 6MiB to {}", ByteSize(max)),
                ));
            }
            i64::try_from(m.bytes()).unwrap_or(i64::MAX)
        }
    };
    let nano_cpus = match r.cpus {
        None => q.default.nano_cpus,
        Some(c) => {
            let max = q.max.nano_cpus as f64 / 1e9;
            if !c.is_finite() || c < 0.01 || c > max {
                return Err(ApiError::invalid(
                    "limits.cpus",
                    format!("limits.cpus {c} must be 0.01 to {max}"),
                ));
            }
            (c * 1e9).round() as i64
        }
    };
    let pids = match r.pids {
        None => q.default.pids,
        Some(p) => {
            if p < 1 || p > q.max.pids {
                return Err(ApiError::invalid(
                    "limits.pids",
                    format!("limits.pids {p} must be 1 to {}", q.max.pids),
                ));
            }
            p
        }
    };
    Ok(ResourceLimits {
        memory_bytes,
        nano_cpus,
        pids,
    })
}

/// Env keys, count and size. Values are never quoted back.
fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if env.len() > MAX_ENV_VARS {
        return Err(ApiError::invalid(
            "env",
            format!("env has {} variables; at most {MAX_ENV_VARS}", env.len()),
        ));
    }
    for (k, v) in env {
        let mut bytes = k.bytes();
        let ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(ApiError::invalid(
                format!("env.{}", show(k)),
                format!("env key {:?} must match ^[A-Za-z_][A-Za-z0-9_]*$", show(k)),
            ));
        }
        if v.contains('\0') {
            return Err(ApiError::invalid(
                format!("env.{k}"),
                format!("the value of env.{k} must not contain a NUL character"),
            ));
        }
    }
    let total: usize = env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ENV_BYTES {
        return Err(ApiError::invalid(
            "env",
            format!(
                "env keys and values are {total} bytes in all; at most {MAX_ENV_BYTES} (64 KiB)"
            ),
        ));
    }
    Ok(())
}

/// Docker's reference grammar: `[host[:port]/]path[:tag][@digest]`, where
/// the path is lowercase components joined by `/`. Returns the rule broken.
pub fn check_image(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    // An id is not a reference: the engine would take it (or any prefix of
    // it) for whatever image has it, another org's included.
    let hex64 = |t: &str| t.len() == 64 && t.bytes().all(|c| c.is_ascii_hexdigit());
    if s.starts_with("sha256:") || hex64(s) {
        return Err(
            "an image id is not accepted; name the image by reference (name[:tag] or name@sha256:digest)"
                .into(),
        );
    }
    if s.len() > 512 {
        return Err("it is over 512 characters".into());
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        check_digest(d)?;
    }
    // A tag is after the last ':' that follows the last '/' (a ':' before
    // it belongs to the registry's port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let mut b = t.bytes();
        let ok = t.len() <= 128
            && b.next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
            && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !ok {
            return Err(format!(
                "tag {t:?} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
            ));
        }
    }
    if name.len() > MAX_IMAGE_NAME {
        return Err(format!("the name is over {MAX_IMAGE_NAME} characters"));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        if first.contains('.')
            || first.contains(':')
            || first == "localhost"
            || first.bytes().any(|b| b.is_ascii_uppercase())
        {
            check_registry(first)?;
            parts.remove(0);
        }
    }
    for p in parts {
        if !path_component(p) {
            return Err(format!(
                "path component {p:?} must be lowercase letters and digits, separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

fn path_component(p: &str) -> bool {
    let b = p.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__' or a run of '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &p[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn check_registry(r: &str) -> Result<(), String> {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()))
    {
        return Err(format!("registry port {p:?} must be a number"));
    }
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    };
    if host.is_empty() || !host.split('.').all(label_ok) {
        return Err(format!("registry host {host:?} is not a valid host name"));
    }
    Ok(())
}

fn check_digest(d: &str) -> Result<(), String> {
    let bad = || format!("digest {d:?} must be algorithm:hex, e.g. sha256:<64 hex digits>");
    let (alg, hex) = d.split_once(':').ok_or_else(bad)?;
    let alg_ok = !alg.is_empty()
        && alg.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'+' | b'.' | b'_' | b'-')
        });
    let hex_ok = hex.len() >= 32 && hex.bytes().all(|c| c.is_ascii_hexdigit());
    if !alg_ok || !hex_ok || (alg == "sha256" && hex.len() != 64) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_image;

    #[test]
    fn docker_references_are_accepted() {
        for ok in [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "berth-test-base",
            "registry.example.com/team/app:v2",
            "localhost:5000/app",
            "my_app__x/a.b-c",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "Registry.Example.com/app",
        ] {
            assert!(check_image(ok).is_ok(), "{ok}: {:?}", check_image(ok));
        }
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "a//b",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "has space",
            "app@sha256:xyz",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:0123",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "app@sha256:0123",
            "host:port/app",
            "/app",
            "app/",
            &"a".repeat(300),
        ] {
            assert!(check_image(bad).is_err(), "{bad} accepted");
        }
    }
}
