//! How a connection to an upstream is made: directly, or through an HTTP
//! CONNECT proxy (`[[upstream]] proxy = "http://host:port"`), as sites behind a
//! corporate proxy need.
//!
//! CONNECT is used for `http://` upstreams as well as `https://` ones: the
//! proxy then only relays bytes, so what patchrelay verifies is exactly what
//! the upstream sent, and one proxy rule (allow CONNECT to the upstream's port)
//! covers both.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
pub enum Connector {
    Direct(HttpConnector),
    Proxied(Tunnel<HttpConnector>),
}

impl Connector {
    pub fn new(http: HttpConnector, proxy: Option<http::Uri>) -> Self {
        match proxy {
            Some(p) => Connector::Proxied(Tunnel::new(p, http)),
            None => Connector::Direct(http),
        }
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Connector::Proxied(c) => c.poll_ready(cx).map_err(|e| Box::new(e) as BoxError),
        }
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        match self {
            Connector::Direct(c) => {
                let f = c.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Connector::Proxied(c) => {
                let f = c.call(dst);
                Box::pin(async move { f.await.map_err(|e| Box::new(e) as BoxError) })
            }
        }
    }
}
