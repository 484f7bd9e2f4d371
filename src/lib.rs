//! What the coordinator and the thin services in `clients/` share: the wire contract and the
//! process plumbing around a server.
//!
//! # Layout
//! - [`coordinator`]: generated gRPC code for `lockstep.coordinator.v1`, compiled from `proto/`
//!   by `build.rs`. Both the coordinator (server side) and `clients/` (client side) use these
//!   types, so the wire contract lives in exactly one place: the `.proto` files.
//! - [`FILE_DESCRIPTOR_SET`]: the same contract encoded, for gRPC server reflection.
//! - [`process`]: logging to stderr and the SIGINT/SIGTERM shutdown signal, the same in every
//!   binary.

/// Messages, the `Coordinator` client and the `Coordinator` server trait.
pub mod coordinator {
    // Generated: a `oneof` of a whole entry beside a small message (LedgerEvent) is how
    // prost writes it.
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("lockstep.coordinator.v1");
    }
}

mod log_filter;
pub mod process;

/// The encoded `FileDescriptorSet` of `proto/`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lockstep_descriptor.bin"));
