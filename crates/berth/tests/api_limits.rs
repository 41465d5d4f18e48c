//! What a client can hold, on the real server over real sockets: 1,500
//! unfinished requests against `berth serve` limited to 1,024 descriptors
//! (issue 9's acceptance test), the header-read timeout on silent and idle
//! connections, room made past the connection cap, per-org caps on streams
//! and waits, paging, the logs' `tail` bound, body, WebSocket message, URI
//! and header limits, and the validation of the `[api]` keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use api_support::{ADMIN, DEADLINE, TestApp, poll_until, spawn, spawn_with};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Reads until the server closes the connection (EOF or reset), failing at
/// `deadline`; returns what was read.
async fn closed_by_server(s: &mut TcpStream, deadline: Instant) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!(
                "the server did not close the connection before the deadline (read {:?})",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One `GET /healthz` on a fresh connection, by hand (the client must not
/// retry or pool behind our back); `true` on a 200.
async fn healthz_once(addr: std::net::SocketAddr, within: Duration) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.ok()?;
        Some(resp.starts_with(b"HTTP/1.1 200"))
    };
    matches!(tokio::time::timeout(within, attempt).await, Ok(Some(true)))
}

/// `berth serve`, a child process; killed when dropped.
struct Served {
    child: Child,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `berth serve --runtime sim` with its descriptor limit set to
/// `nofile` (soft and hard) by the shell's `ulimit` before `exec`.
fn serve_with_nofile(nofile: u64) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("berth.log");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--runtime", "sim", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("BERTH_ADMIN_TOKEN", ADMIN)
        .env("BERTH_LOG", "warn")
        .env_remove("BERTH_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // `berth serve` prints its address once it listens.
    let rx = api_support::listening_address(child.stdout.take().unwrap());
    let addr = match rx.recv_timeout(DEADLINE) {
        Ok(a) => a.parse::<std::net::SocketAddr>().unwrap(),
        Err(_) => panic!(
            "berth serve did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    };
    Served {
        child,
        addr,
        log,
        _dir: dir,
    }
}

/// Raises this process's soft descriptor limit to at least `n` (within the
/// hard limit, which an unprivileged process cannot pass).
fn raise_own_nofile(n: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    if cur.current.is_none_or(|c| c >= n) {
        return;
    }
    let hard = cur.maximum;
    assert!(
        hard.is_none_or(|h| h >= n),
        "this test needs {n} descriptors; the hard limit is {hard:?}"
    );
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(n),
            maximum: hard,
        },
    )
    .unwrap();
}

/// Issue 9's acceptance test: 1,500 connections that never finish their
/// request head (half send nothing at all, half a partial head) against a
/// server whose descriptor limit is 1,024. `/healthz` answers within 15 s,
/// and the server closes every held connection on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_hundred_unfinished_requests_against_1024_descriptors() {
    raise_own_nofile(1_500 + 256);
    let server = serve_with_nofile(1_024);
    let pid = server.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        nofile.split_whitespace().filter(|w| *w == "1024").count() == 2,
        "the server runs with soft = hard = 1024: {nofile}"
    );

    // The cap follows the descriptor limit: 1024 less the reserve of 256.
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("berth_api_connections_max "),
        "the binary at CARGO_BIN_EXE_berth is not this tree's build (a target \
         directory shared with another checkout?)"
    );
    assert!(
        metrics.contains("berth_api_connections_max 768"),
        "{metrics}"
    );

    let mut held = Vec::with_capacity(1_500);
    for i in 0..1_500 {
        let mut s = match tokio::time::timeout(DEADLINE, TcpStream::connect(server.addr)).await {
            Ok(Ok(s)) => s,
            other => panic!(
                "connection {i}: {other:?}; server log: {}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            ),
        };
        if i % 2 == 1 {
            // A head that never ends; a write may fail if the server has
            // already closed this one to make room.
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: berth\r\nX-Slow: 1\r\n")
                .await;
        }
        held.push(s);
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(15);
    loop {
        if healthz_once(server.addr, Duration::from_secs(2)).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz did not answer within 15 s of 1,500 held connections"
        );
    }
    let answered_after = t0.elapsed();

    // The server closes every held connection: the oldest to make room,
    // the others when their header-read timeout (5 s) runs out.
    let closed_by = Instant::now() + Duration::from_secs(5) + DEADLINE;
    let reads = held.iter_mut().map(|s| closed_by_server(s, closed_by));
    let leftovers = futures::future::join_all(reads).await;
    // Nothing was answered on them: no request was ever finished.
    assert!(
        leftovers
            .iter()
            .all(|r| r.is_empty() || r.starts_with(b"HTTP/1.1 503")),
        "a held connection got an answer"
    );

    // The server never ran out of descriptors.
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        !log.contains("cannot accept connections"),
        "accept ran out of descriptors: {log}"
    );
    assert!(
        healthz_once(server.addr, DEADLINE).await,
        "still answering afterwards"
    );
    assert!(
        answered_after < Duration::from_secs(15),
        "{answered_after:?}"
    );
}

