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
