//! Poison-tolerant locking: a thread that panicked while holding a lock must not take the
//! shim's other RPCs and exit reporting down with it.
//!
//! Every lock in the shim guards plain data that is consistent between statements (a map, a
//! status, a count), so the data of a poisoned lock is still usable: take it and keep serving.

use std::sync::{LockResult, Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the data even when another thread panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    unpoison(m.lock())
}

/// The guard (or the guard and timeout flag) of a condition-variable wait, poisoned or not.
pub fn unpoison<G>(r: LockResult<G>) -> G {
    r.unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
