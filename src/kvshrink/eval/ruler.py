"""RULER-style synthetic long-context tasks (Hsieh et al. 2024), generated offline for a model's tokenizer.

The task definitions, templates, answer prefixes, generation lengths and metric follow RULER's published
configuration (`synthetic.yaml`, `constants.py`): thirteen tasks minus the two QA tasks, whose SQuAD/HotpotQA
documents are not available offline. Departures, all forced by working offline:
- RULER's essay haystack (Paul Graham essays) is replaced by the embedded corpus (`pydoc_data.topics` prose);
  the repeated-sentence ("repeat") and distractor-needle ("needle") haystacks are RULER's own.
- Needle keys are two words of the embedded corpus joined by a hyphen ("context-manager"); RULER draws
  adjective-noun pairs from the `wonderwords` lists. `cwe` draws its words from the same corpus vocabulary.
- `vt` and `cwe` carry one short worked example before the question, as RULER's few-shot versions do.
- `cwe` repeats its 10 common words 30 times and the others 3 times (RULER's setting); where the common words alone
  would fill more than half the context (under about 3k tokens), it uses its worked example's 3 and 1.

A prompt is the chat-formatted task text followed by RULER's answer prefix (the assistant's turn is begun with it),
sized so that prompt tokens + the task's generation budget come within 2% of the requested context (never above
it). Everything is a pure function of (task, tokenizer, context, seed): every method sees the same prompts.
"""
from __future__ import annotations

import functools
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

from .corpus import evaluation_text

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: 40 depths from 0 to 100%
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n{context}\n"
                 "What are all the special magic {kind} for {query} mentioned in the provided text?")
NIAH_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {num} variables are "
             "assgined the value {query}, they are: ")  # RULER's spelling, kept so prompts match its own
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n{context}\nQuestion: What are the {num} most common words in the "
                "above list?")
CWE_PREFIX = "Answer: The top {num} words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # "repeat" (noise sentences), "essay" (corpus prose) or "needle" (distractor needles)
    key_kind: str  # "words" or "uuids"
    value_kind: str  # "numbers" or "uuids"
    keys: int = 1  # needles with distinct keys (all but the queried ones are distractors)
    values: int = 1  # values per key
    queries: int = 1  # keys asked for


#: RULER's synthetic.yaml, QA tasks left out
NIAH = {
    "niah_single_1": NiahConfig("repeat", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", keys=4, queries=4),
}
#: tokens RULER lets the model generate per task family
GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
TASKS = tuple(NIAH) + ("vt", "cwe", "fwe")
LENGTH_TOLERANCE = 0.02


@dataclass
class RulerSample:
    task: str
    context: int  # the requested length: prompt tokens + generation budget
    seed: int
    input_ids: list[int]
    references: list[str]  # every one must appear in the answer (string_match_all)
    max_new_tokens: int
    text: str = field(repr=False, default="")

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's metric: the share of references found (case-insensitively) in the prediction."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = _clean(prediction).lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def _clean(text: str) -> str:
    """RULER's post-processing: drop non-printable characters (an empty or cut answer simply matches less)."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text or "").strip()


def family(task: str) -> str:
    if task in NIAH:
        return "niah"
    if task in ("vt", "cwe", "fwe"):
        return task
    raise ValueError(f"unknown RULER task {task!r}; available: {', '.join(TASKS)}")


# -- vocabulary from the embedded corpus -------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """Distinct lower-case words of 4-9 letters in the embedded corpus, sorted (a few thousand)."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,9}\b", evaluation_text()))))


@functools.lru_cache(maxsize=1)
def corpus_sentences() -> tuple[str, ...]:
    """The embedded corpus as sentences (whitespace collapsed), in corpus order; sentences of more than 24 words
    (code listings, tables) are cut into pieces of at most 24 words, so a prompt can be sized finely."""
    flat = re.sub(r"\s+", " ", evaluation_text())
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", flat):
        words = sentence.split()
        out.extend(" ".join(words[i:i + 24]) for i in range(0, len(words), 24))
    return tuple(s for s in out if len(s) > 1)


def _word_key(rng: random.Random) -> str:
    words = corpus_words()
    return f"{rng.choice(words)}-{rng.choice(words)}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _value(rng: random.Random, kind: str) -> str:
    return str(rng.randint(1_000_000, 9_999_999)) if kind == "numbers" else _uuid(rng)


