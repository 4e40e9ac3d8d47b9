//! The memory budget: every request's bytes are reserved before they are spent.
//!
//! A request holds an [`Admission`] from before its body is decoded until its result is encoded:
//! the bytes it keeps (decoder buffers while decoding, then its decoded image and room for its
//! encoded result), and a claim on the network pass it will need. Admissions keep one rule:
//! what queued requests hold, plus the largest claimed network pass (or the passes already
//! running, if more), fits the budget. So the oldest waiting request can always run alone once
//! the running batch and any decode in progress end, and the batcher, which reserves each
//! batch's pass with [`MemoryBudget::try_reserve`], never deadlocks against the images it has
//! queued. No reservation is ever granted beyond the total.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

#[derive(Default)]
struct State {
    /// Bytes held by admitted requests.
    held: u64,
    /// Bytes of network passes running now.
    running: u64,
    /// The network pass each admitted, not yet running request will need (a multiset).
    claims: BTreeMap<u64, usize>,
}

impl State {
    fn largest_claim(&self) -> u64 {
        self.claims.keys().next_back().copied().unwrap_or(0)
    }

    fn reserved(&self) -> u64 {
        self.held + self.running
    }
}

pub struct MemoryBudget {
    total: u64,
    state: Mutex<State>,
    /// Wakes admissions waiting for memory.
    freed: Notify,
    /// Admissions wait in arrival order: a large request is not starved by smaller ones.
    turnstile: tokio::sync::Mutex<()>,
    /// Told the reserved total whenever it changes (the server turns it into a metric).
    report: Box<dyn Fn(u64) + Send + Sync>,
}

impl MemoryBudget {
    pub fn new(total: u64, report: Box<dyn Fn(u64) + Send + Sync>) -> Arc<Self> {
        Arc::new(Self {
            total,
            state: Mutex::default(),
            freed: Notify::new(),
            turnstile: tokio::sync::Mutex::new(()),
            report,
        })
    }

    /// Bytes reserved now: held by requests plus running network passes.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self, state: &State) {
        (self.report)(state.reserved());
        self.freed.notify_waiters();
    }

    /// Admits a request now if the budget allows it: `decoding` bytes held at once (body
    /// buffers, decoder), then `waiting` bytes held once decoded, and a `network`-byte pass.
    /// Two conditions: the decode fits beside what is held and running now; and once it has
    /// shrunk to `waiting`, what is held still leaves room for the largest pass claimed.
    pub fn try_admit(self: &Arc<Self>, decoding: u64, waiting: u64, network: u64) -> Option<Admission> {
        let mut state = self.lock();
        let busiest = state.running.max(state.largest_claim()).max(network);
        let decode_fits = state.reserved().saturating_add(decoding) <= self.total;
        let queue_fits = state.held.saturating_add(waiting).saturating_add(busiest) <= self.total;
        if !(decode_fits && queue_fits) {
            return None;
        }
        state.held += decoding;
        *state.claims.entry(network).or_default() += 1;
        self.changed(&state);
        Some(Admission { budget: Arc::clone(self), held: decoding, claim: Some(network) })
    }

    /// Admits a request once the budget allows it, in arrival order. The caller bounds the wait
    /// (its deadline); a request that could never fit alone (`max(decoding, waiting + network)`
    /// over the total) is refused before it gets here.
    pub async fn admit(self: &Arc<Self>, decoding: u64, waiting: u64, network: u64) -> Admission {
        let _turn = self.turnstile.lock().await;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(admission) = self.try_admit(decoding, waiting, network) {
                return admission;
            }
            freed.await;
        }
    }

    /// Reserves a network pass for a batch if it fits beside what is held and running.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let mut state = self.lock();
        if state.reserved().saturating_add(bytes) > self.total {
            return None;
        }
        state.running += bytes;
        self.changed(&state);
        Some(Reservation { budget: Arc::clone(self), bytes })
    }
}

/// An admitted request's share of the budget; released when dropped.
pub struct Admission {
    budget: Arc<MemoryBudget>,
    held: u64,
    claim: Option<u64>,
}

