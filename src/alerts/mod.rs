//! Alerts: the events worth telling someone about (`crate::events`), sent
//! to webhooks and by email, away from the hot path.
//!
//! Each channel has a bounded queue and a task of its own: a receiver that
//! is down retries with backoff and, at worst, drops what does not fit in its
//! queue (counted in `patchrelay_alerts_dropped_total`), while the other
//! channels carry on. What is sent, and how often, is decided where events
//! are emitted ([`crate::events::Events`]: deduplicated per key, conditions
//! sent as they begin, as reminders, and as they clear); [`watch`] looks at
//! the server every few seconds and emits the conditions.

pub mod email;
pub mod watch;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use crate::config::AlertsConfig;
use crate::events::{Event, Events, Outlet};
use crate::telemetry;

/// Alerts one channel holds while it cannot deliver.
const QUEUE: usize = 100;
/// Tries per alert, and the wait before the second (doubling, up to
/// [`MAX_BACKOFF`]): about four minutes before one is given up.
const ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alerts.webhook {url}: {message}")]
    WebhookSetup { url: String, message: String },
    #[error("alerts.email: {0}")]
    EmailSetup(String),
}

/// Why one delivery failed, and whether trying again may help.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    pub message: String,
    /// A 4xx from a webhook, a refused address: the same bytes will fail again.
    pub permanent: bool,
}

/// Who sends: named in every alert, so that one inbox can serve many relays.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sender {
    /// `fleet.site_name`, else the host name.
    pub name: String,
    /// `origin` or `relay`.
    pub role: &'static str,
}

enum Channel {
    Webhook(webhook::Webhook),
    Email(email::Email),
}

impl Channel {
    fn name(&self) -> String {
        match self {
            Channel::Webhook(w) => w.name(),
            Channel::Email(_) => "email".into(),
        }
    }

    async fn deliver(&self, event: &Event, from: &Sender) -> Result<(), DeliveryError> {
        match self {
            Channel::Webhook(w) => w.deliver(event, from).await,
            Channel::Email(e) => e.deliver(event, from).await,
        }
    }
}

/// Set up the configured channels and connect them to `events`; their
/// tasks run on the upstream runtime (they talk to the network) until
/// aborted. No channel configured: none, and events stay in the log.
pub fn start(
    config: &AlertsConfig,
    events: &Arc<Events>,
    from: Sender,
) -> Result<Vec<tokio::task::JoinHandle<()>>, AlertError> {
    let mut channels = Vec::new();
    for w in &config.webhook {
        channels.push(Channel::Webhook(webhook::Webhook::new(w)?));
    }
    if let Some(e) = &config.email {
        channels.push(Channel::Email(email::Email::new(e)?));
    }
    let from = Arc::new(from);
    let mut outlets: Vec<Outlet> = Vec::new();
    let mut tasks = Vec::new();
    for channel in channels {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let name = channel.name();
        outlets.push((name.clone(), tx));
        tasks.push(crate::upstream::runtime::spawn(run(channel, name, rx, from.clone())));
    }
    if !outlets.is_empty() {
        events.connect(outlets);
    }
    Ok(tasks)
}

async fn run(channel: Channel, name: String, mut rx: tokio::sync::mpsc::Receiver<Arc<Event>>, from: Arc<Sender>) {
    while let Some(event) = rx.recv().await {
        let mut wait = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            match channel.deliver(&event, &from).await {
                Ok(()) => {
                    metrics::counter!(telemetry::ALERTS_SENT, "channel" => name.clone()).increment(1);
                    tracing::info!(channel = %name, kind = %event.kind, key = %event.key, "alert sent");
                    break;
                }
                Err(e) if e.permanent || attempt == ATTEMPTS => {
                    metrics::counter!(telemetry::ALERTS_FAILED, "channel" => name.clone()).increment(1);
                    tracing::error!(
                        channel = %name,
                        kind = %event.kind,
                        key = %event.key,
                        attempts = attempt,
                        "alert not delivered, given up: {e} (check the channel's settings under [alerts])"
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(channel = %name, key = %event.key, attempt, retry_in = ?wait, "alert not delivered yet: {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// The plain-text account of an event: an email's body, and readable in a
/// chat message too.
pub fn plain_text(event: &Event, from: &Sender) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    let _ = writeln!(text, "{}", event.title);
    let _ = writeln!(text);
    if !event.detail.is_empty() {
        let _ = writeln!(text, "What happened: {}", event.detail);
    }
    if !event.action.is_empty() {
        let _ = writeln!(text, "What to do: {}", event.action);
    }
    let _ = writeln!(text);
    let _ = writeln!(text, "Server: {} ({})", from.name, from.role);
    let _ = writeln!(
        text,
        "Event: {} {} ({:?}, {:?}), at {}",
        event.kind,
        event.key,
        event.severity,
        event.phase,
        rfc3339(event.at)
    );
    text
}

/// Unix seconds as RFC 3339.
pub fn rfc3339(unix: u64) -> String {
    crate::repo::manifest::format_time(std::time::UNIX_EPOCH + Duration::from_secs(unix))
}
