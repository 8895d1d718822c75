//! Conversions between protobuf wire types and the domain's, shared by the services.

use crate::error::Error;

/// A protobuf timestamp from milliseconds since the Unix epoch.
pub(crate) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// A non-negative protobuf duration.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the field.
pub(crate) fn duration(field: &str, d: prost_types::Duration) -> Result<std::time::Duration, Error> {
    std::time::Duration::try_from(d)
        .map_err(|_| Error::InvalidArgument { rule: format!("{field} must be a non-negative duration") })
}
