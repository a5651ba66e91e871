//! `/metrics` in the format the scraper asks for, each accepted by its reference checker:
//! `promtool check metrics` for the Prometheus text format 0.0.4, the Python client's strict
//! OpenMetrics parser for OpenMetrics. Both tools come from outside (Debian's `prometheus`,
//! PyPI's `prometheus-client`): the test is ignored by a plain `cargo test`, says so, and
//! `.ci/run` installs the tools and runs it.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use kbs_proxy::config::Settings;
use support::*;

/// GET `/metrics` with `accept`; returns the content type and the body.
async fn scrape(proxy: &TestProxy, accept: Option<&str>) -> (String, String) {
    let mut req = Request::get(format!("{}/metrics", proxy.admin_url()));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let (parts, body) = send(req.body(Full::<Bytes>::default()).unwrap()).await;
    assert_eq!(parts.status, http::StatusCode::OK);
    let ct = parts.headers["content-type"].to_str().unwrap().to_owned();
    (ct, String::from_utf8(body.to_vec()).unwrap())
}

/// Runs `cmd` with `input` on stdin; panics with its output unless it exits 0.
fn check_with(mut cmd: Command, input: &str) {
    let name = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{name} cannot run ({e}): install it (.ci/run shows how)"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{name} refused the exposition:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
#[ignore = "needs promtool (Debian: prometheus) and python3 with prometheus-client; .ci/run installs them and runs it"]
async fn each_format_passes_its_reference_checker() {
    let sims = start_sims(2).await;
    let proxy = start_proxy(Settings {
        admin_listen: Some("127.0.0.1:0".into()),
        ..settings(backends_of(&sims))
    })
    .await;
    // Traffic, so that counters and histograms have samples: proxied and answered locally.
    for path in ["/kbs/v0/resource/a/b/c", "/kbs/v0/auth", "/elsewhere"] {
        send(
            Request::get(format!("{}{path}", proxy.url()))
                .body(Full::default())
                .unwrap(),
        )
        .await;
    }

    let (ct, text) = scrape(&proxy, Some("text/plain; version=0.0.4")).await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(text.contains("# TYPE kbs_proxy_requests_total counter"), "{text}");
    for name in [
        "kbs_proxy_build_info{version=",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
        "kbs_proxy_backend_response_duration_seconds_bucket{le=\"0.005\",backend=",
        "kbs_proxy_upstream_errors_total{backend=",
        "kbs_proxy_retries_total{backend=",
        "kbs_proxy_local_answers_total{error=\"BadGateway\"} ",
        "kbs_proxy_sessions_evicted_total{by=\"session_id\"} ",
        "kbs_proxy_tls_reloads_total{result=\"ok\"} ",
    ] {
        assert!(text.contains(&format!("\n{name}")), "{name} exported: {text}");
    }
    let mut promtool = Command::new("promtool");
    promtool.args(["check", "metrics"]);
    check_with(promtool, &text);

    for accept in [
        None,
        Some("application/openmetrics-text; version=1.0.0"),
        Some("nonsense;;q=x"),
    ] {
        let (ct, om) = scrape(&proxy, accept).await;
        assert_eq!(
            ct, "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "{accept:?}"
        );
        assert!(om.ends_with("# EOF\n"));
        let mut parser = Command::new("python3");
        parser.args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nlist(p(sys.stdin.read()))",
        ]);
        check_with(parser, &om);
    }
}
