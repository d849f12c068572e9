//! Alerts by email over SMTP (lettre), plain text: what happened, and what
//! to do.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{AlertError, DeliveryError, Sender};
use crate::config::{EmailConfig, SmtpTls};
use crate::events::{Event, Phase, Severity};

/// A whole SMTP exchange gets this long.
const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    server: String,
}

impl Email {
    pub fn new(c: &EmailConfig) -> Result<Email, AlertError> {
        let setup = AlertError::EmailSetup;
        let (host, port) = c
            .server
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?)))
            .ok_or_else(|| setup(format!("server {:?}: write host:port", c.server)))?;
        let builder = match c.tls {
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
                .map_err(|e| setup(format!("STARTTLS to {host}: {e}")))?,
            SmtpTls::Tls => {
                AsyncSmtpTransport::<Tokio1Executor>::relay(host).map_err(|e| setup(format!("TLS to {host}: {e}")))?
            }
        };
        let mut builder = builder.port(port).timeout(Some(TIMEOUT));
        if let (Some(user), Some(password)) = (&c.username, &c.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        let address = |a: &str| a.parse::<Mailbox>().map_err(|e| setup(format!("{a:?}: {e}")));
        Ok(Email {
            transport: builder.build(),
            from: address(&c.from)?,
            to: c.to.iter().map(|a| address(a)).collect::<Result<_, _>>()?,
            server: c.server.clone(),
        })
    }

    pub async fn deliver(&self, event: &Event, from: &Sender) -> Result<(), DeliveryError> {
        let mut message = Message::builder().from(self.from.clone());
        for to in &self.to {
            message = message.to(to.clone());
        }
        let message = message
            .subject(subject(event, from))
            .header(ContentType::TEXT_PLAIN)
            .body(super::plain_text(event, from))
            .map_err(|e| DeliveryError { message: format!("cannot build the message: {e}"), permanent: true })?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) => Err(DeliveryError {
                // 5xx: the server refused (an address, the credentials).
                permanent: e.is_permanent(),
                message: format!("SMTP {}: {e}", self.server),
            }),
        }
    }
}

/// `[patchrelay site-a] CRITICAL: ...`, `[patchrelay site-a] resolved: ...`.
pub fn subject(event: &Event, from: &Sender) -> String {
    let tag = match (event.phase, event.severity) {
        (Phase::Resolved, _) => "resolved",
        (_, Severity::Critical) => "CRITICAL",
        (_, Severity::Warning) => "warning",
        (_, Severity::Info) => "info",
    };
    format!("[patchrelay {}] {tag}: {}", from.name, event.title)
}
