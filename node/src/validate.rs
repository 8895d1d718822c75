// Hot path: every secret request validates its path.
//! Input rules for secret paths, values and version lists. A violation names the rule.

use crate::error::Error;

/// The longest path, in bytes.
pub const MAX_PATH_BYTES: usize = 512;
/// The most versions one secret may keep.
pub const MAX_VERSIONS_LIMIT: u32 = 1000;
/// The most versions one Delete/Undelete/Destroy may name.
pub const MAX_VERSIONS_PER_CALL: usize = 100;

/// Checks a secret path: `/`-separated segments of `[A-Za-z0-9._-]`, no empty, `.` or `..`
/// segment, at most [`MAX_PATH_BYTES`] bytes.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the broken rule.
pub fn path(path: &str) -> Result<(), Error> {
    let rule = |rule: String| Err(Error::InvalidArgument { rule });
    if path.is_empty() {
        return rule("the path is empty".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return rule(format!("the path is {} bytes long; at most {MAX_PATH_BYTES} are allowed", path.len()));
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return rule("the path has an empty segment (a leading, trailing or doubled '/')".into());
        }
        if segment == "." || segment == ".." {
            return rule(format!("the path has a '{segment}' segment; '.' and '..' are not allowed"));
        }
        if let Some(c) = segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return rule(format!("the path contains {c:?}; segments may only contain A-Z a-z 0-9 . _ -"));
        }
    }
    Ok(())
}

/// Checks a list prefix: empty, or a path prefix whose characters are allowed in paths.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the broken rule.
pub fn prefix(prefix: &str) -> Result<(), Error> {
    if prefix.len() > MAX_PATH_BYTES {
        return Err(Error::InvalidArgument { rule: format!("the prefix is longer than {MAX_PATH_BYTES} bytes") });
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
pub fn versions(versions: &[u64]) -> Result<(), Error> {
    if versions.len() > MAX_VERSIONS_PER_CALL {
        return Err(Error::InvalidArgument { rule: format!("at most {MAX_VERSIONS_PER_CALL} versions per call") });
    }
    if versions.contains(&0) {
        return Err(Error::InvalidArgument { rule: "versions start at 1; 0 is not a version".into() });
    }
    Ok(())
}

/// The longest request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Reads a request's idempotency key: empty means none; otherwise 1 to
/// [`MAX_REQUEST_ID_BYTES`] bytes of visible ASCII (a UUID, a ULID, `job-42:retry`).
///
/// # Errors
/// [`Error::InvalidArgument`] naming the rule.
pub fn request_id(id: &str) -> Result<Option<String>, Error> {
    if id.is_empty() {
        return Ok(None);
    }
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(Error::InvalidArgument {
            rule: format!("request_id is {} bytes long; at most {MAX_REQUEST_ID_BYTES} are allowed", id.len()),
        });
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(Error::InvalidArgument {
            rule: format!("request_id contains {c:?}; only visible ASCII characters are allowed"),
        });
    }
    Ok(Some(id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(p: &str) -> String {
        match path(p) {
            Err(Error::InvalidArgument { rule }) => rule,
            other => panic!("{p:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn good_paths() {
        for p in ["a", "db/password", "team-1/app_2/v1.2", "...x/y..", &"a".repeat(512)] {
            assert!(path(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn bad_paths_name_the_rule() {
        assert!(rule("").contains("empty"));
        assert!(rule("/a").contains("empty segment"));
        assert!(rule("a/").contains("empty segment"));
        assert!(rule("a//b").contains("empty segment"));
        assert!(rule("a/./b").contains("'.'"));
        assert!(rule("a/../b").contains("'..'"));
        assert!(rule("a b").contains("' '"));
        assert!(rule("a/é").contains("'é'"));
        assert!(rule("a\u{0}b").contains("'\\0'"));
        assert!(rule(&"a".repeat(513)).contains("513 bytes"));
    }

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

    #[test]
    fn request_ids() -> Result<(), Error> {
        assert_eq!(request_id("")?, None);
        assert_eq!(request_id("job-42:retry")?, Some("job-42:retry".into()));
        assert!(request_id("a b").is_err());
        assert!(request_id("a\u{1}").is_err());
        assert!(request_id(&"r".repeat(129)).is_err());
        Ok(())
    }
}
