//! How the engine's failures become [`RuntimeError`]s the worker framework
//! can act on: unreachable engines, 5xx answers and timeouts are retryable
//! (`Unavailable`, `Timeout`); a 404 names what is missing (`NotFound`), a
//! 409 a name that is taken (`Conflict`), and any other refusal (400 and the
//! remaining 4xx, bad references, bad requests) is `Invalid`, which is fatal.
//! Also the error of [`crate::DockerRuntime::connect`].

use std::error::Error as StdError;

use berth_runtime::{HostId, RuntimeError};
use bollard::errors::Error as BollardError;

/// No engine answered (or answered in a way Berth cannot use) when the
/// runtime was constructed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no Docker engine at {endpoint}: {message}")]
pub struct ConnectError {
    /// The host the endpoint was configured for.
    pub host: HostId,
    /// The endpoint as configured (`unix:///var/run/docker.sock`, `tcp://…`).
    pub endpoint: String,
    pub message: String,
}

impl From<ConnectError> for RuntimeError {
    fn from(e: ConnectError) -> Self {
        let message = e.to_string();
        RuntimeError::Unavailable {
            host: e.host,
            message,
        }
    }
}

/// The HTTP status of an engine refusal, if the error is one.
pub(crate) fn status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own message of a refusal (what `docker` would print).
pub(crate) fn server_message(e: &BollardError) -> Option<&str> {
    match e {
        BollardError::DockerResponseServerError { message, .. } => Some(message),
        _ => None,
    }
}

/// An error and its causes, `a: b: c`: bollard's own messages for transport
/// failures ("Error in the hyper legacy client") say little without the
/// underlying OS error.
pub(crate) fn chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

/// Classifies a failed engine call `op` about `what` named `name` (used for
/// 404 and 409, whose meaning depends on what the call was about).
pub(crate) fn map(
    host: &HostId,
    op: &str,
    what: &str,
    name: &str,
    e: BollardError,
) -> RuntimeError {
    let host = host.clone();
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            404 => RuntimeError::NotFound {
                host,
                what: what.to_owned(),
                name: name.to_owned(),
            },
            409 => RuntimeError::Conflict {
                host,
                what: what.to_owned(),
                name: name.to_owned(),
            },
            // 5xx: the engine failed, not the request; it may pass.
            500..=599 => RuntimeError::Unavailable {
                host,
                message: format!("{op}: engine answered {status_code}: {message}"),
            },
            _ => RuntimeError::Invalid {
                host,
                message: format!("{op}: engine refused ({status_code}): {message}"),
            },
        },
        BollardError::RequestTimeoutError => RuntimeError::Timeout {
            host,
            op: op.to_owned(),
        },
        BollardError::IOError { ref err } if err.kind() == std::io::ErrorKind::TimedOut => {
            RuntimeError::Timeout {
                host,
                op: op.to_owned(),
            }
        }
        // The request itself could not be formed (a name that cannot go in a
        // URL, an unsupported endpoint): retrying cannot help.
        BollardError::URLEncodedError { .. }
        | BollardError::URLParseError { .. }
        | BollardError::InvalidURIError { .. }
        | BollardError::InvalidURIPartsError { .. }
        | BollardError::HttpClientError { .. }
        | BollardError::UnsupportedURISchemeError { .. }
        | BollardError::APIVersionParseError {} => RuntimeError::Invalid {
            host,
            message: format!("{op}: {}", chain(&e)),
        },
        // Connection refused or reset, a missing socket, a body cut short by
        // an engine restart, an unreadable answer: all may pass, and
        // ARCHITECTURE.md's rule is that unknown failures are retryable
        // (max_attempts bounds the cost of being wrong).
        other => RuntimeError::Unavailable {
            host,
            message: format!("{op}: {}", chain(&other)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status_code: u16, message: &str) -> BollardError {
        BollardError::DockerResponseServerError {
            status_code,
            message: message.to_owned(),
        }
    }

    fn host() -> HostId {
        HostId::new("local")
    }

    #[test]
    fn statuses_map_to_their_classes() {
        let e = map(
            &host(),
            "build_image",
            "image",
            "b:1",
            server(404, "No such image"),
        );
        assert_eq!(e.code(), "image_not_found");
        assert!(!e.is_retryable());
        let e = map(
            &host(),
            "create_container",
            "container",
            "c",
            server(409, "in use"),
        );
        assert_eq!(e.code(), "conflict");
        let e = map(
            &host(),
            "find_image",
            "image",
            "B",
            server(400, "invalid reference"),
        );
        assert_eq!(e.code(), "invalid_request");
        assert!(!e.is_retryable());
        let e = map(
            &host(),
            "start_container",
            "container",
            "c",
            server(500, "boom"),
        );
        assert!(e.is_retryable());
        assert!(e.to_string().contains("boom"), "{e}");
        let e = map(&host(), "ping", "engine", "local", server(503, "down"));
        assert_eq!(e.code(), "engine_unavailable");
    }

    #[test]
    fn transport_failures_are_retryable() {
        let e = map(
            &host(),
            "ping",
            "engine",
            "local",
            BollardError::RequestTimeoutError,
        );
        assert_eq!(e.code(), "engine_timeout");
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = map(
            &host(),
            "ping",
            "engine",
            "local",
            BollardError::IOError { err: refused },
        );
        assert_eq!(e.code(), "engine_unavailable");
        assert!(e.to_string().contains("refused"), "{e}");
        let e = map(
            &host(),
            "ping",
            "engine",
            "local",
            BollardError::SocketNotFoundError("/nope".into()),
        );
        assert!(e.is_retryable());
    }

    #[test]
    fn connect_errors_read_well() {
        let e = ConnectError {
            host: host(),
            endpoint: "unix:///var/run/docker.sock".into(),
            message: "connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "no Docker engine at unix:///var/run/docker.sock: connection refused"
        );
        assert!(RuntimeError::from(e).is_retryable());
    }
}
