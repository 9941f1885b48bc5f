//! bitsfarm: a Linux-native BITS upload server, its farm, and a Kubernetes operator.

pub mod cli;
pub mod client;
pub mod config;
pub mod receiver;
pub mod server;
pub mod telemetry;
