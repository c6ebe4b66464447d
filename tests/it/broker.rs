//! RabbitMQ fixtures: a unique name prefix per test (queues and exchanges deleted at the end),
//! and helpers to look into a queue.

use amqprs::channel::{
    BasicGetArguments, ExchangeDeleteArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use async_pay::config::Settings;

/// Gives `settings` its own exchange and queue names; deletes them when dropped.
pub struct TestBroker {
    pub settings: async_pay::config::AmqpSettings,
}

impl TestBroker {
    pub fn new(settings: &mut Settings) -> TestBroker {
        let p = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let a = &mut settings.amqp;
        a.exchange = format!("{p}.payments");
        a.queue = format!("{p}.payments.new");
        a.routing_key = format!("{p}.payments.new");
        a.dead_letter_exchange = format!("{p}.payments.dlx");
        a.dead_letter_queue = format!("{p}.payments.dead");
        a.confirm_timeout = std::time::Duration::from_secs(5);
        TestBroker {
            settings: a.clone(),
        }
    }

    pub async fn connect(&self) -> Connection {
        async_pay::amqp::connect(&self.settings, "test")
            .await
            .unwrap()
    }

    /// Messages ready in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        let conn = self.connect().await;
        let ch = conn.open_channel(None).await.unwrap();
        let r = ch
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await
            .unwrap();
        let _ = conn.close().await;
        r.map(|(_, n, _)| n).unwrap_or(0)
    }

    /// Takes every ready message off a queue: (message id, body).
    pub async fn drain(&self, queue: &str) -> Vec<(String, Vec<u8>)> {
        let conn = self.connect().await;
        let ch = conn.open_channel(None).await.unwrap();
        let mut out = Vec::new();
        while let Some((_, props, body)) = ch
            .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
            .await
            .unwrap()
        {
            out.push((props.message_id().cloned().unwrap_or_default(), body));
        }
        let _ = conn.close().await;
        out
    }
}

/// Publishes messages exactly as a test builds them (any properties, any exchange) and waits for
/// the broker's confirms. A test that publishes without confirms and closes its connection at
/// once can lose messages on their way (seen in CI: a dead letter that never arrived).
pub struct ConfirmedPublisher {
    channel: Channel,
    state: Arc<Mutex<Confirms>>,
}

#[derive(Default)]
struct Confirms {
    next_tag: u64,
    unconfirmed: BTreeSet<u64>,
    /// Nacks, returns (published `mandatory`: a message no queue took comes back) and a closed
    /// channel: each fails `confirmed`.
    problems: Vec<String>,
}

struct Callback(Arc<Mutex<Confirms>>);

impl Callback {
    fn settle(&self, tag: u64, multiple: bool, acked: bool) {
        let mut c = self.0.lock().unwrap();
        let settled: Vec<u64> = if multiple {
            c.unconfirmed.range(..=tag).copied().collect()
        } else {
            vec![tag]
        };
        for tag in settled {
            c.unconfirmed.remove(&tag);
            if !acked {
                c.problems.push(format!("publish {tag} nacked"));
            }
        }
    }
}

#[async_trait::async_trait]
impl ChannelCallback for Callback {
    async fn close(
        &mut self,
        _: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let problem = format!("the broker closed the channel: {close}");
        self.0.lock().unwrap().problems.push(problem);
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        self.settle(ack.delivery_tag(), ack.mutiple(), true);
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        self.settle(nack.delivery_tag(), nack.multiple(), false);
    }
    async fn publish_return(&mut self, _: &Channel, ret: Return, _: BasicProperties, _: Vec<u8>) {
        let problem = format!("a message came back unrouted: {ret}");
        self.0.lock().unwrap().problems.push(problem);
    }
}

impl ConfirmedPublisher {
    pub async fn open(conn: &Connection) -> ConfirmedPublisher {
        let channel = conn.open_channel(None).await.unwrap();
        let state = Arc::new(Mutex::new(Confirms {
            next_tag: 1,
            ..Confirms::default()
        }));
        channel
            .register_callback(Callback(state.clone()))
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectArguments::new(false))
            .await
            .unwrap();
        ConfirmedPublisher { channel, state }
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: Vec<u8>,
    ) {
        {
            let mut c = self.state.lock().unwrap();
            let tag = c.next_tag;
            c.next_tag += 1;
            c.unconfirmed.insert(tag);
        }
        self.channel
            .basic_publish(
                props,
                body,
                BasicPublishArguments::new(exchange, routing_key)
                    .mandatory(true)
                    .finish(),
            )
            .await
            .unwrap();
    }

    /// Returns once the broker has confirmed every publish so far (each taken by a queue);
    /// panics on a nack, a returned message, a closed channel, or after 10 s.
    pub async fn confirmed(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            {
                let c = self.state.lock().unwrap();
                assert!(c.problems.is_empty(), "{:?}", c.problems);
                if c.unconfirmed.is_empty() {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no confirm in 10 s for publishes {:?}",
                    c.unconfirmed
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let s = self.settings.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(conn) = async_pay::amqp::connect(&s, "test-cleanup").await else {
                    return;
                };
                if let Ok(ch) = conn.open_channel(None).await {
                    for q in [&s.queue, &s.dead_letter_queue] {
                        let _ = ch.queue_delete(QueueDeleteArguments::new(q)).await;
                    }
                    for e in [&s.exchange, &s.dead_letter_exchange] {
                        let _ = ch.exchange_delete(ExchangeDeleteArguments::new(e)).await;
                    }
                }
                let _ = conn.close().await;
            });
        })
        .join();
    }
}
