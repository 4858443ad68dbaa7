//! Proxy authentication (issue 7): 407 both ways, a correct login recorded
//! with its user, CONNECT with credentials, the verified-credential cache,
//! auth before policy, and `egress-proxy auth hash`.
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use base64::Engine;
use egress_proxy::audit::{Decided, Reason};
use egress_proxy::auth::{hash_password, Auth};
use egress_proxy::config::AuthSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const UPDATE: &str = "repo.clearswift.net";
const KSN: &str = "ksn1.kaspersky-labs.com";
/// Resolves to loopback but is in no rule.
const STRANGER: &str = "example.com";

fn catalog(http_port: u16, echo_port: u16) -> String {
    format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"{UPDATE}\"]\nports = [{http_port}]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"Kaspersky KSN\"\nhosts = [\"{KSN}\"]\nports = [{echo_port}]\naction = \"bypass\"\n"
    )
}

/// `[auth]` with user `gateway`, password `pw` (hashed now), and `extra` lines.
fn auth_section(extra: &str) -> String {
    let phc = hash_password("pw").expect("hash");
    format!("[auth]\nusers = {{ gateway = '{phc}' }}\n{extra}\n")
}

fn basic(user: &str, password: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b}")
}

/// The proxy with auth on, an HTTP origin and an echo origin.
async fn setup(extra_auth: &str) -> (TestProxy, HttpOrigin, SocketAddr) {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let cfg = config(&[UPDATE, KSN, STRANGER], &auth_section(extra_auth));
    let proxy = TestProxy::start(&cfg, &catalog(origin.port(), echo.port())).await;
    (proxy, origin, echo)
}

/// A reqwest client through `proxy` with Basic proxy credentials.
fn client_as(proxy: &TestProxy, user: &str, password: &str) -> reqwest::Client {
    crypto();
    reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::all(proxy.url())
                .expect("proxy url")
                .basic_auth(user, password),
        )
        .timeout(WAIT)
        .build()
        .expect("client")
}

fn proxy_authenticate(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("proxy-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("407 carries Proxy-Authenticate: {:?}", resp.headers()))
        .to_string()
}

#[tokio::test]
async fn no_credentials_get_407_auth_required_with_a_challenge() {
    let (proxy, origin, _echo) = setup("").await;
    let url = format!("http://{UPDATE}:{}/", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 407);
    assert_eq!(resp.headers()["x-egress-error"], "auth_required");
    let challenge = proxy_authenticate(&resp);
    assert!(
        challenge.starts_with("Basic realm=\"egress-proxy\""),
        "default realm: {challenge}"
    );
    let recs = proxy.exactly(1).await;
    let r = &recs[0];
    assert_eq!(r.reason, Some(Reason::AuthRequired));
    assert_eq!(r.status, Some(407));
    assert_eq!(r.decision, Decided::Deny);
    assert_eq!(r.user, None);
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn the_challenge_names_the_configured_realm() {
    let (proxy, origin, _echo) = setup("realm = \"corp gateway\"").await;
    let url = format!("http://{UPDATE}:{}/", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 407);
    let challenge = proxy_authenticate(&resp);
    assert!(
        challenge.starts_with("Basic realm=\"corp gateway\""),
        "{challenge}"
    );
}

#[tokio::test]
async fn wrong_password_or_user_or_scheme_gets_407_auth_failed() {
    let (proxy, origin, _echo) = setup("").await;
    let url = format!("http://{UPDATE}:{}/", origin.port());
    for (user, pw) in [("gateway", "nope"), ("intruder", "pw")] {
        let resp = client_as(&proxy, user, pw)
            .get(&url)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 407, "{user}:{pw}");
        assert_eq!(resp.headers()["x-egress-error"], "auth_failed");
        proxy_authenticate(&resp);
    }
    // Not Basic.
    let req = format!(
        "GET http://{UPDATE}:{p}/ HTTP/1.1\r\nHost: {UPDATE}:{p}\r\nProxy-Authorization: Bearer abc\r\nConnection: close\r\n\r\n",
        p = origin.port()
    );
    let r = parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await);
    assert_eq!(r.status, 407, "{}", r.head);
    assert_eq!(r.header("x-egress-error"), Some("auth_failed"));

    let recs = proxy.exactly(3).await;
    for r in &recs {
        assert_eq!(r.reason, Some(Reason::AuthFailed), "{r:#?}");
        assert_eq!(r.status, Some(407));
        assert_eq!(r.user, None, "no user on a failed login");
    }
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn right_credentials_pass_and_the_record_names_the_user() {
    let (proxy, origin, _echo) = setup("").await;
    let url = format!("http://{UPDATE}:{}/", origin.port());
    let resp = client_as(&proxy, "gateway", "pw")
        .get(&url)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "hello");
    let recs = proxy.exactly(1).await;
    let r = &recs[0];
    assert_eq!(r.user.as_deref(), Some("gateway"));
    assert_eq!(r.reason, None);
    assert_eq!(r.status, Some(200));
    assert_eq!(r.decision, Decided::Allow);
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("proxy-authorization"),
        None,
        "the proxy credential is not forwarded"
    );
}

