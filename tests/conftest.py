import importlib.util
import os

import pytest
import torch

# tests/kvpress/ runs in kvpress's own environment (`make test-kvpress`: kvpress pins transformers<5.3); where kvpress
# is not installed the folder is not collected at all, rather than reported as skipped tests
# (tests/ is on sys.path, so this folder itself would be found as a namespace package named kvpress: ask for a module
# with a file)
_kvpress = importlib.util.find_spec("kvpress")
collect_ignore = [] if _kvpress is not None and _kvpress.origin not in (None, "namespace") else ["kvpress"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# without a GPU the Triton kernels run in Triton's interpreter; it is chosen when a kernel is defined, so before
# anything imports kvshrink.kernels.triton_kernels. kernel='auto' still picks PyTorch on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer random-weight Llama (4 query / 2 KV heads, head dim 16) with peaked logits, in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.2,
               pad_token_id=0, bos_token_id=1, eos_token_id=95)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gemma3(seed: int = 0, sliding_window: int = 8):
    """A 3-layer random-weight Gemma 3 text model: two sliding-window layers then a global one, 1 KV head."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=sliding_window,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=1024, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
                           eos_token_id=95)
    return Gemma3ForCausalLM(cfg).eval()


def greedy(model, ids, cache, n=24, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def logits_through(model, ids, cache, steps, chunk=1, attention_mask=None):
    """Prefill `ids`, then feed greedy tokens `chunk` at a time; the logits of every step."""
    out, logits = [], []
    with torch.no_grad():
        r = model(ids, past_key_values=cache, attention_mask=attention_mask, use_cache=True)
        nxt = r.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            feed = nxt.repeat(1, chunk)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(feed)], 1)
            r = model(feed, past_key_values=cache, attention_mask=attention_mask, use_cache=True)
            logits.append(r.logits)
            nxt = r.logits[:, -1:].argmax(-1)
            out.append(nxt)
    return torch.cat(logits, 1), torch.cat(out, 1)


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct from the embedded GGUF (skipped only if the package is absent, never in CI)."""
    import kvshrink as ks

    try:
        return ks.load_model()
    except ks.ModelNotAvailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
