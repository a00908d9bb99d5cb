"""Exact conversion: prompted logits == converted logits, for every exact combination."""

import pytest
import torch

from lit_icl import ContextState, TransformerConfig, TransformerLM, bake, convert
from tests.conftest import exact_grid, setting_id, tiny_model

V = 40
EXACT = exact_grid()
ids = setting_id


def make(dtype=torch.float64, seed=0, **kw):
    return tiny_model(dtype, seed, vocab_size=V, **kw)


def tokens(*shape, seed=1):
    return torch.randint(1, V, shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("kw", EXACT, ids=ids)
def test_prompted_equals_converted_float64(kw):
    model = make(**kw)
    demo, query = tokens(3, 13), tokens(3, 6, seed=2)
    prompted = model(torch.cat([demo, query], 1))[:, 13:]
    converted = model(query, state=convert(model, demo))
    torch.testing.assert_close(converted, prompted, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", EXACT, ids=ids)
def test_prompted_equals_converted_float32(kw):
    model = make(torch.float32, **kw)
    demo, query = tokens(4, 24), tokens(4, 5, seed=2)
    prompted = model(torch.cat([demo, query], 1))[:, 24:]
    converted = model(query, state=convert(model, demo))
    assert rel_err(prompted, converted) <= 1e-5


@pytest.mark.parametrize("kw", EXACT, ids=ids)
def test_padded_rows_convert_exactly(kw):
    """Rows of lengths 9, 5 and 2, padded on the left and on the right, each continuing at
    its own offset, equal prompting each row on its own."""
    model = make(**kw)
    lengths, M = [9, 5, 2], 9
    rows = [tokens(1, n, seed=10 + n)[0] for n in lengths]
    query = tokens(3, 4, seed=3)
    for side in ("left", "right"):
        demo = torch.zeros(3, M, dtype=torch.long)
        mask = torch.zeros(3, M, dtype=torch.long)
        for r, row in enumerate(rows):
            sl = slice(M - len(row), M) if side == "left" else slice(0, len(row))
            demo[r, sl], mask[r, sl] = row, 1
        state = convert(model, demo, attention_mask=mask)
        assert state.offset.tolist() == lengths
        converted = model(query, state=state)
        for r, row in enumerate(rows):
            prompted = model(torch.cat([row[None], query[r : r + 1]], 1))[:, len(row) :]
            torch.testing.assert_close(converted[r : r + 1], prompted, rtol=1e-10, atol=1e-10)
        # the padded prompt itself (mask over demo + query) gives the same numbers
        full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
        padded_prompted = model(torch.cat([demo, query], 1), attention_mask=full_mask)[:, M:]
        torch.testing.assert_close(converted, padded_prompted, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", EXACT, ids=ids)
def test_incremental_and_bake(kw):
    model = make(**kw)
    a, b, query = tokens(2, 7), tokens(2, 10, seed=4), tokens(2, 3, seed=5)
    whole = convert(model, torch.cat([a, b], 1))
    step = convert(model, b, state=convert(model, a))
    assert step.offset.tolist() == whole.offset.tolist() == [17, 17]
    for lw, ls in zip(whole.layers, step.layers):
        for name, t in lw.tensors().items():
            torch.testing.assert_close(ls.tensors()[name], t, rtol=1e-10, atol=1e-10)
    prompted = model(torch.cat([a, b, query], 1))[:, 17:]
    torch.testing.assert_close(model(query, state=step), prompted, rtol=1e-10, atol=1e-10)
    baked = bake(model, whole)
    torch.testing.assert_close(baked(query), prompted, rtol=1e-10, atol=1e-10)
    assert model.context is None  # the source model is untouched


def test_biases_are_the_sums_of_the_paper():
    """Layer 0's b_KV and b_D are sum_j phi(k_j) v_j^T and sum_j phi(k_j) (Chen et al. 2024, Algorithm 1)."""
    model = make(attention="linear", position="none")
    demo = tokens(1, 6)
    state = convert(model, demo)
    attn = model.blocks[0].attn
    x = model.blocks[0].ln_1(model.wte(demo))
    H, D = 2, 8
    k = attn.phi(attn.k_proj(x).view(1, 6, H, D).transpose(1, 2))
    v = attn.v_proj(x).view(1, 6, H, D).transpose(1, 2)
    torch.testing.assert_close(state.layers[0].mixer.S, torch.einsum("bhtf,bhtd->bhfd", k, v))
    torch.testing.assert_close(state.layers[0].mixer.z, k.sum(2))


def test_batch_one_state_serves_many_queries():
    model = make(attention="linear")
    demo, query = tokens(1, 8), tokens(5, 3, seed=2)
    state = convert(model, demo)
    prompted = model(torch.cat([demo.expand(5, -1), query], 1))[:, 8:]
    torch.testing.assert_close(model(query, state=state), prompted, rtol=1e-10, atol=1e-10)


def test_context_plus_query_longer_than_block_size():
    model = make(attention="linear")
    state = convert(model, tokens(1, 60))
    with pytest.raises(ValueError, match="more than block_size=64"):
        model(tokens(1, 5), state=state)


@pytest.mark.parametrize("kw", EXACT, ids=ids)
def test_save_load_round_trip(tmp_path, kw):
    model = make(**kw)
    demo, query = tokens(2, 9), tokens(2, 4)
    state = convert(model, demo)
    path = tmp_path / "ctx.safetensors"
    state.save(path, model)
    loaded = ContextState.load(path, model)
    assert loaded.mode == state.mode and loaded.offset.tolist() == [9, 9]
    torch.testing.assert_close(model(query, state=loaded), model(query, state=state), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["ctx.safetensors"]  # no temp file left


def test_load_rejects_other_models_and_bad_files(tmp_path):
    model = make(attention="linear")
    path = tmp_path / "ctx.safetensors"
    convert(model, tokens(1, 5)).save(path, model)
    with pytest.raises(ValueError, match="another model.*n_head"):
        ContextState.load(path, TransformerLM(TransformerConfig(vocab_size=V, n_head=4, n_embd=16, block_size=64)))
    with pytest.raises(ValueError, match="another model.*attention"):
        ContextState.load(path, make(attention="softmax"))
    gated = tmp_path / "gla.safetensors"  # same state shapes as retention's, another kind: refused by name
    convert(make(attention="gla"), tokens(1, 5)).save(gated, make(attention="gla"))
    with pytest.raises(ValueError, match=r"another model \(attention: state 'gla' vs model 'retention'\)"):
        ContextState.load(gated, make(attention="retention"))
    with pytest.raises(ValueError, match=r"attention: state 'gla' vs model \['gla', 'softmax'\]"):
        ContextState.load(gated, make(attention=["gla", "softmax"]))
    with pytest.raises(ValueError, match="different weights"):
        ContextState.load(path, make(attention="linear", seed=7))
    assert ContextState.load(path, make(attention="linear", seed=7), strict=False).offset.tolist() == [5]
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ContextState.load(truncated, model)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ContextState.load(junk, model)
    # a state without metadata is still checked against the model's shapes
    bare = convert(make(attention="linear", feature_map="taylor"), tokens(1, 5))
    with pytest.raises(ValueError, match="shape"):
        from lit_icl.context import check_compatible
        check_compatible(bare, model)


def test_convert_rejects_bad_modes():
    lin, soft = make(attention="linear"), make(attention="softmax")
    with pytest.raises(ValueError, match="mode='kv' is not available for linear"):
        convert(lin, tokens(1, 3), mode="kv")
    with pytest.raises(ValueError, match="mode='exact' is not available for softmax"):
        convert(soft, tokens(1, 3), mode="exact")
    with pytest.raises(TypeError, match="TransformerLM"):
        convert(torch.nn.Linear(2, 2), tokens(1, 3))
