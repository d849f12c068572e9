//! Hostile and malformed requests, sent as raw bytes over TCP (an HTTP client
//! library would tidy them up first): path traversal, odd encodings, broken
//! ranges and headers. Every one gets a 4xx (or a valid 2xx/416), never a 5xx,
//! never a hang, and the server keeps serving afterwards.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// Send raw request bytes; return the status code (0 if the server just closed).
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, Vec<u8>) {
    let s = TcpStream::connect(addr).unwrap();
    exchange(s, request, false)
}

/// Sends `request` and reads the whole answer; `slowly` reads in small steps with pauses,
/// so the server finds the socket full and must keep what it could not send yet.
#[allow(clippy::disallowed_methods)] // runs on a spawn_blocking thread: no async worker to block
fn exchange(mut s: TcpStream, request: &[u8], slowly: bool) -> (u16, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    if slowly {
        // Let the server fill the socket before the first read.
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 4096];
        for i in 0.. {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if i % 16 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    } else {
        let _ = s.read_to_end(&mut out);
    }
    let status = std::str::from_utf8(&out[..out.len().min(12)])
        .ok()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// A connection whose receive buffer is small, so a large answer fills it at once.
fn small_window(addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n").into_bytes()
}

#[actix_web::test]
async fn traversal_and_odd_paths_are_4xx() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    let relay = start_relay(&[&origin.url()], &repo.public, storage.path()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let long = "a".repeat(5000);
    let paths = [
        "/v1/objects/../../../../etc/passwd",
        "/v1/objects/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/v1/objects/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/chunks/..%2F..%2Fmanifest",
        "/v1/components/..%2f..%2fetc/versions/passwd",
        "/v1/components/engine/versions/..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/components/engine/versions/%00",
        "/v1/components/%00/latest",
        "/v1/components/engine/versions/1%20",
        "/v1/../v1/manifest/../../etc/passwd",
        "/v1/objects/%ff%fe",
        "/v1/objects/",
        &format!("/v1/objects/{long}"),
        &format!("/v1/components/{long}/latest"),
    ];
    for server in [&origin, &relay] {
        for path in paths {
            let (status, body) = tokio::task::spawn_blocking({
                let (addr, req) = (server.addr, get(path, ""));
                move || raw(addr, &req)
            })
            .await
            .unwrap();
            assert!((400..500).contains(&status), "{path}: {status}");
            assert!(!String::from_utf8_lossy(&body).contains("root:"), "{path}");
        }
    }
}

#[actix_web::test]
async fn malformed_ranges_and_headers_never_break_the_server() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let storage = tempfile::tempdir().unwrap();
    let relay = start_relay(&[&origin.url()], &repo.public, storage.path()).await;
    assert!(wait_ready(&relay.url(), Duration::from_secs(10)).await);
    let sha = repo.sha("big", "1.0");
    let path = format!("/v1/objects/{sha}");
    let many = (0..1000).map(|i| format!("{i}-{i}")).collect::<Vec<_>>().join(",");
    let overlapping = (0..60).map(|_| "0-3145727").collect::<Vec<_>>().join(",");
    let headers = [
        "Range: bytes=--\r\n".to_string(),
        "Range: bytes=1-2-3\r\n".to_string(),
        "Range: bytes=99999999999999999999999-\r\n".to_string(),
        "Range: bytes=-99999999999999999999999\r\n".to_string(),
        "Range: bytes= 0-1\r\n".to_string(),
        "Range: bytes=0-1,,,,\r\n".to_string(),
        "Range: bytes=5-1\r\n".to_string(),
        "Range: pages=1-2\r\n".to_string(),
        "Range: \r\n".to_string(),
        "Range: bytes=\u{ff}\u{fe}\r\n".to_string(),
        format!("Range: bytes={many}\r\n"),
        format!("Range: bytes={overlapping}\r\n"),
        "Range: bytes=0-0\r\nIf-Range: garbage\r\n".to_string(),
        "Range: bytes=0-0\r\nIf-Range: W/\"x\"\r\n".to_string(),
        "If-None-Match: \"unterminated\r\n".to_string(),
        "If-Modified-Since: yesterday\r\n".to_string(),
        "If-Match: *\r\nIf-None-Match: *\r\n".to_string(),
        format!("X-Big: {}\r\n", "x".repeat(60_000)),
    ];
    for h in &headers {
        let (status, body) = tokio::task::spawn_blocking({
            let (addr, req) = (relay.addr, get(&path, h));
            move || raw(addr, &req)
        })
        .await
        .unwrap();
        assert!(matches!(status, 200 | 206 | 304 | 400..=499), "{h:?}: {status}");
        if status == 206 {
            // Never more bytes than the object has (overlaps are merged).
            assert!(body.len() < 2 * (3 << 20), "{h:?}");
        }
    }
    // Still alive and correct.
    let r = client().get(format!("{}{path}", relay.url())).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), noise(42, 3 << 20));

    // Garbage instead of HTTP: the connection is answered 400 or closed.
    for junk in [&b"\x00\x01\x02\r\n\r\n"[..], b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"] {
        let (status, _) = tokio::task::spawn_blocking({
            let (addr, req) = (relay.addr, junk.to_vec());
            move || raw(addr, &req)
        })
        .await
        .unwrap();
        assert!(status == 0 || (400..500).contains(&status), "{junk:?}: {status}");
    }
}

