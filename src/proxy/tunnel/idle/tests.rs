use std::future::poll_fn;
use std::sync::atomic::AtomicU64;

use super::*;

/// An entry's wait as a future: `quiet` is how long since "traffic".
async fn expire(idler: &Idler, idle: Duration, last: &AtomicU64, base: Instant) -> Expired {
    let mut entry = idler.entry();
    poll_fn(|cx| {
        entry.poll(cx, idle, || {
            base.elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)))
        })
    })
    .await
}

fn ms_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[tokio::test]
async fn a_quiet_entry_expires_after_its_idle_time_and_at_most_a_second_late() {
    let idler = Idler::new(CancellationToken::new());
    let (base, last) = (Instant::now(), AtomicU64::new(0));
    let started = Instant::now();
    assert_eq!(
        expire(&idler, Duration::from_millis(1200), &last, base).await,
        Expired::Idle
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1200),
        "expired after {took:?}"
    );
    assert!(took < Duration::from_millis(2400), "expired after {took:?}");
    assert_eq!(idler.armed(), 0, "its slot is freed");
}

#[tokio::test]
async fn traffic_moves_the_end_on() {
    let idler = Idler::new(CancellationToken::new());
    let (base, last) = (Instant::now(), AtomicU64::new(0));
    let started = Instant::now();
    let traffic = async {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            last.store(ms_since(base), Ordering::Relaxed);
        }
    };
    let (expired, ()) = tokio::join!(expire(&idler, Duration::from_secs(1), &last, base), traffic);
    assert_eq!(expired, Expired::Idle);
    // The last traffic at ~2 s: never before 3 s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900),
        "expired after {took:?}"
    );
    assert!(took < Duration::from_millis(4200), "expired after {took:?}");
}

#[tokio::test]
async fn shutdown_ends_every_waiting_entry_at_once_and_any_later_one() {
    let hard = CancellationToken::new();
    let idler = Idler::new(hard.clone());
    let (base, last) = (Instant::now(), AtomicU64::new(0));
    let hour = Duration::from_secs(3600);
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        hard.cancel();
    };
    let started = Instant::now();
    let (a, b, ()) = tokio::join!(
        expire(&idler, hour, &last, base),
        expire(&idler, Duration::from_secs(7), &last, base),
        cancel
    );
    assert_eq!((a, b), (Expired::Shutdown, Expired::Shutdown));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let later = tokio::time::timeout(Duration::from_secs(2), expire(&idler, hour, &last, base));
    assert_eq!(later.await.ok(), Some(Expired::Shutdown));
}

#[tokio::test]
async fn dropped_entries_leave_nothing_armed_and_slots_are_reused() {
    let idler = Idler::new(CancellationToken::new());
    let (base, last) = (Instant::now(), AtomicU64::new(0));
    for _ in 0..3 {
        let waiting = expire(&idler, Duration::from_secs(3600), &last, base);
        assert!(tokio::time::timeout(Duration::from_millis(20), waiting)
            .await
            .is_err());
        assert_eq!(idler.armed(), 0);
    }
    assert_eq!(idler.inner.lock().slots.len(), 1);
}

/// A sweeper spawned onto a runtime that is already shut down is dropped
/// without ever running. The idler must not go on believing a sweeper
/// runs: the next arm (here on another runtime) has to start one, or no
/// tunnel would ever idle out or see a shutdown again.
#[test]
fn a_sweeper_dropped_before_it_ever_ran_is_replaced() {
    let idler = Idler::new(CancellationToken::new());
    let (base, last) = (Instant::now(), AtomicU64::new(0));
    let dead = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = dead.handle().clone();
    dead.shutdown_background();
    {
        let _in = handle.enter();
        let mut entry = idler.entry();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        // Arms, and spawns a sweeper that is cancelled unpolled.
        assert!(entry
            .poll(&mut cx, Duration::from_secs(3600), || Duration::ZERO)
            .is_pending());
    }
    let live = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // On a task of its own: only the sweeper may wake it (a timeout around
    // it would poll it again when the timeout's own timer fires).
    let expired = live.block_on(async move {
        let waiting =
            tokio::spawn(
                async move { expire(&idler, Duration::from_millis(200), &last, base).await },
            );
        tokio::time::timeout(Duration::from_secs(4), waiting).await
    });
    assert_eq!(
        expired.ok().and_then(Result::ok),
        Some(Expired::Idle),
        "no sweeper ran"
    );
}

/// Many entries on a multi-threaded runtime, with traffic, early drops and
/// re-arms racing the sweeper on other threads: each still ends no sooner
/// than its idle time after its last traffic and at most about a second
/// later (a lost wake-up would leave one waiting for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_racing_the_sweeper_on_many_threads_expire_on_time() {
    let idler = Idler::new(CancellationToken::new());
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let idler = idler.clone();
        tasks.push(tokio::spawn(async move {
            let base = Instant::now();
            let last = AtomicU64::new(0);
            let idle = Duration::from_millis(700 + (i * 37) % 900);
            let ticks = i % 4;
            let traffic = async {
                for _ in 0..ticks {
                    tokio::time::sleep(Duration::from_millis(150 + (i * 13) % 300)).await;
                    last.store(ms_since(base), Ordering::Relaxed);
                }
            };
            if i % 5 == 0 {
                // Dropped before it expires: its slot is freed and reused.
                let short = tokio::time::timeout(
                    Duration::from_millis(100 + (i * 7) % 400),
                    expire(&idler, idle, &last, base),
                );
                assert!(short.await.is_err());
                return;
            }
            let (expired, ()) = tokio::join!(expire(&idler, idle, &last, base), traffic);
            assert_eq!(expired, Expired::Idle);
            let quiet = base
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            assert!(
                quiet >= idle,
                "entry {i}: expired after {quiet:?} of {idle:?}"
            );
            assert!(
                quiet < idle + Duration::from_millis(2000),
                "entry {i}: expired after {quiet:?} of {idle:?}"
            );
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("an entry never expired")
            .expect("entry task");
    }
    assert_eq!(idler.armed(), 0);
}

/// The sweeper sleeps until the earliest armed second: an entry armed
/// later for an earlier second must move its wake-up forward, not wait
/// behind a long one. (Each entry on a task of its own, so only the
/// sweeper can wake it.)
#[tokio::test]
async fn a_short_entry_armed_after_a_long_one_is_not_kept_waiting() {
    let idler = Idler::new(CancellationToken::new());
    let long = {
        let idler = idler.clone();
        tokio::spawn(async move {
            let (base, last) = (Instant::now(), AtomicU64::new(0));
            expire(&idler, Duration::from_secs(3600), &last, base).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(idler.armed(), 1);
    let started = Instant::now();
    let short = {
        let idler = idler.clone();
        tokio::spawn(async move {
            let (base, last) = (Instant::now(), AtomicU64::new(0));
            expire(&idler, Duration::from_millis(300), &last, base).await
        })
    };
    let expired = tokio::time::timeout(Duration::from_secs(4), short).await;
    assert_eq!(expired.ok().and_then(Result::ok), Some(Expired::Idle));
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1500), "expired after {took:?}");
    long.abort();
}
