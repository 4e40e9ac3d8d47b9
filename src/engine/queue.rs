//! The request queue and the dynamic batcher that drains it.
//!
//! A batch is the oldest waiting request plus those that share its model, direction and padded
//! size (instance norm makes mixing sizes wrong), up to `max_batch_size`. It closes when full or
//! when that oldest request has waited `max_batch_delay`. Always serving the oldest request's
//! group first keeps the queue FIFO across groups, so a rare size is never starved. A batch is
//! also never larger than the memory budget lets its network pass be: it shrinks, and the rest
//! of its group stays queued.
//!
//! Each worker also has a mailbox here, for loading and unloading model versions: a worker
//! waiting for a batch wakes for its mail too, and takes mail before batches.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use image::DynamicImage;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::budget::{Admission, Reservation};
use super::codec::DecodedImage;
use super::spans::QueuedSpans;
use super::versions::{ModelVersion, VersionId};
use super::worker::Command;
use super::EngineError;
use crate::model::Direction;

/// What requests must share to be computed together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub model: VersionId,
    pub direction: Direction,
    pub width: u32,
    pub height: u32,
}

/// A network result and how it was reached.
pub struct Computed {
    pub image: DynamicImage,
    /// The request's memory, held until its result is encoded.
    pub admission: Admission,
    pub queue_wait: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

pub type Reply = Result<Computed, EngineError>;

/// A decoded request waiting for the network.
pub struct Entry {
    pub key: BatchKey,
    /// The version it runs on, kept loaded until the entry is done with.
    pub model: Arc<ModelVersion>,
    pub image: DecodedImage,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Reply>,
    /// Holds the request's queue slot; released when the batcher takes it.
    pub slot: Option<OwnedSemaphorePermit>,
    /// The request's memory: its decoded image, room for its result, and a claim on its pass.
    pub admission: Admission,
    /// Its request's span and the span of its wait here (see [`super::spans`]).
    pub spans: QueuedSpans,
}

/// What the batcher takes out of the queue.
pub struct Taken {
    pub batch: Vec<Entry>,
    /// The batch's network pass in the memory budget (`None` when the batch is empty).
    pub reservation: Option<Reservation>,
    /// Requests whose caller has gone: they are not computed.
    pub abandoned: Vec<Entry>,
    /// Requests whose deadline passed while waiting: they are not computed either.
    pub expired: Vec<Entry>,
}

/// What a worker is handed next.
pub enum Work {
    /// Mail for this worker; it comes before batches.
    Command(Command),
    Batch(Taken),
}

/// How soon a batch that did not fit the memory budget looks again (while a decode or another
/// device's pass holds memory; both end by themselves).
const BUDGET_RETRY: Duration = Duration::from_millis(10);

struct State {
    entries: VecDeque<Entry>,
    closed: bool,
    /// One per worker; `None` once that worker has stopped.
    mail: Vec<Option<VecDeque<Command>>>,
}

pub struct Queue {
    state: Mutex<State>,
    changed: Condvar,
}

impl Queue {
    /// A queue for `workers` workers, each with its own mailbox.
    pub fn new(workers: usize) -> Self {
        let mail = (0..workers).map(|_| Some(VecDeque::new())).collect();
        Self {
            state: Mutex::new(State { entries: VecDeque::new(), closed: false, mail }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking holder leaves the queue itself consistent: recover the guard.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a request; gives it back if the queue is closed.
    pub fn push(&self, entry: Entry) -> Result<(), Box<Entry>> {
        let mut state = self.lock();
        if state.closed {
            return Err(Box::new(entry));
        }
        state.entries.push_back(entry);
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// Stops accepting; what is queued is still handed out, without waiting for batches to fill.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Sends every running worker the command `make` builds; a stopped worker gets none.
    pub fn broadcast(&self, make: impl Fn() -> Command) {
        let mut state = self.lock();
        for mailbox in state.mail.iter_mut().flatten() {
            mailbox.push_back(make());
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Sends `command` to `worker`; when that worker has stopped, it is dropped (a load's
    /// caller then learns that no answer will come).
    pub fn send(&self, worker: usize, command: Command) {
        let mut state = self.lock();
        match state.mail.get_mut(worker).and_then(Option::as_mut) {
            Some(mailbox) => mailbox.push_back(command),
            None => {
                drop(state);
                drop(command);
                return;
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    /// `worker` takes no more mail; what it had not read is dropped (outside the lock).
    pub fn stop_worker(&self, worker: usize) {
        let unread = self.lock().mail.get_mut(worker).and_then(Option::take);
        drop(unread);
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks until `worker` has mail, or a batch is due and its network pass can be reserved,
    /// and returns it; `None` once closed and drained. `reserve(head, size)` reserves the pass
    /// of a batch of `size` requests like `head`, or says it does not fit now.
    pub fn next_work(
        &self,
        worker: usize,
        max_size: usize,
        max_delay: Duration,
        reserve: impl Fn(&Entry, usize) -> Option<Reservation>,
    ) -> Option<Work> {
        let mut state = self.lock();
        loop {
            let mail = state.mail.get_mut(worker).and_then(Option::as_mut).and_then(VecDeque::pop_front);
            if let Some(command) = mail {
                return Some(Work::Command(command));
            }
            let now = Instant::now();
            let (abandoned, expired) = purge(&mut state.entries, now);
            if !abandoned.is_empty() || !expired.is_empty() {
                return Some(Work::Batch(Taken { batch: Vec::new(), reservation: None, abandoned, expired }));
            }
            let Some(head) = state.entries.front() else {
                if state.closed {
                    return None;
                }
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let key = head.key;
            let due = head.enqueued + max_delay;
            let waiting = state.entries.iter().filter(|e| e.key == key).count();
            if waiting >= max_size || now >= due || state.closed {
                // The largest batch whose pass fits the memory left, down to the oldest request
                // alone (admission keeps room for that whenever no other pass runs).
                let fitting =
                    (1..=waiting.min(max_size)).rev().find_map(|size| Some((size, reserve(head, size)?)));
                let Some((size, reservation)) = fitting else {
                    // A decode in progress or another device's pass holds the memory: look
                    // again shortly.
                    state =
                        self.changed.wait_timeout(state, BUDGET_RETRY).unwrap_or_else(|p| p.into_inner()).0;
                    continue;
                };
                let batch = take_group(&mut state.entries, key, size);
                return Some(Work::Batch(Taken {
                    batch,
                    reservation: Some(reservation),
                    abandoned: Vec::new(),
                    expired: Vec::new(),
                }));
            }
            // Wake at the due time, or when the first queued request's deadline passes (so that
            // its slot and memory are given back), or earlier if the queue changes.
            let first_deadline = state.entries.iter().map(|e| e.deadline).min().unwrap_or(due);
            let wake = due.min(first_deadline).saturating_duration_since(now);
            state = self.changed.wait_timeout(state, wake).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Removes requests nobody waits for any more, and those past their deadline.
fn purge(entries: &mut VecDeque<Entry>, now: Instant) -> (Vec<Entry>, Vec<Entry>) {
    let (mut abandoned, mut expired) = (Vec::new(), Vec::new());
    if entries.iter().all(|e| !e.reply.is_closed() && e.deadline > now) {
        return (abandoned, expired);
    }
    for entry in std::mem::take(entries) {
        if entry.reply.is_closed() {
            abandoned.push(entry);
        } else if entry.deadline <= now {
            expired.push(entry);
        } else {
            entries.push_back(entry);
        }
    }
    (abandoned, expired)
}

/// Takes up to `max` entries with `key`, oldest first, leaving the rest in order.
fn take_group(entries: &mut VecDeque<Entry>, key: BatchKey, max: usize) -> Vec<Entry> {
    let mut batch = Vec::new();
    let mut rest = VecDeque::with_capacity(entries.len());
    for entry in std::mem::take(entries) {
        if entry.key == key && batch.len() < max {
            batch.push(entry);
        } else {
            rest.push_back(entry);
        }
    }
    *entries = rest;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::budget::MemoryBudget;
    use crate::engine::versions;

    fn unlimited() -> Arc<MemoryBudget> {
        MemoryBudget::new(u64::MAX, Box::new(|_| {}))
    }

    fn entry(width: u32, direction: Direction) -> (Entry, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let image = DecodedImage::from_rgb(image::RgbImage::new(width, 8));
        let model = versions::test_version();
        let key = BatchKey { model: model.id, direction, width, height: 8 };
        let now = Instant::now();
        let admission = unlimited().try_admit(0, 0, 0).unwrap();
        let deadline = now + Duration::from_secs(60);
        let spans = QueuedSpans::default();
        let entry = Entry { key, model, image, enqueued: now, deadline, reply, slot: None, admission, spans };
        (entry, rx)
    }

    /// Reserves every pass from an unlimited budget.
    fn any_size(_: &Entry, _: usize) -> Option<Reservation> {
        unlimited().try_reserve(0)
    }

    /// The next batch for worker 0, which has no mail.
    fn next_batch(
        queue: &Queue,
        max_size: usize,
        max_delay: Duration,
        reserve: impl Fn(&Entry, usize) -> Option<Reservation>,
    ) -> Option<Taken> {
        queue.next_work(0, max_size, max_delay, reserve).map(|work| match work {
            Work::Batch(taken) => taken,
            Work::Command(_) => panic!("no mail was sent"),
        })
    }

    #[test]
    fn batches_group_by_key_in_fifo_order_and_respect_the_size_limit() {
        let queue = Queue::new(1);
        let mut receivers = Vec::new();
        for (w, d) in [
            (8, Direction::XtoY),
            (12, Direction::XtoY),
            (8, Direction::XtoY),
            (8, Direction::YtoX),
            (8, Direction::XtoY),
            (8, Direction::XtoY),
        ] {
            let (e, rx) = entry(w, d);
            queue.push(e).map_err(|_| "closed").unwrap();
            receivers.push(rx);
        }
        let take = |q: &Queue| next_batch(q, 3, Duration::ZERO, any_size).unwrap().batch;
        let widths = |b: &[Entry]| b.iter().map(|e| (e.key.width, e.key.direction)).collect::<Vec<_>>();
        assert_eq!(widths(&take(&queue)), vec![(8, Direction::XtoY); 3], "oldest group, capped at 3");
        assert_eq!(widths(&take(&queue)), vec![(12, Direction::XtoY)], "then the next oldest: no starvation");
        assert_eq!(widths(&take(&queue)), vec![(8, Direction::YtoX)]);
        assert_eq!(widths(&take(&queue)), vec![(8, Direction::XtoY)]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_batch_waits_for_the_delay_unless_full() {
        let queue = Queue::new(1);
        let (e, _rx) = entry(8, Direction::XtoY);
        queue.push(e).map_err(|_| "closed").unwrap();
        let started = Instant::now();
        let taken = next_batch(&queue, 4, Duration::from_millis(80), any_size).unwrap();
        assert_eq!(taken.batch.len(), 1);
        assert!(started.elapsed() >= Duration::from_millis(80), "closed by the delay");

        let mut keep = Vec::new();
        for _ in 0..4 {
            let (e, rx) = entry(8, Direction::XtoY);
            queue.push(e).map_err(|_| "closed").unwrap();
            keep.push(rx);
        }
        // With an hour's delay, only a full batch can come back.
        assert_eq!(next_batch(&queue, 4, Duration::from_secs(3600), any_size).unwrap().batch.len(), 4);
    }

    #[test]
    fn abandoned_requests_are_removed_and_closing_drains() {
        let queue = Queue::new(1);
        let (gone, rx) = entry(8, Direction::XtoY);
        drop(rx);
        queue.push(gone).map_err(|_| "closed").unwrap();
        let (live, _rx) = entry(8, Direction::XtoY);
        queue.push(live).map_err(|_| "closed").unwrap();
        let taken = next_batch(&queue, 4, Duration::from_secs(3600), any_size).unwrap();
        assert_eq!((taken.batch.len(), taken.abandoned.len()), (0, 1));
        queue.close();
        assert_eq!(
            next_batch(&queue, 4, Duration::from_secs(3600), any_size).unwrap().batch.len(),
            1,
            "no delay once closed"
        );
        assert!(next_batch(&queue, 4, Duration::from_secs(3600), any_size).is_none());
        let (late, _rx) = entry(8, Direction::XtoY);
        assert!(queue.push(late).is_err());
    }

    #[test]
    fn a_batch_shrinks_to_what_the_memory_budget_allows() {
        let queue = Queue::new(1);
        let mut keep = Vec::new();
        for _ in 0..5 {
            let (e, rx) = entry(8, Direction::XtoY);
            queue.push(e).map_err(|_| "closed").unwrap();
            keep.push(rx);
        }
        // Passes cost 10 bytes an image; 35 bytes are free.
        let budget = MemoryBudget::new(35, Box::new(|_| {}));
        let reserve = |_: &Entry, size: usize| budget.try_reserve(10 * size as u64);
        let taken = next_batch(&queue, 8, Duration::ZERO, reserve).unwrap();
        assert_eq!(taken.batch.len(), 3, "three passes fit in 35 bytes");
        assert_eq!(budget.reserved(), 30);
        drop(taken);
        assert_eq!(budget.reserved(), 0, "the pass is released with the batch");
        assert_eq!(queue.len(), 2, "the rest stays queued");
    }

    #[test]
    fn mail_comes_before_batches_and_wakes_a_waiting_worker() {
        let queue = Arc::new(Queue::new(2));
        let (e, _rx) = entry(8, Direction::XtoY);
        queue.push(e).map_err(|_| "closed").unwrap();
        queue.send(1, Command::Unload(7));
        let work = queue.next_work(1, 1, Duration::ZERO, any_size).unwrap();
        assert!(matches!(work, Work::Command(Command::Unload(7))), "mail first");
        assert!(matches!(queue.next_work(1, 1, Duration::ZERO, any_size), Some(Work::Batch(_))));

        // A worker waiting for an hour-long batch delay wakes for its mail.
        let (e, _rx) = entry(8, Direction::XtoY);
        queue.push(e).map_err(|_| "closed").unwrap();
        let waiting = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.next_work(0, 8, Duration::from_secs(3600), any_size))
        };
        queue.broadcast(|| Command::Unload(9));
        assert!(matches!(waiting.join().unwrap(), Some(Work::Command(Command::Unload(9)))));

        // A stopped worker's mail is dropped, and later mail to it too.
        queue.stop_worker(1);
        queue.send(1, Command::Unload(10));
        queue.close();
        assert!(matches!(queue.next_work(1, 8, Duration::ZERO, any_size), Some(Work::Batch(_))));
        assert!(queue.next_work(1, 8, Duration::ZERO, any_size).is_none());
    }
}
