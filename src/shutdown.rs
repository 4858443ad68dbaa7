//! Drain: leave the load balancer's pool, stop accepting, let in-flight
//! work finish within the grace, then cut what is left. Three tokens:
//! `leaving` (`/readyz` answers 503; everything else goes on, for
//! `server.shutdown_delay`), `graceful` (stop taking new requests; hyper
//! connections finish their current one) and `hard` (the grace ran out:
//! tunnels and streams close with reason `shutdown`).
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by the accept loop and every connection task.
#[derive(Clone, Default)]
pub struct Drain {
    pub leaving: CancellationToken,
    pub graceful: CancellationToken,
    pub hard: CancellationToken,
    pub tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Drain::default()
    }

    /// Begin draining, wait up to `grace` for tracked tasks, then cut the
    /// rest and wait for them to record and exit. Returns true when
    /// everything finished within the grace.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.leaving.cancel();
        self.graceful.cancel();
        self.tracker.close();
        let clean = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if !clean {
            tracing::warn!(grace = ?grace, open = self.tracker.len(), "shutdown grace passed; closing what is left");
            self.hard.cancel();
            // Cut tasks only write their records and return; bound it anyway.
            if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
                .await
                .is_err()
            {
                tracing::error!(
                    open = self.tracker.len(),
                    "tasks still open after the grace"
                );
            }
        }
        clean
    }
}
