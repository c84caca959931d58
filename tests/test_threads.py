"""Two caches generating at once from two threads each give the tokens they give alone: the hand-off from a layer's
`update()` to the attention call it answers is keyed by the returned tensor, not by the thread or the process."""
import threading

import torch
from conftest import greedy, tiny_llama

import kvshrink as ks
from kvshrink import attention


def test_two_threads_each_get_their_own_layers_answers():
    model = tiny_llama(head_dim=32, hidden_size=128)
    before = set(attention._pending)  # hand-offs another test abandoned stay theirs
    specs = ["snapkv:budget=0.5", "turboquant:bits=3,window=4", "tova:budget=0.5 + turboquant:bits=4"]
    prompts = [torch.randint(2, 95, (1, 90), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    alone = {(s, i): greedy(model, p, ks.make_cache(model, s), n=12) for s in specs for i, p in enumerate(prompts)}
    results: dict = {}
    errors: list = []
    start = threading.Barrier(len(specs) * 2)

    def work(spec, i):
        try:
            start.wait()
            for _ in range(2):  # twice, so the threads' steps interleave at different points
                results[(spec, i)] = greedy(model, prompts[i], ks.make_cache(model, spec), n=12)
        except Exception as e:  # noqa: BLE001 - reported below with the thread's spec
            errors.append((spec, i, repr(e)))

    threads = [threading.Thread(target=work, args=(s, i)) for s in specs for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for key, out in results.items():
        assert torch.equal(out, alone[key]), key
    assert set(attention._pending) <= before  # every hand-off of these runs was claimed


def test_a_hand_off_is_claimed_only_with_the_very_tensor_returned():
    class Layer:
        layer_idx, _announced = 3, None

    layer, keys = Layer(), torch.zeros(1, 1, 2, 4)
    attention.announce(layer, keys)
    assert attention.claim(3, keys.clone()) is None  # equal values, another tensor: not this layer's call
    assert attention.claim(2, keys) is None  # another layer index
    assert attention.claim(3, keys) is layer and attention.claim(3, keys) is None  # claimed once
