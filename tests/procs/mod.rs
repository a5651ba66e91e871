//! The binary as child processes (the proxy and `sim` replicas), for the tests that need real
//! processes: in other network namespaces, or killed and restarted, or measured from `/proc`.
//!
//! Readiness is the start-up log line of each process, never a sleep; every wait is bounded;
//! a child is killed and reaped when its guard drops, a panicking test included.
#![allow(dead_code)] // each test binary uses part of it

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::sync::mpsc;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_kbs-affinity-proxy");
/// The proxy's start-up line, the readiness signal.
pub const PROXY_READY: &str = "kbs-affinity-proxy serving";
/// The simulated replica's start-up line.
pub const SIM_READY: &str = "simulated KBS replica serving";
/// The longest a process gets to log its start-up line: debug builds on a loaded machine.
const START_LIMIT: Duration = Duration::from_secs(30);
/// The longest a request to an admin port may take.
const ADMIN_LIMIT: Duration = Duration::from_secs(5);

/// A running child with its stderr lines; killed and reaped on drop.
pub struct Running {
    /// What it is, for messages.
    pub what: String,
    child: std::process::Child,
    /// Stderr, line by line, read by a thread so the child never blocks on a full pipe.
    lines: mpsc::UnboundedReceiver<String>,
}

impl Running {
    /// Spawns `cmd` and waits (bounded) for a stderr line containing `ready`; returns that line.
    pub async fn spawn(what: impl Into<String>, mut cmd: Command, ready: &str) -> (Self, String) {
        let what = what.into();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // Keep draining after the receiver is gone, so the child never blocks on stderr.
                let _ = tx.send(line);
            }
        });
        let mut running = Self { what, child, lines };
        let line = running.wait_for(ready, START_LIMIT).await;
        (running, line)
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    pub async fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(limit, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
                seen.push(line);
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!("{} exited before logging {needle:?}; it said: {seen:#?}", self.what),
            Err(_) => panic!(
                "{} did not log {needle:?} within {limit:?}; it said: {seen:#?}",
                self.what
            ),
        }
    }

    /// The process id (with `ip netns exec`, the binary's own: `ip` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash; reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill(1)");
        assert!(sent.success(), "could not signal {}", self.what);
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "{} still running {limit:?} after SIGTERM",
                self.what
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The binary with `args`, run in network namespace `netns` when given.
pub fn command(netns: Option<&str>, args: &[String]) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args);
    cmd
}

/// A simulated replica `name` listening on `listen` (port 0 for any): the process and its address.
pub async fn start_sim(netns: Option<&str>, listen: &str, name: &str) -> (Running, SocketAddr) {
    let args: Vec<String> = ["sim", "--listen", listen, "--name", name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut cmd = command(netns, &args);
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    let (running, line) = Running::spawn(format!("replica {name}"), cmd, SIM_READY).await;
    // The text log line ends with `name="kbs-0" addr=IP:PORT`.
    let addr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr= in {line:?}"));
    (running, addr)
}

/// A started proxy: the process and the fields of its start-up line.
pub struct ProxyProcess {
    /// The process.
    pub process: Running,
    /// `http://IP:PORT` of the data port.
    pub url: String,
    /// `http://IP:PORT` of the admin port.
    pub admin: String,
}

/// Starts the proxy with `args` (which must include `--admin-listen`) and the cookie `secret`.
pub async fn start_proxy(what: &str, netns: Option<&str>, args: &[String], secret: &str) -> ProxyProcess {
    let mut cmd = command(netns, args);
    cmd.args(["--log-format", "json"])
        .env("KBS_AFFINITY_PROXY_COOKIE_SECRET", secret)
        .env("RUST_LOG", "info");
    let (process, line) = Running::spawn(what, cmd, PROXY_READY).await;
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"));
    let field = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{what}: no {k:?} in {line}"))
            .to_owned()
    };
    ProxyProcess {
        url: format!("http://{}", field("listen")),
        admin: format!("http://{}", field("admin")),
        process,
    }
}

/// The proxy flags every test here uses: fast health checks with hysteresis, short timeouts
/// (a cut link must fail a check in well under a second), one worker, no access log.
pub fn proxy_flags(listen: &str, admin: &str, backends: &[(&str, SocketAddr)]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen",
        listen,
        "--admin-listen",
        admin,
        "--health-check",
        "http",
        "--health-check-interval",
        "200ms",
        "--health-check-timeout",
        "500ms",
        "--health-fall",
        "2",
        "--health-rise",
        "2",
        "--backend-connect-timeout",
        "1s",
        "--backend-response-timeout",
        "5s",
        "--shutdown-grace",
        "1s",
        "--workers",
        "1",
        "--access-log",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (name, addr) in backends {
        args.push("--backend".into());
        args.push(format!("{name}=http://{addr}"));
    }
    args
}

/// `GET url`, bounded: status and body.
pub async fn get(url: &str) -> Result<(http::StatusCode, bytes::Bytes), String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let req = http::Request::get(url)
        .body(Full::default())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(ADMIN_LIMIT, client.request(req))
        .await
        .map_err(|_| format!("GET {url}: no answer within {ADMIN_LIMIT:?}"))?
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    let body = tokio::time::timeout(ADMIN_LIMIT, resp.into_body().collect())
        .await
        .map_err(|_| format!("GET {url}: body not complete within {ADMIN_LIMIT:?}"))?
        .map_err(|e| format!("GET {url}: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// The admin port's `/backends` entry for `name`.
pub async fn backend_state(admin: &str, name: &str) -> Value {
    let (status, body) = get(&format!("{admin}/backends")).await.unwrap();
    assert!(status.is_success(), "/backends: {status}");
    let list: Value = serde_json::from_slice(&body).expect("/backends is JSON");
    list.as_array()
        .expect("/backends is a list")
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no backend {name} in {list}"))
}

/// Polls `/backends` until `name`'s `healthy` is `healthy`; how long that took.
pub async fn wait_health(admin: &str, name: &str, healthy: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let state = backend_state(admin, name).await;
        if state["healthy"] == healthy {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{name} not healthy={healthy} within {limit:?}: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident set size of `pid`, KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Open file descriptors of `pid` (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}
