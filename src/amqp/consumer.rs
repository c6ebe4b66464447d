//! Consuming a queue with manual acks: the AMQP session that `consume` and `dlq-watch` both run.
//!
//! [`Session::open`] connects (to one of `amqp.urls`), declares the topology, opens a channel,
//! sets the prefetch and starts consuming with manual acks. [`Session::next`] is the receive
//! loop: the next message, `None` once shutdown comes, an error when the connection is lost; it
//! also reaps the handlers a role runs with [`Session::spawn`]. Stopping is
//! [`Session::drain`] (cancel the consumer, give the handlers in flight a grace period) and
//! [`Session::close`] (abort what is left, close channel and connection): every message not
//! settled by then goes back to the queue and is redelivered. A [`Delivery`] is settled through
//! its [`Settle`] handle, from whichever task handles it.

use std::time::Duration;

use amqprs::BasicProperties;
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicQosArguments,
    BasicRejectArguments, Channel, ConsumerMessage,
};
use amqprs::connection::Connection;
use amqprs::error::Error as AmqpError;
use anyhow::Context;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use super::{CLOSE_TIMEOUT, previous_deliveries, topology};
use crate::config::AmqpSettings;
use crate::shutdown::Shutdown;

/// One message taken from the queue, not yet settled.
pub struct Delivery {
    pub body: Vec<u8>,
    pub props: Option<BasicProperties>,
    pub settle: Settle,
}

impl Delivery {
    /// How many times this message was delivered before (0 the first time).
    pub fn previous_deliveries(&self) -> u32 {
        previous_deliveries(self.props.as_ref())
    }
}

/// Settles one delivery on the channel it came from. A failure (the channel is gone) only means
/// the broker redelivers the message.
#[derive(Clone)]
pub struct Settle {
    channel: Channel,
    tag: u64,
}

impl Settle {
    /// The delivery tag, for the log.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Done with it.
    pub async fn ack(&self) -> Result<(), AmqpError> {
        self.channel
            .basic_ack(BasicAckArguments::new(self.tag, false))
            .await
    }

    /// Back to the queue, to be delivered again (counts toward the delivery limit).
    pub async fn requeue(&self) -> Result<(), AmqpError> {
        self.channel
            .basic_reject(BasicRejectArguments::new(self.tag, true))
            .await
    }

    /// Rejected without requeue: the queue dead-letters it.
    pub async fn dead_letter(&self) -> Result<(), AmqpError> {
        self.channel
            .basic_reject(BasicRejectArguments::new(self.tag, false))
            .await
    }
}

/// A connection consuming one queue, and the handlers of its messages that run as tasks.
pub struct Session {
    conn: Connection,
    channel: Channel,
    tag: String,
    rx: UnboundedReceiver<ConsumerMessage>,
    tasks: JoinSet<()>,
}

impl Session {
    /// Connects as `role`, declares the topology and consumes `queue` with manual acks and at
    /// most `prefetch` messages unsettled.
    pub async fn open(
        settings: &AmqpSettings,
        role: &str,
        queue: &str,
        prefetch: u16,
    ) -> anyhow::Result<Session> {
        let conn = super::connect(settings, role).await?;
        topology::declare(&conn, settings).await?;
        let channel = super::open_channel(&conn).await?;
        channel
            .basic_qos(BasicQosArguments::new(0, prefetch, false))
            .await
            .context("basic.qos failed")?;
        let tag = format!("async-pay-{role}-{}", uuid::Uuid::new_v4().simple());
        let (tag, rx) = channel
            .basic_consume_rx(
                BasicConsumeArguments::new(queue, &tag)
                    .manual_ack(true)
                    .finish(),
            )
            .await
            .context("basic.consume failed")?;
        Ok(Session {
            conn,
            channel,
            tag,
            rx,
            tasks: JoinSet::new(),
        })
    }

    /// The next message; `None` once `shutdown` is triggered; an error when the broker
    /// connection is lost. Handlers spawned with [`Session::spawn`] that have ended are reaped
    /// meanwhile.
    pub async fn next(&mut self, shutdown: &Shutdown) -> anyhow::Result<Option<Delivery>> {
        loop {
            tokio::select! {
                msg = self.rx.recv() => {
                    let Some(msg) = msg else {
                        anyhow::bail!("the broker connection was lost");
                    };
                    let (Some(deliver), Some(body)) = (msg.deliver, msg.content) else {
                        continue;
                    };
                    let settle = Settle {
                        channel: self.channel.clone(),
                        tag: deliver.delivery_tag(),
                    };
                    return Ok(Some(Delivery { body, props: msg.basic_properties, settle }));
                }
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
                _ = shutdown.wait() => return Ok(None),
            }
        }
    }

    /// Runs a message's handler as a task of this session (see [`Session::drain`]).
    pub fn spawn(&mut self, handler: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(handler);
    }

    /// Handlers still running.
    pub fn in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// Stops taking messages (the consumer is cancelled) and gives the handlers in flight up to
    /// `grace` to finish; returns how many did not.
    pub async fn drain(&mut self, grace: Duration) -> usize {
        let _ = self
            .channel
            .basic_cancel(BasicCancelArguments::new(&self.tag))
            .await;
        let tasks = &mut self.tasks;
        let _ =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        self.tasks.len()
    }

    /// Aborts the handlers still running and closes the channel and the connection: every
    /// message not settled goes back to the queue.
    pub async fn close(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.channel.close()).await;
        super::close(self.conn).await;
    }
}
