"""RULER-style tasks (`niah_single_1` ... `fwe`; `--tasks ruler` names all eleven): one generated prompt per
(task, context, seed), the greedy answer up to RULER's generation budget or the end of turn, scored by RULER's
`string_match_all` (an empty or cut-off answer scores what it contains, never an error)."""
from __future__ import annotations

import torch

from .. import ruler
from ..scoring import continue_greedy
from . import Task, register_task


class RulerTask(Task):
    """Base of the eleven tasks; `name` is the RULER task."""

    shared_columns = (("ruler", "RULER avg", "{:.3f}", True, True),)

    def run(self, env, spec, context, seed):
        sample = env._cached(("ruler", self.name, context, seed),
                             lambda: ruler.ruler_sample(self.name, env.tokenizer, context, seed))
        ids = torch.tensor([sample.input_ids], dtype=torch.long)
        cache, logits, _ = env.prefilled(spec, ids)
        out = continue_greedy(env.model, cache, logits, sample.max_new_tokens, env.stop_ids())
        answer = env.tokenizer.decode(out, skip_special_tokens=True)
        score = ruler.string_match_all(answer, sample.references)
        return {self.name: score, "ruler": score, "answer": answer, "references": sample.references,
                "prompt_tokens": sample.prompt_tokens, "new_tokens": int(out.numel())}, env.memory(cache)


for _task in ruler.TASKS:
    register_task(type(f"Ruler_{_task}", (RulerTask,), {
        "name": _task, "summary": f"RULER {_task}: string_match_all of the greedy answer",
        "columns": ((_task, _task, "{:.2f}", True, False),)}))