impl Admission {
    /// Lowers the held bytes once a larger transient need (body and decoder buffers) is over.
    pub fn shrink_to(&mut self, held: u64) {
        let release = self.held.saturating_sub(held);
        if release > 0 {
            let mut state = self.budget.lock();
            state.held -= release;
            self.held -= release;
            self.budget.changed(&state);
        }
    }

    /// The request's batch has reserved its own network pass: its claim is settled.
    pub fn settle_claim(&mut self) {
        if let Some(claim) = self.claim.take() {
            let mut state = self.budget.lock();
            remove_claim(&mut state, claim);
            self.budget.changed(&state);
        }
    }
}

fn remove_claim(state: &mut State, claim: u64) {
    if let Some(count) = state.claims.get_mut(&claim) {
        *count -= 1;
        if *count == 0 {
            state.claims.remove(&claim);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        state.held -= self.held;
        if let Some(claim) = self.claim.take() {
            remove_claim(&mut state, claim);
        }
        self.budget.changed(&state);
    }
}

/// A running network pass's bytes; released when dropped.
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        state.running -= self.bytes;
        self.budget.changed(&state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: u64) -> Arc<MemoryBudget> {
        MemoryBudget::new(total, Box::new(|_| {}))
    }

    #[test]
    fn admissions_keep_room_for_the_largest_claimed_pass() {
        let b = budget(100);
        let first = b.try_admit(10, 10, 50).expect("10 + 50 fits");
        drop(b.try_admit(10, 10, 50).expect("20 held + a 50-byte pass fits"));
        let second = b.try_admit(30, 30, 20).expect("10 + 30 held, largest pass 50");
        assert!(b.try_admit(11, 11, 0).is_none(), "40 held + 11 + a 50-byte pass is over 100");
        assert!(b.try_admit(10, 10, 0).is_some(), "exactly 100");
        drop(first);
        assert_eq!(b.reserved(), 30);
        drop(second);
        assert_eq!(b.reserved(), 0);
    }

    #[test]
    fn the_oldest_request_can_always_run_once_admitted() {
        let b = budget(100);
        let mut a = b.try_admit(20, 20, 60).unwrap();
        let _other = b.try_admit(20, 20, 10).unwrap();
        // Queued images hold 40; the largest claim (60) was kept free for the batch.
        let pass = b.try_reserve(60).expect("the oldest request's pass fits");
        a.settle_claim();
        assert!(b.try_reserve(1).is_none(), "40 held + 60 running");
        assert!(b.try_admit(1, 1, 0).is_none(), "the running pass counts like a claim");
        drop(pass);
        assert_eq!(b.reserved(), 40);
    }

    #[test]
    fn a_decode_larger_than_its_image_needs_room_only_while_it_runs() {
        let b = budget(100);
        // Decoding needs 70; decoded, the image keeps 20 beside its 80-byte pass.
        let mut a = b.try_admit(70, 20, 80).expect("alone: max(70, 20 + 80) = 100");
        assert!(b.try_reserve(31).is_none(), "70 are held while decoding");
        a.shrink_to(20);
        a.settle_claim();
        assert!(b.try_reserve(80).is_some(), "decoded, its pass fits");
    }

    #[test]
    fn shrinking_releases_the_difference() {
        let b = budget(100);
        let mut a = b.try_admit(80, 30, 0).unwrap();
        a.shrink_to(30);
        assert_eq!(b.reserved(), 30);
        a.shrink_to(50);
        assert_eq!(b.reserved(), 30, "shrinking never grows");
        drop(a);
        assert_eq!(b.reserved(), 0);
    }

    #[tokio::test]
    async fn a_waiting_admission_proceeds_when_memory_is_freed() {
        let b = budget(100);
        let holder = b.try_admit(90, 90, 0).unwrap();
        let waiter = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.admit(50, 50, 0).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(holder);
        let admitted = waiter.await.unwrap();
        assert_eq!(b.reserved(), 50);
        drop(admitted);
    }
}
