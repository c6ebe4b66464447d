//! One integration-test binary. Every test talks to the real PostgreSQL (and, for the pipeline,
//! RabbitMQ) on this machine, in its own database and with its own queue names, removed at the end.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test that cannot set itself up should fail loudly"
)]

mod addresses;
mod api;
mod backstop;
mod broker;
mod cluster;
mod correlation;
mod db_errors;
mod dev;
mod dlq;
mod faults;
mod gateway;
mod gateway_http;
mod helpers;
mod metrics;
mod openapi;
mod pipeline;
mod prepared;
mod props;
mod proxy;
mod psp;
mod rabbit_cluster;
mod receiver;
mod schema;
mod stack;
mod startup;
mod topology;
mod webhooks;
