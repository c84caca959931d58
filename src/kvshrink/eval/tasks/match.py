"""`match`: how many greedy tokens after a context of real text are identical to the uncompressed cache's."""
from __future__ import annotations

from . import Task, register_task


@register_task
class GreedyMatch(Task):
    name = "match"
    summary = "fraction of greedy continuation tokens identical to the reference's, and the first divergence"
    columns = (("match", "match", "{:.3f}", True, True), ("first_divergence", "1st diff", "{:.1f}", True, False))

    def run(self, env, spec, context, seed):
        tokens, memory = env.greedy(spec, context, seed)
        ref, _ = env.greedy(None, context, seed)
        same = tokens == ref
        diverged = (~same).nonzero()
        first = int(diverged[0, 0]) if len(diverged) else len(ref)
        return {"match": same.float().mean().item(), "first_divergence": first, "tokens": len(ref)}, memory
