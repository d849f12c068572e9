//! A plain static web server hosting a published tree is a valid upstream:
//! nginx serves `patchrelay publish`'s output, byte for byte, and relays chain
//! behind it.

mod common;

use std::time::Duration;

use common::*;

#[actix_web::test]
async fn nginx_hosting_a_published_tree_is_an_upstream() {
    let repo = TestRepo::new();
    let Some(nginx) = start_nginx(&repo.repo).await else { return };
    let storage = tempfile::tempdir().unwrap();
    let relay1 = start_relay(&[&nginx.url], &repo.public, &storage.path().join("r1")).await;
    assert!(wait_ready(&relay1.url(), Duration::from_secs(10)).await);
    let relay2 = start_relay(&[&relay1.url()], &repo.public, &storage.path().join("r2")).await;
    assert!(wait_ready(&relay2.url(), Duration::from_secs(10)).await);

    let http = client();
    for url in [relay1.url(), relay2.url()] {
        let m = http.get(format!("{url}/v1/manifest")).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(m, repo.manifest_bytes());
        let r = http.get(format!("{url}/v1/components/big/latest")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), noise(42, 3 << 20));
        let r = http
            .get(format!("{url}/v1/components/engine/versions/2"))
            .header("Range", "bytes=10-19")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(r.bytes().await.unwrap(), TestRepo::engine_bytes(2)[10..20]);
    }

    // A new publish into the tree nginx serves reaches the relays at the next sync.
    repo.add_version("engine", "4", &TestRepo::engine_bytes(4));
    repo.publish();
    let (status, report) = admin_sync(&relay1.url()).await;
    assert_eq!((status, report["serial"].as_u64()), (200, Some(2)), "{report}");
    let r = http.get(format!("{}/v1/components/engine/latest", relay1.url())).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), TestRepo::engine_bytes(4));
}