/// An instance whose flow stays at its first step (the engine is taken
/// away), so that a wait for `running` holds; returns its id.
async fn stuck(t: &TestApp, tok: &str) -> String {
    let sim = t.app.sim.clone().unwrap();
    sim.set_available(&berth_runtime::HostId::new("local"), false);
    let a = t
        .post(
            "/v1/instances",
            tok,
            json!({ "name": "stuck", "image": "busybox" }),
        )
        .await;
    a.ok(202)["id"].as_str().unwrap().to_owned()
}

/// The test application with `[api]` keys set (through `BERTH_API__…`).
async fn limited(api: &[(&str, &str)]) -> TestApp {
    let env = api
        .iter()
        .map(|(k, v)| {
            (
                format!("BERTH_API__{}", k.to_ascii_uppercase()),
                (*v).to_owned(),
            )
        })
        .collect();
    spawn_with(api_support::CONFIG, env).await
}

#[tokio::test]
async fn silent_and_idle_connections_close_on_the_header_timeout() {
    let t = limited(&[("header_read_timeout", "1s")]).await;
    let addr = t.app.api_addr().unwrap();
    let deadline = Instant::now() + DEADLINE;
    // Not a byte sent.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // A head sent a byte at a time still has one timeout for all of it.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    // A keep-alive connection idle after its request.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: berth\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "answered first");
    let t0 = Instant::now();
    assert!(closed_by_server(&mut silent, deadline).await.is_empty());
    for _ in 0..3 {
        // Still trickling: the timeout counts from the first byte.
        let _ = slow.write_all(b"X").await;
    }
    assert!(closed_by_server(&mut slow, deadline).await.is_empty());
    assert!(closed_by_server(&mut idle, deadline).await.is_empty());
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    t.shutdown().await;
}

