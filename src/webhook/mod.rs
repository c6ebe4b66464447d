//! Webhooks: what a final payment sends its merchant, and how. [`schedule`] writes a delivery in
//! the transaction that finalises the payment; [`policy`] decides what happens after each
//! attempt; [`sender`] claims due deliveries and POSTs them, signed ([`crate::signing`]).

pub mod policy;
pub mod schedule;
pub mod sender;
mod slots;

pub use policy::jitter;
pub use schedule::schedule;
pub use sender::Sender;
