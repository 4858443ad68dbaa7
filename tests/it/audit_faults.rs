//! The audit file on a real filesystem that fills up: a tmpfs mounted for
//! the test (CI runs as root; elsewhere the test says why it skips). While
//! writes fail, traffic goes on, `/readyz` turns 503 and the error counter
//! moves; once space is back, the file holds every record exactly once.
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use egress_proxy::audit::{AuditSink, LineSink};
use egress_proxy::config::{AuditFormat, AuditPath};

use crate::admin::{get, metrics_until, value};
use crate::support::*;

/// A tmpfs of `size` on a temp dir, unmounted when dropped (also when the
/// test fails). Lazy unmount: the proxy may still hold the audit file open.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with a note) where mounting is not permitted.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "note: skipped, cannot mount a tmpfs (needs root, as in CI): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("note: skipped, cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fill the filesystem under `dir` with a file, then give back `left`
/// bytes, so the next writes start to fit and then fail mid-line.
fn fill(dir: &Path, left: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = [0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let len = f.metadata().expect("filler size").len();
    f.set_len(len.saturating_sub(left)).expect("free a little");
    path
}

/// Poll `/readyz` until it answers `status`.
async fn readyz_until(admin: std::net::SocketAddr, status: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let a = get(admin, "/readyz").await;
        if a.status == status {
            return a.body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {} ({}), expected {status}",
            a.status,
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The lines of the audit file once it holds `n` of them (or `WAIT` passed).
async fn file_lines(path: &Path, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    loop {
        let bytes = std::fs::read(path).expect("read the audit file");
        let lines = bytes.iter().filter(|&&b| b == b'\n').count();
        if lines >= n || Instant::now() >= deadline {
            return bytes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_full_disk_fails_readiness_and_loses_or_repeats_no_record() {
    let Some(fs) = Tmpfs::mount("256k") else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let (settings, dir) = load(
        &config(&["repo.clearswift.net"], ""),
        &rule(
            "Clearswift",
            &["repo.clearswift.net"],
            origin.port(),
            "allow",
            "",
        ),
    );
    let audit_path = fs.path().join("audit.jsonl");
    let file = LineSink::open(AuditPath::File(audit_path.clone()), AuditFormat::Json)
        .expect("open the audit file");
    let sinks: Vec<Box<dyn AuditSink>> = vec![Box::new(file)];
    let proxy = TestProxy::start_with_sinks(settings, dir, sinks).await;
    let filler = fill(fs.path(), 8192);

    // Traffic goes on while the writes fail: records queue.
    const N: usize = 300;
    let client = proxy.client();
    let url = format!("http://repo.clearswift.net:{}/", origin.port());
    for i in 0..N {
        let resp = client.get(&url).send().await.expect("send");
        assert_eq!(resp.status(), 200, "request {i} while the disk is full");
    }
    let body = readyz_until(proxy.admin, 503).await;
    assert!(body.contains("audit"), "{body}");
    metrics_until(proxy.admin, "write errors", |m| {
        value(m, "egress_audit_write_errors_total") >= 1.0
    })
    .await;

    // Space again: ready again, and every record lands once.
    std::fs::remove_file(&filler).expect("free space");
    readyz_until(proxy.admin, 200).await;
    let memory = proxy.records(N).await;
    let bytes = file_lines(&audit_path, N).await;
    assert!(bytes.ends_with(b"\n"), "no torn last line");
    let mut ids = HashSet::new();
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line)
            .unwrap_or_else(|e| panic!("torn line ({e}): {}", String::from_utf8_lossy(line)));
        let id = v["id"].as_str().expect("id").to_string();
        assert!(ids.insert(id.clone()), "record {id} written twice");
    }
    let want: HashSet<String> = memory.iter().map(|r| r.id_string()).collect();
    assert_eq!(ids.len(), N, "one line per transaction");
    assert_eq!(
        ids, want,
        "the file holds exactly the transactions' records"
    );
    drop(proxy);
}
