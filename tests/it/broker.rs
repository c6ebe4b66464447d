//! RabbitMQ fixtures: a unique name prefix per test (queues and exchanges deleted at the end),
//! and helpers to look into a queue.

use amqprs::channel::{
    BasicGetArguments, ExchangeDeleteArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::Connection;
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
