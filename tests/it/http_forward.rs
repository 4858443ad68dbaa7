//! Plain HTTP forwarding through the proxy.
use egress_proxy::audit::{Decided, Reason};

use crate::support::*;

fn catalog(port: u16) -> String {
    format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"repo.clearswift.net\", \"rh.repo.clearswift.net\"]\nports = [{port}]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"RSS Feed\"\nhosts = [\"www.clearswift.com\"]\nports = [{port}]\naction = \"allow\"\n"
    )
}

#[tokio::test]
async fn get_is_forwarded_with_one_record() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(&config(&["repo.clearswift.net"], ""), &catalog(origin.port())).await;
    let url = format!("http://repo.clearswift.net:{}/hello?x=1", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "hello");
    let recs = proxy.exactly(1).await;
    let r = &recs[0];
    assert_eq!(r.method.as_ref().map(|m| m.as_str()), Some("GET"));
    assert_eq!(r.host.as_deref(), Some("repo.clearswift.net"));
    assert_eq!(r.port, Some(origin.port()));
    assert_eq!(r.url.as_deref(), Some(url.as_str()));
    assert_eq!(r.decision, Decided::Allow);
    assert_eq!(r.rule.as_deref(), Some("Clearswift Update Server"));
    assert_eq!(r.reason, None);
    assert_eq!(r.status, Some(200));
    assert_eq!(r.bytes_down, 5);
    assert_eq!(r.upstream, Some(origin.addr));
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/hello?x=1", "origin-form upstream");
    assert_eq!(seen[0].header("host"), Some(format!("repo.clearswift.net:{}", origin.port()).as_str()));
}

#[tokio::test]
async fn not_in_catalog_is_refused_with_403_reason_header_body_and_record() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(&config(&["repo.clearswift.net", "example.com"], ""), &catalog(origin.port())).await;
    let url = format!("http://example.com:{}/", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-egress-error"], "not_in_catalog");
    assert_eq!(resp.headers()["connection"], "close");
    let body = resp.text().await.expect("body");
    let recs = proxy.exactly(1).await;
    let r = &recs[0];
    assert!(body.contains("not_in_catalog"), "{body}");
    assert!(body.contains(&r.id_string()), "body names the record id: {body}");
    assert_eq!(r.decision, Decided::Deny);
    assert_eq!(r.reason, Some(Reason::NotInCatalog));
    assert_eq!(r.status, Some(403));
    assert!(origin.seen().is_empty(), "origin never sees a refused request");
}
