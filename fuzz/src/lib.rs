//! The pure parsers of bitsfarm, compiled from the server's own source files (they refer to each
//! other as `super::protocol`, which is this crate's root here as `crate::server` is in bitsfarm).
#![allow(dead_code)]

#[path = "../../src/server/protocol.rs"]
pub mod protocol;

#[path = "../../src/server/paths.rs"]
pub mod paths;

#[path = "../../src/server/packet.rs"]
pub mod packet;

/// The same paths as in bitsfarm, for the fuzz targets.
pub mod server {
    pub use super::{packet, paths, protocol};
}
