//! The binary's command line: bad values exit 64 and name the key.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    run_with_env(args, &[])
}

/// Runs the binary with `env` and none of the caller's own `KBS_AFFINITY_PROXY_*` variables.
fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KBS_AFFINITY_PROXY_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const B: &str = "--backend=http://127.0.0.1:9";

#[test]
fn bad_values_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let short_secret = dir.path().join("short");
    std::fs::write(&short_secret, "tiny\n").unwrap();
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "listen = \"127.0.0.1:0\"\ncookie-colour = \"red\"\n").unwrap();
    let wrong_type = dir.path().join("type.toml");
    std::fs::write(&wrong_type, "cookie-max-age = \"soon\"\n").unwrap();
    let short = short_secret.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![B, "--balance", "random"], "balance"),
        (vec![B, "--cookie-max-age", "abc"], "--cookie-max-age"),
        (vec![B, "--cookie-max-age", "0"], "cookie-max-age"),
        (vec![B, "--listen", "localhost"], "listen"),
        (vec![B, "--log-format", "xml"], "log-format"),
        (vec![B, "--cookie-name", "bad name"], "cookie-name"),
        (vec![B, "--cookie-same-site", "sometimes"], "cookie-same-site"),
        (vec![B, "--backend-connect-timeout", "soon"], "backend-connect-timeout"),
        (vec![B, "--workers", "0"], "workers"),
        (vec![B, "--cookie-secret-file", short], "cookie-secret-file"),
        (
            vec![B, "--cookie-secret-file", "/nonexistent/secret"],
            "cookie-secret-file",
        ),
        (vec!["--backend", "ftp://x:1"], "backend"),
        (vec![B, "--backend-tls-name", "kbs example"], "backend-tls-name"),
        (vec!["--backend", "https://x:1;tls-name=-"], "backend"),
        (
            vec!["--backend", "a=http://x:1", "--backend", "a=http://y:1"],
            "backend",
        ),
        (vec![], "backend"),
        (vec!["--no-such-flag"], "--no-such-flag"),
        (vec![B, "--config", bad_toml.to_str().unwrap()], "cookie-colour"),
        (vec![B, "--config", wrong_type.to_str().unwrap()], "cookie-max-age"),
        (vec!["demo", "--backend", "http://x:1"], "backend"),
        (vec!["demo", "--listen", "nowhere"], "listen"),
    ];
    for (args, key) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, 64, "{args:?} should exit 64; stderr: {stderr}");
        assert!(stderr.contains(key), "{args:?}: stderr should name {key}: {stderr}");
        assert!(!stderr.contains("tiny"), "secrets never printed: {stderr}");
        assert!(stderr.lines().count() <= 6, "short and clear: {stderr}");
    }
}

#[test]
fn in_json_mode_a_bad_value_is_one_json_line_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("json.toml");
    std::fs::write(&file, "log-format = \"json\"\nbalance = \"random\"\n").unwrap();
    let file = file.to_str().unwrap();
    type Env<'a> = Vec<(&'a str, &'a str)>;
    let cases: Vec<(Vec<&str>, Env, &str)> = vec![
        (
            vec![B, "--log-format", "json", "--balance", "random"],
            vec![],
            "balance",
        ),
        (
            vec![B, "--balance=random"],
            vec![("KBS_AFFINITY_PROXY_LOG_FORMAT", "json")],
            "balance",
        ),
        (vec![B, "--config", file], vec![], "balance"),
        (
            vec![B, "--log-format=json"],
            vec![("KBS_AFFINITY_PROXY_COOKIE_MAX_AGE", "soon")],
            "cookie-max-age",
        ),
        (
            vec![B, "--log-format", "json", "--backend-tls-name", "a b"],
            vec![],
            "backend-tls-name",
        ),
    ];
    for (args, env, key) in cases {
        let (code, stderr) = run_with_env(&args, &env);
        assert_eq!(code, 64, "{args:?} {env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?} {env:?}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
        assert_eq!(v["level"], "ERROR", "{v}");
        assert_eq!(v["key"], key, "{v}");
        assert!(v["error"].as_str().unwrap().contains(key), "{v}");
    }
}

