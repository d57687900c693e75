//! Power of two choices (Mitzenmacher): draw two distinct replicas at random
//! among those that can take a request and send to the less loaded one.
//! Nearly as good as "least loaded" without scanning for the minimum under
//! contention, and it avoids herding every router onto the same replica.

use rand::Rng;

use super::ReplicaChoice;

/// The default policy; see the module doc.
#[derive(Debug, Default, Clone, Copy)]
pub struct PowerOfTwoChoices;

impl ReplicaChoice for PowerOfTwoChoices {
    fn choose(&self, loads: &[Option<usize>]) -> Option<usize> {
        // Few replicas per backend: collecting the candidates is cheap.
        let open: Vec<(usize, usize)> = loads
            .iter()
            .enumerate()
            .filter_map(|(i, load)| load.map(|l| (i, l)))
            .collect();
        match open.len() {
            0 => None,
            1 => Some(open[0].0),
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                // A second, distinct draw: shift by 1..n around the ring.
                let b = (a + rng.random_range(1..n)) % n;
                let (ia, la) = open[a];
                let (ib, lb) = open[b];
                Some(if lb < la { ib } else { ia })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_picks_a_full_or_broken_replica() {
        let p = PowerOfTwoChoices;
        assert_eq!(p.choose(&[]), None);
        assert_eq!(p.choose(&[None, None]), None);
        for _ in 0..100 {
            assert_eq!(p.choose(&[None, Some(50), None]), Some(1));
        }
    }

    #[test]
    fn with_two_replicas_the_less_loaded_always_wins() {
        let p = PowerOfTwoChoices;
        for _ in 0..100 {
            assert_eq!(p.choose(&[Some(3), Some(1)]), Some(1));
        }
    }

    #[test]
    fn most_loaded_of_many_is_never_chosen() {
        let p = PowerOfTwoChoices;
        let loads = [Some(9), Some(0), Some(1), Some(2)];
        for _ in 0..200 {
            assert_ne!(p.choose(&loads), Some(0));
        }
    }
}
