//! List: secret paths under a prefix, one page at a time. The page token is the last path of
//! the previous page, so pages stay correct while secrets are added or removed between calls;
//! on the wire it is sealed with the keyring ([`seal_cursor`]), so it names no path to a caller
//! whose policies hid that path.

use crate::error::Error;
use crate::node::Node;
use crate::validate;

/// Page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The largest page size.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// One page of paths, and the token of the next page (`None`: this was the last).
#[derive(Debug)]
pub struct Page {
    /// The paths, in lexical order.
    pub paths: Vec<String>,
    /// Token for the next page.
    pub next_page_token: Option<String>,
}

const CURSOR_AAD: &[u8] = b"coffer/list-cursor/v1";

/// The page token for a page that ended at `last`: `<keyring version>.<base64url of the seal>`.
///
/// # Errors
/// The keyring's nonce counter is exhausted.
pub fn seal_cursor(keyring: &crate::envelope::Keyring, last: &str) -> Result<String, Error> {
    use base64::Engine;
    let (version, sealed) = keyring.wrap(CURSOR_AAD, last.as_bytes())?;
    Ok(format!("{}.{}", version.0, base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed)))
}

/// The path a page token from [`seal_cursor`] ends at; `None` for the first page.
///
/// # Errors
/// `InvalidArgument` for a token that no node of this cluster made.
pub fn open_cursor(keyring: &crate::envelope::Keyring, token: &str) -> Result<Option<String>, Error> {
    use base64::Engine;
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::InvalidArgument { rule: "page_token is not a token from a previous List".into() };
    let (version, sealed) = token.split_once('.').ok_or_else(bad)?;
    let version = coffer_raft::KeyringVersion(version.parse().map_err(|_| bad())?);
    let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sealed).map_err(|_| bad())?;
    let plain = keyring.unwrap(version, CURSOR_AAD, &sealed).map_err(|_| bad())?;
    Ok(Some(String::from_utf8(plain.to_vec()).map_err(|_| bad())?))
}

/// Lists paths (linearizable).
///
/// # Errors
/// `InvalidArgument` for a bad prefix, page size or token; `Unavailable`.
pub async fn list_secrets(node: &Node, prefix: &str, page_size: u32, page_token: &str) -> Result<Page, Error> {
    validate::prefix(prefix)?;
    if page_size > MAX_PAGE_SIZE {
        return Err(Error::InvalidArgument { rule: format!("page_size is at most {MAX_PAGE_SIZE}") });
    }
    let size = if page_size == 0 { DEFAULT_PAGE_SIZE } else { page_size } as usize;
    let after = if page_token.is_empty() {
        None
    } else {
        coffer_raft::SecretPath::parse(page_token)
            .map_err(|_| Error::InvalidArgument { rule: "page_token is not a token from a previous List".into() })?;
        Some(page_token)
    };
    node.read_barrier(None).await?;
    // One extra row tells whether another page follows.
    let mut paths = node.reader().list(prefix, after, size + 1)?;
    let next_page_token = if paths.len() > size {
        paths.truncate(size);
        paths.last().cloned()
    } else {
        None
    };
    Ok(Page { paths, next_page_token })
}