#[tokio::test]
async fn past_the_connection_cap_the_oldest_waiting_connection_makes_room() {
    let t = limited(&[("max_connections", "8"), ("max_waits_per_org", "1")]).await;
    let addr = t.app.api_addr().unwrap();
    let deadline = Instant::now() + DEADLINE;
    let (_, tok) = t.org("acme").await;
    let id = stuck(&t, &tok).await;
    // A connection in the middle of a request (a wait) is never the one
    // closed to make room. The wait holds the org's only wait slot once it
    // is being answered, which a probe sees as 429; a probe that held the
    // slot first makes the wait itself 429, and it is sent again.
    let request = format!(
        "GET /v1/instances/{id}/wait?timeout=3s HTTP/1.1\r\nHost: berth\r\n\
         Authorization: Bearer {tok}\r\nConnection: close\r\n\r\n"
    );
    let probe = format!("/v1/instances/{id}/wait?timeout=0s");
    let end = Instant::now() + DEADLINE;
    let mut busy = 'sent: loop {
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(request.as_bytes()).await.unwrap();
        loop {
            assert!(Instant::now() < end, "the wait never got under way");
            if t.get(&probe, &tok).await.status.as_u16() == 429 {
                break 'sent busy;
            }
            let mut buf = [0u8; 64];
            if busy.try_read(&mut buf).is_ok_and(|n| n > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mut waiting = Vec::new();
    for _ in 0..8 {
        waiting.push(TcpStream::connect(addr).await.unwrap());
    }
    // Each new connection is served at once, long before any header
    // timeout (5 s): the oldest connection waiting for a head makes room.
    let t0 = Instant::now();
    for _ in 0..8 {
        assert!(healthz_once(addr, DEADLINE).await);
    }
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(closed_by_server(&mut waiting[0], deadline).await.is_empty());
    let answer = closed_by_server(&mut busy, deadline).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "the wait ran to its end: {answer}"
    );
    t.shutdown().await;
}

/// Opens the org's event stream; the upgrade's status when refused.
async fn try_ws(t: &TestApp, token: &str) -> Result<api_support::Ws, u16> {
    let mut req = format!("{}/v1/events", t.ws_base)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn streams_past_the_org_cap_are_429_until_one_closes() {
    let t = limited(&[("max_streams_per_org", "2")]).await;
    let (_, acme) = t.org("acme").await;
    let (_, other) = t.org("other").await;
    let a1 = t.ws(&acme, "").await;
    let _a2 = t.ws(&acme, "").await;
    assert_eq!(try_ws(&t, &acme).await.err(), Some(429));
    // The refusal in the API's shape, with Retry-After.
    let a = t
        .http
        .get(t.url("/v1/events"))
        .bearer_auth(&acme)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(a.headers()["retry-after"], "1");
    let body: Value = a.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api.max_streams_per_org")
    );
    // Another org is not affected.
    let _o = t.ws(&other, "").await;
    // A follower of logs counts as a stream.
    let inst = t.running(&other, "web").await;
    let id = inst["id"].as_str().unwrap();
    let _follow = t
        .http
        .get(t.url(&format!("/v1/instances/{id}/logs?follow=true")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(try_ws(&t, &other).await.err(), Some(429));
    // Closing one gives its slot back.
    let mut a1 = a1;
    a1.close(None).await.unwrap();
    drop(a1);
    let again = poll_until("acme's slot to come back", || async {
        try_ws(&t, &acme).await.ok()
    })
    .await;
    drop(again);
    t.shutdown().await;
}

#[tokio::test]
async fn waits_past_the_org_cap_are_429_write_nothing_and_end_with_the_client() {
    let t = limited(&[("max_waits_per_org", "1")]).await;
    let (_, tok) = t.org("acme").await;
    let id = stuck(&t, &tok).await;
    let probe = format!("/v1/instances/{id}/wait?timeout=0s");
    // One long wait, on a connection of its own that the test will drop.
    let http = reqwest::Client::new();
    let url = t.url(&format!("/v1/instances/{id}/wait?timeout=5m"));
    let auth = tok.clone();
    let waiter = tokio::spawn(async move {
        loop {
            // A probe below may hold the slot for a moment: try again.
            let r = http.get(&url).bearer_auth(&auth).send().await;
            if !matches!(&r, Ok(resp) if resp.status().as_u16() == 429) {
                return r;
            }
        }
    });
    let refused = poll_until("the long wait to hold the org's slot", || async {
        let a = t.get(&probe, &tok).await;
        (a.status.as_u16() == 429).then_some(a)
    })
    .await;
    refused.error(429, "too_many_requests");
    assert_eq!(refused.headers["retry-after"], "1");
    // A create that would wait is refused before it writes anything.
    let before = t.count("instances").await;
    let a = t
        .post(
            "/v1/instances?wait=true",
            &tok,
            json!({ "name": "second", "image": "busybox" }),
        )
        .await;
    a.error(429, "too_many_requests");
    assert_eq!(t.count("instances").await, before, "nothing created");
    // An action too, which then does nothing.
    let a = t
        .call(
            Method::DELETE,
            &format!("/v1/instances/{id}?wait=true"),
            Some(&tok),
            None,
        )
        .await;
    a.error(429, "too_many_requests");
    assert_eq!(
        t.get(&format!("/v1/instances/{id}"), &tok).await.json["status"],
        "requested"
    );
    // Without waiting, the org is not limited.
    t.post(
        "/v1/instances",
        &tok,
        json!({ "name": "third", "image": "busybox" }),
    )
    .await
    .ok(202);
    // The waiting client leaves: its slot comes back.
    waiter.abort();
    let _ = waiter.await;
    let a = poll_until("the slot to come back", || async {
        let a = t.get(&probe, &tok).await;
        (a.status.as_u16() != 429).then_some(a)
    })
    .await;
    a.error(408, "wait_timeout");
    t.shutdown().await;
}

#[tokio::test]
async fn the_list_pages_without_gaps_or_duplicates() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let (_, other) = t.org("other").await;
    let mut created = Vec::new();
    for i in 0..7 {
        let a = t
            .post(
                "/v1/instances",
                &tok,
                json!({ "name": format!("web-{i}"), "image": "busybox" }),
            )
            .await;
        created.push(a.ok(202)["id"].as_str().unwrap().to_owned());
    }
    let theirs = t
        .post(
            "/v1/instances",
            &other,
            json!({ "name": "theirs", "image": "busybox" }),
        )
        .await
        .ok(202)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut path = "/v1/instances?limit=3".to_owned();
    loop {
        let a = t.get(&path, &tok).await;
        let page = a.ok(200);
        let items = page["instances"].as_array().unwrap();
        sizes.push(items.len());
        seen.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_owned()));
        match &page["next"] {
            Value::Null => break,
            Value::String(next) => path = format!("/v1/instances?limit=3&after={next}"),
            other => panic!("next is {other}"),
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen, created, "every instance once, in creation order");
    // One page by default, with `next` null.
    let all = t.get("/v1/instances", &tok).await;
    assert_eq!(all.ok(200)["instances"].as_array().unwrap().len(), 7);
    assert_eq!(all.json["next"], Value::Null);
    // Bounds.
    t.get("/v1/instances?limit=1001", &tok)
        .await
        .bad(422, "invalid_value", "limit");
    t.get("/v1/instances?limit=0", &tok)
        .await
        .bad(422, "invalid_value", "limit");
    t.get("/v1/instances?limit=ten", &tok)
        .await
        .bad(400, "invalid_parameter", "limit");
    t.get("/v1/instances?limit=1000", &tok).await.ok(200);
    // Another org's instance as a cursor answers exactly like nonsense.
    let foreign = t.get(&format!("/v1/instances?after={theirs}"), &tok).await;
    let nonsense = t.get("/v1/instances?after=nonsense", &tok).await;
    // A cursor is an instance, so one that names none is not found (404).
    foreign.bad(404, "not_found", "after");
    assert_eq!(foreign.text, nonsense.text);
    t.shutdown().await;
}

#[tokio::test]
async fn logs_tail_is_bounded_and_the_logs_stream() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let inst = t.running(&tok, "web").await;
    let id = inst["id"].as_str().unwrap();
    t.get(&format!("/v1/instances/{id}/logs?tail=10001"), &tok)
        .await
        .bad(422, "invalid_value", "tail");
    t.get(&format!("/v1/instances/{id}/logs?tail=-1"), &tok)
        .await
        .bad(400, "invalid_parameter", "tail");
    let a = t
        .http
        .get(t.url(&format!("/v1/instances/{id}/logs?tail=10000")))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status().as_u16(), 200);
    // Sent as a stream (chunked), not as one buffered body.
    assert!(a.headers().get("content-length").is_none());
    assert_eq!(a.headers()["transfer-encoding"], "chunked");
    a.text().await.unwrap();
    t.shutdown().await;
}

