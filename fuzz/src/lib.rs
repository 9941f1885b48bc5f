//! The pure parsers of bitsfarm, compiled from its own `src/bits/` files (they refer to each other
//! as `super::protocol`, which is this crate's root here as `crate::bits` is in bitsfarm).
#![allow(dead_code)]

#[path = "../../src/bits/protocol.rs"]
pub mod protocol;

#[path = "../../src/bits/paths.rs"]
pub mod paths;

#[path = "../../src/bits/packet.rs"]
pub mod packet;

/// The same paths as in bitsfarm, for the fuzz targets.
pub mod bits {
    pub use super::{packet, paths, protocol};
}
