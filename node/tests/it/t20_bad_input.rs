use coffer_proto::v1::{DeleteRequest, DescribeRequest, ListRequest};
use tonic::Code;

use crate::{get, put, InProcessNode};

#[tokio::test(flavor = "multi_thread")]
async fn bad_paths_and_sizes_are_refused_and_nothing_is_written() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut c = node.client().await?;
    let long = "a".repeat(513);
    let cases: [(&str, &str); 8] = [
        ("", "empty"),
        ("/lead", "empty segment"),
        ("trail/", "empty segment"),
        ("a//b", "empty segment"),
        ("a/../b", "'..'"),
        ("a/./b", "'.'"),
        ("with space", "' '"),
        (&long, "513 bytes"),
    ];
    for (path, rule) in cases {
        let err = c.put(put(path, b"v", None)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path:?}: {err}");
        assert!(err.message().contains(rule), "{path:?}: {}", err.message());
        assert_eq!(c.get(get(path, None)).await.unwrap_err().code(), Code::InvalidArgument);
    }

    let err = c.put(put("big/value", &vec![7u8; 4097], None)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("4097 bytes") && err.message().contains("4096"), "{}", err.message());
    c.put(put("big/value-ok", &vec![7u8; 4096], None)).await?;

    let mut req = put("mv/x", b"v", None);
    req.max_versions = Some(0);
    assert_eq!(c.put(req).await.unwrap_err().code(), Code::InvalidArgument);

    let err = c.get(get("big/value-ok", Some(0))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .delete(DeleteRequest { path: "big/value-ok".into(), versions: vec![0], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .delete(DeleteRequest { path: "big/value-ok".into(), versions: vec![1, 5], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "a missing version refuses the whole call");
    let err =
        c.list(ListRequest { prefix: "bad prefix".into(), page_size: 0, page_token: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err =
        c.list(ListRequest { prefix: String::new(), page_size: 5000, page_token: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Nothing of the refused writes exists; the one valid secret is untouched.
    let listed =
        c.list(ListRequest { prefix: String::new(), page_size: 0, page_token: String::new() }).await?.into_inner();
    assert_eq!(listed.paths, vec!["big/value-ok"]);
    let d = c.describe(DescribeRequest { path: "big/value-ok".into() }).await?.into_inner();
    assert_eq!(d.current_version, 1);
    assert!(d.versions.iter().all(|v| v.deleted_at.is_none()));

    // A wrong CAS writes nothing either.
    let err = c.put(put("big/value-ok", b"x", Some(7))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(c.get(get("big/value-ok", None)).await?.into_inner().value, vec![7u8; 4096]);
    Ok(())
}
