//! Locks that outlive a panic of their holder.
//!
//! A thread that panics while holding a `std::sync` lock poisons it. The bus's locks guard
//! data that a panic cannot leave half-changed (each change is one assignment or one
//! collection call), and a panic in a consumer is caught and turned into a failed attempt: a
//! poisoned lock must not turn into a second panic everywhere else. These take the lock
//! whether or not it was poisoned.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`], poisoned or not.
///
/// ```
/// use bus_core::sync::MutexExt;
/// let counter = std::sync::Mutex::new(1);
/// *counter.locked() += 1;
/// assert_eq!(*counter.locked(), 2);
/// ```
pub trait MutexExt<T> {
    /// The guard, whether or not a holder panicked.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// [`RwLock::read`] and [`RwLock::write`], poisoned or not.
///
/// ```
/// use bus_core::sync::RwLockExt;
/// let names = std::sync::RwLock::new(vec!["orders"]);
/// names.write_locked().push("billing");
/// assert_eq!(names.read_locked().len(), 2);
/// ```
pub trait RwLockExt<T> {
    /// A read guard, whether or not a holder panicked.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// A write guard, whether or not a holder panicked.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T> RwLockExt<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
