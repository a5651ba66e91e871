//! The deployment assets against the proxy they deploy:
//!
//! - every metric the Grafana dashboard's panels and the PrometheusRule's alerts query is one a
//!   running proxy exports (a query on a name it does not export draws an empty panel or an
//!   alert that never fires, and nothing else would notice);
//! - every `KBS_AFFINITY_PROXY_*` variable the manifests set is a setting's, and the shipped
//!   config files are settings the proxy accepts;
//! - the manifests name the image and version this crate builds.
//!
//! The Kubernetes schemas, `promtool check rules` and `actionlint` are `.ci/deploy-assets.sh`'s
//! job (tools from outside); this file needs none of them.

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use http::Request;
use http_body_util::Full;
use kbs_proxy::config::{declared, DnsSource, Settings};
use kbs_proxy::control::discovery::Resolve;
use support::pki::Pki;
use support::*;

/// The dashboard, and the file whose `spec.groups` hold the alerts.
const DASHBOARD: &str = "deploy/kubernetes/monitoring/grafana-dashboard.json";
const ALERTS: &str = "deploy/kubernetes/monitoring/prometheusrule.yaml";

/// Names a query may use without the proxy exporting them: Prometheus makes `up` itself for
/// every scrape target.
const FROM_PROMETHEUS: [&str; 1] = ["up"];

/// PromQL's functions, aggregations and keywords, and Grafana's template functions: words in a
/// query that name no metric.
const QUERY_WORDS: &str = "\
    abs absent absent_over_time and avg avg_over_time bool bottomk ceil changes clamp \
    clamp_max clamp_min count count_over_time count_values day_of_month day_of_week delta \
    deriv exp floor group histogram_quantile hour idelta increase irate label_join \
    label_replace last_over_time ln log10 log2 max max_over_time min min_over_time minute \
    month offset or predict_linear present_over_time quantile quantile_over_time rate resets \
    round scalar sgn sort sort_desc sqrt stddev stdvar sum sum_over_time time timestamp topk \
    unless vector year label_values query_result";

/// Words followed by a parenthesised list of label names, not of expressions.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

/// A resolver that answers every name with the simulated replicas' addresses.
#[derive(Clone)]
struct FixedDns(Vec<SocketAddr>);

impl Resolve for FixedDns {
    fn resolve<'a>(
        &'a self,
        _: &'a DnsSource,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(std::future::ready(Ok(self.0.clone())))
    }
}

/// One request through `proxy`; its answer does not matter.
async fn call(proxy: &TestProxy, method: http::Method, path: &str, body: &'static str) {
    let req = Request::builder().method(method).uri(format!("{}{path}", proxy.url()));
    send(req.body(Full::from(body)).unwrap()).await;
}

/// `/metrics` of `proxy`.
async fn metrics(proxy: &TestProxy) -> String {
    let (status, body) = admin_get(proxy, "/metrics").await;
    assert_eq!(status, http::StatusCode::OK);
    String::from_utf8(body.to_vec()).unwrap()
}

