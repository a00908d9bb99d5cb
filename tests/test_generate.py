"""Decoding: with a converted context, greedy tokens equal prompting with the demonstrations
(float64, on inputs whose greedy choices lead by a margin: see `naive_greedy`)."""
import pytest
import torch

from lit_icl import convert
from lit_icl.generate import generate
from lit_icl.mixers import MIXERS
from tests.conftest import GEMMA_LIKE, HYBRIDS, WINDOWED, naive_greedy, setting_id, tiny_model

V = 30


def model(**kw):
    return tiny_model(vocab_size=V, block_size=48, **kw)


DECODING = [dict(attention=kind, momentum=eta, token_shift=True) for kind in [*MIXERS, *HYBRIDS] for eta in (0.0, 0.5)]
DECODING += [dict(attention="sliding", momentum=eta, token_shift=True, **WINDOWED) for eta in (0.0, 0.5)]
DECODING += [GEMMA_LIKE]  # decoding runs far past the 3-token window


@pytest.mark.parametrize("kw", DECODING + [dict(attention="linear", feature_map="taylor", position="rope")],
                         ids=setting_id)
def test_greedy_with_context_equals_prompting(kw):
    m = model(**kw)
    demo, prompt = torch.randint(1, V, (3, 12)), torch.randint(1, V, (3, 4))
    expected = naive_greedy(m, torch.cat([demo, prompt], 1), 10)
    assert torch.equal(generate(m, torch.cat([demo, prompt], 1), 10), expected)
    assert torch.equal(generate(m, prompt, 10, state=convert(m, demo)), expected)


def test_approximate_context_decodes_the_input_exactly():
    """After an approximate context, the prompt and generated tokens attend each other exactly:
    with zero context sums the result is plain greedy decoding of the prompt."""
    m = model(attention="softmax")
    prompt = torch.randint(1, V, (2, 5))
    state = convert(m, torch.randint(1, V, (2, 6)), mode="taylor")
    for layer in state.layers:
        layer.mixer.S.zero_()
        layer.mixer.z.zero_()
    state.offset.zero_()
    state.last_token.fill_(-1)
    assert torch.equal(generate(m, prompt, 6, state=state), naive_greedy(m, prompt, 6))


def test_sampling_is_seeded_and_respects_top_k():
    m = model()
    prompt = torch.randint(1, V, (4, 3))
    a = generate(m, prompt, 8, temperature=1.0, top_k=3, seed=1)
    assert torch.equal(a, generate(m, prompt, 8, temperature=1.0, top_k=3, seed=1))
    first = m(prompt)[:, -1].topk(3).indices
    assert all(int(a[i, 0]) in first[i].tolist() for i in range(4))


def test_bad_arguments():
    m = model()
    with pytest.raises(ValueError, match="more than block_size=48"):
        generate(m, torch.ones(1, 40, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="T >= 1"):
        generate(m, torch.ones(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        generate(m, torch.ones(1, 2, dtype=torch.long), 0)
