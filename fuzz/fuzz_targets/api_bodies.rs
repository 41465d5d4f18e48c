//! Fuzz target: the bodies clients send to the API, sent to the real Berth
//! (`App::build` on the simulated runtime, as `berth serve` boots it) over
//! loopback, and the build-context checks run on them directly. A body may
//! be refused, but with a 4xx in the API's error shape: never a 5xx, a
//! dropped connection or a panic.
//!
//! Input: the first byte picks the endpoint and the content type, the rest
//! is the body (see [`Kind`]).
#![no_main]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use berth_runtime::context;
use libfuzzer_sys::fuzz_target;

const ADMIN: &str = "fuzz-admin-token-0123456789";

/// Fast retries and a quick reconciler: the flows the fuzzer's valid
/// requests start end in the background without piling up.
const CONFIG: &str = r#"
listen = "127.0.0.1:0"

[runtime]
kind = "sim"

[bus]
shutdown_grace = "1s"

[workers.default]
max_attempts = 2
timeout = "5s"
backoff = { initial = "1ms", max = "2ms" }
"#;

/// What the body is, from the first byte's low bits.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `POST /v1/instances`, the body as sent.
    Instance,
    /// `POST /v1/orgs` with the admin token.
    Org,
    /// `POST /v1/builds`, the body as the tar archive.
    Tar,
    /// `POST /v1/builds` of a context whose only file is a Dockerfile with
    /// the body as its text: the tar checksums need not be found by chance.
    Dockerfile,
    /// `POST /v1/builds` of a context of files: the body is
    /// `path NUL contents NUL path NUL contents …`.
    Files,
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let kind = match first % 5 {
        0 => Kind::Instance,
        1 => Kind::Org,
        2 => Kind::Tar,
        3 => Kind::Dockerfile,
        _ => Kind::Files,
    };
    // The next bits: which Content-Type the client claims.
    let variant = (first / 5) % 4;
    let h = harness();
    match kind {
        Kind::Instance | Kind::Org => {
            let ct = [
                None,
                Some("application/json"),
                Some("application/json; charset=utf-8"),
                Some("text/plain"),
            ][usize::from(variant)];
            let (path, token) = match kind {
                Kind::Instance => ("/v1/instances", h.token.as_str()),
                _ => ("/v1/orgs", ADMIN),
            };
            h.post(path, token, ct, body);
        }
        Kind::Tar => tar(h, body, variant),
        Kind::Dockerfile => {
            if let Ok(t) = context::tar_of(&[("Dockerfile", body), ("app.txt", b"hi")]) {
                tar(h, &t, variant);
            }
        }
        Kind::Files => {
            let parts: Vec<&[u8]> = body.split(|&b| b == 0).collect();
            let mut files: Vec<(&str, &[u8])> = Vec::new();
            for pair in parts.chunks(2) {
                let (Ok(path), Some(contents)) = (std::str::from_utf8(pair[0]), pair.get(1)) else {
                    continue;
                };
                files.push((path, contents));
            }
            if let Ok(t) = context::tar_of(&files) {
                tar(h, &t, variant);
            }
        }
    }
});

/// A build context: checked here as the API and the image step check it,
/// then uploaded.
fn tar(h: &Harness, bytes: &[u8], variant: u8) {
    check_context(bytes);
    let ct = [
        Some("application/x-tar"),
        Some("application/x-tar"),
        None,
        Some("application/json"),
    ][usize::from(variant)];
    h.post("/v1/builds", &h.token, ct, bytes);
}

/// What the image step relies on: a context whose bases were read can be
/// pinned, and the pinned Dockerfile names no base but the pinned ids; the
/// context takes the pinned Dockerfile and gives it back.
fn check_context(bytes: &[u8]) {
    let Ok(dockerfile) = context::dockerfile_of(bytes) else {
        return;
    };
    let Ok(bases) = context::base_images(&dockerfile) else {
        return;
    };
    for b in &bases {
        let _ = berth_api::validate::check_image(b);
    }
    let pins: BTreeMap<String, String> = bases
        .iter()
        .enumerate()
        .map(|(i, b)| (b.clone(), format!("sha256:{i:064x}")))
        .collect();
    let pinned = context::pin(&dockerfile, &pins);
    match context::base_images(&pinned) {
        Ok(after) => {
            for b in &after {
                assert!(
                    pins.values().any(|id| id == b),
                    "base {b:?} survived pinning\n--- dockerfile\n{dockerfile}\n--- pinned\n{pinned}"
                );
            }
        }
        Err(e) => panic!(
            "the pinned Dockerfile is refused: {e}\n--- dockerfile\n{dockerfile}\n--- pinned\n{pinned}"
        ),
    }
    match context::with_dockerfile(bytes, &pinned) {
        Ok(again) => assert_eq!(
            context::dockerfile_of(&again).as_deref(),
            Ok(pinned.as_str()),
            "the context does not give back the Dockerfile it was given"
        ),
        // An entry the tar writer cannot write again (e.g. a long name in a
        // header it rebuilds) is refused, not mangled.
        Err(context::ContextError::NotTar(_)) => {}
        Err(e) => panic!("rewriting the context failed unexpectedly: {e}"),
    }
}

