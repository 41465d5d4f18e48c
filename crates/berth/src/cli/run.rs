//! `berth run`: creates an instance, then shows its flow live — one line
//! per step as it finishes (with its time), a spinner on the step running
//! when stdout is a terminal, a line per retry as it happens — and ends on
//! `running` with the IP or on the error's code, message and step. Ctrl-C
//! detaches (the flow goes on) and says how to follow it.
//!
//! The lines come from the flow's own trace (`GET /v1/flows/{id}`), read
//! again whenever the org's event stream says something happened to the
//! instance; the stream's `retry` messages are printed the moment they
//! arrive. Nothing is timed by sleeping: without a stream the command
//! waits on `/wait`, which answers when the flow ends.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Api, Socket, enc, next_message};
use super::output::{Out, between, cut, s, short, time};
use super::{Failure, trace};

/// What `berth run` asks for.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The base image, e.g. `busybox` or `berth-test-base:latest`.
    pub image: String,
    /// The instance's name (a DNS label: `^[a-z0-9][a-z0-9-]{0,62}$`).
    #[arg(long)]
    pub name: String,
    /// An environment variable, `KEY=VALUE` (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command and its arguments, instead of the image's (everything
    /// after `--cmd`).
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "ARG")]
    pub cmd: Option<Vec<String>>,
    /// What to do when the container exits.
    #[arg(long, value_name = "no|on-failure|always")]
    pub restart: Option<Restart>,
    /// Print the new instance's id and return at once.
    #[arg(long, short = 'd')]
    pub detach: bool,
}

/// `--restart`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Restart {
    No,
    OnFailure,
    Always,
}

impl Restart {
    fn as_str(self) -> &'static str {
        match self {
            Restart::No => "no",
            Restart::OnFailure => "on-failure",
            Restart::Always => "always",
        }
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!(
            "{s:?} is not KEY=VALUE (a key, '=', then the value)"
        )),
    }
}

/// What one `berth run` has shown so far.
struct Shown {
    /// Attempts already printed: (event id, worker, attempt).
    attempts: HashSet<(String, String, u64)>,
    /// Each step's most attempts, learnt from retries and progress.
    max: BTreeMap<String, u64>,
    /// The step running now and since when (for the spinner).
    current: Option<(String, Instant)>,
    /// A spinner is drawn on the current line.
    spinning: bool,
    frame: usize,
}

const FRAMES: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];

impl Shown {
    /// Prints a permanent line (over the spinner, if one is drawn).
    fn line(&mut self, text: &str) {
        if self.spinning {
            print!("\r\x1b[2K");
            self.spinning = false;
        }
        println!("{text}");
    }

    /// Removes the spinner's line, if one is drawn.
    fn clear(&mut self) {
        if self.spinning {
            print!("\r\x1b[2K");
            let _ = std::io::stdout().flush();
            self.spinning = false;
        }
    }

    fn spin(&mut self, out: &Out) {
        if !out.tty || out.json {
            return;
        }
        let Some((step, since)) = &self.current else {
            return;
        };
        self.frame = (self.frame + 1) % FRAMES.len();
        print!(
            "\r\x1b[2K{} {step} {}",
            out.yellow(FRAMES[self.frame]),
            out.dim(&short(since.elapsed()))
        );
        let _ = std::io::stdout().flush();
        self.spinning = true;
    }

    fn retry_line(
        &mut self,
        out: &Out,
        step: &str,
        message: &str,
        attempt: u64,
        delay: Option<Duration>,
    ) {
        let max = self
            .max
            .get(step)
            .map(|m| format!("/{m}"))
            .unwrap_or_default();
        let delay = delay
            .map(|d| format!(" in {}", short(d)))
            .unwrap_or_default();
        let text = format!(
            "{} {step}: {} — retry {}{max}{delay}",
            out.yellow("↻"),
            cut(message, 120),
            attempt + 1
        );
        self.line(&text);
    }
}

