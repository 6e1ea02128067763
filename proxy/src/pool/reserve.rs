//! The reserve pool (PgBouncer's `reserve_pool_size`): a client still
//! waiting for a slot after `reserve_pool_timeout` adds one, up to
//! `reserve_pool_size` per pool; once nobody waits, `maintain` forgets
//! the reserve slots no connection holds. May call: tokio sync and time.

use std::sync::atomic::Ordering;

use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::Pool;

impl Pool {
    /// A free slot, waiting until `deadline` at most (`None`); an error
    /// when the pool was retired meanwhile. A client still waiting after
    /// `reserve_pool_timeout` adds a reserve slot, if any is left: the
    /// first client in line takes it.
    pub(super) async fn wait_for_slot(
        &self,
        deadline: Instant,
    ) -> Option<Result<OwnedSemaphorePermit, AcquireError>> {
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        let reserve_at = Instant::now() + self.cfg.reserve_pool_timeout;
        let mut may_grow = self.cfg.reserve_pool_size > 0 && reserve_at < deadline;
        loop {
            tokio::select! {
                biased;
                s = &mut acquire => return Some(s),
                () = tokio::time::sleep_until(reserve_at), if may_grow => {
                    may_grow = false;
                    self.grow_reserve();
                }
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Adds a reserve slot, if fewer than `reserve_pool_size` were added.
    fn grow_reserve(&self) {
        let max = self.cfg.reserve_pool_size;
        let grown = self
            .reserve
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if let Ok(before) = grown {
            self.slots.add_permits(1);
            tracing::info!(
                backend = %self.backend.name,
                database = self.login.database,
                user = self.login.user,
                reserve = before + 1,
                "a client waited reserve_pool_timeout: the pool takes a reserve slot"
            );
        }
    }

    /// Forgets the reserve slots no connection holds, once nobody waits.
    pub(super) fn shrink_reserve(&self) {
        let added = self.reserve.load(Ordering::Acquire);
        if added == 0 || self.waiting() > 0 {
            return;
        }
        let gone = self.slots.forget_permits(added);
        if gone > 0 {
            self.reserve.fetch_sub(gone, Ordering::AcqRel);
            tracing::info!(
                backend = %self.backend.name,
                database = self.login.database,
                user = self.login.user,
                reserve = added - gone,
                "reserve slots no longer needed are given back"
            );
        }
    }
}
