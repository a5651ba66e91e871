//! The two transports (the fast path and hyper) must not drift: the same requests give the
//! same answers, the same access-log lines and the same metrics. Each scenario runs through a
//! proxy with the fast path on and through one with it off, and the observations are compared.

mod support;

use std::io::Write;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use kbs_proxy::config::Settings;
use kbs_proxy::routing::route_cookie::BackendId;
use kbs_proxy_harness::sim::{SimConfig, SimKbs};
use support::*;

/// The access-log lines whose path contains `marker`, without the duration and the generated
/// request id, the marker made neutral so the two transports compare.
fn access_lines(marker: &str) -> Vec<serde_json::Value> {
    logs::access_lines(marker)
        .into_iter()
        .map(|mut v| {
            let obj = v.as_object_mut().unwrap();
            assert!(
                obj.remove("duration_ms").is_some_and(|d| d.is_f64()),
                "a duration: {obj:?}"
            );
            assert!(
                obj.remove("request_id")
                    .is_some_and(|id| id.as_str().is_some_and(|s| !s.is_empty())),
                "a request id: {obj:?}"
            );
            for k in ["timestamp", "level", "threadId", "threadName"] {
                obj.remove(k);
            }
            let path = obj["path"].as_str().unwrap().replace(marker, "TRANSPORT");
            obj.insert("path".into(), path.into());
            v
        })
        .collect()
}

/// The request, error and retry counters and the latency histograms' counts from `/metrics`.
async fn request_metrics(proxy: &TestProxy) -> Vec<String> {
    let (_, body) = admin_get(proxy, "/metrics").await;
    let mut lines: Vec<String> = String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| {
            l.starts_with("kbs_proxy_requests_total")
                || l.starts_with("kbs_proxy_request_duration_seconds_count")
                || l.starts_with("kbs_proxy_pinned_refused_total")
                || l.starts_with("kbs_proxy_cookies_")
                || l.starts_with("kbs_proxy_local_answers_total")
                || l.starts_with("kbs_proxy_upstream_errors_total")
                || l.starts_with("kbs_proxy_retries_total")
                || l.starts_with("kbs_proxy_backend_response_duration_seconds_count")
        })
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// What a client saw of one request.
#[derive(Debug, PartialEq)]
struct Answer {
    status: StatusCode,
    content_type: Option<String>,
    /// Whether the answer set a route cookie (its value differs per run: a timestamp).
    set_cookie: bool,
    body: Bytes,
}

async fn get(proxy: &TestProxy, path: &str, route: Option<&str>) -> Answer {
    let mut req = Request::get(format!("{}{path}", proxy.url()));
    if let Some(v) = route {
        req = req.header("cookie", format!("route={v}"));
    }
    let (parts, body) = send(req.body(Full::default()).unwrap()).await;
    Answer {
        status: parts.status,
        content_type: parts
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned()),
        set_cookie: parts.headers.contains_key("set-cookie"),
        body,
    }
}