#[test]
fn help_and_version_exit_0() {
    for arg in ["--help", "--version"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"))
            .arg(arg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
    }
}

#[test]
fn the_environment_is_below_the_flags_and_above_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "listen = \"from-file\"\n").unwrap();
    let file = file.to_str().unwrap();
    let env = [("KBS_AFFINITY_PROXY_LISTEN", "from-env")];
    // A bad listen address names the layer it came from, and nothing binds before validation.
    let cases = [
        (run_with_env(&[B, "--config", file], &[]), "from-file"),
        (run_with_env(&[B, "--config", file], &env), "from-env"),
        (
            run_with_env(&[B, "--config", file, "--listen", "from-flag"], &env),
            "from-flag",
        ),
    ];
    for ((code, stderr), winner) in cases {
        assert_eq!(code, 64, "{stderr}");
        assert!(
            stderr.contains(&format!("invalid value \"{winner}\" for `listen`")),
            "{stderr}"
        );
    }
}

#[test]
fn bad_environment_values_exit_64_naming_the_key_and_the_variable() {
    let cases = [
        ("KBS_AFFINITY_PROXY_COOKIE_MAX_AGE", "abc", "`cookie-max-age`"),
        ("KBS_AFFINITY_PROXY_TOKENS_PORTABLE", "maybe", "`tokens-portable`"),
        (
            "KBS_AFFINITY_PROXY_BACKEND_CONNECT_TIMEOUT",
            "soon",
            "`backend-connect-timeout`",
        ),
        (
            "KBS_AFFINITY_PROXY_ADMIN_WRITE_ROUTES",
            "nonsense",
            "`admin-write-routes`",
        ),
    ];
    for (var, value, key) in cases {
        let (code, stderr) = run_with_env(&[B], &[(var, value)]);
        assert_eq!(code, 64, "{var}={value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(value),
            "{var}={value}: {stderr}"
        );
    }
    // Variables clap parses (numbers, switches) also name the variable, as their flag is not given.
    let (_, stderr) = run_with_env(&[B], &[("KBS_AFFINITY_PROXY_HEALTH_FALL", "x")]);
    assert!(stderr.contains("KBS_AFFINITY_PROXY_HEALTH_FALL"), "{stderr}");
    // A flag replaces its variable, bad or not.
    let (_, stderr) = run_with_env(&[B, "--health-fall", "0"], &[("KBS_AFFINITY_PROXY_HEALTH_FALL", "x")]);
    assert!(stderr.contains("invalid value \"0\" for `health-fall`"), "{stderr}");
    // The other subcommands do not read the proxy's variables.
    let (code, stderr) = run_with_env(
        &["healthcheck", "--url", "http://127.0.0.1:1/"],
        &[("KBS_AFFINITY_PROXY_HEALTH_FALL", "x")],
    );
    assert_eq!(code, 1, "{stderr}");
}

#[test]
fn the_cookie_secret_is_refused_as_a_flag() {
    for args in [
        &[B, "--cookie-secret", "a-secret-of-twenty-bytes"][..],
        &["demo", "--cookie-secret=a-secret-of-twenty-bytes"],
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, 64, "{stderr}");
        assert!(stderr.contains("`cookie-secret`"), "{stderr}");
        assert!(!stderr.contains("a-secret-of"), "never printed: {stderr}");
    }
    // From the environment it is taken (and checked, without being printed).
    let (code, stderr) = run_with_env(&[B], &[("KBS_AFFINITY_PROXY_COOKIE_SECRET", "tiny")]);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("`cookie-secret`") && !stderr.contains("tiny"),
        "{stderr}"
    );
}

#[test]
fn bench_chart_draws_a_runs_file_and_names_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs.tsv");
    let svg = dir.path().join("chart.svg");
    let mut lines = String::new();
    for rep in 1..=3 {
        for (target, rps) in [("haproxy", 30000), ("ours", 33000 + rep * 1000)] {
            lines += &format!("{rep}\tka-cookie\t{target}\t{rps}\t900\t2000\t20.0\t1\t0\t5\t15\t90\t90\n");
        }
    }
    std::fs::write(&runs, lines).unwrap();
    let (runs, svg_path) = (runs.to_str().unwrap(), svg.to_str().unwrap());
    let (code, stderr) = run(&["bench-chart", runs, "--out", svg_path]);
    assert_eq!(code, 0, "{stderr}");
    // ours' req/s ratios are 34/30, 35/30 and 36/30: the bar stands at their median.
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("\nka-cookie\n") && svg.contains("\n1.17\n"),
        "{svg}"
    );

    std::fs::write(dir.path().join("bad.tsv"), "1\tka-cookie\tours\n").unwrap();
    let bad = dir.path().join("bad.tsv");
    let (code, stderr) = run(&["bench-chart", bad.to_str().unwrap(), "-o", svg_path]);
    assert_eq!(code, 1);
    assert!(stderr.contains("bad.tsv") && stderr.contains("line 1"), "{stderr}");
}
