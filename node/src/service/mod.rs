//! Thin tonic services: parse the wire request, call one use case in `op/`, build the reply.

pub mod keys;
pub mod operator;
pub mod secrets;
pub mod stats;

/// A protobuf timestamp from milliseconds since the Unix epoch.
pub(crate) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}
