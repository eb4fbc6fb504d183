//! Hashing a checkpoint holds a few read buffers per thread, never a file: the peak of the heap
//! while 40 MiB are hashed on 4 threads, and while the dump follower hashes them, measured by a
//! counting allocator (this test binary's own, so nothing else runs in it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kybernate_checkpoint::digest::{hash_files, Algorithm, Job, READ_BUF};
use kybernate_checkpoint::Follower;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn hashing_holds_one_read_buffer_per_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let mut jobs = Vec::new();
    // Written in 1 MiB pieces, so that writing does not raise the peak either.
    for (name, mib) in [("pages-1.img", 24), ("pages-2.img", 16), ("core-1.img", 0)] {
        let path = tmp.path().join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let piece = vec![0x5au8; 1 << 20];
        for _ in 0..mib {
            std::io::Write::write_all(&mut f, &piece).unwrap();
        }
        jobs.push(Job { path, size: None });
    }
    for (algorithm, threads) in [(Algorithm::current(), 4), (Algorithm::current(), 1), (Algorithm::Sha256, 3)] {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let hashed = hash_files(&jobs, algorithm, true, threads).unwrap();
        assert_eq!(hashed[0].size, 24 << 20);
        let peak = PEAK.load(Ordering::Relaxed) - base;
        // The buffers, plus bookkeeping (work list, digests, thread stacks are not heap).
        let bound = threads * READ_BUF + (256 << 10);
        assert!(peak <= bound, "{algorithm:?} on {threads} threads: peak heap {peak} bytes, bound {bound}");
        assert!(peak >= READ_BUF, "the buffers are counted: {peak}");
    }
    // The follower: one buffer, whatever it follows (24 MiB: 2 final chunks; 16 MiB: 1).
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let follower = Follower::start(tmp.path(), Algorithm::current());
    let started = std::time::Instant::now();
    while follower.hashed_units() < 3 && started.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let prehashed = follower.finish();
    assert_eq!(prehashed.units(), 3);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    assert!(peak <= READ_BUF + (64 << 10), "the follower: peak heap {peak} bytes");
}
