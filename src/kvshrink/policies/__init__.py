"""Token policies: which tokens stay (`scoring`: one registered class each, on a `ScoreContext`), and how the
low-rank methods turn significance into per-token levels (`significance`)."""
