//! Build facts: the git commit for `--version` and `egress_build_info`
//! (`EGRESS_PROXY_COMMIT`, "unknown" outside a git checkout).
use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EGRESS_PROXY_COMMIT={commit}");
    // Build again when HEAD moves: HEAD itself (a checkout), the ref it
    // points to (a commit) and packed-refs (a gc). In a worktree, HEAD is in
    // the worktree's git dir and the refs in the common one.
    // (A missing file would make cargo run this script on every build, so
    // only files that exist are named.)
    if let Some(dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) {
        let common = git(&["rev-parse", "--git-common-dir"]).map_or(dir.clone(), PathBuf::from);
        let mut watched = vec![dir.join("HEAD"), common.join("packed-refs")];
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(common.join(head_ref));
        }
        for f in watched.iter().filter(|f| f.exists()) {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    }
}
