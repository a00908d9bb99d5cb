"""Shared fixtures: tiny models and data, and a runner for the ``lit-icl`` command."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network from a test
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's own calls, not ours

import itertools
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lit_icl.data import AssociativeRecallDataModule
from lit_icl.mixers import MIXERS
from lit_icl.model import TransformerConfig, TransformerLM, evaluating

ROOT = Path(__file__).resolve().parents[1]
LIT_ICL = Path(sys.executable).with_name("lit-icl")  # the installed console script
TINY_OVERRIDES = [  # shrink a config to a seconds-long run
    "--model.config.n_embd", "32", "--model.config.n_head", "2",
    "--data.init_args.num_train", "256", "--data.init_args.num_val", "64",
    "--data.init_args.batch_size", "16", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
    "--trainer.max_time", "null", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def model_config(vocab_size: int = 40, **overrides) -> TransformerConfig:
    """The tests' tiny model: 2 layers, 2 heads of size 8, block_size 64, chunk_size 4
    (several chunks even in short sequences); `overrides` set any other field."""
    base = dict(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16, block_size=64, chunk_size=4)
    return TransformerConfig(**{**base, **overrides})


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> TransformerLM:
    """A `model_config(**overrides)` TransformerLM in `dtype` and eval mode, weights from `seed`."""
    torch.manual_seed(seed)
    return TransformerLM(model_config(**overrides)).to(dtype).eval()


def naive_greedy(model: TransformerLM, ids: torch.Tensor, n: int, state=None, min_margin: float | None = None) -> torch.Tensor:
    """The `n` greedy tokens after `ids` (on a context `state`, if given), re-running the whole
    sequence for every new token: the obviously correct reference for decoding. It also checks that the input has a margin: at every
    step the best token's logit leads the second's by more than `min_margin` (default 1e-8 in
    float64, 1e-3 otherwise), so another code path whose logits differ from these by rounding
    (another kernel, a state instead of the prompt) must choose the same tokens on any CPU."""
    if min_margin is None:
        min_margin = 1e-8 if model.lm_head.weight.dtype == torch.float64 else 1e-3
    with torch.no_grad():
        for _ in range(n):
            top2 = model(ids, state=state)[:, -1].topk(2, dim=-1)
            gap = float((top2.values[:, 0] - top2.values[:, 1]).min())
            assert gap > min_margin, f"a near-tie in the reference decoding ({gap:.2e}): choose other inputs"
            ids = torch.cat([ids, top2.indices[:, :1]], 1)
    return ids[:, -n:]


def min_candidate_margin(model, episodes) -> float:
    """The smallest gap, over episodes, between the best and second-best candidate logits of the
    prompted run: a converted run whose logits differ by less than half this gap predicts the
    same candidate in every episode."""
    with evaluating(model), torch.no_grad():
        logits = model.run(episodes.prompts, attention_mask=episodes.prompt_mask, logits_at="last").logits[:, -1]
    top2 = logits[:, episodes.candidates].topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


HYBRIDS = (["gla", "softmax"], ["deltanet", "simple_gla"], ["retention", "linear"])  # 2-layer mixed stacks
WINDOWED = dict(window=3)  # sliding-window settings: contexts and queries run past the window
GEMMA_LIKE = dict(attention=["sliding", "softmax"], window=3, position="rope", rope_local_theta=50.0, head_size=12,
                  qk_norm="rmsnorm", norm="rmsnorm_1p", post_norm=True, scale_embedding=True, mlp="geglu",
                  activation="gelu_tanh", attn_scale=0.3, qkv_bias=False)  # every Gemma 3 field, two layers


def exact_grid() -> list[dict]:
    """Every model setting whose conversion is exact, one grid over the registry: each kind x
    position x momentum (linear also x feature map), token shift, and hybrid stacks. A new
    registered kind is covered by the exactness tests without touching them."""
    grid = []
    for kind in MIXERS:
        maps = ("elu", "relu", "taylor") if kind == "linear" else ("elu",)
        extra = WINDOWED if kind == "sliding" else {}  # a window shorter than the tests' contexts
        grid += [dict(attention=kind, feature_map=fm, position=pos, momentum=eta, **extra)
                 for fm, pos, eta in itertools.product(maps, ("learned", "rope", "none"), (0.0, 0.6))]
        grid += [dict(attention=kind, position=pos, momentum=0.6, token_shift=True, **extra) for pos in ("learned", "rope")]
        grid += [dict(attention=kind, qk_norm=norm, momentum=0.6, **extra) for norm in MIXERS[kind].qk_norms[1:]]
    grid += [dict(attention=h, position="rope", momentum=eta) for h in HYBRIDS for eta in (0.0, 0.6)]
    return grid + [dict(GEMMA_LIKE, momentum=eta) for eta in (0.0, 0.6)]


def setting_id(kw) -> str:
    """A test id for a settings dict or an attention kind (a list joins as gla+softmax)."""
    values = kw.values() if isinstance(kw, dict) else [kw]
    return "-".join("+".join(v) if isinstance(v, list) else str(v) for v in values)


def pytest_configure(config):
    # raised inside Lightning itself with the pinned torch; not actionable here
    config.addinivalue_line("filterwarnings", r"ignore:`isinstance\(treespec, LeafSpec\)`")


@pytest.fixture
def quickstart_tiny() -> list[str]:
    """``--config configs/quickstart.yaml`` plus overrides that make it a tiny, seconds-long run."""
    return ["--config", str(ROOT / "configs" / "quickstart.yaml"), *TINY_OVERRIDES]


@pytest.fixture
def tiny_data() -> AssociativeRecallDataModule:
    return AssociativeRecallDataModule(
        n_pairs=4, n_keys=8, n_values=8, n_queries=4, num_train=256, num_val=64, num_heldout=32, batch_size=16
    )


@pytest.fixture
def tiny_config(tiny_data) -> TransformerConfig:
    return model_config(tiny_data.vocab_size, n_embd=32, block_size=32, chunk_size=32)


@pytest.fixture
def run_cli():
    """Run ``lit-icl *args`` in ``cwd``; returns the CompletedProcess (text, captured)."""

    def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        return subprocess.run(
            [str(LIT_ICL), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )

    return run


@pytest.fixture
def make_trainer(tmp_path):
    """A quiet CPU Trainer writing under ``tmp_path`` (no logger, no checkpoints unless asked)."""

    def make(**kwargs) -> pl.Trainer:
        defaults = dict(
            accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )
        return pl.Trainer(**{**defaults, **kwargs})

    return make
