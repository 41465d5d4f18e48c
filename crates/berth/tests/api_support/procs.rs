//! `berth serve` as a real child process: started with its arguments and
//! variables, ready once it prints its first `berth …` line, stopped with
//! SIGTERM or killed with SIGKILL, its log kept in a file.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{ADMIN, DEADLINE};

/// A `berth serve` child process; killed when dropped.
pub struct Served {
    child: Child,
    /// The first line it printed, and the API's address if it serves one.
    pub ready: String,
    log: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    pub fn addr(&self) -> &str {
        self.ready
            .strip_prefix("berth API listening on http://")
            .unwrap_or_else(|| panic!("not an API process: {}", self.ready))
    }

    /// Stops it as a service manager would (SIGTERM); its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        self.child.wait().unwrap()
    }

    /// Kills it where it stands (SIGKILL), as a crash or the OOM killer would.
    pub fn kill(mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `berth serve --listen 127.0.0.1:0 --role <role> <args>` on the data
/// directory `data` with the admin token and `env`, once it says it has
/// started.
pub fn serve(data: &Path, role: &str, args: &[&str], env: &[(&str, &str)]) -> Served {
    static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = data.with_extension(format!("{role}.{n}.log"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--role", role])
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("BERTH_ADMIN_TOKEN", ADMIN)
        .env("BERTH_LOG", "warn")
        // Another process's commits are found by the dispatcher's poll
        // (on SQLite): keep it short so that the test does not wait on it.
        .env("BERTH_BUS__POLL_INTERVAL", "50ms")
        .env_remove("BERTH_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.starts_with("berth ") {
                let _ = tx.send(line);
            }
        }
    });
    let ready = match rx.recv_timeout(DEADLINE) {
        Ok(line) => line,
        Err(_) => panic!(
            "berth serve --role {role} did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    };
    Served { child, ready, log }
}
