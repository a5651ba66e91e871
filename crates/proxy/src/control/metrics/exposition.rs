//! The two exposition formats `/metrics` speaks, chosen by the scraper's `Accept` header:
//! OpenMetrics 1.0 (what prometheus-client writes; the default) and the Prometheus text format
//! 0.0.4, for scrapers and tools that ask for it (`promtool check metrics` reads only that one).

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
    /// `text/plain; version=0.0.4`.
    Text004,
}

impl Format {
    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header prefers: the text format only when it ranks `text/plain`
    /// above OpenMetrics; OpenMetrics for everything else, an absent, unknown or malformed
    /// header included (RFC 9110 §12.5.1; wildcards accept both, so they decide nothing). A few
    /// lines rather than a crate: this is the only header the proxy negotiates.
    pub fn negotiate(accept: Option<&[u8]>) -> Format {
        let Some(accept) = accept.and_then(|a| std::str::from_utf8(a).ok()) else {
            return Format::OpenMetrics;
        };
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| {
                    v.trim().parse::<f32>().ok().filter(|q| (0.0..=1.0).contains(q))
                });
            let Some(q) = q else { continue };
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" => text = text.max(q),
                _ => {}
            }
        }
        if text > openmetrics {
            Format::Text004
        } else {
            Format::OpenMetrics
        }
    }
}

/// Rewrites prometheus-client's OpenMetrics text as the Prometheus text format 0.0.4: a
/// counter family `foo` is described as `foo_total` (its samples' name), an info family `bar` as
/// the gauge `bar_info`, `# UNIT` lines and the closing `# EOF` go, the samples stay as they are.
pub fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let lines: Vec<&str> = openmetrics.lines().collect();
    // Counter families, from their TYPE lines (HELP comes first, so look them all up front).
    let typed = |kind: &'static str| -> std::collections::HashSet<&str> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(kind))
            .collect()
    };
    let (counters, infos) = (typed(" counter"), typed(" info"));
    for line in lines {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match described {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                // The text format has no info type: an info family is a gauge named `_info`.
                let info = infos.contains(name);
                if info {
                    out.push_str("_info");
                }
                out.push(' ');
                out.push_str(if info && prefix == "# TYPE " { "gauge" } else { tail });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_default_accept_gets_openmetrics() {
        let prom = b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
    }

    #[test]
    fn text_when_asked_for_it_openmetrics_otherwise() {
        for (accept, want) in [
            (Some(&b"text/plain; version=0.0.4"[..]), Format::Text004),
            (
                Some(b"text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.5"),
                Format::Text004,
            ),
            (Some(b"TEXT/PLAIN"), Format::Text004),
            (None, Format::OpenMetrics),
            (Some(b"*/*"), Format::OpenMetrics),
            (Some(b"application/json"), Format::OpenMetrics),
            (Some(b"text/plain;q=banana"), Format::OpenMetrics),
            (Some(b"text/plain;q=2"), Format::OpenMetrics),
            (Some(b";;;,,,=="), Format::OpenMetrics),
            (Some(b"\xff\xfe"), Format::OpenMetrics),
            (
                Some(b"text/plain;q=0.5, application/openmetrics-text;q=0.5"),
                Format::OpenMetrics,
            ),
        ] {
            assert_eq!(
                Format::negotiate(accept),
                want,
                "{:?}",
                accept.map(String::from_utf8_lossy)
            );
        }
    }

    #[test]
    fn counters_are_described_by_their_samples_name() {
        let om = "# HELP x_requests Responses.\n# TYPE x_requests counter\nx_requests_total{a=\"b\"} 3\n\
                  # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# UNIT x_up seconds\n\
                  # HELP x_build Version.\n# TYPE x_build info\nx_build_info{version=\"1\"} 1\n# EOF\n";
        assert_eq!(
            to_text_004(om),
            "# HELP x_requests_total Responses.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 3\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n\
             # HELP x_build_info Version.\n# TYPE x_build_info gauge\nx_build_info{version=\"1\"} 1\n"
        );
    }
}
