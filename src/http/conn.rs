//! Rules for a connection, applied once as it is accepted: no per-request
//! cost.
//!
//! - **`TCP_NODELAY`**: a response goes out in several writes (head, then
//!   pieces); with Nagle on, the last small one waits for the client's
//!   delayed ACK, 40 ms per response.
//! - **`server.send_buffer`** caps the kernel's send buffer (tens of
//!   thousands of slow agents exhaust kernel socket memory first).
//! - **`server.send_timeout`** is the kernel's `TCP_USER_TIMEOUT`: a
//!   connection whose sent bytes go unacknowledged, or whose client keeps its
//!   receive window shut, for that long is aborted by the kernel. A client
//!   that stops reading then loses its connection, and with it the response,
//!   its download slot and its buffers. It measures progress where progress
//!   is (acknowledged bytes): a slow client that keeps reading is never cut,
//!   and a response waiting for a fill has nothing unacknowledged. (Linux
//!   5.11 and newer apply it to a shut window too.)
//! - **`server.max_connections_per_address`**: one client address (not a
//!   trusted proxy, whose connections carry many clients) may hold that many
//!   connections at once; beyond, the new connection is shut at once, before
//!   it costs a buffer. Counted per address while the connection lives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;

use crate::telemetry;

/// What every accepted connection gets.
#[derive(Clone)]
pub struct ConnectionRules {
    pub send_buffer: Option<usize>,
    pub send_timeout: Option<Duration>,
    pub per_address: Option<Arc<PerAddress>>,
}

/// Connections open per client address.
pub struct PerAddress {
    max: u32,
    trusted: Vec<IpNet>,
    shards: Box<[Mutex<HashMap<IpAddr, u32>>]>,
    refused: metrics::Counter,
}

const SHARDS: usize = 16;

impl PerAddress {
    pub fn new(max: u32, trusted: &[IpNet]) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            max,
            trusted: trusted.to_vec(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            refused: metrics::counter!(telemetry::CONNECTIONS_REFUSED, "reason" => "per_address"),
        })
    }

    fn shard(&self, ip: &IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        let n = match ip {
            IpAddr::V4(v4) => v4.octets()[3] as usize,
            IpAddr::V6(v6) => v6.octets()[15] as usize,
        };
        self.shards[n % SHARDS].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a new connection from `ip`, or `None` when it holds the most
    /// it may. The count goes down when the returned guard is dropped.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Counted> {
        if self.trusted.iter().any(|n| n.contains(&ip)) {
            return Some(Counted { table: None, ip });
        }
        let mut shard = self.shard(&ip);
        let n = shard.entry(ip).or_insert(0);
        if *n >= self.max {
            drop(shard);
            self.refused.increment(1);
            return None;
        }
        *n += 1;
        Some(Counted { table: Some(self.clone()), ip })
    }

    /// Connections open from `ip` (for tests and status).
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        self.shard(&ip).get(&ip).copied().unwrap_or(0)
    }
}

/// A counted connection; kept in the connection's extensions, so it is
/// dropped (and uncounted) when the connection ends, however it ends.
struct Counted {
    table: Option<Arc<PerAddress>>,
    ip: IpAddr,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(table) = &self.table {
            let mut shard = table.shard(&self.ip);
            if let Some(n) = shard.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shard.remove(&self.ip);
                }
            }
        }
    }
}

impl ConnectionRules {
    /// Apply the rules to a connection just accepted (actix-web's
    /// `on_connect`). Socket options that cannot be set are logged: the
    /// connection is served anyway.
    pub fn apply(&self, tcp: &actix_rt::net::TcpStream, ext: &mut actix_web::dev::Extensions) {
        match tcp.peer_addr() {
            Ok(peer) => self.apply_as(tcp, peer.ip(), ext),
            Err(_) => self.socket_options(tcp),
        }
    }

    /// [`ConnectionRules::apply`] for a connection whose client is `client`
    /// (from a PROXY header: the TCP peer is the balancer).
    pub fn apply_as(&self, tcp: &actix_rt::net::TcpStream, client: IpAddr, ext: &mut actix_web::dev::Extensions) {
        if let Some(per_address) = &self.per_address {
            let peer = client;
            // An IPv4 client of a [::] listener is `::ffff:a.b.c.d`: counted,
            // and matched against IPv4 proxies, as the IPv4 address it is.
            match per_address.admit(peer.to_canonical()) {
                Some(counted) => {
                    ext.insert(counted);
                }
                None => {
                    tracing::debug!(peer = %peer, "too many connections from one address; shutting this one");
                    let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
        self.socket_options(tcp);
    }

    fn socket_options(&self, tcp: &actix_rt::net::TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let sock = socket2::SockRef::from(tcp);
        if let Some(size) = self.send_buffer
            && let Err(e) = sock.set_send_buffer_size(size)
        {
            tracing::debug!(error = %e, "cannot set SO_SNDBUF");
        }
        if let Some(timeout) = self.send_timeout
            && let Err(e) = sock.set_tcp_user_timeout(Some(timeout))
        {
            tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
        }
    }
}
