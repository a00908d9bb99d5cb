"""Every registered mixer and each of its conversion modes: the typed state starts empty with the
shapes it declares, moves, selects rows, expands, saves and loads (also files in the format the
dict-keyed states wrote), and bakes into a checkpoint. A kind added with `register` is covered
here without a new test."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lit_icl import ContextState, bake, convert
from lit_icl.context import FORMAT, check_compatible
from lit_icl.mixers import MIXERS, LayerState, register
from lit_icl.model import BakedContext
from tests.conftest import tiny_model

V = 40
CASES = [(kind, mode, eta) for kind, cls in MIXERS.items() for mode in cls.states for eta in (0.0, 0.5)]


def ids(case):
    return "-".join(map(str, case))


def tokens(*shape, seed=1):
    return torch.randint(1, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=CASES, ids=ids)
def case(request):
    kind, mode, eta = request.param
    return tiny_model(vocab_size=V, attention=kind, momentum=eta), mode


def test_registry_names_the_config_kinds():
    assert set(MIXERS) >= {"linear", "softmax"}
    assert MIXERS["linear"].states and list(MIXERS["softmax"].states) == ["kv", "prf", "taylor"]
    with pytest.raises(ValueError, match="registered twice"):
        register("linear")(MIXERS["softmax"])


def test_empty_state_has_the_declared_shapes(case):
    model, mode = case
    state = ContextState.empty(model, 3, mode, num_features=8)
    check_compatible(state, model)  # names and shapes agree with what each mixer declares
    assert state.offset.tolist() == [0, 0, 0] and state.last_token.tolist() == [-1, -1, -1]
    for layer, mixer in zip(state.layers, model.mixers):
        assert isinstance(layer, LayerState) and (layer.momentum is None) == (model.config.momentum == 0)
        assert set(layer.tensors()) == set(mixer.state_shapes(mode))
        for name, t in layer.tensors().items():
            assert t.shape[0] == 3 and t.dtype in (torch.float64, torch.bool, torch.long), name
            assert name == "W" or not t.any(), name  # nothing seen yet (W: ICLAA's random projection)


def test_move_select_expand(case):
    model, mode = case
    state = convert(model, tokens(3, 7), mode=mode, num_features=8)
    half = state.to(dtype=torch.float32)
    for layer, moved in zip(state.layers, half.layers):
        for name, t in layer.tensors().items():
            got = moved.tensors()[name]
            assert got.dtype == (torch.float32 if t.is_floating_point() else t.dtype)
            torch.testing.assert_close(got.double(), t.double(), rtol=1e-6, atol=1e-6)
    one = state.select(1)
    assert one.batch_size == 1 and one.offset.tolist() == [7]
    for layer, row in zip(state.layers, one.layers):
        for name, t in row.tensors().items():
            assert torch.equal(t, layer.tensors()[name][1:2])
        wide = row.expand(4)
        assert all(t.shape[0] == 4 and torch.equal(t[3], t[0]) for t in wide.tensors().values())
    query = tokens(1, 3, seed=2)
    torch.testing.assert_close(model(query, state=one), model(query.expand(3, -1), state=state)[1:2], rtol=1e-12, atol=1e-12)


def test_tensors_round_trip_and_save_load(case, tmp_path):
    model, mode = case
    state = convert(model, tokens(2, 6), mode=mode, num_features=8)
    for layer, mixer in zip(state.layers, model.mixers):
        again = mixer.state_from_tensors(layer.tensors(), mode)
        assert type(again.mixer) is type(layer.mixer)
        assert all(torch.equal(again.tensors()[n], t) for n, t in layer.tensors().items())
        assert mixer.mode_of(layer.tensors()) == mode
    path = tmp_path / "ctx.safetensors"
    state.save(path, model)
    loaded = ContextState.load(path, model)
    assert loaded.mode == mode
    query = tokens(2, 4, seed=3)
    assert torch.equal(model(query, state=loaded), model(query, state=state))


def test_bake_survives_a_state_dict_round_trip(case):
    model, mode = case
    state = convert(model, tokens(1, 5), mode=mode, num_features=8)
    baked = bake(model, state)
    context = BakedContext.from_state_dict({f"model.context.{k}": t for k, t in baked.context.state_dict().items()},
                                           "model.context.", model)
    query = tokens(2, 4, seed=4)
    rebuilt = tiny_model(vocab_size=V, attention=model.config.attention, momentum=model.config.momentum)
    rebuilt.context = context
    assert torch.equal(rebuilt(query), baked(query))
    torch.testing.assert_close(baked(query), model(query, state=state), rtol=0, atol=0)


def test_a_context_baked_under_the_old_buffer_names_loads(case):
    """Checkpoints baked before the buffers were named offset/last_token hold offset_/last_token_."""
    model, mode = case
    baked = bake(model, convert(model, tokens(1, 5), mode=mode, num_features=8))
    old = {k.replace("context.offset", "context.offset_").replace("context.last_token", "context.last_token_"): t
           for k, t in baked.state_dict().items()}
    assert "context.offset_" in old and "context.offset" not in old
    rebuilt = tiny_model(vocab_size=V, attention=model.config.attention, momentum=model.config.momentum)
    rebuilt.context = BakedContext.from_state_dict(old, "context.", model)
    rebuilt.load_state_dict(old)
    query = tokens(2, 4, seed=4)
    assert torch.equal(rebuilt(query), baked(query))


@pytest.mark.parametrize("kind,names", [("linear", ["S", "z", "m"]), ("softmax", ["k", "v", "kv_mask", "m"])])
def test_files_of_the_dict_keyed_format_still_load(tmp_path, kind, names):
    """A file written before the typed states: tensors "layers.{i}.{name}" and the same metadata."""
    model = tiny_model(vocab_size=V, attention=kind, momentum=0.5)
    state = convert(model, tokens(2, 5))
    old = {f"layers.{i}.{n}": layer.tensors()[n].contiguous().clone() for i, layer in enumerate(state.layers) for n in names}
    old |= {"offset": state.offset.clone(), "last_token": state.last_token.clone()}
    meta = {"format": FORMAT, "mode": state.mode, "n_layer": "2", "num_tokens": json.dumps([5, 5])}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    loaded = ContextState.load(tmp_path / "old.safetensors", model)
    query = tokens(2, 3, seed=5)
    assert torch.equal(model(query, state=loaded), model(query, state=state))
    save_file({k: t for k, t in old.items() if not k.endswith(".m")}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"layer 0 state holds .*, the model needs .*'m'"):
        ContextState.load(tmp_path / "bad.safetensors", model)
