//! The BITS upload protocol on the wire ([MC-BUP]), pure: packet types, headers, Acks and error
//! codes (`protocol`), the headers every packet shares (`packet`), and the one mapping from a URL
//! path to a file below a data folder (`paths`). Nothing here touches a socket or a file; the
//! server, the client and the fuzz targets all use it.

pub mod notification;
pub mod packet;
pub mod paths;
pub mod protocol;
pub mod request;
