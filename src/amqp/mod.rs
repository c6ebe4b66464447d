//! RabbitMQ: connecting, logging what the broker says on callbacks, the one topology declarer,
//! and the confirming publisher. amqprs does not reconnect by itself: each role's loop reopens
//! the connection (through [`connect`]) and re-declares the topology after a failure.

pub mod publisher;
pub mod topology;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::Channel;
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{
    Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, FieldValue, Nack, Return,
};
use anyhow::Context;
use async_trait::async_trait;

use crate::config::{AmqpSettings, redact_url};

/// Heartbeat interval in seconds: a dead TCP peer is noticed within about twice this.
const HEARTBEAT_SECS: u16 = 10;

/// Opens a connection named after the role (shown in the management UI).
pub async fn connect(settings: &AmqpSettings, role: &str) -> anyhow::Result<Connection> {
    let raw = settings.url.expose();
    let url =
        url::Url::parse(raw).with_context(|| format!("invalid amqp.url {}", redact_url(raw)))?;
    if url.scheme() != "amqp" {
        anyhow::bail!(
            "amqp.url must start with amqp:// (TLS is not built in), got {}",
            redact_url(raw)
        );
    }
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(5672);
    let decode = |s: &str| percent_decode(s);
    let user = if url.username().is_empty() {
        "guest".to_string()
    } else {
        decode(url.username())
    };
    let pass = url
        .password()
        .map(decode)
        .unwrap_or_else(|| "guest".to_string());
    let vhost = match url.path() {
        "" | "/" => "/".to_string(),
        p => decode(&p[1..]),
    };
    let mut args = OpenConnectionArguments::new(host, port, &user, &pass);
    args.virtual_host(&vhost)
        .heartbeat(HEARTBEAT_SECS)
        .connection_name(&format!("async-pay {role} pid {}", std::process::id()));
    let conn = tokio::time::timeout(std::time::Duration::from_secs(10), Connection::open(&args))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from RabbitMQ at {} within 10s", redact_url(raw)))?
        .with_context(|| format!("cannot connect to RabbitMQ at {}", redact_url(raw)))?;
    conn.register_callback(LogConnection)
        .await
        .context("cannot register the connection callback")?;
    Ok(conn)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a channel whose closing reason (a 406 on a mismatched declare, say) reaches the log.
pub async fn open_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let channel = conn
        .open_channel(None)
        .await
        .context("cannot open a channel")?;
    channel
        .register_callback(LogChannel)
        .await
        .context("cannot register the channel callback")?;
    Ok(channel)
}

struct LogConnection;

#[async_trait]
impl ConnectionCallback for LogConnection {
    async fn close(&mut self, _c: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        log::warn!("RabbitMQ closed the connection: {close}");
        Ok(())
    }
    async fn blocked(&mut self, _c: &Connection, reason: String) {
        log::warn!("RabbitMQ blocked the connection (publishing paused): {reason}");
    }
    async fn unblocked(&mut self, _c: &Connection) {
        log::info!("RabbitMQ unblocked the connection");
    }
    async fn secret_updated(&mut self, _c: &Connection) {}
}

/// Logs channel-level events; used on channels that do not publish with confirms.
pub struct LogChannel;

#[async_trait]
impl ChannelCallback for LogChannel {
    async fn close(
        &mut self,
        ch: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        log::error!("RabbitMQ closed channel {ch}: {close}");
        Ok(())
    }
    async fn cancel(&mut self, ch: &Channel, cancel: Cancel) -> Result<(), amqprs::error::Error> {
        log::warn!(
            "RabbitMQ cancelled consumer {} on channel {ch}",
            cancel.consumer_tag()
        );
        Ok(())
    }
    async fn flow(&mut self, _ch: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _ch: &Channel, _ack: Ack) {}
    async fn publish_nack(&mut self, _ch: &Channel, _nack: Nack) {}
    async fn publish_return(
        &mut self,
        _ch: &Channel,
        ret: Return,
        _p: BasicProperties,
        _c: Vec<u8>,
    ) {
        log::warn!("RabbitMQ returned a message: {ret}");
    }
}

/// How many times this message was delivered before, from the quorum queue's
/// `x-delivery-count` header (absent on the first delivery).
pub fn previous_deliveries(props: Option<&BasicProperties>) -> u32 {
    props
        .and_then(|p| p.headers())
        .and_then(|h| h.get(&field_name("x-delivery-count")))
        .and_then(field_as_i64)
        .map(|n| n.clamp(0, i64::from(u32::MAX)) as u32)
        .unwrap_or(0)
}

pub fn field_name(name: &str) -> amqprs::FieldName {
    // Names here are literals well under 256 bytes, which is all ShortStr requires.
    name.try_into().unwrap_or_default()
}

pub fn field_as_i64(v: &FieldValue) -> Option<i64> {
    Some(match v {
        FieldValue::b(n) => i64::from(*n),
        FieldValue::B(n) => i64::from(*n),
        FieldValue::s(n) => i64::from(*n),
        FieldValue::u(n) => i64::from(*n),
        FieldValue::I(n) => i64::from(*n),
        FieldValue::i(n) => i64::from(*n),
        FieldValue::l(n) => *n,
        _ => return None,
    })
}

/// AMQP headers as JSON, for the dead-letter record.
pub fn table_to_json(t: &FieldTable) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = t
        .as_ref()
        .iter()
        .map(|(k, v)| (k.to_string(), value_to_json(v)))
        .collect();
    serde_json::Value::Object(map)
}

pub fn value_to_json(v: &FieldValue) -> serde_json::Value {
    use serde_json::Value as J;
    if let Some(n) = field_as_i64(v) {
        return J::from(n);
    }
    match v {
        FieldValue::t(b) => J::Bool(*b),
        FieldValue::S(s) => J::String(s.as_ref().clone()),
        FieldValue::F(t) => table_to_json(t),
        FieldValue::A(a) => J::Array(
            Vec::<FieldValue>::from(a.clone())
                .iter()
                .map(value_to_json)
                .collect(),
        ),
        FieldValue::V => J::Null,
        other => J::String(other.to_string()),
    }
}
