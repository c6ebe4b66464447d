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
    tags: Arc<Mutex<Tags>>,
}

/// Next delivery tag, tags not yet confirmed, tags the broker refused.
type Tags = (u64, BTreeSet<u64>, Vec<u64>);

struct Confirms(Arc<Mutex<Tags>>);

impl Confirms {
    fn settle(&self, tag: u64, multiple: bool, acked: bool) {
        let mut t = self.0.lock().unwrap();
        let settled: Vec<u64> = if multiple {
            t.1.range(..=tag).copied().collect()
        } else {
            vec![tag]
        };
        for tag in settled {
            t.1.remove(&tag);
            if !acked {
                t.2.push(tag);
            }
        }
    }
}

#[async_trait::async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
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
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

impl ConfirmedPublisher {
    pub async fn open(conn: &Connection) -> ConfirmedPublisher {
        let channel = conn.open_channel(None).await.unwrap();
        let tags = Arc::new(Mutex::new((1, BTreeSet::new(), Vec::new())));
        channel
            .register_callback(Confirms(tags.clone()))
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectArguments::new(false))
            .await
            .unwrap();
        ConfirmedPublisher { channel, tags }
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: Vec<u8>,
    ) {
        {
            let mut t = self.tags.lock().unwrap();
            let tag = t.0;
            t.0 += 1;
            t.1.insert(tag);
        }
        self.channel
            .basic_publish(
                props,
                body,
                BasicPublishArguments::new(exchange, routing_key),
            )
            .await
            .unwrap();
    }

    /// Returns once the broker has confirmed every publish so far; panics on a nack or after
    /// 10 s.
    pub async fn confirmed(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            {
                let t = self.tags.lock().unwrap();
                assert!(t.2.is_empty(), "the broker refused publishes {:?}", t.2);
                if t.1.is_empty() {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no confirm in 10 s for publishes {:?}",
                    t.1
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