#[tokio::test]
async fn an_over_size_body_is_413_in_the_error_shape() {
    let t = spawn().await;
    let name = "a".repeat(1024 * 1024);
    let a = t
        .call(
            Method::POST,
            "/v1/orgs",
            Some(ADMIN),
            Some(json!({ "name": name })),
        )
        .await;
    a.bad(413, "payload_too_large", "body");
    t.shutdown().await;
}

#[tokio::test]
async fn a_websocket_message_over_64_kib_closes_the_stream() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let mut ws = t.ws(&tok, "").await;
    // Small messages mean nothing and change nothing.
    ws.send(Message::text("x".repeat(1024))).await.unwrap();
    ws.send(Message::text("x".repeat(64 * 1024 + 1)))
        .await
        .unwrap();
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
    .expect("the server closes the stream");
    assert_eq!(end, Some(1009), "closed as too big");
    t.shutdown().await;
}

#[tokio::test]
async fn over_long_uris_and_headers_answer_in_the_error_shape() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let long = format!("/v1/instances?all={}", "a".repeat(9 * 1024));
    let a = t.get(&long, &tok).await;
    a.bad(414, "uri_too_long", "uri");
    // Also where no route would match.
    let a = t.get(&format!("/{}", "x".repeat(9 * 1024)), &tok).await;
    a.bad(414, "uri_too_long", "uri");
    let a = t
        .http
        .get(t.url("/v1/instances"))
        .bearer_auth(&tok)
        .header("x-big", "b".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(a.status().as_u16(), 431);
    let body: Value = a.json().await.unwrap();
    assert_eq!(body["error"]["code"], "headers_too_large");
    // Past what the server buffers of a head, hyper answers 431 itself
    // (with no body), and closes by the header timeout at the latest.
    let mut s = TcpStream::connect(t.app.api_addr().unwrap()).await.unwrap();
    let _ = s
        .write_all(
            format!(
                "GET / HTTP/1.1\r\nHost: berth\r\nX-Huge: {}\r\n\r\n",
                "h".repeat(80 * 1024)
            )
            .as_bytes(),
        )
        .await;
    let resp = closed_by_server(&mut s, Instant::now() + DEADLINE).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    // The server is fine.
    assert!(healthz_once(t.app.api_addr().unwrap(), DEADLINE).await);
    t.shutdown().await;
}

