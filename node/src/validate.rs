// Hot path: every secret request validates its path.
//! Input rules for values, version lists and list prefixes. A violation names the rule. Paths,
//! key names and request ids are parsed into their types instead (`coffer_raft::SecretPath`, …).

use coffer_raft::SecretVersion;

use crate::error::Error;

/// The most versions one secret may keep.
pub const MAX_VERSIONS_LIMIT: u32 = 1000;
/// The most versions one Delete/Undelete/Destroy may name.
pub const MAX_VERSIONS_PER_CALL: usize = 100;

/// Checks a list prefix: empty, or a path prefix whose characters are allowed in paths.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the broken rule.
pub fn prefix(prefix: &str) -> Result<(), Error> {
    if prefix.len() > coffer_raft::MAX_PATH_BYTES {
        return Err(Error::InvalidArgument {
            rule: format!("the prefix is longer than {} bytes", coffer_raft::MAX_PATH_BYTES),
        });
    }
    if let Some(c) = prefix.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))) {
        return Err(Error::InvalidArgument {
            rule: format!("the prefix contains {c:?}; only A-Z a-z 0-9 . _ - / are allowed"),
        });
    }
    Ok(())
}

/// Checks a value's size.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the limit.
pub fn value(value: &[u8], max_bytes: usize) -> Result<(), Error> {
    if value.len() > max_bytes {
        return Err(Error::InvalidArgument {
            rule: format!(
                "the value is {} bytes; this server accepts at most {max_bytes} (max-value-bytes)",
                value.len()
            ),
        });
    }
    Ok(())
}

/// Checks a `max_versions` setting.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the range.
pub fn max_versions(max: Option<u32>) -> Result<(), Error> {
    match max {
        Some(m) if m == 0 || m > MAX_VERSIONS_LIMIT => {
            Err(Error::InvalidArgument { rule: format!("max_versions must be between 1 and {MAX_VERSIONS_LIMIT}") })
        }
        _ => Ok(()),
    }
}

/// Checks the version list of a Delete, Undelete or Destroy.
///
/// # Errors
/// [`Error::InvalidArgument`] for version 0 or too many versions.
pub fn versions(versions: &[u64]) -> Result<Vec<SecretVersion>, Error> {
    if versions.len() > MAX_VERSIONS_PER_CALL {
        return Err(Error::InvalidArgument { rule: format!("at most {MAX_VERSIONS_PER_CALL} versions per call") });
    }
    if versions.contains(&0) {
        return Err(Error::InvalidArgument { rule: "versions start at 1; 0 is not a version".into() });
    }
    Ok(versions.iter().copied().map(SecretVersion).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_versions() {
        assert!(value(&[0; 10], 10).is_ok());
        assert!(value(&[0; 11], 10).is_err());
        assert!(max_versions(Some(0)).is_err());
        assert!(max_versions(Some(1001)).is_err());
        assert!(max_versions(None).is_ok());
        assert!(versions(&[1, 0]).is_err());
        assert!(versions(&[1, 2]).is_ok());
        assert!(prefix("a b").is_err());
        assert!(prefix("").is_ok() && prefix("db/").is_ok());
    }
}
