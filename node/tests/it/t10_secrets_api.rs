use coffer_proto::v1::{DeleteRequest, DescribeRequest, DestroyRequest, ListRequest, PutRequest, UndeleteRequest};
use tonic::Code;

use crate::{get, put, InProcessNode};

#[tokio::test(flavor = "multi_thread")]
async fn put_get_versions_cas_delete_undelete_destroy() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut c = node.client().await?;

    let v1 = c.put(put("db/password", b"one", Some(0))).await?.into_inner();
    assert_eq!(v1.version, 1);
    assert!(v1.created_at.is_some());
    let v2 = c.put(put("db/password", b"two", None)).await?.into_inner();
    assert_eq!(v2.version, 2);
    let v3 = c.put(put("db/password", b"three", Some(2))).await?.into_inner();
    assert_eq!(v3.version, 3);

    let cur = c.get(get("db/password", None)).await?.into_inner();
    assert_eq!((cur.value.as_slice(), cur.version), (&b"three"[..], 3));
    let old = c.get(get("db/password", Some(1))).await?.into_inner();
    assert_eq!((old.value.as_slice(), old.version), (&b"one"[..], 1));

    // CAS mismatch: FAILED_PRECONDITION, nothing written.
    let err = c.put(put("db/password", b"nope", Some(1))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("current version is 3"), "{}", err.message());
    let err = c.put(put("db/password", b"nope", Some(0))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(c.get(get("db/password", None)).await?.into_inner().version, 3);

    // Soft delete, then undelete.
    c.delete(DeleteRequest { path: "db/password".into(), versions: vec![], ..Default::default() }).await?;
    let err = c.get(get("db/password", None)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("deleted"), "{}", err.message());
    c.undelete(UndeleteRequest { path: "db/password".into(), versions: vec![3], ..Default::default() }).await?;
    assert_eq!(c.get(get("db/password", None)).await?.into_inner().value, b"three");

    // Destroy: gone for good, and undelete cannot bring it back.
    c.destroy(DestroyRequest { path: "db/password".into(), versions: vec![1], ..Default::default() }).await?;
    let err = c.get(get("db/password", Some(1))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("destroyed"), "{}", err.message());
    let err = c
        .undelete(UndeleteRequest { path: "db/password".into(), versions: vec![1], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let d = c.describe(DescribeRequest { path: "db/password".into() }).await?.into_inner();
    assert_eq!((d.current_version, d.max_versions), (3, 5));
    let states: Vec<_> = d.versions.iter().map(|v| (v.version, v.destroyed, v.deleted_at.is_some())).collect();
    assert_eq!(states, vec![(1, true, false), (2, false, false), (3, false, false)]);

    let err = c.get(get("db/never", None)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("no secret"), "{}", err.message());
    let err = c.get(get("db/password", Some(9))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("no version 9"), "{}", err.message());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn max_versions_prunes_the_oldest() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut c = node.client().await?;
    let mut req = put("app/key", b"v1", None);
    req.max_versions = Some(2);
    c.put(req).await?;
    c.put(put("app/key", b"v2", None)).await?;
    c.put(put("app/key", b"v3", None)).await?;
    let d = c.describe(DescribeRequest { path: "app/key".into() }).await?.into_inner();
    assert_eq!(d.max_versions, 2);
    assert_eq!(d.versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![2, 3]);
    let err = c.get(get("app/key", Some(1))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("pruned"), "{}", err.message());

    // The config default (5) applies to a new secret.
    for i in 0..7 {
        c.put(put("app/other", format!("{i}").as_bytes(), None)).await?;
    }
    let d = c.describe(DescribeRequest { path: "app/other".into() }).await?.into_inner();
    assert_eq!(d.versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![3, 4, 5, 6, 7]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn list_paginates_under_a_prefix() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut c = node.client().await?;
    let paths: Vec<String> = (0..25).map(|i| format!("team/svc-{i:02}")).collect();
    for p in &paths {
        c.put(put(p, b"x", None)).await?;
    }
    c.put(put("teamx/other", b"x", None)).await?;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c.list(ListRequest { prefix: "team/".into(), page_size: 10, page_token: token }).await?.into_inner();
        pages += 1;
        assert!(page.paths.len() <= 10);
        seen.extend(page.paths);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, paths);
    let all =
        c.list(ListRequest { prefix: String::new(), page_size: 0, page_token: String::new() }).await?.into_inner();
    assert_eq!(all.paths.len(), 26);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_put_with_the_same_request_id_is_applied_once() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut c = node.client().await?;
    let req = PutRequest { request_id: "req-42".into(), ..put("idem/x", b"a", None) };
    let first = c.put(req.clone()).await?.into_inner();
    let again = c.put(req).await?.into_inner();
    assert_eq!(first.version, again.version);
    let d = c.describe(DescribeRequest { path: "idem/x".into() }).await?.into_inner();
    assert_eq!(d.current_version, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_to_one_secret_get_distinct_versions() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut c = node.client().await?;
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for i in 0..10 {
                versions.push(c.put(put("hot/key", format!("{w}-{i}").as_bytes(), None)).await?.into_inner().version);
            }
            anyhow::Ok(versions)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=40).collect::<Vec<u64>>());
    Ok(())
}
