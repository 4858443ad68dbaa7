//! The idle time-outs and the shutdown of all the tunnels of a proxy, kept
//! by one sweeper task rather than by a timer and a cancellation waiter in
//! each tunnel (184 bytes of every idle tunnel's state; here a tunnel keeps
//! 16, and a slot of 24 and an entry of 8 in the shared table).
//!
//! A tunnel arms its slot for the second after the moment it would have
//! idled out; the sweeper sleeps until the earliest armed second, wakes the
//! tunnels due, and those that moved bytes since arm again for the rest. A
//! time-out thus ends a tunnel at most a second late, never early. Nothing
//! runs between armed seconds, so idle tunnels cost no CPU; the sweeper
//! ends when nothing is armed. At shutdown it wakes every armed tunnel,
//! and an arm after that sees the shutdown at once. (Every open tunnel is
//! armed, or was just woken and arms on its next poll, starting a sweeper
//! if none runs: so a sweeper is there to see the shutdown.)
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Shared by all the tunnels of a proxy; cheap to clone.
#[derive(Clone)]
pub struct Idler {
    inner: Arc<Inner>,
}

struct Inner {
    start: Instant,
    hard: CancellationToken,
    /// Set by the sweeper once `hard` is cancelled: read on every poll of
    /// every tunnel, where the token's own check would take its lock.
    shut: AtomicBool,
    state: Mutex<State>,
    /// Tells a sleeping sweeper that an earlier second was armed.
    replan: Notify,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// (second, slot) for each armed slot.
    armed: BTreeSet<(u32, u32)>,
    /// The second the sweeper sleeps until; `None`: no sweeper runs.
    sweeper: Option<u32>,
    /// Shut down: every armed tunnel was woken, and none may arm again.
    closed: bool,
}

#[derive(Default)]
struct Slot {
    waker: Option<Waker>,
    /// The second it is armed for; 0: not armed.
    second: u32,
}

/// How a tunnel's clock ran out.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Expired {
    Idle,
    Shutdown,
}

impl Idler {
    /// For a proxy that shuts down with `hard`.
    pub fn new(hard: CancellationToken) -> Self {
        Idler {
            inner: Arc::new(Inner {
                start: Instant::now(),
                hard,
                shut: AtomicBool::new(false),
                state: Mutex::default(),
                replan: Notify::new(),
            }),
        }
    }

    /// A tunnel's entry, armed on its first poll.
    pub(super) fn entry(&self) -> Entry<'_> {
        Entry {
            idler: self,
            slot: u32::MAX,
            due_ms: 0,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Slots armed now (for tests).
    #[cfg(test)]
    pub(super) fn armed(&self) -> usize {
        self.inner.lock().armed.len()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock; stay usable anyway.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One tunnel's place in the [`Idler`]; its slot is freed on drop.
pub(super) struct Entry<'a> {
    idler: &'a Idler,
    /// `u32::MAX` until first armed.
    slot: u32,
    /// The moment (ms after the idler's start) it is armed for.
    due_ms: u64,
}

impl Entry<'_> {
    /// Ready once the tunnel has been quiet (per `quiet`) for `idle`, or
    /// the proxy shuts down. Between the moments it is armed for it takes
    /// no lock: the sweeper keeps the waker it was armed with (a task's
    /// waker wakes that task, whichever poll gave it).
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        idle: Duration,
        quiet: impl FnOnce() -> Duration,
    ) -> Poll<Expired> {
        let inner = &self.idler.inner;
        if inner.shut.load(Ordering::Acquire) {
            return Poll::Ready(Expired::Shutdown);
        }
        let now_ms = self.idler.now_ms();
        if self.slot != u32::MAX && now_ms < self.due_ms {
            return Poll::Pending;
        }
        let quiet = quiet();
        if quiet >= idle {
            return Poll::Ready(Expired::Idle);
        }
        let rest = u64::try_from((idle - quiet).as_millis()).unwrap_or(u64::MAX);
        self.due_ms = now_ms.saturating_add(rest.max(1));
        if self.arm(cx.waker()) {
            Poll::Pending
        } else {
            Poll::Ready(Expired::Shutdown)
        }
    }

