"""The real pretrained models, when the cache holds them (skipped otherwise: nothing is
downloaded in a test run; `lit-icl data fetch gemma3-270m qwen2.5-0.5b smollm2-135m` fetches
them): TransformerLM.from_hf continues two prompts as the issue asks, and the converted
few-shot context (through Gemma 3's sliding-window layers) continues as prompting does."""
import pytest
import torch

from lit_icl import TransformerLM, convert
from lit_icl.generate import generate
from lit_icl.sources import SOURCES, model_directory, status

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer  # noqa: E402

CONTINUATIONS = {"France -> Paris\nGermany -> Berlin\nItaly ->": " Rome",
                 "The capital of France is the city of": " Paris"}


def fetched(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(
        not status(SOURCES[name]).startswith("fetched"),
        reason=f"{name} is not in the cache: lit-icl data fetch {name} (downloads it)"))


@pytest.mark.parametrize("name", [fetched("gemma3-270m"), fetched("qwen2.5-0.5b")])
def test_real_model_continues_the_prompts_and_converts_exactly(name):
    directory = model_directory(name)
    model, tokenizer = TransformerLM.from_hf(directory), Tokenizer.from_file(f"{directory}/tokenizer.json")
    for prompt, expected in CONTINUATIONS.items():
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        got = tokenizer.decode(generate(model, ids, 2)[0].tolist())
        assert got.startswith(expected), (prompt, got)
    demo = tokenizer.encode("France -> Paris\nGermany -> Berlin\n").ids
    query = tokenizer.encode("Italy ->", add_special_tokens=False).ids  # no second BOS
    with torch.no_grad():
        prompted = model(torch.tensor([demo + query]))[:, len(demo):]
        converted = model(torch.tensor([query]), state=convert(model, torch.tensor([demo])))
    torch.testing.assert_close(converted, prompted, rtol=1e-4, atol=1e-4 * prompted.abs().max().item())
    after = generate(model, torch.tensor([query]), 1, state=convert(model, torch.tensor([demo])))
    assert tokenizer.decode(after[0].tolist()) == " Rome"


@pytest.mark.parametrize("name", [fetched("gemma3-270m")])
def test_real_gemma_converts_a_context_longer_than_its_window(name):
    """A 700-token context (the sliding layers' state keeps its last 512 keys) continues as the
    prompted model does."""
    directory = model_directory(name)
    model, tokenizer = TransformerLM.from_hf(directory), Tokenizer.from_file(f"{directory}/tokenizer.json")
    pairs = ["France -> Paris", "Germany -> Berlin", "Spain -> Madrid", "Japan -> Tokyo", "Egypt -> Cairo"]
    demo = tokenizer.encode("\n".join(pairs * 40) + "\n").ids[:700]
    query = tokenizer.encode("Italy ->", add_special_tokens=False).ids
    assert model.config.window == 512 < len(demo)
    with torch.no_grad():
        state = convert(model, torch.tensor([demo]))
        assert {layer.mixer.k.shape[2] for layer, kind in zip(state.layers, model.config.kinds) if kind == "sliding"} == {512}
        prompted = model(torch.tensor([demo + query]))[:, len(demo):]
        converted = model(torch.tensor([query]), state=state)
    torch.testing.assert_close(converted, prompted, rtol=1e-4, atol=1e-4 * prompted.abs().max().item())