/// The metric names the proxy exports, as a query writes them: from the OpenMetrics `# TYPE`
/// lines (an empty labelled family still has one), with the suffixes of its samples. From two
/// proxies, so that the families of every feature the manifests turn on are there: one with
/// static backends, one of them dead (upstream errors, retries); one with backends from DNS and
/// a TLS listener (discovery, certificate reloads).
async fn exported_names() -> BTreeSet<String> {
    let sims = start_sims(2).await;
    let mut backends = backends_of(&sims);
    backends.push(format!("dead=http://{}", dead_addr().await));
    let static_backends = start_proxy(Settings {
        admin_listen: Some("127.0.0.1:0".into()),
        ..settings(backends)
    })
    .await;
    let pki = Pki::new();
    let files = pki.issue("proxy", &["localhost"]);
    let dns = FixedDns(sims.iter().map(|s| s.addr()).collect());
    let discovered = start_proxy_with(
        Settings {
            admin_listen: Some("127.0.0.1:0".into()),
            backend: None,
            backend_dns: Some(vec!["kbs-headless:8080".into()]),
            tls_cert: Some(files.cert.clone()),
            tls_key: Some(files.key.clone()),
            ..settings(vec![])
        },
        |c| c.with_resolver(dns),
    )
    .await;
    // Traffic, so that a family that appears only with its first sample has one: proxied,
    // answered locally, an admin write, sessions started (some on the dead backend).
    let get = http::Method::GET;
    for path in ["/kbs/v0/resource/a/b/c", "/kbs/v0/auth", "/elsewhere"] {
        call(&static_backends, get.clone(), path, "").await;
    }
    call(&static_backends, http::Method::POST, "/kbs/v0/resource/a/b/c", "x").await;
    for _ in 0..4 {
        call(&static_backends, http::Method::POST, "/kbs/v0/auth", "{}").await;
    }
    let text = metrics(&static_backends).await + &metrics(&discovered).await;

    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(family), Some(kind)) = (words.next(), words.next()) else {
                panic!("bad TYPE line {line:?}");
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                "info" => &["_info"],
                "gauge" | "stateset" | "unknown" => &[""],
                other => panic!("metric type {other:?} in {line:?}"),
            };
            names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            // A sample's own name too, whatever its family's type says.
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The metric names a PromQL (or Grafana template) query uses: the identifiers left once
/// strings, label matchers, ranges, label lists and Grafana's `$variables` are taken out, less
/// the language's own words.
fn metric_names(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = query.chars().collect();
    let mut i = 0;
    // Set after a word that takes a list of label names: the next `( … )` is skipped.
    let mut label_list_next = false;
    let skip_to = |i: usize, close: char| -> usize {
        let mut j = i + 1;
        let mut in_string = false;
        while j < chars.len() {
            match chars[j] {
                '"' | '\'' | '`' => in_string = !in_string,
                c if c == close && !in_string => return j + 1,
                _ => {}
            }
            j += 1;
        }
        panic!("unclosed {close:?} in {query:?}");
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_to(i, c),
            '{' => i = skip_to(i, '}'),
            '[' => i = skip_to(i, ']'),
            '(' if label_list_next => {
                label_list_next = false;
                i = skip_to(i, ')');
            }
            '$' => {
                // A Grafana variable: $name, ${name} or $__interval.
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_to(i, '}');
                } else {
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if LABEL_LISTS.contains(&word.as_str()) {
                    label_list_next = true;
                } else if !QUERY_WORDS.split_whitespace().any(|w| w == word) {
                    names.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // A number or a duration (5m, 1e3, 0.99): letters glued to it are its unit.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
        if c.is_whitespace() || c == '(' {
            continue;
        }
        // `by` must be followed by its list; anything else in between ends the expectation.
        if !c.is_ascii_alphabetic() && c != '_' {
            label_list_next = false;
        }
    }
    names
}

/// Every query of the dashboard: the panels' `expr` (rows' nested panels included) and the
/// template variables' queries.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", serde_json::Value::String(q)) => out.push(q.clone()),
                        ("query" | "definition", serde_json::Value::String(q)) if q.contains('(') => {
                            out.push(q.clone())
                        }
                        _ => walk(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(&repo_file(DASHBOARD)).expect("the dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    assert!(out.len() > 10, "the dashboard has queries: {out:?}");
    out
}

/// Every `expr:` of the alert rules: one line, or a block scalar (`|`, `>`) of the lines
/// indented deeper than the key.
fn alert_queries() -> Vec<String> {
    let text = repo_file(ALERTS);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .copied()
                .collect();
            out.push(block.join("\n"));
        } else {
            out.push(value.to_owned());
        }
    }
    assert!(out.len() > 5, "the rules have expressions: {out:?}");
    out
}

#[test]
fn metric_names_are_found_in_queries() {
    let q = r#"histogram_quantile(0.99, sum by (backend, le) (rate(kbs_proxy_x_bucket{namespace="$namespace", pod=~"$pod"}[$__rate_interval]))) / on (pod) group_left (version) up{job="a"} > 0.5"#;
    assert_eq!(
        metric_names(q),
        BTreeSet::from(["kbs_proxy_x_bucket".to_owned(), "up".to_owned()])
    );
    assert_eq!(
        metric_names("label_values(kbs_proxy_build_info{namespace=\"$namespace\"}, pod)"),
        BTreeSet::from(["kbs_proxy_build_info".to_owned(), "pod".to_owned()])
    );
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let exported = exported_names().await;
    let mut unknown = Vec::new();
    let queries = [(DASHBOARD, dashboard_queries()), (ALERTS, alert_queries())];
    for (file, queries) in &queries {
        for query in queries {
            // label_values(METRIC, LABEL): the second argument is a label.
            let query = match query.strip_prefix("label_values(") {
                Some(args) => args.rsplit_once(',').map_or(args, |(metric, _)| metric).to_owned(),
                None => query.clone(),
            };
            for name in metric_names(&query) {
                if !exported.contains(&name) && !FROM_PROMETHEUS.contains(&name.as_str()) {
                    unknown.push(format!("{file}: {name} (in {})", query.trim()));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "queried but not exported by the proxy:\n{}\n\nexported:\n{}",
        unknown.join("\n"),
        exported.iter().cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Every `*.yaml` under `dir`.
fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[test]
fn manifests_set_only_settings_the_proxy_has() {
    let known: BTreeSet<String> = declared().iter().map(|s| s.env()).collect();
    let mut files = Vec::new();
    yaml_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes"),
        &mut files,
    );
    let mut unknown = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for line in text.lines() {
            let Some(name) = line.trim_start().trim_start_matches("- ").strip_prefix("name: ") else {
                continue;
            };
            let name = name.trim();
            if name.starts_with("KBS_AFFINITY_PROXY_") && !known.contains(name) {
                unknown.push(format!("{}: {name}", file.display()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "variables no setting reads:\n{}",
        unknown.join("\n")
    );
}

/// The `config.toml: |` block of a ConfigMap file.
fn config_toml(path: &str) -> String {
    let text = repo_file(path);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "config.toml: |")
        .unwrap_or_else(|| panic!("{path} has no config.toml block"));
    let indent = lines[start].len() - lines[start].trim_start().len();
    let block: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .map(|l| l.get(indent + 2..).unwrap_or(""))
        .collect();
    block.join("\n")
}

#[test]
fn shipped_config_files_are_settings_the_proxy_accepts() {
    for path in [
        "deploy/kubernetes/base/configmap.yaml",
        "deploy/kubernetes/sidecar/configmap.yaml",
    ] {
        let toml_text = config_toml(path);
        let settings: Settings =
            toml::from_str(&toml_text).unwrap_or_else(|e| panic!("{path}: not a config the proxy accepts: {e}"));
        if path.contains("/base/") {
            // Discovery follows the namespace the manifests are applied to: no namespace in the
            // name (the workloads give the pod's own as backend-dns-namespace).
            for name in settings.backend_dns.unwrap_or_default() {
                let host = name.rsplit_once(':').map_or(name.as_str(), |(h, _)| h);
                assert!(!host.contains('.'), "{path}: backend-dns {name:?} names a namespace");
            }
        }
    }
}

#[test]
fn manifests_name_the_image_and_version_this_crate_builds() {
    let version = env!("CARGO_PKG_VERSION");
    let image = "ghcr.io/kbs-affinity-proxy/kbs-affinity-proxy";
    for (path, wanted) in [
        (
            "deploy/kubernetes/base/kustomization.yaml",
            format!("newTag: {version}"),
        ),
        (
            "deploy/kubernetes/base/kustomization.yaml",
            format!("app.kubernetes.io/version: \"{version}\""),
        ),
        ("deploy/kubernetes/base/kustomization.yaml", format!("- name: {image}")),
        (
            "deploy/kubernetes/base/deployment.yaml",
            format!("image: {image}:{version}"),
        ),
        (
            "deploy/kubernetes/base/statefulset.yaml",
            format!("image: {image}:{version}"),
        ),
        (
            "deploy/kubernetes/sidecar/kustomization.yaml",
            format!("newTag: {version}"),
        ),
        (
            "deploy/kubernetes/sidecar/sidecar-patch.yaml",
            format!("image: {image}:{version}"),
        ),
        // The release workflow publishes under the repository owner's name; the manifests'
        // name is that of the project's home.
        (".github/workflows/release.yaml", "/kbs-affinity-proxy".to_owned()),
    ] {
        assert!(repo_file(path).contains(&wanted), "{path} does not say {wanted:?}");
    }
}