/// The read buffer starts at 1 KiB and grows on demand (the actix-http patch in
/// vendor/): a 20 KB head still parses, and pipelined requests on one
/// connection, written in one go, are each answered in order with the right bytes.
#[actix_web::test]
async fn large_heads_and_pipelined_requests_are_served() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let sha = repo.sha("big", "1.0");
    let path = format!("/v1/objects/{sha}");
    let want = noise(42, 3 << 20);

    let big_head: String = (0..20).map(|i| format!("X-Pad-{i}: {}\r\n", "p".repeat(1000))).collect();
    let (status, body) = tokio::task::spawn_blocking({
        let (addr, req) = (origin.addr, get(&path, &format!("Range: bytes=0-99\r\n{big_head}")));
        move || raw(addr, &req)
    })
    .await
    .unwrap();
    assert_eq!(status, 206);
    assert!(body.ends_with(&want[..100]));

    // Small and large answers in one pipeline: large bodies are written straight to the socket
    // (the patched dispatcher), small ones and every head through its buffer, and the order
    // must hold whether the reader keeps up or not.
    let whole = (0, 3_145_727);
    let ranges = [(0, 9), (100, 299_999), whole, whole, whole, (3_145_700, 3_145_727)];
    let mut pipelined = Vec::new();
    for (i, (from, to)) in ranges.iter().enumerate() {
        let close = if i == ranges.len() - 1 { "close" } else { "keep-alive" };
        pipelined.extend_from_slice(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: {close}\r\nRange: bytes={from}-{to}\r\n\r\n")
                .as_bytes(),
        );
    }
    for slowly in [false, true] {
        let (status, out) = tokio::task::spawn_blocking({
            let (addr, pipelined) = (origin.addr, pipelined.clone());
            move || match slowly {
                true => exchange(small_window(addr), &pipelined, true),
                false => raw(addr, &pipelined),
            }
        })
        .await
        .unwrap();
        assert_eq!(status, 206, "slowly: {slowly}");
        // Every response, in order, each with its slice of the object.
        let mut rest = &out[..];
        for (from, to) in ranges {
            let head_end = rest.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
            let head = String::from_utf8_lossy(&rest[..head_end]).to_lowercase();
            assert!(head.starts_with("http/1.1 206"), "{head}");
            assert!(head.contains(&format!("content-range: bytes {from}-{to}/")), "{head}");
            let len = to - from + 1;
            assert!(rest[head_end..head_end + len] == want[from..=to], "slowly: {slowly}, {from}-{to}");
            rest = &rest[head_end + len..];
        }
        assert!(rest.is_empty(), "slowly: {slowly}");
    }
}

/// Slowloris: 200 connections that each send a request head a byte at a
/// time and never finish it. They are closed within the head timeout
/// (actix-web's 5 s) while other clients are served as usual throughout.
#[actix_web::test]
async fn slow_request_heads_are_cut_and_others_still_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(origin.addr).await.unwrap();
        s.write_all(b"GET /v1/manifest HTTP/1.1\r\nHost: x\r\nX-Pad: ").await.unwrap();
        slow.push(s);
    }
    let started = std::time::Instant::now();
    let mut open = slow.len();
    let mut closed_at = None;
    while started.elapsed() < Duration::from_secs(15) {
        // A byte on each still-open connection, and a real client in between.
        for s in slow.iter_mut() {
            let _ = s.write_all(b"a").await;
        }
        let r = client().get(format!("{}/v1/manifest", origin.url())).send().await.unwrap();
        assert_eq!(r.status(), 200, "a normal client was not served during the attack");
        open = 0;
        for s in slow.iter_mut() {
            let mut buf = [0u8; 512];
            match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                Ok(Ok(_)) => {} // an error answer (408) before closing counts as closed too
                Err(_) => open += 1,
            }
        }
        if open == 0 {
            closed_at = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let closed = closed_at.unwrap_or_else(|| panic!("{open} slow heads still open after 15 s"));
    assert!(closed < Duration::from_secs(10), "slow heads held for {closed:?}");
}

/// A head with more headers than the server takes is refused (4xx); one with
/// a few dozen is served.
#[actix_web::test]
async fn too_many_headers_are_refused() {
    let repo = TestRepo::new();
    let origin = start_origin(&repo).await;
    for (n, ok) in [(40, true), (200, false)] {
        let extra: String = (0..n).map(|i| format!("X-H{i}: v\r\n")).collect();
        let (status, _) = tokio::task::spawn_blocking({
            let (addr, req) = (origin.addr, get("/v1/manifest", &extra));
            move || raw(addr, &req)
        })
        .await
        .unwrap();
        if ok {
            assert_eq!(status, 200, "{n} headers");
        } else {
            assert!((400..500).contains(&status) || status == 0, "{n} headers: {status}");
        }
    }
    let r = client().get(format!("{}/v1/manifest", origin.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
