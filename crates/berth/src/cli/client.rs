//! The HTTP API as the CLI sees it: where the server is and which token to
//! send (flags, then `BERTH_URL`/`BERTH_TOKEN`, then the file `berth login`
//! wrote), JSON requests, the API's errors as [`Failure`]s and the event
//! stream's WebSocket.

use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::Failure;
use super::creds::Credentials;

/// Where the API is when nothing says otherwise (`berth serve`'s default).
pub const DEFAULT_URL: &str = "http://127.0.0.1:7077";

/// How long one request may take, but for those that wait or follow.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one server, as one token.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Api {
    // Never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// The event stream's socket.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Api {
    /// The server and token from `BERTH_URL`/`BERTH_TOKEN`, else the login
    /// file, else the default URL and no token.
    pub fn from_env() -> Result<Api, Failure> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let (url, token) = (env("BERTH_URL"), env("BERTH_TOKEN"));
        // The file is read only for what the environment does not say, so
        // that a damaged one cannot stop a shell that sets both.
        let saved = if url.is_none() || token.is_none() {
            Credentials::load()?
        } else {
            None
        };
        let url = url
            .or_else(|| saved.as_ref().map(|c| c.url.clone()))
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let token = token.or_else(|| saved.and_then(|c| c.token));
        Api::new(&url, token)
    }

    pub fn new(url: &str, token: Option<String>) -> Result<Api, Failure> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Failure::usage(format!(
                "BERTH_URL must start with http:// or https:// (got {base:?})"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| {
                Failure::local("client_error", format!("cannot make an HTTP client: {e}"))
            })?;
        Ok(Api { base, token, http })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// Sends a request and reads its JSON answer; an error answer is the
    /// API's code and message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<Value, Failure> {
        let mut r = self
            .request(method, path)
            .timeout(timeout.unwrap_or(REQUEST_TIMEOUT));
        if let Some(b) = body {
            r = r.json(b);
        }
        let resp = r.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.unreachable(e))?;
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(json);
        }
        Err(Failure::from_answer(status.as_u16(), &json, &text))
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(Method::GET, path, None, None).await
    }

    /// A streamed plain-text answer (logs), for the caller to read chunks of.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, Failure> {
        let resp = self
            .request(Method::GET, path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Err(Failure::from_answer(status, &json, &text))
    }

    /// Opens the org's event stream (`query` without the `?`).
    pub async fn events(&self, query: &str) -> Result<Socket, Failure> {
        let ws_base = if let Some(rest) = self.base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = self.base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            self.base.clone()
        };
        let url = if query.is_empty() {
            format!("{ws_base}/v1/events")
        } else {
            format!("{ws_base}/v1/events?{query}")
        };
        let mut req = url
            .into_client_request()
            .map_err(|e| Failure::usage(format!("BERTH_URL does not make a WebSocket URL: {e}")))?;
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| Failure::usage("BERTH_TOKEN is not a valid header value"))?;
            req.headers_mut().insert("authorization", v);
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let text = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                Err(Failure::from_answer(status, &json, &text))
            }
            Err(e) => Err(Failure::local(
                "unreachable",
                format!("cannot open the event stream at {}: {e}", self.base),
            )),
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> Failure {
        let what = if e.is_timeout() {
            "did not answer in time"
        } else if e.is_connect() {
            "cannot be reached"
        } else {
            "failed"
        };
        Failure::local(
            "unreachable",
            format!("the berth API at {} {what}: {e}", self.base),
        )
    }
}

/// The next message of the stream as JSON; `None` when it closed.
pub async fn next_message(socket: &mut Socket) -> Option<Result<Value, Failure>> {
    loop {
        return match socket.next().await? {
            Ok(Message::Text(t)) => match serde_json::from_str(t.as_str()) {
                Ok(v) => Some(Ok(v)),
                // Not ours to judge: skip what does not parse.
                Err(_) => continue,
            },
            Ok(Message::Close(frame)) => {
                let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                if reason.is_empty() {
                    None
                } else {
                    Some(Err(Failure::local(
                        "stream_closed",
                        format!("the server closed the event stream: {reason}"),
                    )))
                }
            }
            Ok(_) => continue,
            Err(e) => Some(Err(Failure::local(
                "stream_closed",
                format!("the event stream broke: {e}"),
            ))),
        };
    }
}

/// `s` made safe for a URL's path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
