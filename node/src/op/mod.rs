//! One use case per file. Services parse and validate the wire request, call one of these, and
//! turn the result into the wire response; errors become a gRPC status in exactly one place
//! (`impl From<Error> for tonic::Status`).

pub mod auto_rotate;
pub mod describe_secret;
pub mod get_secret;
pub mod key_crypto;
pub mod list_secrets;
pub mod manage_keys;
pub mod operator;
pub mod put_secret;
pub mod set_version_state;
