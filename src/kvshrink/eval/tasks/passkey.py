"""`passkey`: a 5-digit number hidden at several depths of filler prose, asked for at the end (greedy answer)."""
from __future__ import annotations

from ..passkey import passkey_prompt
from ..scoring import continue_greedy
from . import Task, register_task


@register_task
class Passkey(Task):
    name = "passkey"
    summary = "needle retrieval: accuracy over needle depths, one prompt per depth and seed"
    columns = (("accuracy", "passkey", "{:.2f}", True, True),)

    def run(self, env, spec, context, seed):
        answers, correct, memory = [], 0, None
        for depth in env.depths:
            prompt = passkey_prompt(env.tokenizer, context, depth, seed)
            cache, logits, _ = env.prefilled(spec, prompt.input_ids)
            out = continue_greedy(env.model, cache, logits, env.answer_tokens)
            answer = env.tokenizer.decode(out, skip_special_tokens=True).strip()
            ok = prompt.is_correct(answer)
            correct += ok
            answers.append({"depth": depth, "passkey": prompt.passkey, "answer": answer, "correct": ok})
            memory = env.memory(cache)
        return {"accuracy": correct / len(answers), "correct": correct, "prompts": len(answers),
                "answers": answers}, memory
