//! Publishing with publisher confirms. amqprs's `basic_publish` returns nothing to await, so this
//! keeps its own delivery-tag counter (the broker numbers publishes on a confirm channel 1, 2, 3,
//! …) and a waiter per tag, resolved by the channel callback on ack/nack (honouring `multiple`).
//! Messages are published `mandatory`: one that matches no queue comes back as `basic.return`
//! before its ack, and counts as NOT sent.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, Nack, Return};
use anyhow::Context;
use async_trait::async_trait;
use tokio::sync::oneshot;

/// The broker's verdict on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// Stored by the broker and routed to a queue.
    Acked,
    /// The broker refused it (nack), it matched no queue (return), or no answer came in time.
    NotSent,
}

/// A message to publish.
pub struct Outgoing {
    pub message_id: String,
    pub message_type: String,
    pub body: Vec<u8>,
    /// Application headers ([`super::correlation::headers`]).
    pub headers: Option<FieldTable>,
}

#[derive(Default)]
struct State {
    next_tag: u64,
    waiters: BTreeMap<u64, (String, oneshot::Sender<Confirm>)>,
    returned: HashSet<String>,
}

impl State {
    fn resolve(&mut self, tag: u64, multiple: bool, acked: bool) {
        let tags: Vec<u64> = if multiple {
            self.waiters.range(..=tag).map(|(t, _)| *t).collect()
        } else {
            vec![tag]
        };
        for t in tags {
            if let Some((id, tx)) = self.waiters.remove(&t) {
                let returned = self.returned.remove(&id);
                let verdict = if acked && !returned {
                    Confirm::Acked
                } else {
                    Confirm::NotSent
                };
                let _ = tx.send(verdict);
            }
        }
    }

    /// The channel is gone: every outstanding message is unconfirmed.
    fn fail_all(&mut self) {
        for (_, (_, tx)) in std::mem::take(&mut self.waiters) {
            let _ = tx.send(Confirm::NotSent);
        }
        self.returned.clear();
    }
}

struct ConfirmCallback {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl ChannelCallback for ConfirmCallback {
    async fn close(
        &mut self,
        ch: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        log::error!("RabbitMQ closed publishing channel {ch}: {close}");
        lock(&self.state).fail_all();
        Ok(())
    }
    async fn cancel(&mut self, _ch: &Channel, _c: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _ch: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _ch: &Channel, ack: Ack) {
        lock(&self.state).resolve(ack.delivery_tag(), ack.mutiple(), true);
    }
    async fn publish_nack(&mut self, _ch: &Channel, nack: Nack) {
        log::warn!("RabbitMQ refused (nack) publish #{}", nack.delivery_tag());
        lock(&self.state).resolve(nack.delivery_tag(), nack.multiple(), false);
    }
    async fn publish_return(
        &mut self,
        _ch: &Channel,
        ret: Return,
        props: BasicProperties,
        _c: Vec<u8>,
    ) {
        let id = props.message_id().cloned().unwrap_or_default();
        let request_id = super::header(Some(&props), super::correlation::REQUEST_ID);
        crate::logging::with_id(request_id, || {
            log::warn!(
                "RabbitMQ could not route message {id}: {} {}",
                ret.reply_code(),
                ret.reply_text()
            )
        });
        lock(&self.state).returned.insert(id);
    }
}

/// A channel in confirm mode. One publisher per connection; `publish_batch` calls are serialised.
pub struct Publisher {
    channel: Channel,
    state: Arc<Mutex<State>>,
    /// Held across "assign tag + publish" so tags match the broker's numbering.
    publish_lock: tokio::sync::Mutex<()>,
    exchange: String,
    routing_key: String,
    confirm_timeout: Duration,
}

impl Publisher {
    pub async fn open(
        conn: &Connection,
        exchange: &str,
        routing_key: &str,
        confirm_timeout: Duration,
    ) -> anyhow::Result<Publisher> {
        let channel = conn
            .open_channel(None)
            .await
            .context("cannot open the publishing channel")?;
        let state = Arc::new(Mutex::new(State {
            next_tag: 1,
            ..State::default()
        }));
        channel
            .register_callback(ConfirmCallback {
                state: state.clone(),
            })
            .await
            .context("cannot register the confirm callback")?;
        channel
            .confirm_select(ConfirmSelectArguments::new(false))
            .await
            .context("cannot enable publisher confirms")?;
        Ok(Publisher {
            channel,
            state,
            publish_lock: tokio::sync::Mutex::new(()),
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            confirm_timeout,
        })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn is_open(&self) -> bool {
        self.channel.is_open()
    }

    /// Publishes every message (persistent, mandatory) and waits for the broker's verdict on
    /// each. The result has one entry per message, in order. An error means the channel failed
    /// while publishing: nothing of this batch may be taken as sent.
    pub async fn publish_batch(&self, messages: &[Outgoing]) -> anyhow::Result<Vec<Confirm>> {
        let mut receivers = Vec::with_capacity(messages.len());
        {
            let _guard = self.publish_lock.lock().await;
            for m in messages {
                let (tx, rx) = oneshot::channel();
                {
                    let mut st = lock(&self.state);
                    let tag = st.next_tag;
                    st.next_tag += 1;
                    st.waiters.insert(tag, (m.message_id.clone(), tx));
                }
                let mut props = BasicProperties::default();
                props
                    .with_message_id(&m.message_id)
                    .with_message_type(&m.message_type)
                    .with_content_type("application/json")
                    .with_persistence(true)
                    .with_timestamp(time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64);
                if let Some(headers) = &m.headers {
                    props.with_headers(headers.clone());
                }
                let args = BasicPublishArguments::new(&self.exchange, &self.routing_key)
                    .mandatory(true)
                    .finish();
                // A blocked connection (broker memory or disk alarm) makes publishing wait
                // forever: bound it like the confirms.
                let sent = tokio::time::timeout(
                    self.confirm_timeout,
                    self.channel.basic_publish(props, m.body.clone(), args),
                )
                .await;
                let failure = match sent {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(anyhow::Error::new(e).context("publishing failed")),
                    Err(_) => Some(anyhow::anyhow!(
                        "publishing stalled for {:?} (is the broker blocking publishers?)",
                        self.confirm_timeout
                    )),
                };
                if let Some(e) = failure {
                    lock(&self.state).fail_all();
                    return Err(e);
                }
                receivers.push(rx);
            }
        }
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let mut out = Vec::with_capacity(receivers.len());
        for rx in receivers {
            let verdict = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(v)) => v,
                // The callback dropped the waiter (channel gone) or no answer in time.
                Ok(Err(_)) | Err(_) => Confirm::NotSent,
            };
            out.push(verdict);
        }
        Ok(out)
    }
}