/// Runs `berth run`.
pub async fn run(api: &Api, out: Out, args: RunArgs) -> Result<(), Failure> {
    // Installed first: from here on Ctrl-C detaches instead of killing the
    // process mid-line.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Failure::local("client_error", format!("cannot listen for Ctrl-C: {e}")))?;
    // Opened before the create, so that no retry of the new flow can pass
    // before we listen. A stream refused (too many open) only costs the
    // live lines: the outcome is still waited for.
    let mut socket = if args.detach {
        None
    } else {
        match api.events("").await {
            Ok(s) => Some(s),
            Err(f) if f.code == "unreachable" => return Err(f),
            Err(f) if f.status == Some(401) => return Err(f),
            Err(f) => {
                eprintln!("note: no live progress ({}: {})", f.code, f.message);
                None
            }
        }
    };
    let mut body = json!({ "name": args.name, "image": args.image });
    if !args.env.is_empty() {
        body["env"] = json!(args.env.iter().cloned().collect::<BTreeMap<_, _>>());
    }
    if let Some(cmd) = &args.cmd {
        body["cmd"] = json!(cmd);
    }
    if let Some(r) = args.restart {
        body["restart"] = json!(r.as_str());
    }
    let accepted = api
        .call(Method::POST, "/v1/instances", Some(&body), None)
        .await?;
    let id = s(&accepted, "id").to_owned();
    let flow = s(&accepted, "flow_id").to_owned();
    if args.detach {
        if out.json {
            out.print_json(&accepted);
        } else {
            println!("{id}");
        }
        return Ok(());
    }
    if !out.json {
        println!(
            "{} {} ({})",
            out.bold("creating"),
            args.name,
            out.dim(&format!("id {id}, flow {flow}"))
        );
    }
    let started = Instant::now();
    let mut shown = Shown {
        attempts: HashSet::new(),
        max: BTreeMap::new(),
        current: None,
        spinning: false,
        frame: 0,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let spin = out.tty && !out.json && socket.is_some();
        // The trace first, then the instance: the spinner's step (from the
        // instance) is then never one the trace already showed finished.
        let trace = api.get(&format!("/v1/flows/{}", enc(&flow))).await?;
        if !out.json {
            print_attempts(&trace, &out, &mut shown);
        }
        let inst = api.get(&format!("/v1/instances/{}", enc(&id))).await?;
        if let Some(p) = inst.get("progress").filter(|p| !p.is_null())
            && let Some(m) = p.get("max_attempts").and_then(Value::as_u64)
        {
            shown.max.insert(s(p, "step").to_owned(), m);
        }
        let status = s(&inst, "status");
        if !out.json && matches!(status, "running" | "failed") {
            // What finished between the two reads.
            let trace = api.get(&format!("/v1/flows/{}", enc(&flow))).await?;
            print_attempts(&trace, &out, &mut shown);
        }
        shown.current = inst
            .get("progress")
            .filter(|p| !p.is_null())
            .map(|p| s(p, "step").to_owned())
            .map(|step| match shown.current.take() {
                Some((cur, since)) if cur == step => (cur, since),
                _ => (step, Instant::now()),
            });
        match s(&inst, "status") {
            "running" => {
                shown.current = None;
                if out.json {
                    out.print_json(&inst);
                } else {
                    let ip = inst.get("ip").and_then(Value::as_str).unwrap_or("-");
                    let text = format!(
                        "{} {}  ip {ip}  {}",
                        out.green("running"),
                        args.name,
                        out.dim(&short(started.elapsed()))
                    );
                    shown.line(&text);
                }
                return Ok(());
            }
            "failed" => {
                shown.current = None;
                shown.clear();
                if out.json {
                    out.print_json(&inst);
                }
                let e = inst.get("error").cloned().unwrap_or(Value::Null);
                return Err(Failure {
                    code: non_empty(s(&e, "code"), "instance_failed"),
                    message: non_empty(s(&e, "message"), "the instance failed"),
                    step: Some(s(&e, "step").to_owned()).filter(|s| !s.is_empty()),
                    status: None,
                    exit: 1,
                });
            }
            // An exited instance with a restart policy comes back by itself.
            "exited" if s(&inst, "restart") != "no" => {}
            st @ ("stopped" | "exited" | "deleting" | "deleted") => {
                shown.clear();
                return Err(Failure::local(
                    "state_unreachable",
                    format!(
                        "instance '{}' is {st}; it will not become running",
                        args.name
                    ),
                ));
            }
            _ => {}
        }
        // Until something happens to the instance.
        loop {
            tokio::select! {
                _ = sigint.recv() => {
                    shown.clear();
                    eprintln!(
                        "detached: the flow goes on without this command. Follow it with\n    berth wait {} --state running\nor see it with `berth trace {}`.",
                        args.name, args.name
                    );
                    return Err(Failure { exit: 130, ..Failure::local("detached", "") });
                }
                _ = tick.tick(), if spin => shown.spin(&out),
                m = wait_message(&mut socket, api, &id) => match m {
                    Wake::Retry(msg) => {
                        if !out.json {
                            print_retry(&msg, &out, &mut shown);
                        }
                    }
                    Wake::Changed => break,
                    Wake::Other => {}
                    Wake::Closed => {
                        socket = None;
                        break;
                    }
                },
            }
        }
    }
}

