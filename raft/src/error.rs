//! The one error type of the storage layer.

/// A failure of the RocksDB store or of decoding what it holds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// RocksDB failed (open, read or write).
    #[error("RocksDB at {path}: {source}")]
    Rocks {
        /// The database directory.
        path: String,
        /// What RocksDB said.
        #[source]
        source: rocksdb::Error,
    },
    /// A stored record could not be decoded: the data directory is corrupt or from a newer version.
    #[error("cannot decode a stored {what}")]
    Decode {
        /// Which record.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: postcard::Error,
    },
    /// A snapshot file could not be read or written.
    #[error("snapshot file {path}")]
    SnapshotIo {
        /// The file.
        path: String,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn rocks(path: &std::path::Path, source: rocksdb::Error) -> Self {
        StoreError::Rocks { path: path.display().to_string(), source }
    }
}
