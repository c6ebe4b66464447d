//! async-pay: asynchronous payment processing. The binary's roles live in [`roles`]; this crate
//! root only lists modules, so that tests can drive every role in-process.

pub mod amqp;
pub mod api;
pub mod config;
pub mod db;
pub mod domain;
pub mod gateway;
pub mod logging;
pub mod metrics;
pub mod processing;
pub mod roles;
pub mod shutdown;
pub mod signing;
pub mod ssrf;
pub mod webhook;
