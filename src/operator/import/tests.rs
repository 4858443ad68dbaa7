use super::*;

#[test]
fn plain_regexes_become_names() {
    assert_eq!(
        regex_domain(r"\.example\.com$"),
        Some((None, Some("example.com".into())))
    );
    assert_eq!(
        regex_domain(r"(^|\.)Example\.com$"),
        Some((Some("example.com".into()), Some("example.com".into())))
    );
    assert_eq!(
        regex_domain(r"^example\.com$"),
        Some((Some("example.com".into()), None))
    );
    for bad in [
        r"example\.com",
        r"\.exam.le\.com$",
        r"^ads[0-9]\.example\.com$",
        r"\.com\.$",
    ] {
        assert_eq!(regex_domain(bad), None, "{bad}");
    }
}

#[test]
fn port_sets_intersect() {
    assert_eq!(
        intersect(
            &[(80, 80), (443, 443), (1025, 65535)],
            &[(443, 443), (8000, 8010)]
        ),
        vec![(443, 443), (8000, 8010)]
    );
    assert_eq!(
        normalise(vec![(80, 80), (81, 90), (443, 443)]),
        vec![(80, 90), (443, 443)]
    );
}
