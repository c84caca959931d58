"""`ppl`: negative log-likelihood of the next T tokens of real text after N tokens of context, through the cache."""
from __future__ import annotations

import math

from . import Task, register_task


@register_task
class Perplexity(Task):
    name = "ppl"
    summary = "perplexity of the next T tokens of held-out text after a context of N tokens"
    columns = (("ppl", "ppl", "{:.3f}", False, False), ("ppl_change", "Δppl", "{:+.2%}", False, True))

    def run(self, env, spec, context, seed):
        _, cont = env.text_sample(context, seed)
        logprobs, memory = env.logprobs(spec, context, seed)
        ref, _ = env.logprobs(None, context, seed)
        nll = -logprobs.gather(1, cont[0, :, None]).mean().item()
        ref_nll = -ref.gather(1, cont[0, :, None]).mean().item()
        return {"nll": nll, "ppl": math.exp(nll), "ref_ppl": math.exp(ref_nll),
                "ppl_change": math.exp(nll - ref_nll) - 1.0, "scored_tokens": int(cont.shape[1])}, memory
