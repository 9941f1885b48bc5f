//! bitsfarm: a Linux-native BITS upload server, its farm, and a Kubernetes operator.

pub mod api;
pub mod bits;
pub mod cli;
pub mod client;
pub mod config;
pub mod farm;
pub mod operator;
pub mod receiver;
pub mod server;
pub mod telemetry;
pub mod tls;