    /// Arm the slot for the second after `due_ms`; false once shut down.
    fn arm(&mut self, waker: &Waker) -> bool {
        let inner = &self.idler.inner;
        let second = u32::try_from(self.due_ms / 1000 + 1).unwrap_or(u32::MAX);
        let mut st = inner.lock();
        if st.closed {
            return false;
        }
        if self.slot == u32::MAX {
            self.slot = match st.free.pop() {
                Some(i) => i,
                None => {
                    st.slots.push(Slot::default());
                    u32::try_from(st.slots.len() - 1).unwrap_or(u32::MAX)
                }
            };
        }
        let id = self.slot;
        let Some(slot) = st.slots.get_mut(id as usize) else {
            return false;
        };
        let old = std::mem::replace(&mut slot.second, second);
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            slot.waker = Some(waker.clone());
        }
        if old != 0 {
            st.armed.remove(&(old, id));
        }
        st.armed.insert((second, id));
        let (spawn, replan) = match st.sweeper {
            None => (true, false),
            Some(planned) => (false, second < planned),
        };
        if spawn {
            st.sweeper = Some(second);
        }
        drop(st);
        if spawn {
            // The guard goes in as an argument, so it is dropped (and says
            // no sweeper runs) even if the task is dropped unpolled, as on
            // a runtime that is shutting down.
            tokio::spawn(sweep(Arc::clone(inner), Running(Some(Arc::clone(inner)))));
        } else if replan {
            inner.replan.notify_one();
        }
        true
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if self.slot == u32::MAX {
            return;
        }
        let mut st = self.idler.inner.lock();
        let id = self.slot;
        if let Some(slot) = st.slots.get_mut(id as usize) {
            let second = std::mem::take(slot).second;
            if second != 0 {
                st.armed.remove(&(second, id));
            }
            st.free.push(id);
        }
    }
}

/// Wake the tunnels whose armed second has come, until none is armed; at
/// shutdown, wake them all.
async fn sweep(inner: Arc<Inner>, mut running: Running) {
    loop {
        let next = {
            let mut st = inner.lock();
            let Some(&(second, _)) = st.armed.first() else {
                st.sweeper = None;
                running.0 = None;
                return;
            };
            st.sweeper = Some(second);
            second
        };
        let at = inner.start + Duration::from_secs(u64::from(next));
        tokio::select! {
            biased;
            () = inner.hard.cancelled() => {
                let wakers = {
                    let mut st = inner.lock();
                    st.closed = true;
                    inner.shut.store(true, Ordering::Release);
                    st.sweeper = None;
                    running.0 = None;
                    st.armed.clear();
                    st.slots.iter_mut().filter_map(|s| { s.second = 0; s.waker.take() }).collect::<Vec<_>>()
                };
                wakers.into_iter().for_each(Waker::wake);
                return;
            }
            () = inner.replan.notified() => continue,
            () = tokio::time::sleep_until(at.into()) => {}
        }
        let now = u32::try_from(inner.start.elapsed().as_secs()).unwrap_or(u32::MAX);
        let wakers = {
            let mut st = inner.lock();
            let later = st.armed.split_off(&(now.saturating_add(1), 0));
            let due = std::mem::replace(&mut st.armed, later);
            due.into_iter()
                .filter_map(|(_, id)| {
                    let slot = st.slots.get_mut(id as usize)?;
                    slot.second = 0;
                    slot.waker.take()
                })
                .collect::<Vec<_>>()
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// Held by a sweeper from its spawning: if its runtime drops it before it
/// ends (or before it ever ran), the next arm starts another. (A sweeper
/// that ends by itself says so under the lock where it saw nothing armed,
/// and clears this.)
struct Running(Option<Arc<Inner>>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.lock().sweeper = None;
        }
    }
}

#[cfg(test)]
mod tests;
