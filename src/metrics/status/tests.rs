use super::*;
use std::time::Duration;

fn rec(host: &str, port: u16, decision: Decided, reason: Option<Reason>, t: u64) -> Record {
    let mut r = Record::new(
        1,
        "10.0.0.9:40000".parse().unwrap(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(t),
    );
    r.host = Some(host.into());
    r.port = Some(port);
    r.decision = decision;
    r.reason = reason;
    r.bytes_up = 10;
    r.bytes_down = 20;
    r
}

#[test]
fn table_is_bounded_and_evicts_least_recently_seen() {
    let s = Status::new(3);
    let deny = |h: &str, t| rec(h, 443, Decided::Deny, Some(Reason::NotInCatalog), t);
    s.observe(&[
        deny("a.example", 1),
        deny("b.example", 2),
        deny("c.example", 3),
    ]);
    // a is seen again: b is now the oldest.
    s.observe(&[deny("a.example", 4), deny("d.example", 5)]);
    let (list, evictions) = s.denials();
    let hosts: Vec<&str> = list.iter().map(|d| d.host.as_str()).collect();
    assert_eq!(hosts, ["d.example", "a.example", "c.example"]);
    assert_eq!(evictions, 1);
    assert_eq!(list[1].count, 2);
    assert_eq!(list[1].clients, [("10.0.0.9".parse().unwrap(), 2)]);
    assert_eq!(
        list[1].first_seen,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1)
    );
    s.set_denials_kept(1);
    let (list, evictions) = s.denials();
    assert_eq!(list.len(), 1);
    assert_eq!(evictions, 3);
}

#[test]
fn only_refusals_with_a_destination_are_listed() {
    let s = Status::new(10);
    s.observe(&[
        rec("ok.example", 443, Decided::Allow, None, 1),
        rec(
            "down.example",
            443,
            Decided::Allow,
            Some(Reason::UpstreamConnectFailed),
            1,
        ),
        rec(
            "miss.example",
            443,
            Decided::Report,
            Some(Reason::NotInCatalog),
            1,
        ),
        rec(
            "no.example",
            80,
            Decided::Deny,
            Some(Reason::PortNotAllowed),
            1,
        ),
    ]);
    let (list, _) = s.denials();
    let mut hosts: Vec<&str> = list.iter().map(|d| d.host.as_str()).collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["miss.example", "no.example"]);
}

#[test]
fn recent_minutes_roll() {
    let s = Status::new(10);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 * 60);
    s.observe_at(&[rec("a.example", 1, Decided::Allow, None, 0)], t0);
    s.observe_at(
        &[rec(
            "a.example",
            1,
            Decided::Deny,
            Some(Reason::NotInCatalog),
            0,
        )],
        t0 + Duration::from_secs(120),
    );
    let settings =
        Settings::from_toml(crate::config::ConfigSource::Builtin, "", Vec::new()).unwrap();
    let v = s.summary_at(&settings, t0 + Duration::from_secs(150));
    assert_eq!(v["recent"]["transactions"], 2);
    assert_eq!(
        v["recent"]["per_minute"].as_array().unwrap().len(),
        RECENT_MINUTES
    );
    assert_eq!(v["recent"]["per_minute"][RECENT_MINUTES - 1]["denied"], 1);
    assert_eq!(
        v["recent"]["per_minute"][RECENT_MINUTES - 3]["transactions"],
        1
    );
    // 15 minutes on, the first minute has left the window; totals keep it.
    let later = t0 + Duration::from_secs(60 * RECENT_MINUTES as u64);
    s.observe_at(&[], later);
    let v = s.summary_at(&settings, later);
    assert_eq!(v["recent"]["transactions"], 1);
    assert_eq!(v["totals"]["transactions"], 2);
    assert_eq!(v["totals"]["decisions"]["deny"]["bytes_down"], 20);
}
