//! A sum-tree over non-negative priorities: set one priority and draw an index with
//! probability proportional to its priority, both in O(log n).
//!
//! Leaves sit at `[cap, 2·cap)` of one array (`cap` = capacity rounded up to a power of
//! two); every inner node holds the sum of its two children. An update rewrites the leaf
//! and recomputes each ancestor from its children instead of adding a difference, so the
//! sums never drift: after any sequence of updates the tree is bit for bit the tree that
//! would be built from scratch over the same leaves.

use rand::Rng;

#[derive(Debug, Clone)]
pub struct SumTree {
    /// Number of usable leaves.
    len: usize,
    /// Power of two ≥ `len`: index of the first leaf.
    cap: usize,
    nodes: Vec<f64>,
}

impl SumTree {
    /// A tree of `len` leaves, all with priority 0.
    pub fn new(len: usize) -> Self {
        let cap = len.max(1).next_power_of_two();
        Self {
            len,
            cap,
            nodes: vec![0.0; 2 * cap],
        }
    }

    /// A tree holding `priorities`.
    pub fn from_priorities(priorities: &[f64]) -> Self {
        let mut tree = Self::new(priorities.len());
        for (i, &p) in priorities.iter().enumerate() {
            check_priority(p);
            tree.nodes[tree.cap + i] = p;
        }
        for node in (1..tree.cap).rev() {
            tree.nodes[node] = tree.nodes[2 * node] + tree.nodes[2 * node + 1];
        }
        tree
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The priority of leaf `i`.
    pub fn get(&self, i: usize) -> f64 {
        assert!(i < self.len, "leaf {i} out of range (len {})", self.len);
        self.nodes[self.cap + i]
    }

    /// The sum of all priorities.
    pub fn total(&self) -> f64 {
        self.nodes[1]
    }

    /// Sets the priority of leaf `i` (finite, ≥ 0).
    pub fn set(&mut self, i: usize, priority: f64) {
        assert!(i < self.len, "leaf {i} out of range (len {})", self.len);
        check_priority(priority);
        let mut node = self.cap + i;
        self.nodes[node] = priority;
        while node > 1 {
            node /= 2;
            self.nodes[node] = self.nodes[2 * node] + self.nodes[2 * node + 1];
        }
    }

    /// The leaf whose cumulative-priority interval holds `u` (`0 ≤ u < total`). Leaves with
    /// priority 0 are never returned while the total is positive; `None` when it is 0.
    pub fn find(&self, u: f64) -> Option<usize> {
        if self.total() <= 0.0 {
            return None;
        }
        let mut u = u.clamp(0.0, self.total());
        let mut node = 1;
        while node < self.cap {
            let left = self.nodes[2 * node];
            let right = self.nodes[2 * node + 1];
            // Rounding can leave `u` at or past the left sum when the right side is empty
            // (or past both); stay where there is mass.
            if (u < left && left > 0.0) || right <= 0.0 {
                node *= 2;
            } else {
                u -= left;
                node = 2 * node + 1;
            }
        }
        Some(node - self.cap)
    }

    /// Draws a leaf with probability priority / total; `None` when the total is 0.
    pub fn sample<R: Rng>(&self, rng: &mut R) -> Option<usize> {
        if self.total() <= 0.0 {
            return None;
        }
        self.find(rng.gen::<f64>() * self.total())
    }
}

fn check_priority(p: f64) {
    assert!(
        p.is_finite() && p >= 0.0,
        "a priority must be finite and non-negative, got {p}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn sampled_frequencies_match_priorities() {
        // Uneven priorities, zeros among them, a length that is not a power of two.
        let priorities = [1.0, 0.0, 2.5, 7.0, 0.25, 3.0, 0.0, 12.0, 5.0, 0.5, 9.0];
        let tree = SumTree::from_priorities(&priorities);
        let total: f64 = priorities.iter().sum();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let draws = 400_000;
        let mut counts = vec![0usize; priorities.len()];
        for _ in 0..draws {
            counts[tree.sample(&mut rng).unwrap()] += 1;
        }
        let mut chi2 = 0.0;
        let mut dof = 0;
        for (i, &p) in priorities.iter().enumerate() {
            if p == 0.0 {
                assert_eq!(counts[i], 0, "leaf {i} has priority 0 but was drawn");
                continue;
            }
            let expected = draws as f64 * p / total;
            chi2 += (counts[i] as f64 - expected).powi(2) / expected;
            dof += 1;
        }
        // 8 degrees of freedom; the 0.999 quantile of chi² with 8 dof is 26.12.
        assert_eq!(dof - 1, 8);
        assert!(chi2 < 26.12, "chi² = {chi2} over {dof} leaves: {counts:?}");
        // And not trivially: a uniform draw would be far off.
        let uniform_chi2: f64 = priorities
            .iter()
            .filter(|p| **p > 0.0)
            .map(|&p| {
                let expected = draws as f64 * p / total;
                let uniform = draws as f64 / dof as f64;
                (uniform - expected).powi(2) / expected
            })
            .sum();
        assert!(uniform_chi2 > 1000.0);
    }

    #[test]
    fn updates_keep_the_total_exact() {
        let n = 1000;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut tree = SumTree::new(n);
        let mut leaves = vec![0.0f64; n];
        for step in 0..20_000 {
            let i = rng.gen_range(0..n);
            // Priorities of very different sizes make drift visible if sums were updated
            // by differences.
            let p = if step % 7 == 0 {
                0.0
            } else {
                rng.gen::<f64>() * 10f64.powi(rng.gen_range(-6..6))
            };
            tree.set(i, p);
            leaves[i] = p;
        }
        let rebuilt = SumTree::from_priorities(&leaves);
        assert_eq!(tree.total().to_bits(), rebuilt.total().to_bits());
        assert_eq!(tree.nodes, rebuilt.nodes);
        let naive: f64 = leaves.iter().sum();
        assert!((tree.total() - naive).abs() <= 1e-12 * naive);
        for (i, &p) in leaves.iter().enumerate() {
            assert_eq!(tree.get(i), p);
        }
    }

    #[test]
    fn find_lands_on_the_right_leaf_and_skips_empty_ones() {
        let tree = SumTree::from_priorities(&[0.0, 2.0, 0.0, 1.0, 0.0]);
        assert_eq!(tree.total(), 3.0);
        assert_eq!(tree.find(0.0), Some(1));
        assert_eq!(tree.find(1.999), Some(1));
        assert_eq!(tree.find(2.0), Some(3));
        assert_eq!(tree.find(2.999), Some(3));
        // At or past the total (rounding in a caller): still a leaf with mass.
        assert_eq!(tree.find(3.0), Some(3));
        assert_eq!(tree.find(1e9), Some(3));
        assert_eq!(SumTree::new(4).find(0.0), None);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(SumTree::new(0).sample(&mut rng), None);
    }

    #[test]
    #[should_panic(expected = "finite and non-negative")]
    fn negative_priorities_are_refused() {
        SumTree::new(3).set(1, -1.0);
    }
}
