//! Where replaced configuration snapshots are dropped: not on a worker
//! thread. A reload swaps the snapshot while connections still hold the
//! old one; whichever lets go last frees it, and freeing a large catalog
//! takes a while (`benches/reload.rs` measures it), which on a worker
//! thread stalls every connection of that thread. The reload hands the old
//! snapshot here instead: one thread, at the audit writer's lower priority,
//! holds each until it is the last holder and then drops it.
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often held snapshots are checked for other holders.
const EVERY: Duration = Duration::from_millis(20);

/// The thread that drops replaced snapshots (started with the first).
pub struct Graveyard<T: Send + Sync + 'static> {
    tx: Mutex<Option<Sender<Arc<T>>>>,
}

impl<T: Send + Sync + 'static> Default for Graveyard<T> {
    fn default() -> Self {
        Graveyard {
            tx: Mutex::new(None),
        }
    }
}

impl<T: Send + Sync + 'static> Graveyard<T> {
    /// Drop `old` here when nothing else holds it, else on the graveyard
    /// thread once nothing else does. When that thread cannot be started,
    /// the last holder drops it, as without a graveyard.
    pub fn retire(&self, old: Arc<T>) {
        if Arc::strong_count(&old) == 1 {
            return;
        }
        let Ok(mut tx) = self.tx.lock() else { return };
        let old = match tx.as_ref() {
            Some(t) => match t.send(old) {
                Ok(()) => return,
                Err(mpsc::SendError(old)) => old,
            },
            None => old,
        };
        let (t, rx) = mpsc::channel();
        let started = std::thread::Builder::new()
            .name("retire".into())
            .spawn(move || keep_until_last(&rx));
        if started.is_ok() && t.send(old).is_ok() {
            *tx = Some(t);
        }
    }
}

/// Hold what arrives until each is the last reference, then drop it.
fn keep_until_last<T>(rx: &mpsc::Receiver<Arc<T>>) {
    crate::audit::yield_to_traffic();
    let mut held: Vec<Arc<T>> = Vec::new();
    loop {
        let next = if held.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(EVERY)
        };
        match next {
            Ok(old) => held.push(old),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        held.retain(|s| Arc::strong_count(s) > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Notes the thread it is dropped on.
    struct Noted(Arc<Mutex<Option<String>>>);

    impl Drop for Noted {
        fn drop(&mut self) {
            let name = std::thread::current().name().map(String::from);
            *self.0.lock().unwrap() = Some(name.unwrap_or_default());
        }
    }

    #[test]
    fn a_snapshot_still_held_is_dropped_on_the_graveyard_thread_after_its_last_holder() {
        let graveyard = Graveyard::default();
        let seen = Arc::new(Mutex::new(None));
        let old = Arc::new(Noted(Arc::clone(&seen)));
        let connection = Arc::clone(&old);
        graveyard.retire(old);
        std::thread::sleep(EVERY * 3);
        assert_eq!(*seen.lock().unwrap(), None, "still held by the connection");
        std::thread::spawn(move || drop(connection)).join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(EVERY);
        }
        assert_eq!(seen.lock().unwrap().as_deref(), Some("retire"));
    }

    #[test]
    fn a_snapshot_nobody_holds_is_dropped_at_once() {
        let graveyard = Graveyard::default();
        let seen = Arc::new(Mutex::new(None));
        graveyard.retire(Arc::new(Noted(Arc::clone(&seen))));
        let here = std::thread::current().name().map(String::from);
        assert_eq!(*seen.lock().unwrap(), Some(here.unwrap_or_default()));
    }
}