fn non_empty(s: &str, default: &str) -> String {
    if s.is_empty() {
        default.to_owned()
    } else {
        s.to_owned()
    }
}

/// Why the wait for news ended.
enum Wake {
    /// A `retry` message about the instance.
    Retry(Value),
    /// Something happened to it (or the flow may have ended).
    Changed,
    /// A message about another instance.
    Other,
    /// The stream ended: wait without it from now on.
    Closed,
}

async fn wait_message(socket: &mut Option<Socket>, api: &Api, id: &str) -> Wake {
    let Some(sock) = socket else {
        // No stream: `/wait` answers when the flow ends (or after its
        // timeout), either way a time to look again.
        let _ = api
            .call(
                Method::GET,
                &format!("/v1/instances/{}/wait?state=running&timeout=10s", enc(id)),
                None,
                Some(Duration::from_secs(20)),
            )
            .await;
        return Wake::Changed;
    };
    match next_message(sock).await {
        None | Some(Err(_)) => Wake::Closed,
        Some(Ok(m)) if s(&m, "instance_id") != id => Wake::Other,
        Some(Ok(m)) if s(&m, "kind") == "retry" => Wake::Retry(m),
        Some(Ok(_)) => Wake::Changed,
    }
}

fn print_retry(m: &Value, out: &Out, shown: &mut Shown) {
    let step = s(m, "step").to_owned();
    let attempt = m.get("attempt").and_then(Value::as_u64).unwrap_or(0);
    if let Some(max) = m.get("max_attempts").and_then(Value::as_u64) {
        shown.max.insert(step.clone(), max);
    }
    if !shown
        .attempts
        .insert((s(m, "id").to_owned(), step.clone(), attempt))
    {
        return;
    }
    let delay = match (time(s(m, "at")), time(s(m, "next_attempt_at"))) {
        (Some(a), Some(n)) => Some(between(a, n)),
        _ => None,
    };
    let message = m
        .get("error")
        .map(|e| s(e, "message").to_owned())
        .unwrap_or_default();
    shown.retry_line(out, &step, &message, attempt, delay);
}

/// Prints the attempts of the flow not printed yet: a finished step with
/// its time, a retry, a failure.
fn print_attempts(flow: &Value, out: &Out, shown: &mut Shown) {
    for (event, a) in trace::attempts(flow) {
        let worker = s(&a, "worker").to_owned();
        let n = a.get("attempt").and_then(Value::as_u64).unwrap_or(0);
        if let Some(m) = a.get("max_attempts").and_then(Value::as_u64) {
            shown.max.insert(worker.clone(), m);
        }
        if !shown.attempts.insert((event, worker.clone(), n)) {
            continue;
        }
        let took = a
            .get("duration_us")
            .and_then(Value::as_u64)
            .map(|us| short(Duration::from_micros(us)))
            .unwrap_or_default();
        let err = a.get("error").filter(|e| !e.is_null());
        let message = err
            .map(|e| format!("{}: {}", s(e, "code"), s(e, "message")))
            .unwrap_or_default();
        match s(&a, "outcome") {
            "ok" => {
                let text = format!("{} {worker}  {}", out.green("✓"), out.dim(&took));
                shown.line(&text);
            }
            "duplicate" => {}
            _ if a.get("next_delay_us").is_some_and(|d| !d.is_null()) => {
                let delay = a
                    .get("next_delay_us")
                    .and_then(Value::as_u64)
                    .map(Duration::from_micros);
                let message = err.map(|e| s(e, "message").to_owned()).unwrap_or_default();
                shown.retry_line(out, &worker, &message, n, delay);
            }
            outcome => {
                let text = format!(
                    "{} {worker}  {} {}",
                    out.red("✗"),
                    out.dim(&took),
                    out.red(&format!("{outcome} {}", cut(&message, 120)))
                );
                shown.line(&text);
            }
        }
    }
}
