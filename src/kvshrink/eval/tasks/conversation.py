"""`chat20`: KV-Direct's multi-turn benchmark: 20 user turns over the embedded corpus, the reference replies
generated greedily with the uncompressed cache, every method teacher-forced through the same conversation. The
context length sets the passage size per user turn (in characters: context x 4). Metrics: mean token match, per-turn
cache bytes, peak resident memory and time per decoding step. A base model whose tokenizer has no chat template
(Gemma 3 270M here) gets a plain "User: / Assistant:" transcript; the record names the format."""
from __future__ import annotations

from ..conversation import make_conversation, play, turn_format
from . import Task, register_task

TURNS = 20


@register_task
class Chat20(Task):
    name = "chat20"
    summary = "20-turn conversation, teacher-forced on the full cache's replies: token match, bytes, peak memory"
    columns = (("match", "chat match", "{:.3f}", True, True),
               ("peak_above_start_mib", "peak MiB above start", "{:.1f}", False, False))

    def run(self, env, spec, context, seed):
        conv = env._cached(("chat20-conv", None, context, seed),
                           lambda: make_conversation(TURNS, passage_chars=4 * context, seed=seed))
        stops = tuple(env.stop_ids())

        def reference():
            replies, _ = play(env.model, env.tokenizer, env.make_cache(None), conv, None, env.answer_tokens * 4,
                              stops)
            return replies

        ref = env._cached(("chat20-ref", None, context, seed), reference)
        cache = env.make_cache(spec)
        _, turns = play(env.model, env.tokenizer, cache, conv, ref, stop_ids=stops)
        return {"match": sum(t["match"] for t in turns) / len(turns), "turn_format": turn_format(env.tokenizer),
                "peak_mib": max(t["peak_rss"] for t in turns) / 2**20,
                "peak_above_start_mib": max(t["peak_above_start"] for t in turns) / 2**20,
                "final_cache_bytes": turns[-1]["cache_bytes"], "turns": turns}, env.memory(cache)