#[test]
fn the_api_limits_are_validated_naming_their_source() {
    for (var, value, rule) in [
        (
            "BERTH_API__HEADER_READ_TIMEOUT",
            "11s",
            "at most 10s (got 11s)",
        ),
        ("BERTH_API__HEADER_READ_TIMEOUT", "0s", "more than 0"),
        ("BERTH_API__MAX_CONNECTIONS", "0", "at least 1"),
        ("BERTH_API__MAX_STREAMS_PER_ORG", "0", "at least 1"),
        ("BERTH_API__MAX_WAITS_PER_ORG", "0", "at least 1"),
    ] {
        let err = berth::Config::load(None, vec![(var.to_owned(), value.to_owned())])
            .unwrap_err()
            .to_string();
        let key = var
            .strip_prefix("BERTH_")
            .unwrap()
            .to_ascii_lowercase()
            .replace("__", ".");
        assert!(
            err.contains(var) && err.contains(&key) && err.contains(rule),
            "{err}"
        );
    }
    let c = berth::Config::load(
        None,
        vec![(
            "BERTH_API__HEADER_READ_TIMEOUT".to_owned(),
            "10s".to_owned(),
        )],
    )
    .unwrap();
    assert_eq!(c.api.header_read_timeout, Duration::from_secs(10));
}
