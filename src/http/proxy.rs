//! The PROXY protocol (v1 text and v2 binary, as HAProxy sends with
//! `send-proxy` / `send-proxy-v2`) on a listener with `proxy_protocol =
//! true`: the load balancer opens each connection with a header naming the
//! client, and the relay takes that address as the connection's peer, so
//! limits, logs and policies see the agent, not the balancer.
//!
//! Only a peer in `server.trusted_proxies` may send one; any other
//! connection, and one whose header is missing, malformed or slower than
//! [`HEADER_TIMEOUT`], is closed before a byte of HTTP is read. Exactly the
//! header's bytes are consumed (v2 says its length; v1 is found by peeking),
//! so what follows goes to HTTP untouched. A `LOCAL` header (the balancer's
//! own health checks) keeps the balancer's address; a proxied connection
//! without a TCP client address (`UNKNOWN`, a unix socket) is refused, since
//! the balancer's trusted address would make the client's own
//! `X-Forwarded-For` believed.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long a connection may take to send its PROXY header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The v2 signature (12 bytes); a v2 header is 16 bytes and then its length.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// Headers with TLVs beyond this are refused (HAProxy's are far smaller).
const V2_MAX_BODY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("peer {0} is not in server.trusted_proxies: a PROXY header from it is not believed")]
    Untrusted(SocketAddr),
    #[error("no PROXY header within {HEADER_TIMEOUT:?}")]
    Timeout,
    #[error("not a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Read the PROXY header from a connection just accepted from `peer`: the
/// client's address, or `peer` itself for `LOCAL` and `UNKNOWN` headers.
pub async fn accept(io: &mut TcpStream, trusted: &[IpNet]) -> Result<SocketAddr, ProxyHeaderError> {
    let peer = io.peer_addr()?;
    let ip = peer.ip().to_canonical();
    if !trusted.iter().any(|n| n.contains(&ip)) {
        return Err(ProxyHeaderError::Untrusted(peer));
    }
    match tokio::time::timeout(HEADER_TIMEOUT, read(io, peer)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyHeaderError::Timeout),
    }
}

async fn read(io: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, ProxyHeaderError> {
    let mut head = [0u8; 16];
    // Peek until the first 16 bytes (or a v1 line's end) are here.
    loop {
        let n = io.peek(&mut head).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Missing);
        }
        if n == head.len() || (head.starts_with(b"PROXY ") && head[..n].contains(&b'\n')) {
            break;
        }
        if !V2_SIGNATURE.starts_with(&head[..n.min(12)]) && !b"PROXY ".starts_with(&head[..n.min(6)]) {
            return Err(ProxyHeaderError::Missing);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if head.starts_with(V2_SIGNATURE) {
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        if len > V2_MAX_BODY {
            return Err(ProxyHeaderError::Malformed(format!("v2 header of {len} bytes")));
        }
        let mut whole = vec![0u8; 16 + len];
        io.read_exact(&mut whole).await?;
        let header = ppp::v2::Header::try_from(&whole[..]).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
        return Ok(match (header.command, header.addresses) {
            (ppp::v2::Command::Local, _) => peer,
            (_, ppp::v2::Addresses::IPv4(a)) => SocketAddr::from((a.source_address, a.source_port)),
            (_, ppp::v2::Addresses::IPv6(a)) => SocketAddr::from((a.source_address, a.source_port)),
            // Keeping the balancer's (trusted) address would make the
            // client's own X-Forwarded-For believed.
            _ => return Err(ProxyHeaderError::Malformed("a proxied connection without a TCP client address".into())),
        });
    }
    if !head.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    let mut line = [0u8; V1_MAX];
    let end = loop {
        let n = io.peek(&mut line).await?;
        if let Some(i) = line[..n].windows(2).position(|w| w == b"\r\n") {
            break i + 2;
        }
        if n == V1_MAX {
            return Err(ProxyHeaderError::Malformed("v1 header without CRLF in 107 bytes".into()));
        }
        if n == 0 {
            return Err(ProxyHeaderError::Missing);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut whole = vec![0u8; end];
    io.read_exact(&mut whole).await?;
    let header = ppp::v1::Header::try_from(&whole[..]).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v1::Addresses::Tcp6(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v1::Addresses::Unknown => {
            return Err(ProxyHeaderError::Malformed("PROXY UNKNOWN: no client address".into()));
        }
    })
}

/// A connection whose client a PROXY header named: what HTTP reads and
/// writes is the TCP stream; `client` lets the connection rules count it
/// against the agent's address, not the balancer's.
pub struct Proxied {
    pub tcp: TcpStream,
    pub client: SocketAddr,
}

impl tokio::io::AsyncRead for Proxied {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Proxied {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    // Vectored writes are how body pieces reach the socket without a copy
    // (vendor/actix-http): pass them through, not one slice at a time.
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair(bytes: Vec<u8>, trusted: &str) -> (Result<SocketAddr, ProxyHeaderError>, Vec<u8>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let w = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            // In two writes: the header may arrive in pieces.
            let (a, b) = bytes.split_at(bytes.len().min(7));
            c.write_all(a).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(b).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            c
        });
        let (mut s, _) = l.accept().await.unwrap();
        let r = accept(&mut s, &[trusted.parse().unwrap()]).await;
        let _c = w.await.unwrap();
        let mut rest = vec![0u8; 16];
        let n = if r.is_ok() { s.read(&mut rest).await.unwrap() } else { 0 };
        rest.truncate(n);
        (r, rest)
    }

    #[tokio::test]
    async fn v1_and_v2_name_the_client_and_leave_http_untouched() {
        let (r, rest) = pair(b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 80\r\n".to_vec(), "127.0.0.0/8").await;
        assert_eq!(r.unwrap(), "10.1.2.3:5555".parse::<SocketAddr>().unwrap());
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");

        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 9, 8, 7, 127, 0, 0, 1, 0x1f, 0x90, 0, 80]);
        let (r, rest) = pair(v2, "127.0.0.0/8").await;
        assert_eq!(r.unwrap(), "10.9.8.7:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");

        // LOCAL (health checks): the balancer's own address.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        let (r, _) = pair(local, "127.0.0.0/8").await;
        assert_eq!(r.unwrap().ip(), std::net::IpAddr::from([127, 0, 0, 1]));
    }

    #[tokio::test]
    async fn untrusted_missing_and_malformed_headers_are_refused() {
        let (r, _) = pair(b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 80\r\n".to_vec(), "10.0.0.0/8").await;
        assert!(matches!(r, Err(ProxyHeaderError::Untrusted(_))), "{r:?}");
        let (r, _) = pair(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "127.0.0.0/8").await;
        assert!(matches!(r, Err(ProxyHeaderError::Missing)), "{r:?}");
        let (r, _) = pair(b"PROXY TCP4 999.1.2.3 127.0.0.1 5555 80\r\n".to_vec(), "127.0.0.0/8").await;
        assert!(matches!(r, Err(ProxyHeaderError::Malformed(_))), "{r:?}");
        let (r, _) = pair(b"PROXY UNKNOWN\r\n".to_vec(), "127.0.0.0/8").await;
        assert!(matches!(r, Err(ProxyHeaderError::Malformed(_))), "{r:?}");
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (r, _) = pair(huge, "127.0.0.0/8").await;
        assert!(matches!(r, Err(ProxyHeaderError::Malformed(_))), "{r:?}");
    }
}