/// Runs every scenario through a proxy with the fast path `on` or `off`, in front of `live`
/// and a replica that is down; returns the answers and the metrics.
async fn scenarios(fast: &str, live: &SimKbs, dead: std::net::SocketAddr) -> (Vec<Answer>, Vec<String>) {
    let marker = format!("via-{fast}");
    let proxy = start_proxy_by_hand(Settings {
        fast_path: Some(fast.into()),
        access_log: Some("on".into()),
        health_check: Some("tcp".into()),
        health_check_interval: Some("3600s".into()),
        health_fall: Some(1),
        admin_listen: Some("127.0.0.1:0".into()),
        // Round-robin over one live replica: every unpinned request goes to it.
        ..settings(vec![format!("kbs-0={}", live.url()), format!("kbs-1=http://{dead}")])
    })
    .await;
    let path = |what: &str| format!("/kbs/v0/resource/{marker}/key/{what}");
    proxy.control.check_health().await; // kbs-1 is seen down
    let pinned_live = route_value(BackendId::from_name("kbs-0"));
    let pinned_dead = route_value(BackendId::from_name("kbs-1"));
    let answers = vec![
        // Unpinned: balanced to the live replica, which answers its own 401 (no session).
        get(&proxy, &path("unpinned"), None).await,
        // Pinned to the live replica: forwarded there.
        get(&proxy, &path("pinned"), Some(&pinned_live)).await,
        // Pinned to the replica that is down: the proxy answers the KBS 401 itself.
        get(&proxy, &path("lost"), Some(&pinned_dead)).await,
        // A forged route cookie: treated as absent, balanced.
        get(&proxy, &path("forged"), Some("not-a-cookie")).await,
        // Outside the KBS API: proxied, the replica's 404.
        get(&proxy, &format!("/{marker}/other"), None).await,
    ];
    // The proxy finishes its accounting just after the client has the last byte: wait
    // (bounded) until every request is in the latency histogram before reading the metrics.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let metrics = request_metrics(&proxy).await;
        let timed: u64 = metrics
            .iter()
            .filter(|l| l.starts_with("kbs_proxy_request_duration_seconds_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if timed == answers.len() as u64 || std::time::Instant::now() > deadline {
            return (answers, metrics);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn both_transports_answer_log_and_count_alike() {
    logs::capture();
    let live = SimKbs::start_local(SimConfig::new("kbs-0")).await.unwrap();
    let dead = dead_addr().await;
    let (fast_answers, fast_metrics) = scenarios("on", &live, dead).await;
    let (hyper_answers, hyper_metrics) = scenarios("off", &live, dead).await;

    assert_eq!(fast_answers.len(), 5);
    for (i, (f, h)) in fast_answers.iter().zip(&hyper_answers).enumerate() {
        assert_eq!(f.status, h.status, "scenario {i}");
        assert_eq!(f.content_type, h.content_type, "scenario {i}");
        assert_eq!(f.set_cookie, h.set_cookie, "scenario {i}");
        // Bodies name the request path in some answers: compare them with it made neutral.
        let neutral = |a: &Answer, m: &str| String::from_utf8_lossy(&a.body).replace(m, "TRANSPORT");
        assert_eq!(neutral(f, "via-on"), neutral(h, "via-off"), "scenario {i}");
    }
    assert_eq!(fast_answers[2].status, StatusCode::UNAUTHORIZED, "session lost");

    // Both proxies answered from the same starting point: the same counts.
    assert!(!fast_metrics.is_empty());
    assert_eq!(fast_metrics, hyper_metrics);

    // The log is written after the answer: wait (bounded) until both transports' lines are in.
    eventually(std::time::Duration::from_secs(5), || {
        access_lines("via-on").len() == 5 && access_lines("via-off").len() == 5
    })
    .await;
    let (f, h) = (access_lines("via-on"), access_lines("via-off"));
    assert_eq!(
        f.len(),
        5,
        "one line per request on the fast path, local answers too: {f:#?}"
    );
    assert_eq!(f, h);
    let lost = f
        .iter()
        .find(|l| l["path"].as_str().unwrap().ends_with("/lost"))
        .unwrap();
    assert_eq!(
        (lost["backend"].as_str(), lost["decision"].as_str()),
        (Some("kbs-1"), Some("session-lost"))
    );
    let _ = std::io::stderr().flush();
}

/// One transport's answers and access lines when one of two replicas refuses connections but is
/// not yet known to be down (no active checks): round-robin sends one request there.
async fn refused_then_retried(
    fast: &str,
    live: &SimKbs,
    dead: std::net::SocketAddr,
) -> Vec<(Answer, serde_json::Value)> {
    let marker = format!("retry-{fast}");
    let proxy = start_proxy_by_hand(Settings {
        fast_path: Some(fast.into()),
        access_log: Some("on".into()),
        health_check: Some("off".into()),
        ..settings(vec![format!("kbs-0={}", live.url()), format!("kbs-1=http://{dead}")])
    })
    .await;
    let mut answers = Vec::new();
    for i in 0..2 {
        answers.push(get(&proxy, &format!("/kbs/v0/resource/{marker}/key/{i}"), None).await);
    }
    eventually(std::time::Duration::from_secs(5), || access_lines(&marker).len() == 2).await;
    answers.into_iter().zip(access_lines(&marker)).collect()
}

#[tokio::test]
async fn a_refused_connect_is_retried_alike_on_both_transports() {
    logs::capture();
    let live = SimKbs::start_local(SimConfig::new("kbs-0")).await.unwrap();
    let dead = dead_addr().await;
    let fast = refused_then_retried("on", &live, dead).await;
    let hyper = refused_then_retried("off", &live, dead).await;
    for (i, ((fa, fl), (ha, hl))) in fast.iter().zip(&hyper).enumerate() {
        assert_eq!((fa.status, fa.set_cookie), (ha.status, ha.set_cookie), "request {i}");
        assert_eq!(fl["decision"], hl["decision"], "request {i}");
        assert_eq!(fl["backend"], hl["backend"], "request {i}");
        // Every answer comes from the live replica, with a cookie pinning the client there.
        assert_eq!(fl["backend"], "kbs-0", "request {i}");
        assert!(fa.set_cookie, "request {i}");
    }
    let decisions: Vec<_> = fast.iter().map(|(_, l)| l["decision"].as_str().unwrap()).collect();
    assert!(decisions.contains(&"retried"), "one request was re-sent: {decisions:?}");
}

/// A backend that answers every request with a head promising 100 bytes, sends 10 and closes.
async fn start_truncating_backend() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
            });
        }
    });
    addr
}

/// Sends one GET over a raw connection and reads until the proxy closes it.
async fn raw_get(proxy: &TestProxy, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: kbs\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out));
    let _ = read
        .await
        .expect("the proxy closes a connection whose answer broke off");
    out
}

#[tokio::test]
async fn a_response_body_that_breaks_off_is_logged_with_its_status_and_counted() {
    logs::capture();
    let backend = start_truncating_backend().await;
    let mut lines = Vec::new();
    for fast in ["on", "off"] {
        let proxy = start_proxy_by_hand(Settings {
            fast_path: Some(fast.into()),
            access_log: Some("on".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            ..settings(vec![format!("kbs-0=http://{backend}")])
        })
        .await;
        let marker = format!("broken-{fast}");
        let got = raw_get(&proxy, &format!("/kbs/v0/resource/{marker}/key/x")).await;
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
        assert!(
            got.ends_with(b"0123456789"),
            "the client gets what came, then the close"
        );
        eventually(std::time::Duration::from_secs(5), || access_lines(&marker).len() == 1).await;
        lines.push(access_lines(&marker));
        if fast == "on" {
            let (_, body) = admin_get(&proxy, "/metrics").await;
            let text = String::from_utf8_lossy(&body);
            assert!(
                text.contains("kbs_proxy_aborted_exchanges_total{reason=\"response_body\"} 1"),
                "{text}"
            );
        }
    }
    assert_eq!(lines[0], lines[1], "both transports log the status the client was sent");
    assert_eq!(lines[0][0]["status"], 200);
}
