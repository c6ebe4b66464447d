//! RabbitMQ: connecting (to one of several cluster nodes), logging what the broker says on
//! callbacks, the one topology declarer, the confirming publisher, and the consuming session.
//! amqprs connects to one address and does not reconnect by itself: each role's loop reopens the
//! connection (through [`connect`], which moves on to the next address) and re-declares the
//! topology after a failure.

pub mod consumer;
pub mod correlation;
pub mod publisher;
pub mod topology;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::Channel;
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{
    Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, FieldValue, Nack, Return,
};
use anyhow::Context;
use async_trait::async_trait;

use crate::config::{AmqpAddress, AmqpSettings};

/// Heartbeat interval in seconds: a dead TCP peer is noticed within about twice this.
const HEARTBEAT_SECS: u16 = 10;

/// How long one address gets to answer the AMQP handshake. A healthy broker answers within
/// milliseconds; a hung node (stopped, swapping, partitioned) accepts the TCP connection and
/// then says nothing, so this is what it costs before the next address is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where this process's next connection attempt starts in `amqp.urls`; `usize::MAX` until the
/// first attempt, which starts at a random address so that processes spread over the nodes.
static NEXT_ADDRESS: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The address this process last connected to.
static LAST_ADDRESS: AtomicUsize = AtomicUsize::new(0);

/// Opens a connection, named after the role (shown in the management UI), to the first address
/// of `amqp.urls` that answers. The first attempt of a process starts at a random address. Every
/// later one (the roles reconnect, with their backoff, after a lost connection or a failed
/// operation) starts at the address after the one it last connected to, so a role moves away
/// from a node that failed; unless the role closed that connection with [`close`] and the broker
/// answered, which shows the node works (a nack or a missing confirm can come from a queue
/// leader on another node), so the next attempt starts at it again.
pub async fn connect(settings: &AmqpSettings, role: &str) -> anyhow::Result<Connection> {
    let addresses = settings.addresses()?;
    let n = addresses.len();
    let first = match NEXT_ADDRESS.load(Ordering::Relaxed) {
        usize::MAX => fastrand::usize(..n),
        i => i % n,
    };
    let mut errors = Vec::with_capacity(n);
    for i in (first..first + n).map(|i| i % n) {
        let address = &addresses[i];
        match open(address, role).await {
            Ok(conn) => {
                LAST_ADDRESS.store(i, Ordering::Relaxed);
                NEXT_ADDRESS.store(i + 1, Ordering::Relaxed);
                log::info!("{role} connected to RabbitMQ at {}", address.redacted);
                return Ok(conn);
            }
            Err(e) => errors.push(e),
        }
    }
    // Next time, start after the address tried first rather than at it again.
    NEXT_ADDRESS.store(first + 1, Ordering::Relaxed);
    match errors.len() {
        1 => Err(errors.remove(0)),
        _ => {
            let each: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
            anyhow::bail!("no RabbitMQ address answered: {}", each.join("; "))
        }
    }
}

async fn open(address: &AmqpAddress, role: &str) -> anyhow::Result<Connection> {
    let mut args = OpenConnectionArguments::new(
        &address.host,
        address.port,
        &address.user,
        address.password.expose(),
    );
    args.virtual_host(&address.vhost)
        .heartbeat(HEARTBEAT_SECS)
        .connection_name(&format!("async-pay {role} pid {}", std::process::id()));
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::open(&args))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from RabbitMQ at {} within {CONNECT_TIMEOUT:?}",
                address.redacted
            )
        })?
        .with_context(|| format!("cannot connect to RabbitMQ at {}", address.redacted))?;
    conn.register_callback(LogConnection)
        .await
        .context("cannot register the connection callback")?;
    Ok(conn)
}

/// How long closing a connection waits for the broker's answer. A hung node never answers: the
/// connection is then dropped (its socket goes once the heartbeat gives up on it) and the role
/// moves on to another node now rather than after up to 2 × [`HEARTBEAT_SECS`].
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes a connection, waiting at most [`CLOSE_TIMEOUT`] for the broker. If the broker answered,
/// the next [`connect`] starts at its address again (see there).
pub async fn close(conn: Connection) {
    // amqprs answers Ok without asking the broker when the connection is already gone.
    let was_open = conn.is_open();
    match tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await {
        Ok(Ok(())) if was_open => {
            NEXT_ADDRESS.store(LAST_ADDRESS.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Ok(_) => {}
        Err(_) => log::warn!(
            "RabbitMQ did not answer closing the connection within {CLOSE_TIMEOUT:?}; dropped it"
        ),
    }
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

/// A string header of a message, if it has one by that name.
pub fn header<'a>(props: Option<&'a BasicProperties>, name: &str) -> Option<&'a str> {
    match props?.headers()?.get(&field_name(name))? {
        FieldValue::S(s) => Some(s.as_ref().as_str()),
        _ => None,
    }
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
