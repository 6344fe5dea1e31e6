//! Generated gRPC code, and the descriptor set that server reflection serves.

/// The seed's Contact service and messages (`proto/contact.proto`, no package).
///
/// The seed's method names are camelCase, so the generated stream types are too.
#[allow(non_camel_case_types)]
pub mod contact {
    tonic::include_proto!("_");
}

/// contactd's operator API (`proto/contactd/admin/v1/admin.proto`).
pub mod admin {
    tonic::include_proto!("contactd.admin.v1");
}

/// The Contact proto, encoded, for reflection on the public port.
pub const CONTACT_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/contact_descriptor.bin"));

/// The admin proto, encoded, for reflection on the admin socket.
pub const ADMIN_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/admin_descriptor.bin"));

/// The metadata header an agent sends on every call, carrying its name. A
/// caller without it (a seed client) is known by its peer address.
pub const AGENT_HEADER: &str = "x-contactd-agent";
