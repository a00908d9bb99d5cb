"""Associative recall (BRIEF §5): a random key->value map shown as pairs, then keys are asked.

Token layout: ``0`` = pad, keys ``1..n_keys``, values ``n_keys+1..n_keys+n_values``.

A training sequence has ``n_pairs + n_queries`` slots of two tokens ``key value``. Each sequence
draws a fresh map over distinct keys and a shot count ``k ~ U{1..n_pairs}``; the first ``k``
slots show the pairs, the remaining ``n_pairs + n_queries - k`` slots ask keys drawn uniformly
from the shown ones, followed by their value. Labels (already shifted: ``labels[t]`` is the
target when predicting at position ``t``) are set only at the key of a query slot and equal its
value; everything else is ``-100``. The loss therefore measures recall alone, and the answer is
only in the context, so a model without it is at chance.

Streams: train, validation, test and held-out episodes come from generators seeded by
``SeedSequence([seed, stream])`` with distinct streams 0, 1, 3 and 2, so the held-out maps are
never seen in training.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_icl.data.episodes import Episodes

__all__ = ["AssociativeRecallDataModule"]

TRAIN, VAL, HELDOUT, TEST = 0, 1, 2, 3
IGNORE_INDEX = -100


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for ``stream`` of ``seed``; distinct streams give independent draws."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _collate(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    input_ids, labels = zip(*rows)
    return {"input_ids": torch.stack(input_ids), "labels": torch.stack(labels)}


class AssociativeRecallDataModule(pl.LightningDataModule):
    """Synthetic associative-recall sequences plus held-out ICL episodes.

    Args:
        n_pairs: most pairs shown in a sequence (the shot count ``k`` is drawn in ``1..n_pairs``).
        n_keys: size of the key alphabet (keys in a map are distinct, so ``n_pairs <= n_keys``).
        n_values: size of the value alphabet (values may repeat within a map).
        n_queries: least number of query slots; a sequence has ``2 * (n_pairs + n_queries)`` tokens.
        num_train: training sequences, generated once in ``setup``.
        num_val: validation (and test) sequences.
        num_heldout: default number of held-out episodes of ``heldout_episodes``.
        batch_size: sequences per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        seed: root seed of every stream.
    """

    def __init__(
        self,
        n_pairs: int = 8,
        n_keys: int = 32,
        n_values: int = 32,
        n_queries: int = 8,
        num_train: int = 20000,
        num_val: int = 512,
        num_heldout: int = 256,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        for name, value, least in (
            ("n_pairs", n_pairs, 1), ("n_keys", n_keys, 1), ("n_values", n_values, 1),
            ("n_queries", n_queries, 1), ("num_train", num_train, 1), ("num_val", num_val, 1),
            ("num_heldout", num_heldout, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
        ):
            if value < least:
                raise ValueError(f"AssociativeRecallDataModule: {name} must be >= {least}, got {value}")
        if n_pairs > n_keys:
            raise ValueError(
                f"AssociativeRecallDataModule: n_pairs={n_pairs} exceeds n_keys={n_keys} "
                "(the keys of a map are distinct)"
            )
        self.save_hyperparameters()
        self.n_pairs, self.n_keys, self.n_values, self.n_queries = n_pairs, n_keys, n_values, n_queries
        self.num_train, self.num_val, self.num_heldout = num_train, num_val, num_heldout
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._splits: dict[int, TensorDataset] = {}

    @property
    def vocab_size(self) -> int:
        """Pad + keys + values."""
        return 1 + self.n_keys + self.n_values

    @property
    def seq_len(self) -> int:
        """Tokens per training sequence: ``2 * (n_pairs + n_queries)``."""
        return 2 * (self.n_pairs + self.n_queries)

    @property
    def value_ids(self) -> torch.Tensor:
        """``[n_values]`` long: every value token (the candidates of an episode)."""
        return torch.arange(self.n_keys + 1, self.n_keys + self.n_values + 1)

    def _draw_maps(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random maps as ``(keys, values)``, each ``[n, n_pairs]``; keys distinct per row."""
        keys = torch.rand(n, self.n_keys, generator=gen).argsort(dim=1)[:, : self.n_pairs] + 1
        values = torch.randint(self.n_keys + 1, self.n_keys + self.n_values + 1, (n, self.n_pairs), generator=gen)
        return keys, values

    def sequences(self, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` sequences of ``stream`` as ``(input_ids, labels)``, both ``[n, seq_len]`` long."""
        gen = _generator(self.seed, stream)
        keys, values = self._draw_maps(n, gen)
        slots = self.n_pairs + self.n_queries
        shots = torch.randint(1, self.n_pairs + 1, (n, 1), generator=gen)
        slot = torch.arange(slots).expand(n, slots)
        asked = (torch.rand(n, slots, generator=gen) * shots).long()  # uniform over the shown pairs
        is_query = slot >= shots
        pair = torch.where(is_query, asked, slot)
        key, value = keys.gather(1, pair), values.gather(1, pair)
        input_ids = torch.stack([key, value], dim=2).reshape(n, 2 * slots)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, 0::2] = torch.where(is_query, value, IGNORE_INDEX)
        return input_ids, labels

    def heldout_episodes(self, n_shots: int, num_episodes: int | None = None) -> Episodes:
        """Held-out ICL episodes with ``n_shots`` demonstrations each (BRIEF §4-5).

        Every episode draws a fresh map from the held-out stream (never used for training);
        the demonstrations are its first ``n_shots`` pairs (``M = 2 * n_shots`` tokens), the
        query is one of these keys (``Q = 1``), the answer its value, and the candidates are all
        value tokens. The result is the same on every call, and the episodes of different
        ``n_shots`` share their maps and query draws (more shots of the same maps).

        Args:
            n_shots: demonstrations per episode, in ``0..n_pairs`` (0: the query alone, at chance).
            num_episodes: number of episodes; ``num_heldout`` when ``None``.
        """
        num_episodes = self.num_heldout if num_episodes is None else num_episodes
        if not 0 <= n_shots <= self.n_pairs:
            raise ValueError(f"heldout_episodes: n_shots must be in 0..n_pairs={self.n_pairs}, got {n_shots}")
        if num_episodes < 1:
            raise ValueError(f"heldout_episodes: num_episodes must be >= 1, got {num_episodes}")
        gen = _generator(self.seed, HELDOUT)
        keys, values = self._draw_maps(num_episodes, gen)
        asked = (torch.rand(num_episodes, 1, generator=gen) * max(n_shots, 1)).long()
        demo_ids = torch.stack([keys[:, :n_shots], values[:, :n_shots]], dim=2).reshape(num_episodes, 2 * n_shots)
        return Episodes(
            demo_ids=demo_ids,
            query_ids=keys.gather(1, asked),
            answers=values.gather(1, asked).squeeze(1),
            candidates=self.value_ids,
            shot_index=(torch.arange(2 * n_shots) // 2).expand(num_episodes, 2 * n_shots),
        )

    def setup(self, stage: str | None = None) -> None:
        """Generate the fixed train / validation / test sets (once)."""
        for stream, n in ((TRAIN, self.num_train), (VAL, self.num_val), (TEST, self.num_val)):
            if stream not in self._splits:
                self._splits[stream] = TensorDataset(*self.sequences(n, stream))

    def _loader(self, stream: int, shuffle: bool = False) -> DataLoader:
        self.setup()
        return DataLoader(
            self._splits[stream],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(TRAIN, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAL)

    def test_dataloader(self) -> DataLoader:
        return self._loader(TEST)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(TEST)
