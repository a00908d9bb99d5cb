"""Induction head (Olsson et al. 2022; the task of Chen et al. 2024's induction-head experiment): after ``trigger target`` somewhere in a
random token sequence, the trigger appears again and the answer is the target.

Token layout: ``0`` = pad, ``1`` = the trigger, content tokens ``2..n_tokens+1``.

A sequence draws a fresh target among the content tokens and ``n_segments`` segments of
``segment_len`` random content tokens; in each segment the pair ``trigger target`` overwrites two
adjacent tokens at a random place. The trigger closes the sequence (``seq_len = n_segments *
segment_len + 1``). Every trigger after the first is labelled with the target (``labels[t]`` is
the target where ``input_ids[t]`` is such a trigger, ``-100`` elsewhere): the first occurrence
cannot be predicted, every later one is an induction-head lookup, so a sequence trains every
shot count ``1..n_segments`` at once.

A held-out episode has ``n_shots`` segments as demonstrations (``shot_index`` = segment), the
query ``[trigger]`` and the target as answer; the candidates are all content tokens, so zero-shot
is at chance ``1 / n_tokens``.
"""

from __future__ import annotations

import torch

from lit_icl.data.batches import IGNORE_INDEX
from lit_icl.data.episodes import Episodes
from lit_icl.data.synthetic import HELDOUT, SyntheticICLDataModule, check_at_least, stream_generator

__all__ = ["InductionHeadDataModule", "TRIGGER"]

TRIGGER = 1


class InductionHeadDataModule(SyntheticICLDataModule):
    """Induction-head sequences plus held-out ICL episodes.

    Args:
        n_segments: segments per sequence, each holding one ``trigger target`` pair; also the
            largest shot count of held-out episodes.
        segment_len: tokens per segment (``>= 2``: the pair must fit).
        n_tokens: size of the content alphabet (noise and targets; chance is ``1 / n_tokens``).
        **kwargs: ``num_train``, ``num_val``, ``num_heldout``, ``batch_size``, ``num_workers``,
            ``seed``: see :class:`~lit_icl.data.synthetic.SyntheticICLDataModule`.
    """

    task_name = "induction"

    def __init__(
        self,
        n_segments: int = 8,
        segment_len: int = 8,
        n_tokens: int = 32,
        **kwargs,
    ) -> None:
        check_at_least(type(self).__name__, [
            ("n_segments", n_segments, 1), ("segment_len", segment_len, 2), ("n_tokens", n_tokens, 1),
        ])
        super().__init__(**kwargs)
        self.n_segments, self.segment_len, self.n_tokens = n_segments, segment_len, n_tokens

    @property
    def vocab_size(self) -> int:
        """Pad + trigger + content tokens."""
        return 2 + self.n_tokens

    @property
    def seq_len(self) -> int:
        """``n_segments * segment_len + 1`` (the closing trigger)."""
        return self.n_segments * self.segment_len + 1

    @property
    def max_shots(self) -> int:
        return self.n_segments

    @property
    def content_ids(self) -> torch.Tensor:
        """``[n_tokens]`` long: every content token (the candidates of an episode)."""
        return torch.arange(2, 2 + self.n_tokens)

    def _draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(segments [n, n_segments, segment_len], targets [n], places [n, n_segments])``: the
        segments with their ``trigger target`` pair written at ``places``."""
        S, L = self.n_segments, self.segment_len
        targets = torch.randint(2, 2 + self.n_tokens, (n,), generator=gen)
        segments = torch.randint(2, 2 + self.n_tokens, (n, S, L), generator=gen)
        places = torch.randint(0, L - 1, (n, S), generator=gen)
        segments.scatter_(2, places[..., None], TRIGGER)
        segments.scatter_(2, places[..., None] + 1, targets[:, None, None].expand(n, S, 1))
        return segments, targets, places

    def sequences(self, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` sequences of ``stream`` as ``(input_ids, labels)``, both ``[n, seq_len]`` long."""
        segments, targets, places = self._draw(n, stream_generator(self.seed, stream))
        S, L = self.n_segments, self.segment_len
        input_ids = torch.cat([segments.reshape(n, S * L), torch.full((n, 1), TRIGGER)], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        later = torch.cat([places[:, 1:] + L * torch.arange(1, S), torch.full((n, 1), S * L)], dim=1)
        labels.scatter_(1, later, targets[:, None].expand_as(later))
        return input_ids, labels

    def _episodes(self, n_shots: int, num_episodes: int, task: str) -> Episodes:
        segments, targets, _ = self._draw(num_episodes, stream_generator(self.seed, HELDOUT))
        M = n_shots * self.segment_len
        return Episodes(
            demo_ids=segments[:, :n_shots].reshape(num_episodes, M),
            query_ids=torch.full((num_episodes, 1), TRIGGER),
            answers=targets,
            candidates=self.content_ids,
            shot_index=(torch.arange(M) // self.segment_len).expand(num_episodes, M),
        )