# -- prompt assembly and length fitting ---------------------------------------------------------------------------
def _format(tokenizer, body: str, prefix: str) -> str:
    """The chat-formatted user turn, then the assistant's turn begun with the answer prefix."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                             tokenize=False)
        return head + prefix
    bos = tokenizer.bos_token or ""
    return f"{bos}{body}\n{prefix}"


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _fit(build: Callable[[int], tuple[str, str]], tokenizer, target: int, upper: int) -> tuple[str, list[int], int]:
    """The largest haystack size n in [0, upper] whose prompt (build(n) = body, prefix) fits in `target` tokens,
    by bisection on the token count; returns (text, ids, n)."""
    def measure(n: int) -> tuple[str, list[int]]:
        text = _format(tokenizer, *build(n))
        return text, _tokens(tokenizer, text)

    lo, hi = 0, upper
    text, ids = measure(0)
    if len(ids) > target:
        raise ValueError(f"the task's fixed text alone is {len(ids)} tokens, more than the {target} available: "
                         "ask for a longer context")
    best = (text, ids, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text, ids = measure(mid)
        if len(ids) <= target:
            lo, best = mid, (text, ids, mid)
        else:
            hi = mid - 1
    return best


def _cut(units: list[str], chars: int) -> list[str]:
    """The first `chars` characters of `units`: whole units, then the start of the next one (so a prompt can be
    sized to a few tokens; the cut unit is haystack, never a needle)."""
    out, left = [], chars
    for unit in units:
        if left <= 0:
            break
        out.append(unit[:left])
        left -= len(unit)
    return out


def _insert(units: list[str], items: list[str], depths: list[int]) -> list[str]:
    """`units` with each item inserted at its depth (percent of the way through), later items after earlier ones
    at the same place."""
    out = list(units)
    places = sorted(((round(len(units) * d / 100), i) for i, d in enumerate(depths)), reverse=True)
    for place, i in places:
        out.insert(place, items[i])
    return out


def _niah(cfg: NiahConfig, tokenizer, target: int, rng: random.Random):
    kind = cfg.value_kind
    keys: list[str] = []
    while len(keys) < cfg.keys:
        k = _word_key(rng) if cfg.key_kind == "words" else _uuid(rng)
        if k not in keys:
            keys.append(k)
    values = [[_value(rng, kind) for _ in range(cfg.values)] for _ in keys]
    needles = [NEEDLE.format(kind=kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(len(keys)), cfg.queries)
    query_keys = [keys[i] for i in asked]
    references = [v for i in asked for v in values[i]]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    depths = [rng.choice(DEPTHS) for _ in needles]
    upper = target  # units: every unit is at least one token
    if cfg.haystack == "repeat":
        pool = _noise(upper)
    elif cfg.haystack == "essay":
        sentences = corpus_sentences()
        start = rng.randrange(len(sentences))
        pool = [sentences[(start + i) % len(sentences)] for i in range(upper)]
    else:  # distractor needles with keys and values of the same kinds, none equal to a real key
        pool = []
        while len(pool) < upper // 8 + 1:
            k = _word_key(rng) if cfg.key_kind == "words" else _uuid(rng)
            if k not in keys:
                pool.append(NEEDLE.format(kind=kind, key=k, value=_value(rng, kind)))
    upper = sum(len(u) for u in pool)

    def build(n: int) -> tuple[str, str]:  # n: characters of haystack
        context = " ".join(_insert(_cut(pool, n), needles, depths))
        return (NIAH_TEMPLATE.format(kind=kind, context=context, query=query),
                NIAH_PREFIX.format(kind=kind, query=query))

    return build, upper, references


def _noise(sentences: int) -> list[str]:
    """RULER's repeated noise, sentence by sentence."""
    one = [x if x.endswith(".") else x + "." for x in NOISE.split(". ")]
    return [one[i % len(one)] for i in range(sentences)]


def _vt_chain(rng: random.Random, hops: int = 4) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    return statements, names, value


