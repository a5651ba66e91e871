//! The binary's command line: bad values exit 64 and name the key.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"))
        .args(args)
        .env_remove("KBS_AFFINITY_PROXY_COOKIE_SECRET")
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
fn help_and_version_exit_0() {
    for arg in ["--help", "--version"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"))
            .arg(arg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
    }
}
