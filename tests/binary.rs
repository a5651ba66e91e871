//! The binary as an operator runs it: several workers on one port, real signals.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kbs_proxy_harness::kbs_client::KbsClient;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A running binary and its log lines.
struct Running {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    start: serde_json::Value,
    /// The lines logged before the "serving" one.
    before: Vec<serde_json::Value>,
}

impl Running {
    /// Starts the binary with `args` and waits for its "serving" line.
    async fn start(args: &[String]) -> Self {
        Self::start_logging(args, "info").await
    }

    /// [`Self::start`] with `RUST_LOG` set to `filter`.
    async fn start_logging(args: &[String], filter: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"))
            .args(args)
            .args(["--log-format", "json"])
            .env("KBS_AFFINITY_PROXY_COOKIE_SECRET", SECRET)
            .env("RUST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut raw = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = raw.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut before = Vec::new();
        let start = Self::wait_in(&mut lines, "kbs-affinity-proxy serving", &mut before).await;
        Self {
            child,
            lines,
            start,
            before,
        }
    }

    /// The next line with `message`; the lines before it go to `skipped`.
    async fn wait_in(
        lines: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
        message: &str,
        skipped: &mut Vec<serde_json::Value>,
    ) -> serde_json::Value {
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(v) = lines.recv().await {
                if v["message"] == message {
                    return v;
                }
                skipped.push(v);
            }
            panic!("the proxy exited before logging {message:?}");
        })
        .await
        .unwrap()
    }

    async fn wait_for(&mut self, message: &str) -> serde_json::Value {
        Self::wait_in(&mut self.lines, message, &mut Vec::new()).await
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    fn field(&self, name: &str) -> String {
        self.start[name].as_str().unwrap().to_owned()
    }
}

async fn cookie_name(addr: &str) -> String {
    let req = http::Request::get(format!("http://{addr}/healthz"))
        .body(http_body_util::Full::default())
        .unwrap();
    let (parts, _) = send(req).await;
    parts.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split('=')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_and_refuses_a_bad_one() {
    let sims = start_sims(1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let config = |cookie: &str| {
        format!(
            "backend = [\"{}\"]\ncookie-name = \"{cookie}\"\naccess-log = \"off\"\n",
            backends_of(&sims)[0]
        )
    };
    std::fs::write(&file, config("first")).unwrap();
    let args: Vec<String> = [
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--admin-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut proxy = Running::start(&args).await;
    let addr = proxy.field("listen");
    assert_eq!(cookie_name(&addr).await, "first");
    // Every field of the start-up lines a value of its own: no list stringified into one.
    assert_eq!(proxy.start["backends"], 1, "{}", proxy.start);
    let configured: Vec<_> = proxy
        .before
        .iter()
        .filter(|l| l["message"] == "backend configured")
        .collect();
    assert_eq!(configured.len(), 1, "{:?}", proxy.before);
    assert_eq!(configured[0]["backend"], "kbs-0");
    for line in proxy.before.iter().chain([&proxy.start]) {
        for (k, v) in line.as_object().unwrap() {
            assert!(!v.as_str().is_some_and(|s| s.starts_with('[')), "{k}: {line}");
        }
    }

    std::fs::write(&file, "cookie-name = 42\n").unwrap();
    proxy.signal("-HUP");
    let refused = proxy
        .wait_for("reload refused: the new configuration is invalid; keeping the old one")
        .await;
    assert!(refused["error"].as_str().unwrap().contains("cookie-name"), "{refused}");
    assert_eq!(cookie_name(&addr).await, "first");

    std::fs::write(&file, config("second")).unwrap();
    proxy.signal("-HUP");
    proxy.wait_for("configuration reloaded").await;
    assert_eq!(cookie_name(&addr).await, "second");

    // The healthcheck subcommand, as a container HEALTHCHECK runs it, against the admin port.
    let admin = proxy.field("admin");
    for (path, ok) in [("/healthz", true), ("/nope", false)] {
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"))
            .args(["healthcheck", "--url", &format!("http://{admin}{path}")])
            .output()
            .unwrap()
            .status;
        assert_eq!(status.success(), ok, "{path}");
    }
    proxy.signal("-TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), proxy.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_sessions_on_every_worker_and_stops_on_sigterm() {
    let sims = start_sims(2).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"));
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "2", "--log-format", "json"])
        .env("KBS_AFFINITY_PROXY_COOKIE_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for b in backends_of(&sims) {
        cmd.arg("--backend").arg(b);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();

    // The start-up line says where it listens: no port guessing, no sleeping.
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
            if v["message"] == "kbs-affinity-proxy serving" {
                return v["listen"].as_str().unwrap().to_owned();
            }
        }
        panic!("the proxy exited before serving");
    })
    .await
    .unwrap();
    let log = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });

    // Many short connections so both SO_REUSEPORT workers get some; each session stays put.
    for _ in 0..16 {
        let mut c = KbsClient::new(format!("http://{addr}"));
        c.get_resource("default/key/demo").await.unwrap();
        let r = c.replicas();
        assert!(r[1..].iter().all(|x| x.is_some() && x == &r[1]), "{r:?}");
    }

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "a clean exit on SIGTERM");
    let log = log.await.unwrap();
    assert!(log.iter().any(|l| l.contains("shutting down")), "{log:?}");
    // No cookie value or token ever reaches the log.
    assert!(
        !log.iter().any(|l| l.contains(SECRET) || l.contains("kbs-session-id=")),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_tokens_and_resource_bodies_never_reach_the_log_at_any_level() {
    let sims = start_sims(2).await;
    let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--workers", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for b in backends_of(&sims) {
        args.push("--backend".into());
        args.push(b);
    }
    // Trace level everywhere, hyper, h2 and rustls included.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"))
        .args(&args)
        .env("KBS_AFFINITY_PROXY_COOKIE_SECRET", SECRET)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("kbs-affinity-proxy serving") {
                let start = line.find("listen=").unwrap() + "listen=".len();
                return line[start..].split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("no serving line");
    })
    .await
    .unwrap();
    let reader = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut secrets = Vec::new();
    for h2 in [false, true] {
        let url = format!("http://{addr}");
        let mut c = if h2 { KbsClient::http2(url) } else { KbsClient::new(url) }.with_token_auth();
        c.handshake().await.unwrap();
        let body = c.fetch_resource("default/key/demo").await.unwrap();
        secrets.push(String::from_utf8(body.to_vec()).unwrap());
        secrets.push(c.cookie("route").unwrap().to_owned());
        secrets.push(c.cookie("kbs-session-id").unwrap().to_owned());
    }
    secrets.push(SECRET.to_owned());
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    let log = reader.await.unwrap();
    assert!(log.len() > 1000, "trace logging was on: {} bytes", log.len());
    for s in &secrets {
        assert!(!log.contains(s.as_str()), "a secret reached the log");
    }
    assert!(
        !log.to_lowercase().contains("bearer "),
        "no Authorization value in the log"
    );
}