#[tokio::test]
async fn connect_with_proxy_authorization_opens_the_tunnel() {
    let (proxy, _origin, echo) = setup("").await;
    let authority = format!("{KSN}:{}", echo.port());

    // Without credentials: 407.
    let (status, _s) = connect(proxy.addr, &authority).await;
    assert_eq!(status, 407, "CONNECT without credentials");

    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(
        format!(
            "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {}\r\n\r\n",
            basic("gateway", "pw")
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut b))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&b, b"ping");
    drop(s);

    let recs = proxy
        .audit
        .wait_for(WAIT, |r| r.iter().any(|x| x.user.is_some()))
        .await;
    let refused = recs
        .iter()
        .find(|r| r.reason == Some(Reason::AuthRequired))
        .unwrap_or_else(|| panic!("an auth_required record: {recs:#?}"));
    assert_eq!(refused.method.as_ref().map(|m| m.as_str()), Some("CONNECT"));
    let ok = recs
        .iter()
        .find(|r| r.user.is_some())
        .unwrap_or_else(|| panic!("the tunnel's record: {recs:#?}"));
    assert_eq!(ok.user.as_deref(), Some("gateway"));
    assert_eq!(ok.method.as_ref().map(|m| m.as_str()), Some("CONNECT"));
    assert_eq!(ok.status, Some(200));
    assert_eq!(ok.decision, Decided::Bypass);
}

#[tokio::test]
async fn many_requests_with_one_credential_all_pass() {
    let (proxy, origin, _echo) = setup("").await;
    let url = format!("http://{UPDATE}:{}/", origin.port());
    let client = client_as(&proxy, "gateway", "pw");
    for i in 0..50 {
        let resp = client.get(&url).send().await.expect("send");
        assert_eq!(resp.status(), 200, "request {i}");
        let _ = resp.bytes().await;
    }
    let recs = proxy.exactly(50).await;
    assert!(recs
        .iter()
        .all(|r| r.user.as_deref() == Some("gateway") && r.status == Some(200)));
    assert_eq!(origin.seen().len(), 50);
}

/// Wrong passwords cost an argon2 verification each (milliseconds of CPU and
/// ~19 MiB of memory) and are never cached, so the per-client request rate
/// must count them: otherwise a client guessing passwords is not limited.
#[tokio::test]
async fn wrong_credentials_count_against_the_request_rate() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let extra = format!(
        "{}\n[rates]\nper_client_requests = \"2/m\"\n",
        auth_section("")
    );
    let cfg = config(&[UPDATE, KSN], &extra);
    let proxy = TestProxy::start(&cfg, &catalog(origin.port(), echo.port())).await;
    let url = format!("http://{UPDATE}:{}/", origin.port());
    let client = client_as(&proxy, "gateway", "guess");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            client
                .get(&url)
                .send()
                .await
                .expect("send")
                .status()
                .as_u16(),
        );
    }
    assert_eq!(
        statuses,
        [407, 407, 429],
        "the third request in a minute is over 2/m"
    );
    let recs = proxy.exactly(3).await;
    assert_eq!(recs[2].reason, Some(Reason::RateLimited), "{recs:#?}");
}

#[tokio::test]
async fn a_verified_credential_is_served_from_the_cache() {
    let (settings, _dir) = load(&config(&[], &auth_section("")), &catalog(8080, 8443));
    let auth = Auth::new(&settings.auth).expect("auth is on with users");
    let right = basic("gateway", "pw");
    let wrong = basic("gateway", "nope");
    assert!(
        auth.cached(right.as_bytes()).is_none(),
        "nothing cached before a verification"
    );
    assert_eq!(
        auth.verify(right.as_bytes()).as_deref().ok(),
        Some("gateway")
    );
    assert_eq!(
        auth.cached(right.as_bytes()).as_deref(),
        Some("gateway"),
        "cache hit"
    );
    assert_eq!(
        auth.verify(wrong.as_bytes()).err(),
        Some(Reason::AuthFailed)
    );
    assert!(
        auth.cached(wrong.as_bytes()).is_none(),
        "failures are not cached"
    );
}

#[tokio::test]
async fn auth_comes_before_the_policy() {
    let (proxy, origin, _echo) = setup("").await;
    let url = format!("http://{STRANGER}:{}/", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(
        resp.status(),
        407,
        "uncatalogued host without credentials: 407, not 403"
    );
    assert_eq!(resp.headers()["x-egress-error"], "auth_required");
    let resp = client_as(&proxy, "gateway", "pw")
        .get(&url)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 403, "with credentials, the policy decides");
    assert_eq!(resp.headers()["x-egress-error"], "not_in_catalog");
    let recs = proxy.exactly(2).await;
    assert_eq!(recs[0].reason, Some(Reason::AuthRequired));
    assert_eq!(recs[1].reason, Some(Reason::NotInCatalog));
    assert_eq!(
        recs[1].user.as_deref(),
        Some("gateway"),
        "the user is recorded on a refusal too"
    );
    assert!(origin.seen().is_empty());
}

#[test]
fn auth_hash_command_prints_a_phc_string_that_verifies() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_egress-proxy"))
        .args(["auth", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run egress-proxy auth hash");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"s3cret pass\n")
        .expect("write password");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let phc = String::from_utf8(out.stdout).expect("utf-8");
    let phc = phc.trim();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    assert!(!phc.contains("s3cret"), "the password is not echoed");

    let mut users = std::collections::BTreeMap::new();
    users.insert("gateway".to_string(), phc.to_string());
    let auth = Auth::new(&AuthSettings {
        realm: "egress-proxy".into(),
        users,
    })
    .expect("auth on");
    assert_eq!(
        auth.verify(basic("gateway", "s3cret pass").as_bytes())
            .as_deref()
            .ok(),
        Some("gateway")
    );
    assert_eq!(
        auth.verify(basic("gateway", "s3cret").as_bytes()).err(),
        Some(Reason::AuthFailed)
    );
}
