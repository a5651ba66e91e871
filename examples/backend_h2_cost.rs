//! What HTTP/2 to the backends would cost, against pooled HTTP/1.1 — measured, not guessed.
//!
//! ```text
//! cargo run --release --example backend_h2_cost -- [REQUESTS] [CONCURRENCY] [ROUNDS] [h1|h2]
//! ```
//!
//! One process, two threads, each with a `current_thread` runtime: a backend (hyper's server,
//! answering HTTP/1.1 and HTTP/2 with prior knowledge alike, 200 with a 3-byte body) and a client
//! side that is what the proxy's hyper path is towards its backends: hyper-util's pooled legacy
//! client, once as the proxy builds it (HTTP/1.1, a connection per request in flight) and once
//! with `http2_only` (one connection, a stream per request in flight). CONCURRENCY tasks
//! (default 64, as `benches/compare.sh`) send REQUESTS in all (default 200,000) with a route
//! cookie-sized header, each waiting for its answer; ROUNDS (default 5) alternate the two
//! protocols (a last argument `h1` or `h2` runs only that one, e.g. under `strace -c -f` to
//! count system calls). Per round it prints the client thread's and the backend thread's CPU
//! time per request (the client's `CLOCK_THREAD_CPUTIME_ID`; the backend's as the process's less
//! the client's), so other load on the machine does not count, and at the end the medians and
//! the HTTP/2 ÷ HTTP/1.1 ratios.
//!
//! The client side is the proxy's hyper path, not its fast path (which speaks HTTP/1.1 only and
//! costs less again, see docs/benchmarks.md): HTTP/2 to the backends would move every proxied
//! request onto the hyper path.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustix::time::{clock_gettime, ClockId};
use tokio::net::TcpListener;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map_or(default, |a| a.parse().expect("a positive number"))
    };
    let (requests, concurrency, rounds) = (arg(1, 200_000), arg(2, 64).max(1), arg(3, 5).max(1));
    let only = std::env::args().nth(4);

    // The backend, on the process's only other thread: its CPU time is the process's less this
    // thread's.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = listener.local_addr().expect("an address");
    std::thread::spawn(move || backend(listener));
    let backend_cpu = || cpu(ClockId::ProcessCPUTime) - thread_cpu();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut results: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    rt.block_on(async {
        let h1 = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Empty<Bytes>>();
        let url: hyper::Uri = format!("http://{addr}/kbs/v0/resource/default/key/1").parse().unwrap();
        // Warm both: connections made, allocator and caches settled.
        for (i, client) in [&h1, &h2].into_iter().enumerate() {
            if only.as_deref().map_or(true, |o| o == ["h1", "h2"][i]) {
                load(client, &url, concurrency * 50, concurrency).await;
            }
        }
        for round in 1..=rounds {
            for (i, (name, client)) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)].into_iter().enumerate() {
                if only.as_deref().is_some_and(|o| o != ["h1", "h2"][i]) {
                    continue;
                }
                let (cpu0, b0, t0) = (thread_cpu(), backend_cpu(), Instant::now());
                load(client, &url, requests, concurrency).await;
                let (cpu1, b1, wall) = (thread_cpu(), backend_cpu(), t0.elapsed());
                let sample = Sample {
                    client_us: per_request(cpu1 - cpu0, requests),
                    backend_us: per_request(b1 - b0, requests),
                    rps: requests as f64 / wall.as_secs_f64(),
                };
                println!(
                    "round {round} {name:8}  {:>8.0} req/s  client {:5.2} µs/req  backend {:5.2} µs/req",
                    sample.rps, sample.client_us, sample.backend_us
                );
                results[i].push(sample);
            }
        }
    });

    let median = |v: &[Sample], f: fn(&Sample) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    println!("\nmedians of {rounds} rounds, {requests} requests each, {concurrency} in flight:");
    println!("| | req/s | client CPU µs/req | backend CPU µs/req |");
    println!("|---|---:|---:|---:|");
    for (i, name) in ["HTTP/1.1", "HTTP/2"].into_iter().enumerate() {
        if results[i].is_empty() {
            continue;
        }
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} |",
            median(&results[i], |s| s.rps),
            median(&results[i], |s| s.client_us),
            median(&results[i], |s| s.backend_us)
        );
    }
    if only.is_some() {
        return;
    }
    // Ratios paired per round, as benches/compare.sh pairs them.
    let paired = |f: fn(&Sample) -> f64| {
        let mut r: Vec<f64> = results[1].iter().zip(&results[0]).map(|(b, a)| f(b) / f(a)).collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    println!(
        "| HTTP/2 ÷ HTTP/1.1 | {:.2} | {:.2} | {:.2} |",
        paired(|s| s.rps),
        paired(|s| s.client_us),
        paired(|s| s.backend_us)
    );
}

struct Sample {
    client_us: f64,
    backend_us: f64,
    rps: f64,
}

fn per_request(cpu: Duration, requests: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / requests as f64
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    cpu(ClockId::ThreadCPUTime)
}

fn cpu(clock: ClockId) -> Duration {
    let t = clock_gettime(clock);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Sends `requests` in all from `concurrency` tasks, each waiting for its answer.
async fn load(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &hyper::Uri,
    requests: usize,
    concurrency: usize,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let (client, url) = (client.clone(), url.clone());
        let n = requests / concurrency + usize::from(t < requests % concurrency);
        tasks.spawn(async move {
            for _ in 0..n {
                let req = Request::get(url.clone())
                    .header("cookie", "route=AfUS1jp_NgZBaw7kQJx2Vb0c3Qp9m4nYtR8sLk1eWfGhIjKlMnOpQ")
                    .header("x-forwarded-for", "127.0.0.1")
                    .body(Empty::new())
                    .expect("a valid request");
                let resp = client.request(req).await.expect("the backend answers");
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.expect("the whole body");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a load task");
    }
}

/// The backend: HTTP/1.1 and HTTP/2 (prior knowledge) on one port.
fn backend(listener: std::net::TcpListener) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let listener = TcpListener::from_std(listener).expect("a tokio listener");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "text/plain")
                            .body(Full::new(Bytes::from_static(b"ok\n")))
                            .expect("a valid response"),
                    )
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
