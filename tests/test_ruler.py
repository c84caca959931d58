"""RULER-style task generators and their metric."""
import pytest

from kvshrink.eval import ruler


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model[1]


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("context", [1024, 4096])
def test_prompts_fill_the_context_and_hold_their_answers(tok, task, context):
    s = ruler.ruler_sample(task, tok, context, seed=3)
    assert s.prompt_tokens + s.max_new_tokens <= context
    assert ruler.fill_ratio(s) >= 1 - ruler.LENGTH_TOLERANCE
    assert s.input_ids == tok(s.text, add_special_tokens=False).input_ids
    assert s.references
    body = s.text
    if ruler.family(task) == "niah":
        cfg = ruler.NIAH[task]
        assert len(s.references) == cfg.values * cfg.queries
        for ref in s.references:  # each answer is in exactly one needle, and only there
            assert body.count(ref) == 1
            assert body.count(f"is: {ref}.") == 1
        assert body.count("One of the special magic") >= cfg.keys * cfg.values
    elif task == "vt":
        for name in s.references:  # 5 chained variables, each assigned once in the question's chain
            assert body.count(f"VAR {name} = ") == 1
    elif task == "cwe":
        listing = body.rsplit("Below is a numbered list of words.", 1)[1]
        counts = {}
        for entry in listing.split("Question:")[0].split():
            if not entry[:-1].isdigit():
                counts[entry] = counts.get(entry, 0) + 1
        top = sorted(counts, key=counts.get, reverse=True)[:10]
        assert set(top) == set(s.references)
        assert min(counts[w] for w in s.references) > max(c for w, c in counts.items() if w not in s.references)
    else:  # fwe: the three most frequent coded words, '...' being noise
        words = body.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
        counts = {}
        for w in words:
            if w != "...":
                counts[w] = counts.get(w, 0) + 1
        assert sorted(counts, key=counts.get, reverse=True)[:3] == s.references


def test_prompts_are_deterministic_per_seed_and_differ_across_seeds(tok):
    a = ruler.ruler_sample("niah_multikey_1", tok, 1024, seed=5)
    b = ruler.ruler_sample("niah_multikey_1", tok, 1024, seed=5)
    c = ruler.ruler_sample("niah_multikey_1", tok, 1024, seed=6)
    assert a.input_ids == b.input_ids and a.references == b.references
    assert a.references != c.references


def test_chat_template_and_answer_prefix(tok):
    s = ruler.ruler_sample("niah_single_1", tok, 1024, seed=0)
    assert s.text.startswith("<|im_start|>")
    assert s.text.endswith("mentioned in the provided text are")
    assert "The grass is green." in s.text


def test_string_match_all():
    assert ruler.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert ruler.string_match_all("only 123", ["123", "456"]) == 0.5
    assert ruler.string_match_all("", ["123"]) == 0.0  # an empty answer scores 0, no error
    assert ruler.string_match_all("ABC-def\x00", ["abc-DEF"]) == 1.0
    with pytest.raises(ValueError):
        ruler.string_match_all("x", [])


def test_bad_task_and_context(tok):
    with pytest.raises(ValueError, match="unknown RULER task 'qa_1'"):
        ruler.ruler_sample("qa_1", tok, 4096, 0)
    with pytest.raises(ValueError, match="at least 256"):
        ruler.ruler_sample("vt", tok, 100, 0)
