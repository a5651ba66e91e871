//! Multi-host tests: the proxies and the replicas on separate network addresses, each in a
//! network namespace of its own that the test creates, so a replica's link can be cut as a
//! network partition cuts it (packets vanish; no RST, no "connection refused").
//!
//! Topology, one private /24 `10.231.X.0/24` per test (X chosen free at run time):
//!
//! ```text
//!   test (client, root namespace) .1 ─┐
//!   lb-a (proxy A) .2 ────────────────┤
//!   lb-b (proxy B) .3 ────────────────┼── br0 in namespace "hub" (a plain L2 switch)
//!   r0 (sim kbs-0) .10 ───────────────┤
//!   r1 (sim kbs-1) .11 ───────────────┘
//! ```
//!
//! Every host sits on the same bridge, so nothing is routed and no namespace needs IP
//! forwarding. The root namespace gets one veth (`kapn<X>`, whose creation also claims the
//! subnet, atomically, against other test runs) and one address inside the /24; nothing else
//! of the root namespace is touched. Namespaces are named `kapnetns-<pid>-<test>-<host>` and
//! deleted on drop, a failing test included; those of a test process that died without
//! cleaning up are deleted by the next run.
//!
//! Needs root and `ip` (iproute2), so the tests are `#[ignore]`d: `cargo test` lists them as
//! ignored (a visible skip, never a pass), and `.ci/run`, which runs as root, runs them with
//! `cargo test --test netns -- --ignored`. Run that way without root or `ip`, or where the
//! kernel refuses network namespaces, they fail and say why.

mod procs;
mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kbs_proxy_harness::kbs_client::{ClientError, KbsClient};
use procs::{start_proxy, start_sim, wait_health, ProxyProcess, Running};

/// The resource every session fetches.
const RESOURCE: &str = "default/key/demo";
/// The proxy's route cookie (the default name).
const ROUTE: &str = "route";
/// Limit on any one client call; a cut link must never make a client hang.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Limit on a health transition seen on `/backends`: 2 failed checks at 200 ms with a 500 ms
/// timeout take about 1.4 s; the rest is slack for a loaded machine.
const HEALTH_LIMIT: Duration = Duration::from_secs(15);
/// Namespace name prefix; the process id and the test follow.
const PREFIX: &str = "kapnetns";
/// First two octets of the private subnets used: `10.231.X.0/24`, X picked per test.
const NET: [u8; 2] = [10, 231];
/// Last octet of each host's address in the /24: the test itself (root namespace), the two
/// proxies, the two replicas.
const HOST_CLIENT: u8 = 1;
const HOST_LB_A: u8 = 2;
const HOST_LB_B: u8 = 3;
const HOST_R0: u8 = 10;
const HOST_R1: u8 = 11;

/// Runs `ip args`: stdout, or stderr as the error.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip args`, which must succeed.
fn ip_ok(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Fails unless the test runs as root with `ip` available.
fn require_root_and_ip() {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "the netns tests create network namespaces and veth links: run them as root (effective uid is {euid})"
    );
    if let Err(e) = ip(&["-V"]) {
        panic!("the netns tests need `ip` (iproute2) on PATH: {e}");
    }
}

/// Kills the processes inside namespace `ns` (all started by a test here) and deletes it.
fn delete_namespace(ns: &str) -> Result<String, String> {
    for pid in ip(&["netns", "pids", ns]).unwrap_or_default().split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    ip(&["netns", "del", ns])
}

/// Deletes what a test process left when it was killed before its guards could drop: its
/// namespaces and the replicas and proxies still running in them. Only names of our own
/// pattern whose process id is dead are touched.
fn delete_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = delete_namespace(name);
        }
    }
}

/// The namespaces, links and addresses of one test; all of it deleted on drop.
struct Lab {
    /// `kapnetns-<pid>-<test>`: namespace names start with it.
    prefix: String,
    /// X of `10.231.X.0/24`.
    subnet: u8,
    /// The root namespace's end of its veth, once created (it also holds the subnet claim).
    host_link: Option<String>,
    /// Namespaces created, in order.
    namespaces: Vec<String>,
}