def _vt(tokenizer, target: int, rng: random.Random):
    ex_statements, ex_names, ex_value = _vt_chain(rng)
    example_context = " ".join(_insert([NOISE] * 12, ex_statements, sorted(rng.sample(range(0, 101), 5))))
    example = (VT_TEMPLATE.format(context=example_context, query=ex_value) + "\n"
               + VT_PREFIX.format(num=len(ex_names), query=ex_value) + " ".join(ex_names) + "\n\n")
    statements, names, value = _vt_chain(rng)
    depths = sorted(rng.choice(DEPTHS) for _ in statements)  # the chain in order, spread through the noise

    noise = _noise(target)

    def build(n: int) -> tuple[str, str]:  # n: characters of noise
        context = " ".join(_insert(_cut(noise, n), statements, depths))
        return example + VT_TEMPLATE.format(context=context, query=value), VT_PREFIX.format(num=len(names),
                                                                                           query=value)

    return build, sum(len(u) for u in noise), names


def _cwe_list(rng: random.Random, common: list[str], rare: list[str], freq_common: int, freq_rare: int) -> str:
    words = common * freq_common + rare * freq_rare
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe(tokenizer, target: int, rng: random.Random, num: int = 10, freq_common: int = 30, freq_rare: int = 3):
    words = list(corpus_words())
    rng.shuffle(words)
    ex_common, ex_rare = words[:num], words[num:num + 20]
    example = (CWE_TEMPLATE.format(context=_cwe_list(random.Random(rng.random()), ex_common, ex_rare, 3, 1), num=num)
               + "\n" + CWE_PREFIX.format(num=num) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common))
               + "\n\n")
    pool = words[num + 20:]
    common, rare_pool = pool[:num], pool[num:]
    order_seed = rng.random()
    if len(_tokens(tokenizer, _cwe_list(random.Random(0), common, [], freq_common, freq_rare))) > target // 2:
        freq_common, freq_rare = 3, 1  # short contexts: the frequencies of RULER's worked example

    def build(n: int) -> tuple[str, str]:
        listing = _cwe_list(random.Random(order_seed), common, rare_pool[:n], freq_common, freq_rare)
        return example + CWE_TEMPLATE.format(context=listing, num=num), CWE_PREFIX.format(num=num)

    return build, min(len(rare_pool), target), common


def _fwe(tokenizer, target: int, rng: random.Random, alpha: float = 2.0, word_len: int = 6):
    size = max(target // 50, 8)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(word_len)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the top-ranked "word" is noise, as in RULER
    zeta = sum(k ** -alpha for k in range(1, 100_000)) + 100_000 ** (1 - alpha) / (alpha - 1)
    order_seed = rng.random()

    def build(n: int) -> tuple[str, str]:
        counts = [int(n * k ** -alpha / zeta) for k in range(1, len(ranked) + 1)]
        text = [w for w, c in zip(ranked, counts) for _ in range(c)]
        random.Random(order_seed).shuffle(text)
        return FWE_TEMPLATE.format(context=" ".join(text)), FWE_PREFIX

    return build, target * 2, ranked[1:4]


def ruler_sample(task: str, tokenizer, context: int, seed: int) -> RulerSample:
    """The prompt of RULER task `task` for `seed`, sized so that it and the task's generation budget fill
    `context` tokens of `tokenizer` (within 2%, never above)."""
    fam = family(task)
    if not isinstance(context, int) or context < 256:
        raise ValueError(f"RULER contexts must be at least 256 tokens, got {context!r}")
    budget = GENERATE[fam]
    target = context - budget
    rng = random.Random(f"ruler:{task}:{seed}")
    if fam == "niah":
        build, upper, references = _niah(NIAH[task], tokenizer, target, rng)
    elif fam == "vt":
        build, upper, references = _vt(tokenizer, target, rng)
    elif fam == "cwe":
        build, upper, references = _cwe(tokenizer, target, rng)
    else:
        build, upper, references = _fwe(tokenizer, target, rng)
    text, ids, _ = _fit(build, tokenizer, target, upper)
    if len(ids) + budget < context * (1 - LENGTH_TOLERANCE):
        raise ValueError(f"{task}: could only fill {len(ids)} + {budget} of {context} tokens (the haystack ran out)")
    return RulerSample(task, context, seed, ids, list(references), budget, text)


def fill_ratio(sample: RulerSample) -> float:
    """(prompt tokens + generation budget) / requested context."""
    return (sample.prompt_tokens + sample.max_new_tokens) / sample.context


