//! Generated gRPC code for `lockstep.coordinator.v1`, compiled from `proto/` by `build.rs`.
//!
//! Both the coordinator (server side) and the thin services in `clients/` (client side) use
//! these types, so the wire contract lives in exactly one place: the `.proto` files.

/// Messages, the `Coordinator` client and the `Coordinator` server trait.
pub mod coordinator {
    pub mod v1 {
        tonic::include_proto!("lockstep.coordinator.v1");
    }
}

/// The encoded `FileDescriptorSet` of `proto/`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lockstep_descriptor.bin"));