impl Lab {
    /// Builds the topology with one namespace per entry of `hosts` (name, host byte); fails,
    /// saying why, when it cannot.
    fn new(test: &str, hosts: &[(&str, u8)]) -> Self {
        require_root_and_ip();
        delete_stale_namespaces();
        let mut lab = Lab {
            prefix: format!("{PREFIX}-{}-{test}", std::process::id()),
            subnet: 0,
            host_link: None,
            namespaces: Vec::new(),
        };
        let hub = lab.ns("hub");
        if let Err(e) = ip(&["netns", "add", &hub]) {
            panic!("{test}: the kernel refuses network namespaces here ({e})");
        }
        lab.namespaces.push(hub.clone());
        ip_ok(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &hub, "link", "set", "br0", "up"]);
        lab.claim_subnet(&hub);

        let host_link = lab.host_link.clone().expect("claimed");
        ip_ok(&["-n", &hub, "link", "set", "p-host", "master", "br0", "up"]);
        ip_ok(&["addr", "add", &format!("{}/24", lab.ip(HOST_CLIENT)), "dev", &host_link]);
        ip_ok(&["link", "set", &host_link, "up"]);

        for (host, byte) in hosts {
            let ns = lab.ns(host);
            ip_ok(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            let port = format!("p-{host}");
            ip_ok(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip_ok(&["-n", &hub, "link", "set", &port, "master", "br0", "up"]);
            ip_ok(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.ip(*byte)),
                "dev",
                "eth0",
            ]);
            ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    /// Picks a free `10.231.X.0/24` and creates the root namespace's veth into `hub`. Creating
    /// `kapn<X>` fails if another run holds X, which makes the claim atomic across processes.
    fn claim_subnet(&mut self, hub: &str) {
        let start = std::process::id() as usize;
        for i in 0..200 {
            let x = 20 + (start + i * 7) % 200;
            let cidr = format!("{}.{}.{x}.0/24", NET[0], NET[1]);
            // Something else already uses the subnet in the root namespace: leave it alone.
            let used =
                ip_ok(&["-4", "-o", "addr", "show", "to", &cidr]) + &ip_ok(&["-4", "route", "show", "root", &cidr]);
            if !used.trim().is_empty() {
                continue;
            }
            let link = format!("kapn{x}");
            match ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "p-host", "netns", hub,
            ]) {
                Ok(_) => {
                    self.subnet = x as u8;
                    self.host_link = Some(link);
                    return;
                }
                Err(e) if e.contains("File exists") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free 10.231.X.0/24 for the test");
    }

    /// The namespace of `host`.
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// The address with host byte `byte` in this test's /24.
    fn ip(&self, byte: u8) -> Ipv4Addr {
        Ipv4Addr::new(NET[0], NET[1], self.subnet, byte)
    }

    /// Sets `host`'s only link down or up, from inside its namespace.
    fn set_link(&self, host: &str, up: bool) {
        ip_ok(&[
            "-n",
            &self.ns(host),
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ]);
    }

    /// A simulated replica `name` in `host`'s namespace, listening on `byte`.
    async fn sim(&self, host: &str, byte: u8, name: &str) -> (Running, SocketAddr) {
        start_sim(Some(&self.ns(host)), &format!("{}:0", self.ip(byte)), name).await
    }

    /// A proxy in `host`'s namespace, listening on `byte`, in front of `backends`.
    async fn proxy(&self, host: &str, byte: u8, backends: &[(&str, SocketAddr)]) -> ProxyProcess {
        let listen = format!("{}:0", self.ip(byte));
        let args = procs::proxy_flags(&listen, &listen, backends);
        let proxy = start_proxy(
            &format!("proxy in {host}"),
            Some(&self.ns(host)),
            &args,
            support::SECRET,
        )
        .await;
        for (name, _) in backends {
            wait_health(&proxy.admin, name, true, HEALTH_LIMIT).await;
        }
        proxy
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting the root end deletes its peer at once; a namespace's own links go with it
        // (when its last process is gone: processes whose guard did not run are killed).
        if let Some(link) = &self.host_link {
            let _ = ip(&["link", "del", link]);
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = delete_namespace(ns) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// `fut`, which must finish within [`CALL_LIMIT`].
async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_LIMIT:?}"))
}

/// A client whose `auth` was answered by `replica` (round-robin places one within two tries).
async fn client_pinned_to(url: &str, replica: &str) -> KbsClient {
    for _ in 0..8 {
        let mut c = KbsClient::new(url);
        bounded("auth", c.auth()).await.expect("auth");
        if c.log.last().and_then(|e| e.replica.as_deref()) == Some(replica) {
            return c;
        }
    }
    panic!("no auth reached {replica} in 8 tries");
}

/// The replicas that answered `c`'s exchanges from its last `auth` on (the current session).
fn session_replicas(c: &KbsClient) -> Vec<Option<String>> {
    let from = c.log.iter().rposition(|e| e.step == "auth").unwrap_or(0);
    c.log[from..].iter().map(|e| e.replica.clone()).collect()
}

/// Asserts `e` is the KBS's own 401 with type `.../<kind>`, answered by the proxy (no
/// `x-kbs-replica`: the pinned replica was never asked).
fn assert_kbs_401(c: &KbsClient, e: &ClientError, kind: &str) {
    match e {
        ClientError::Kbs { status, error_type, .. } => {
            assert_eq!(status.as_u16(), 401, "{e}");
            assert_eq!(error_type, kind, "{e}");
        }
        other => panic!("not the KBS 401 shape: {other}"),
    }
    assert_eq!(
        c.log.last().map(|x| x.replica.clone()),
        Some(None),
        "answered by the proxy"
    );
}

/// A replica's link is cut: the proxy's checks take it out, new sessions avoid it, sessions
/// pinned to it get the KBS 401 and recover by themselves; the link comes back, so does it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and iproute2: .ci/run runs it (cargo test --test netns -- --ignored)"]
async fn a_cut_replica_is_avoided_its_sessions_recover_and_it_returns() {
    let started = Instant::now();
    let lab = Lab::new("cut", &[("lb", HOST_LB_A), ("r0", HOST_R0), ("r1", HOST_R1)]);
    let (_r0, r0) = lab.sim("r0", HOST_R0, "kbs-0").await;
    let (_r1, r1) = lab.sim("r1", HOST_R1, "kbs-1").await;
    let mut proxy = lab.proxy("lb", HOST_LB_A, &[("kbs-0", r0), ("kbs-1", r1)]).await;
    let url = proxy.url.clone();

    // Two sessions on kbs-1: one attested with a resource fetched, one only past `auth`.
    let mut attested = client_pinned_to(&url, "kbs-1").await;
    bounded("attest", attested.attest()).await.expect("attest");
    bounded("resource", attested.fetch_resource(RESOURCE))
        .await
        .expect("resource");
    let mut authed = client_pinned_to(&url, "kbs-1").await;

    lab.set_link("r1", false);
    let detected = wait_health(&proxy.admin, "kbs-1", false, HEALTH_LIMIT).await;
    assert_eq!(procs::backend_state(&proxy.admin, "kbs-0").await["healthy"], true);

    // New sessions all go to the replica still reachable.
    for _ in 0..6 {
        let mut c = KbsClient::new(&url);
        bounded("get_resource", c.get_resource(RESOURCE))
            .await
            .expect("a new session");
        let r = c.replicas();
        assert!(r.iter().all(|x| x.as_deref() == Some("kbs-0")), "{r:?}");
    }

    // The pinned sessions get the KBS's own 401, from the proxy, at once ...
    let old_route = attested.cookie(ROUTE).map(str::to_owned);
    let e = bounded("resource", attested.fetch_resource(RESOURCE))
        .await
        .expect_err("pinned to a cut replica");
    assert_kbs_401(&attested, &e, "TokenNotFound");
    let e = bounded("attest", authed.attest())
        .await
        .expect_err("pinned to a cut replica");
    assert_kbs_401(&authed, &e, "AttestationError");

    // ... and recover by themselves: the client redoes its handshake and is re-pinned.
    for c in [&mut attested, &mut authed] {
        bounded("get_resource", c.get_resource(RESOURCE))
            .await
            .expect("recovered on retry");
        let r = session_replicas(c);
        assert!(r.iter().all(|x| x.as_deref() == Some("kbs-0")), "{r:?}");
    }
    assert_ne!(attested.cookie(ROUTE).map(str::to_owned), old_route, "re-pinned");
    let refused = procs::backend_state(&proxy.admin, "kbs-1").await["pinned_refused"].clone();
    assert!(refused.as_u64().is_some_and(|n| n >= 2), "pinned_refused: {refused}");

    // The link comes back: so does the replica, and it takes new sessions again.
    lab.set_link("r1", true);
    let returned = wait_health(&proxy.admin, "kbs-1", true, HEALTH_LIMIT).await;
    let mut seen_r1 = false;
    for _ in 0..6 {
        let mut c = KbsClient::new(&url);
        bounded("get_resource", c.get_resource(RESOURCE))
            .await
            .expect("a new session");
        let r = session_replicas(&c);
        assert!(r.windows(2).all(|w| w[0] == w[1]), "{r:?}");
        seen_r1 |= r[0].as_deref() == Some("kbs-1");
    }
    assert!(seen_r1, "no new session reached kbs-1 after its link came back");

    let status = proxy.process.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    eprintln!(
        "cut replica: down after {detected:?}, up after {returned:?}; test took {:?}",
        started.elapsed()
    );
}

/// What the clients looping through proxy B saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    ok_after_kill: u64,
    failures: Vec<String>,
    crossings: Vec<Vec<Option<String>>>,
}

/// Two proxies sharing the secret route every cookie identically: a session started on one
/// continues on the other; killing proxy A loses none of the sessions going through B, and
/// sessions pinned through A carry on through B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and iproute2: .ci/run runs it (cargo test --test netns -- --ignored)"]
async fn two_proxies_route_alike_and_one_dying_loses_nothing_on_the_other() {
    let started = Instant::now();
    let hosts = [
        ("lb-a", HOST_LB_A),
        ("lb-b", HOST_LB_B),
        ("r0", HOST_R0),
        ("r1", HOST_R1),
    ];
    let lab = Lab::new("ha", &hosts);
    let (_r0, r0) = lab.sim("r0", HOST_R0, "kbs-0").await;
    let (_r1, r1) = lab.sim("r1", HOST_R1, "kbs-1").await;
    let backends = [("kbs-0", r0), ("kbs-1", r1)];
    let mut a = lab.proxy("lb-a", HOST_LB_A, &backends).await;
    let b = lab.proxy("lb-b", HOST_LB_B, &backends).await;

    // Sessions started on one proxy continue on the other with the same jar, both ways: the
    // same replica answers every step, and the route cookie is not re-issued.
    let mut spread = std::collections::BTreeSet::new();
    for i in 0..8 {
        let (first, second) = if i % 2 == 0 { (&a.url, &b.url) } else { (&b.url, &a.url) };
        let mut c = KbsClient::new(first);
        bounded("auth", c.auth()).await.expect("auth");
        let route = c.cookie(ROUTE).map(str::to_owned);
        assert!(route.is_some(), "a route cookie from the first proxy");
        c.retarget(second);
        bounded("attest", c.attest()).await.expect("attest on the other proxy");
        bounded("resource", c.fetch_resource(RESOURCE))
            .await
            .expect("resource on the other proxy");
        let r = c.replicas();
        assert!(r.iter().all(|x| x.is_some() && *x == r[0]), "{r:?}");
        assert_eq!(c.cookie(ROUTE).map(str::to_owned), route, "same cookie, same route");
        spread.insert(r[0].clone().unwrap());
    }
    assert_eq!(spread.len(), 2, "new sessions spread over both replicas: {spread:?}");

    // Sessions attested through A, to be continued through B once A is gone.
    let mut handed_over = Vec::new();
    for _ in 0..4 {
        let mut c = KbsClient::new(&a.url);
        bounded("handshake", c.handshake()).await.expect("handshake on A");
        handed_over.push(c);
    }

    // Clients looping through B (the checked ones) and through A (keeping A busy as it dies).
    let stop = Arc::new(AtomicBool::new(false));
    let a_killed = Arc::new(AtomicBool::new(false));
    let b_sessions = Arc::new(AtomicU64::new(0));
    let mut through_b = Vec::new();
    for _ in 0..3 {
        let (url, stop, a_killed, count) = (b.url.clone(), stop.clone(), a_killed.clone(), b_sessions.clone());
        through_b.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            // Bounded in count as well as by `stop`.
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let after_kill = a_killed.load(Ordering::Relaxed);
                let mut c = KbsClient::new(&url);
                match tokio::time::timeout(CALL_LIMIT, c.get_resource(RESOURCE)).await {
                    Ok(Ok(_)) => {
                        tally.ok += 1;
                        tally.ok_after_kill += u64::from(after_kill);
                    }
                    Ok(Err(e)) => tally.failures.push(e.to_string()),
                    Err(_) => tally.failures.push("timeout".into()),
                }
                let r = session_replicas(&c);
                if r.windows(2).any(|w| w[0] != w[1]) {
                    tally.crossings.push(r);
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
            tally
        }));
    }
    let mut through_a = Vec::new();
    for _ in 0..2 {
        let (url, stop) = (a.url.clone(), stop.clone());
        through_a.push(tokio::spawn(async move {
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut c = KbsClient::new(&url);
                // Fails once A is gone: only B's clients are judged.
                if tokio::time::timeout(CALL_LIMIT, c.get_resource(RESOURCE))
                    .await
                    .is_ok_and(|r| r.is_err())
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }

    // Let B's clients get going, kill A mid-traffic, and let them run on for a while.
    let wait_sessions = |at_least: u64, limit: Duration| {
        let count = b_sessions.clone();
        async move {
            let start = Instant::now();
            while count.load(Ordering::Relaxed) < at_least {
                assert!(start.elapsed() < limit, "B's clients stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_sessions(30, Duration::from_secs(30)).await;
    a.process.kill();
    a_killed.store(true, Ordering::Relaxed);
    let at_kill = b_sessions.load(Ordering::Relaxed);
    let kill_time = Instant::now();
    wait_sessions(at_kill + 60, Duration::from_secs(30)).await;
    while kill_time.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for t in through_b {
        let t = bounded("B's clients", t).await.unwrap();
        total.ok += t.ok;
        total.ok_after_kill += t.ok_after_kill;
        total.failures.extend(t.failures);
        total.crossings.extend(t.crossings);
    }
    for t in through_a {
        bounded("A's clients", t).await.unwrap();
    }
    assert!(a.process.exited().is_some(), "proxy A is gone");
    assert!(
        total.failures.is_empty(),
        "sessions through B failed: {:?}",
        total.failures
    );
    assert!(
        total.crossings.is_empty(),
        "sessions crossed replicas: {:?}",
        total.crossings
    );
    assert!(total.ok_after_kill >= 30, "{total:?}");

    // The sessions attested through A finish through B: same replica, no new handshake.
    for mut c in handed_over {
        c.retarget(&b.url);
        bounded("resource", c.fetch_resource(RESOURCE))
            .await
            .expect("a session from A continues on B");
        let r = c.replicas();
        assert_eq!(r.len(), 3, "auth, attest (A), resource (B): {r:?}");
        assert!(r.iter().all(|x| x.is_some() && *x == r[0]), "{r:?}");
    }
    eprintln!(
        "two proxies: {} sessions through B ({} after A was killed), none failed; test took {:?}",
        total.ok,
        total.ok_after_kill,
        started.elapsed()
    );
}
