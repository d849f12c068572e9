//! Who an agent is, read from a request: the one place that knows.
//!
//! Limits, the fleet inventory and staged rollouts all need the same answer,
//! under the same rules:
//!
//! - **The client's address** is the peer's, unless the peer is one of
//!   `server.trusted_proxies`: then it comes from the one header those proxies
//!   are configured to set (`server.forwarded_header`, `X-Forwarded-For` or
//!   `Forwarded`), read right to left, the first hop that is not a trusted
//!   proxy. The other header is never read (a client may have sent it, and a
//!   proxy passed it on).
//! - **The agent** is named by `limits.identity`: the `limits.agent_header`
//!   value (`header`, the default; printable ASCII up to 128 bytes, else the
//!   address), the address alone (`ip`), or the name in its verified client
//!   certificate (`cert`; a connection without one: the address).
//!
//! An id is the agent's own word; an address is not. What relies on the
//! difference (limits match address policies first) sees which one it got.

use std::net::IpAddr;

use actix_web::http::header::{HeaderMap, HeaderName};
use ipnet::IpNet;
use serde::Deserialize;

/// `limits.identity`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    #[default]
    Header,
    Ip,
    Cert,
}

/// Which header trusted proxies set (`server.forwarded_header`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Forwarded {
    #[default]
    XForwardedFor,
    Forwarded,
}

impl Forwarded {
    pub fn parse(s: &str) -> Result<Forwarded, String> {
        match s.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Forwarded::XForwardedFor),
            "forwarded" => Ok(Forwarded::Forwarded),
            _ => Err(format!("{s:?}: use \"x-forwarded-for\" or \"forwarded\", whichever your proxies set")),
        }
    }
}

impl<'de> Deserialize<'de> for Forwarded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Forwarded::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Who an agent is (borrowed from the request: no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who<'a> {
    /// An id: printable ASCII, checked.
    Id(&'a [u8]),
    Ip(IpAddr),
}

/// The rules, built once per server.
#[derive(Debug, Clone)]
pub struct Identify {
    kind: IdentityKind,
    agent_header: HeaderName,
    trusted_proxies: Vec<IpNet>,
    forwarded: Forwarded,
}

impl Identify {
    pub fn new(
        kind: IdentityKind,
        agent_header: HeaderName,
        trusted_proxies: Vec<IpNet>,
        forwarded: Forwarded,
    ) -> Identify {
        Identify { kind, agent_header, trusted_proxies, forwarded }
    }

    /// The rules a config sets.
    pub fn from_config(config: &crate::config::Config) -> Identify {
        Identify::new(
            config.limits.identity,
            config.limits.agent_header.0.clone(),
            config.server.trusted_proxies.clone(),
            config.server.forwarded_header,
        )
    }

    pub fn kind(&self) -> IdentityKind {
        self.kind
    }

    /// Whether agents are named by their client certificates: only then is
    /// the connection's certificate name worth looking up for a request.
    pub fn by_certificate(&self) -> bool {
        self.kind == IdentityKind::Cert
    }

    pub fn agent_header(&self) -> &HeaderName {
        &self.agent_header
    }

    /// The client's address: the peer, or what a trusted proxy says it is.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        client_ip(peer, headers, &self.trusted_proxies, self.forwarded)
    }

    /// Who the agent at `ip` is; `cert`: the name in the connection's
    /// client certificate (checked printable and short as it opened).
    pub fn who<'a>(&self, ip: IpAddr, headers: &'a HeaderMap, cert: Option<&'a [u8]>) -> Who<'a> {
        match self.kind {
            IdentityKind::Cert => cert.map_or(Who::Ip(ip), Who::Id),
            IdentityKind::Ip => Who::Ip(ip),
            IdentityKind::Header => match headers.get(&self.agent_header).and_then(|v| agent_id(v.as_bytes())) {
                Some(id) => Who::Id(id),
                None => Who::Ip(ip),
            },
        }
    }
}

