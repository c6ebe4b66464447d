//! `amqp.urls`: a connection goes to the first address that answers, and the next connection of
//! the process starts at the address after the one it used last (at that one again if it was
//! closed cleanly). Two proxies in front of the shared RabbitMQ stand for two nodes. (The
//! position is per process; nextest runs each test in its own process.)

use std::time::Duration;

use async_pay::config::Secret;

use crate::broker::TestBroker;
use crate::helpers::*;
use crate::proxy::Proxy;

fn url(proxy: &Proxy) -> Secret {
    Secret::new(format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        proxy.addr.port()
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_move_on_to_the_next_address_and_skip_one_that_is_down() {
    let mut s = settings("postgres://unused");
    let _broker = TestBroker::new(&mut s);
    let (a, b) = (
        Proxy::start("127.0.0.1:5672".parse().unwrap()).await,
        Proxy::start("127.0.0.1:5672".parse().unwrap()).await,
    );
    s.amqp.urls = vec![url(&a), url(&b)];
    let first = async_pay::amqp::connect(&s.amqp, "test").await.unwrap();
    let second = async_pay::amqp::connect(&s.amqp, "test").await.unwrap();
    // Closed cleanly (the broker answered): that node works, the next connection goes there again.
    async_pay::amqp::close(second).await;
    let third = async_pay::amqp::connect(&s.amqp, "test").await.unwrap();
    // A goes down: exactly one of the two open connections was on it, so the second (and with
    // it the third) used the other address.
    a.cut();
    eventually(
        Duration::from_secs(30),
        "the connection through A to drop",
        || async { (!first.is_open() || !third.is_open()).then_some(()) },
    )
    .await;
    assert!(
        first.is_open() != third.is_open(),
        "the second connection went to the other address, the third to the second's"
    );
    // A refuses connections now: wherever an attempt starts, it ends on B.
    for _ in 0..3 {
        let c = async_pay::amqp::connect(&s.amqp, "test").await.unwrap();
        assert!(c.is_open());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_address_answering_is_an_error_naming_each_without_its_password() {
    let mut s = settings("postgres://unused");
    let _broker = TestBroker::new(&mut s);
    let down = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    down.cut();
    // A listener that accepts and never answers: a hung node.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    s.amqp.urls = vec![
        Secret::new(format!(
            "amqp://guest:hunter2@127.0.0.1:{}/%2f",
            down.addr.port()
        )),
        Secret::new(format!(
            "amqp://guest:hunter2@{}/%2f",
            hung.local_addr().unwrap()
        )),
    ];
    let Err(err) = async_pay::amqp::connect(&s.amqp, "test").await else {
        panic!("connected although no address answers");
    };
    let err = format!("{err:#}");
    assert!(err.contains("no RabbitMQ address answered"), "{err}");
    assert!(err.contains(&down.addr.port().to_string()), "{err}");
    assert!(err.contains("within 5s"), "the hung one: {err}");
    assert!(!err.contains("hunter2"), "{err}");
}
