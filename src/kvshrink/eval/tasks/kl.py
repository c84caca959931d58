"""`kl`: KL divergence of next-token distributions from the uncompressed cache's, and top-1 agreement."""
from __future__ import annotations

from . import Task, register_task


@register_task
class KLDivergence(Task):
    name = "kl"
    summary = "mean KL(reference || method) of next-token distributions on the same positions, top-1 agreement"
    columns = (("kl", "KL", "{:.4f}", False, True), ("top1", "top-1", "{:.3f}", True, True))

    def run(self, env, spec, context, seed):
        logprobs, memory = env.logprobs(spec, context, seed)
        ref, _ = env.logprobs(None, context, seed)
        kl = (ref.exp() * (ref - logprobs)).sum(-1).clamp_min(0.0)
        top1 = (ref.argmax(-1) == logprobs.argmax(-1)).float()
        return {"kl": kl.mean().item(), "kl_max": kl.max().item(), "top1": top1.mean().item(),
                "positions": int(kl.numel())}, memory