/// An agent id as sent: trimmed, 1 to 128 printable ASCII bytes (one pass:
/// printable ASCII is also a valid header value and UTF-8), or none.
pub fn agent_id(v: &[u8]) -> Option<&[u8]> {
    let v = v.trim_ascii();
    (!v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic())).then_some(v)
}

/// The client's address. Only when the peer is a trusted proxy, and only from
/// the header the proxies are configured to set (`forwarded`): read right to
/// left, the first address that is not a trusted proxy is the client's (every
/// hop appends the address it got the request from; anything to the left of
/// the first untrusted one was written by the client itself). If every
/// address in it is trusted, the leftmost; if it has none, the peer.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet], forwarded: Forwarded) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    // An IPv4 client of a [::] listener is `::ffff:a.b.c.d`.
    let peer = peer.to_canonical();
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    match forwarded {
        Forwarded::Forwarded => {
            for v in headers.get_all(actix_web::http::header::FORWARDED).filter_map(|v| v.to_str().ok()) {
                for elem in v.split(',') {
                    for pair in elem.split(';') {
                        if let Some((k, val)) = pair.trim().split_once('=')
                            && k.trim().eq_ignore_ascii_case("for")
                        {
                            let val = val.trim().trim_matches('"');
                            let val = val
                                .strip_prefix('[')
                                .and_then(|s| s.split(']').next())
                                .unwrap_or_else(|| val.split(':').next().unwrap_or(val));
                            if let Ok(ip) = val.parse() {
                                hops.push(ip);
                            }
                        }
                    }
                }
            }
        }
        Forwarded::XForwardedFor => {
            for v in headers.get_all("x-forwarded-for").filter_map(|v| v.to_str().ok()) {
                hops.extend(v.split(',').filter_map(|s| s.trim().parse::<IpAddr>().ok()));
            }
        }
    }
    for hop in &mut hops {
        *hop = hop.to_canonical();
    }
    hops.iter().rev().find(|ip| !is_trusted(ip)).or(hops.first()).copied().unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    #[test]
    fn forwarded_headers_only_from_trusted_peers() {
        use Forwarded::{Forwarded as Fwd, XForwardedFor as Xff};
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut h = HeaderMap::new();
        h.insert(HeaderName::from_static("x-forwarded-for"), HeaderValue::from_static("203.0.113.7, 10.0.0.2"));
        let proxy = ip("10.0.0.1");
        let stranger = ip("198.51.100.1");
        assert_eq!(client_ip(proxy, &h, &trusted, Xff), ip("203.0.113.7"));
        assert_eq!(client_ip(stranger, &h, &trusted, Xff), stranger);
        // Whatever the client wrote to the left of the first untrusted hop
        // is the client's word, not an address.
        h.insert(
            HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_static("192.0.2.99, 203.0.113.7, 10.0.0.2"),
        );
        assert_eq!(client_ip(proxy, &h, &trusted, Xff), ip("203.0.113.7"));
        let mut f = HeaderMap::new();
        f.insert(
            actix_web::http::header::FORWARDED,
            HeaderValue::from_static("for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\""),
        );
        assert_eq!(client_ip(proxy, &f, &trusted, Fwd), ip("2001:db8::1"));
        // Only the header the proxies set is read: the other one came from
        // the client, passed through.
        assert_eq!(client_ip(proxy, &f, &trusted, Xff), proxy);
        assert_eq!(client_ip(proxy, &h, &trusted, Fwd), proxy);
    }

    #[test]
    fn agent_ids_are_short_printable_ascii_or_nothing() {
        assert_eq!(agent_id(b"  ws-0042 "), Some(&b"ws-0042"[..]));
        for bad in [&b""[..], b"   ", b"a b", b"caf\xc3\xa9", &[b'x'; 129][..]] {
            assert_eq!(agent_id(bad), None, "{bad:?}");
        }
    }
}
