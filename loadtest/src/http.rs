//! A minimal HTTP/1.1 client, written for the load generator rather than taken
//! from a crate: it must bind each connection to a chosen source address
//! (127.0.0.x, to get past the ~28,000 ephemeral ports per destination), keep
//! per-connection memory tiny for tens of thousands of agents, and expose the
//! exact moment the first body byte arrives. It speaks only what patchrelay and
//! nginx answer a GET with: a status line, headers, and a Content-Length body.

use std::io;
use std::net::{IpAddr, SocketAddr};

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use nix::sys::time::TimeSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};

pub struct Conn {
    stream: Stream,
    buf: BytesMut,
    host: String,
}

/// Plain TCP, or TLS over it (for HTTPS rows: the slow agents' memory cost
/// with encryption on both sides).
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A TLS client trusting the CA certificates in the PEM file `ca`.
pub fn tls_client(ca: &std::path::Path) -> io::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(format!("{}: {e}", ca.display())))? {
        roots.add(cert.map_err(|e| bad(format!("{}: {e}", ca.display())))?).map_err(|e| bad(e.to_string()))?;
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub content_length: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Conn {
    /// Connect to `target`, from `source` if given. `recv_buffer` caps the
    /// kernel receive buffer (slow agents should not each hold megabytes).
    pub async fn connect(target: SocketAddr, source: Option<IpAddr>, recv_buffer: Option<u32>) -> io::Result<Conn> {
        let sock = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = source {
            sock.bind(SocketAddr::new(ip, 0))?;
        }
        if let Some(n) = recv_buffer {
            sock.set_recv_buffer_size(n)?;
        }
        let stream = sock.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream: Stream::Plain(stream), buf: BytesMut::with_capacity(4096), host: target.to_string() })
    }

    /// [`Conn::connect`], then a TLS handshake naming the target's address.
    pub async fn connect_tls(
        target: SocketAddr,
        source: Option<IpAddr>,
        recv_buffer: Option<u32>,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> io::Result<Conn> {
        let mut conn = Conn::connect(target, source, recv_buffer).await?;
        let Stream::Plain(tcp) = conn.stream else { unreachable!("connect makes a plain stream") };
        let name = rustls::pki_types::ServerName::IpAddress(target.ip().into());
        let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
        conn.stream = Stream::Tls(Box::new(tls));
        Ok(conn)
    }

    /// Read the body in pieces of up to `n` bytes (4 KiB unless set): fewer
    /// reads for agents that take whole files, a small buffer for slow ones.
    pub fn read_buffer(&mut self, n: usize) {
        self.buf.reserve(n);
    }

    /// Ask the kernel to stamp received data with its arrival time, for
    /// [`Conn::first_body_arrival`].
    pub fn stamp_arrivals(&self) -> io::Result<()> {
        match &self.stream {
            Stream::Plain(s) => setsockopt(s, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from),
            Stream::Tls(_) => {
                Err(io::Error::new(io::ErrorKind::Unsupported, "arrival stamps are for plain connections"))
            }
        }
    }

    /// When the first body byte reached this socket, by the kernel's receive
    /// timestamp (wall clock), or `None` if it was already read with the head.
    ///
    /// The time this process reads a byte is the time the server sent it plus
    /// however long this process took to get round to that agent; with a
    /// thousand agents sharing two cores, the second part dominates. The arrival
    /// stamp leaves it out, as a real agent on its own machine would.
    pub async fn first_body_arrival(&mut self) -> io::Result<Option<SystemTime>> {
        if !self.buf.is_empty() {
            return Ok(None);
        }
        let Stream::Plain(stream) = &self.stream else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "arrival stamps are for plain connections"));
        };
        let fd = stream.as_raw_fd();
        loop {
            stream.readable().await?;
            let got = stream.try_io(Interest::READABLE, || {
                // One byte, so the stamp is that of the first segment.
                let mut byte = [0u8; 1];
                let mut space = nix::cmsg_space!(TimeSpec);
                let mut iov = [IoSliceMut::new(&mut byte)];
                let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::empty()).map_err(io::Error::from)?;
                let mut stamp = None;
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmTimestampns(t) = c {
                        stamp = Some(UNIX_EPOCH + Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32));
                    }
                }
                Ok((msg.bytes, byte[0], stamp))
            });
            match got {
                Ok((0, _, _)) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the body"));
                }
                Ok((_, byte, stamp)) => {
                    self.buf.put_u8(byte);
                    return Ok(stamp);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Send `GET path` with extra header lines (each "Name: value").
    pub async fn get(&mut self, path: &str, headers: &[String]) -> io::Result<Head> {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: patchrelay-load\r\n", self.host);
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        self.stream.write_all(req.as_bytes()).await?;
        self.read_head().await
    }

    async fn read_head(&mut self) -> io::Result<Head> {
        loop {
            let mut parsed = [httparse::EMPTY_HEADER; 32];
            let mut res = httparse::Response::new(&mut parsed);
            match res.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = res.code.unwrap_or(0);
                    let content_length = res
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok());
                    // 304 and 204 carry no body, whatever they say.
                    let content_length = match (status, content_length) {
                        (304 | 204, _) => 0,
                        (_, Some(n)) => n,
                        (_, None) => return Err(bad("response without Content-Length")),
                    };
                    self.buf.advance(n);
                    return Ok(Head { status, content_length });
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(bad(format!("bad response head: {e}"))),
            }
            if self.buf.len() > 64 * 1024 {
                return Err(bad("response head over 64 KiB"));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the response head"));
            }
        }
    }

    /// Read `len` body bytes, handing each piece to `sink`. `limit` stops early
    /// (the caller then drops the connection, as an agent whose link fails).
    pub async fn read_body(&mut self, len: u64, limit: Option<u64>, mut sink: impl FnMut(&[u8])) -> io::Result<u64> {
        let stop = limit.unwrap_or(len).min(len);
        let mut got = 0u64;
        while got < stop {
            if self.buf.is_empty() && self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body ended at {got} of {len} bytes"),
                ));
            }
            let take = (self.buf.len() as u64).min(stop - got) as usize;
            sink(&self.buf[..take]);
            self.buf.advance(take);
            got += take as u64;
            // One piece per turn. Simulated agents share this process's CPU, as real
            // ones do not: an agent whose socket is full would otherwise hash
            // megabytes before the others read their first byte, and first-byte
            // figures would measure this client's scheduling, not the server.
            tokio::task::yield_now().await;
        }
        Ok(got)
    }
}
