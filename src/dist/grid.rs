//! The ranks of a job arranged for latent sharding: R/S data-parallel groups of S latent
//! shards each (OpenAI's recipe for its 16M-latent SAE). Rank r is shard r mod S of group
//! r div S: a group's S ranks see the same batch rows and own disjoint latents, and the R/S
//! ranks that own the same latents, one per group, hold different rows.

use std::ops::Range;
use std::sync::Arc;

use super::Collective;
use crate::error::{Error, Result};

/// One rank's place in the grid and the two collectives it works through.
#[derive(Clone)]
pub struct Grid {
    /// Latent shards per group (S); 1 is plain data parallelism.
    pub shards: usize,
    /// This rank's shard within its group, 0 ≤ shard < S.
    pub shard: usize,
    /// The S ranks of this rank's group (same rows, disjoint latents), ranked by shard.
    pub latent: Arc<dyn Collective>,
    /// The R/S ranks holding this rank's shard, one per group (same latents, disjoint rows),
    /// ranked by group.
    pub data: Arc<dyn Collective>,
    /// Every rank of the job (BatchTopK's batch-wide cut is taken over all of them).
    pub world: Arc<dyn Collective>,
}

impl Grid {
    /// Splits `world` into groups of `shards` consecutive ranks. Every rank calls it with the
    /// same `shards`, which must divide the world size; a wrong count is refused on every rank
    /// before any split, naming the option.
    pub fn new(world: Arc<dyn Collective>, shards: usize) -> Result<Grid> {
        let size = world.world_size();
        if shards == 0 || !size.is_multiple_of(shards) {
            return Err(Error::Distributed {
                reason: format!(
                    "--latent-shards {shards} does not divide the {size} ranks of this job; \
                     pass a divisor of the rank count (1 for data parallelism alone)"
                ),
            });
        }
        let rank = world.rank();
        let latent = world.split(rank / shards);
        let data = world.split(rank % shards);
        Ok(Grid {
            shards,
            shard: rank % shards,
            latent,
            data,
            world,
        })
    }

    /// Number of data-parallel groups (R/S).
    pub fn groups(&self) -> usize {
        self.data.world_size()
    }

    /// This rank's group, 0 ≤ group < R/S.
    pub fn group(&self) -> usize {
        self.data.rank()
    }

    /// This rank's latents of a dictionary of `f`, `part(f, shard, S)`, checked against the
    /// `held` latents its shard of `what` holds.
    pub fn latents_of(&self, f: usize, held: usize, what: &str) -> Result<Range<usize>> {
        let latents = super::part(f, self.shard, self.shards);
        if latents.len() != held {
            return Err(Error::Distributed {
                reason: format!(
                    "shard {} of {} holds {held} latents, not latents {latents:?} of the \
                     {f}-latent {what}",
                    self.shard, self.shards
                ),
            });
        }
        Ok(latents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{SingleProcess, Threads};

    /// Each rank's sums within its group and across groups, for a world of `size` threads in
    /// groups of `shards`: every rank contributes 10^rank.
    fn sums(size: usize, shards: usize) -> Vec<(usize, usize, u64, u64)> {
        let handles: Vec<_> = Threads::world(size)
            .into_iter()
            .map(|world| {
                std::thread::spawn(move || {
                    let world: Arc<dyn Collective> = Arc::new(world);
                    let grid = Grid::new(world.clone(), shards).unwrap();
                    assert_eq!(grid.latent.world_size(), shards);
                    assert_eq!(grid.latent.rank(), grid.shard);
                    let mine = 10u64.pow(world.rank() as u32);
                    let (mut within, mut across) = ([mine], [mine]);
                    grid.latent.all_reduce_sum_u64(&mut within);
                    grid.data.all_reduce_sum_u64(&mut across);
                    // The world still works beside its splits.
                    let mut all = [1u64];
                    world.all_reduce_sum_u64(&mut all);
                    assert_eq!(all[0], size as u64);
                    (grid.group(), grid.shard, within[0], across[0])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn groups_are_consecutive_ranks_and_shards_pair_across_groups() {
        assert_eq!(
            sums(4, 2),
            [
                (0, 0, 11, 101),
                (0, 1, 11, 1010),
                (1, 0, 1100, 101),
                (1, 1, 1100, 1010)
            ]
        );
        assert_eq!(
            sums(3, 3),
            [(0, 0, 111, 1), (0, 1, 111, 10), (0, 2, 111, 100)]
        );
        assert_eq!(sums(2, 1), [(0, 0, 1, 11), (1, 0, 10, 11)]);
        // Six ranks as three groups of two, split twice over.
        let six = sums(6, 2);
        assert_eq!(six[5], (2, 1, 110_000, 101_010));
    }

    #[test]
    fn a_shard_count_that_does_not_divide_the_ranks_names_the_option() {
        for shards in [0, 2] {
            let err = Grid::new(Arc::new(SingleProcess), shards)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(&format!("--latent-shards {shards}")), "{err}");
        }
        let grid = Grid::new(Arc::new(SingleProcess), 1).unwrap();
        assert_eq!((grid.groups(), grid.group(), grid.shard), (1, 0, 0));
    }
}