/// A client's IP address in SNI (what `wrk` and many clients send when given an address) makes
/// rustls warn: a line per handshake that any client can trigger, so rustls logs only errors
/// unless `RUST_LOG` names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_make_rustls_log_a_line_per_handshake() {
    use std::io::{Read, Write};
    let sims = start_sims(1).await;
    let pki = pki::Pki::new();
    let files = pki.issue("proxy", &["localhost"]);
    let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--workers", "1", "--access-log", "on"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([
        "--tls-cert".into(),
        files.cert.display().to_string(),
        "--tls-key".into(),
        files.key.display().to_string(),
        "--backend".into(),
        backends_of(&sims).remove(0),
    ]);
    let localhost = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let client_config = pki.client_config(&[b"http/1.1"]);
    // The same first flight a rustls client sends for "localhost", with "127.0.0.1" (as long)
    // in its place: the server reads it as an IP address in SNI.
    let ip_in_sni = {
        let mut client = rustls::ClientConnection::new(Arc::clone(&client_config), localhost.clone()).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        let at = hello
            .windows(9)
            .position(|w| w == b"localhost")
            .expect("SNI in the hello");
        hello[at..at + 9].copy_from_slice(b"127.0.0.1");
        hello
    };
    // RUST_LOG, and how many of the three handshakes' warnings it lets through.
    for (filter, warnings) in [("info", 0), ("info,rustls=warn", 3)] {
        let mut proxy = Running::start_logging(&args, filter).await;
        let addr = proxy.field("listen");
        for _ in 0..3 {
            let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            tcp.write_all(&ip_in_sni).unwrap();
            // The server's first flight: the hello was read (and logged about, or not).
            assert!(tcp.read(&mut [0; 512]).unwrap() > 0);
        }
        // A request after them: its access line comes after anything those handshakes logged.
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(&client_config))
            .connect(localhost.clone(), tcp)
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"GET /kbs/v0/resource/default/key/demo HTTP/1.1\r\nhost: kbs\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        tls.read_to_end(&mut Vec::new()).await.unwrap();
        let mut before = Vec::new();
        Running::wait_in(&mut proxy.lines, "request", &mut before).await;
        let sni_lines = before
            .iter()
            .filter(|v| v.to_string().contains("Illegal SNI extension"))
            .count();
        assert_eq!(sni_lines, warnings, "RUST_LOG={filter}: {before:?}");
    }
}

#[tokio::test]
async fn the_demo_prints_its_table_before_any_access_line() {
    // stdout and stderr into one pipe, in the order they were written.
    let bin = env!("CARGO_BIN_EXE_kbs-affinity-proxy");
    let mut child = Command::new("sh")
        .args(["-c", r#"exec "$0" demo --listen 127.0.0.1:0 2>&1"#, bin])
        .env("KBS_AFFINITY_PROXY_COOKIE_SECRET", SECRET)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Until the demo's 12 access lines (4 sessions x 3 calls) are out, bounded.
    while seen.iter().filter(|l: &&String| l.contains(" access: ")).count() < 12 {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("the demo's output in time")
            .unwrap()
            .expect("the demo still running");
        seen.push(line);
    }
    let table = seen.iter().position(|l| l.starts_with("session ")).expect("a table");
    let first_access = seen.iter().position(|l| l.contains(" access: ")).unwrap();
    assert!(table < first_access, "the table comes first:\n{}", seen.join("\n"));
    assert!(
        seen[table + 1..table + 5].iter().all(|l| l.ends_with(" ok")),
        "{seen:#?}"
    );
}