/// The running Berth and a keep-alive connection to it.
struct Harness {
    addr: SocketAddr,
    /// An org token for the org-scoped routes.
    token: String,
    /// `BERTH_FUZZ_SHOW` is set: print every answer.
    show: bool,
    conn: Mutex<Option<BufReader<TcpStream>>>,
    // Kept alive for the whole run: the runtime the app's tasks run on,
    // the app and its data directory.
    _rt: tokio::runtime::Runtime,
    _app: berth::App,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config =
            berth::Config::from_toml_str(CONFIG, "fuzz config", Vec::new()).expect("the config");
        config.data_dir = dir.path().join("data");
        config.admin_token = Some(berth::config::Secret(ADMIN.to_owned()));
        let app = rt
            .block_on(berth::App::build(config, "fuzz config"))
            .expect("berth starts");
        let mut h = Harness {
            addr: app.api_addr().expect("the default role serves the API"),
            token: String::new(),
            show: std::env::var_os("BERTH_FUZZ_SHOW").is_some(),
            conn: Mutex::new(None),
            _rt: rt,
            _app: app,
            _dir: dir,
        };
        let (status, text) = h.send(
            "/v1/orgs",
            ADMIN,
            Some("application/json"),
            br#"{"name":"fuzz"}"#,
        );
        assert_eq!(status, 201, "creating the fuzz org: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("the org's JSON");
        h.token = v["token"].as_str().expect("a token").to_owned();
        h
    })
}

impl Harness {
    /// Sends a body and checks the answer: below 500, and a refusal in the
    /// API's error shape.
    fn post(&self, path: &str, token: &str, content_type: Option<&str>, body: &[u8]) {
        let (status, text) = self.send(path, token, content_type, body);
        // To see what the seeds and a crash's input were answered:
        // `BERTH_FUZZ_SHOW=1 cargo fuzz run … <file>`.
        if self.show {
            eprintln!("POST {path} ({content_type:?}) → {status} {text}");
        }
        assert!(
            status < 500,
            "POST {path} answered {status} to a client's body: {text}\n--- body\n{}",
            String::from_utf8_lossy(body)
        );
        if status >= 400 {
            let v: serde_json::Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => panic!("POST {path} answered {status} with no JSON ({e}): {text}"),
            };
            assert!(
                v["error"]["code"].as_str().is_some_and(|c| !c.is_empty())
                    && v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                "POST {path} answered {status} outside the error shape: {text}"
            );
        }
    }

    /// One request on the kept connection (a new one if the server closed
    /// it: after a refused body, or when it sat idle past the header-read
    /// timeout while libFuzzer was busy elsewhere).
    fn send(
        &self,
        path: &str,
        token: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (u16, String) {
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: fuzz\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str("\r\n");
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        for fresh in [false, true] {
            if fresh || guard.is_none() {
                *guard = Some(self.connect());
            }
            let Some(conn) = guard.as_mut() else {
                continue;
            };
            match exchange(conn, head.as_bytes(), body) {
                Ok((status, text, keep)) => {
                    if !keep {
                        *guard = None;
                    }
                    return (status, text);
                }
                // A kept connection the server had closed: once more on a
                // new one. On a new one, the server dropped the request.
                Err(_) if !fresh => {}
                Err(e) => panic!(
                    "POST {path}: no answer ({e})\n--- body\n{}",
                    String::from_utf8_lossy(body)
                ),
            }
        }
        unreachable!("the second attempt answers or panics")
    }

    fn connect(&self) -> BufReader<TcpStream> {
        let s = TcpStream::connect(self.addr).expect("connecting to berth");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("a read timeout");
        s.set_nodelay(true).expect("TCP_NODELAY");
        BufReader::new(s)
    }
}

/// Writes one request, reads its answer: status, body, and whether the
/// connection stays open.
fn exchange(
    conn: &mut BufReader<TcpStream>,
    head: &[u8],
    body: &[u8],
) -> std::io::Result<(u16, String, bool)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    {
        let w = conn.get_mut();
        w.write_all(head)?;
        w.write_all(body)?;
        w.flush()?;
    }
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the status line",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let (mut length, mut chunked, mut keep) = (None, false, true);
    loop {
        let mut h = String::new();
        if conn.read_line(&mut h)? == 0 {
            return Err(bad("closed in the headers"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => keep = !value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            conn.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| bad("chunk size"))?;
            let mut chunk = vec![0; n + 2];
            conn.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        conn.read_exact(&mut out)?;
    } else {
        conn.read_to_end(&mut out)?;
        keep = false;
    }
    Ok((status, String::from_utf8_lossy(&out).into_owned(), keep))
}
