//! Groups decoded images by the padded size the network runs them at, so that each batch is
//! one tensor. A group is handed out when it is full; when too many images wait in groups that
//! do not fill (many different sizes), the oldest group goes out as it is, which bounds the
//! decoded images held.

/// Images of one padded size, handed to the network together.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch<T> {
    pub size: (u32, u32),
    pub items: Vec<T>,
}

struct Group<T> {
    size: (u32, u32),
    capacity: usize,
    items: Vec<T>,
}

pub struct Batcher<T> {
    /// Oldest first: a group is created by its first image and leaves whole.
    groups: Vec<Group<T>>,
    waiting: usize,
    max_waiting: usize,
}

impl<T> Batcher<T> {
    /// Holds at most `max_waiting` images.
    pub fn new(max_waiting: usize) -> Self {
        Self { groups: Vec::new(), waiting: 0, max_waiting: max_waiting.max(1) }
    }

    /// Adds an image of padded `size`; returns a batch when one is ready. A batch of this size
    /// holds at most `capacity()` images (at least 1), asked when the size is first seen.
    pub fn push(&mut self, size: (u32, u32), item: T, capacity: impl FnOnce() -> usize) -> Option<Batch<T>> {
        let index = match self.groups.iter().position(|g| g.size == size) {
            Some(index) => index,
            None => {
                let capacity = capacity().max(1);
                self.groups.push(Group { size, capacity, items: Vec::new() });
                self.groups.len() - 1
            }
        };
        let group = &mut self.groups[index];
        group.items.push(item);
        self.waiting += 1;
        if group.items.len() >= group.capacity {
            return Some(self.take(index));
        }
        (self.waiting > self.max_waiting).then(|| self.take(0))
    }

    /// The groups still waiting, oldest first.
    pub fn drain(mut self) -> impl Iterator<Item = Batch<T>> {
        std::iter::from_fn(move || (!self.groups.is_empty()).then(|| self.take(0)))
    }

    fn take(&mut self, index: usize) -> Batch<T> {
        let group = self.groups.remove(index);
        self.waiting -= group.items.len();
        Batch { size: group.size, items: group.items }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: (u32, u32) = (252, 200);
    const B: (u32, u32) = (256, 256);
    const HUGE: (u32, u32) = (4096, 4096);

    /// Batches of 3, except one image at a time for `HUGE` (as a memory limit would say).
    fn capacity(size: (u32, u32)) -> usize {
        if size == HUGE {
            1
        } else {
            3
        }
    }

    #[test]
    fn interleaved_sizes_still_fill_their_batches() {
        let mut batcher = Batcher::new(8);
        let mut out = Vec::new();
        for (i, size) in [A, B, A, B, A, B, A].into_iter().enumerate() {
            out.extend(batcher.push(size, i, || capacity(size)));
        }
        assert_eq!(out, [Batch { size: A, items: vec![0, 2, 4] }, Batch { size: B, items: vec![1, 3, 5] }]);
        assert_eq!(batcher.drain().collect::<Vec<_>>(), [Batch { size: A, items: vec![6] }]);
    }

    #[test]
    fn too_many_waiting_sends_the_oldest_group_early() {
        let mut batcher = Batcher::new(2);
        let mut push = |size, item| batcher.push(size, item, || capacity(size));
        assert_eq!(push(A, 0), None);
        assert_eq!(push(B, 1), None);
        assert_eq!(push(B, 2), Some(Batch { size: A, items: vec![0] }));
        assert_eq!(push(HUGE, 3), Some(Batch { size: HUGE, items: vec![3] }));
        assert_eq!(batcher.drain().collect::<Vec<_>>(), [Batch { size: B, items: vec![1, 2] }]);
    }
}
