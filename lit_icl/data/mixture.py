"""A weighted mixture of synthetic ICL tasks, with per-task held-out episodes.

Each task keeps its own token ids in a disjoint range of one shared vocabulary: padding ``0`` is
shared, and a task's token ``t > 0`` becomes ``t + offset`` with ``offset`` the number of non-pad
tokens of the tasks before it (``vocab_size = 1 + sum(task.vocab_size - 1)``). Shorter sequences
are right-padded with ``0`` (labels ``-100``) to the longest task's ``seq_len``.

Per-task evaluation: ``heldout_tasks()`` lists the task names and ``heldout_episodes(k, n,
task=name)`` returns that task's held-out episodes in the mixture's ids; ``task=None`` gives the
first task's, so a caller that knows nothing of tasks still gets valid episodes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lit_icl.data.batches import IGNORE_INDEX
from lit_icl.data.episodes import Episodes
from lit_icl.data.synthetic import SyntheticICLDataModule, stream_generator

__all__ = ["MixtureDataModule"]


class MixtureDataModule(SyntheticICLDataModule):
    """Trains on a weighted mixture of synthetic tasks; evaluates each task on its own.

    Each training (validation, test) sequence picks its task with probability proportional to
    ``weights`` (drawn from the mixture's stream of the split); the task then supplies the
    sequence from the same split's stream of its own seed. The tasks serve only as generators:
    their ``num_*``, ``batch_size`` and ``num_workers`` are not used, the mixture's are.
    Held-out episodes are each task's own (its HELDOUT stream), shifted into the mixture's ids.

    Args:
        tasks: the synthetic task DataModules (at least one; not mixtures themselves).
        weights: sampling weight of each task (``>= 0``, positive sum); ``None``: uniform.
        names: a name per task for ``heldout_tasks``; ``None``: each task's ``task_name``
            (they must then be distinct).
        **kwargs: ``num_train``, ``num_val``, ``num_heldout`` (held-out episodes per task),
            ``batch_size``, ``num_workers``, ``seed`` (of the task draws; the tasks' sequences use
            their own seeds): see :class:`~lit_icl.data.synthetic.SyntheticICLDataModule`.
    """

    task_name = "mixture"
    hparams_ignore = ("tasks",)  # DataModules, not values (each logs its own)

    def __init__(
        self,
        tasks: Sequence[SyntheticICLDataModule],
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        owner = type(self).__name__
        tasks = list(tasks)
        if not tasks or not all(isinstance(t, SyntheticICLDataModule) for t in tasks):
            raise ValueError(f"{owner}: tasks must be a non-empty list of synthetic task DataModules, got {tasks!r}")
        if any(isinstance(t, MixtureDataModule) for t in tasks):
            raise ValueError(f"{owner}: a task cannot itself be a mixture")
        weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
        if len(weights) != len(tasks) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"{owner}: weights={weights} must give one weight >= 0 per task ({len(tasks)}) with a positive sum"
            )
        names = [t.task_name for t in tasks] if names is None else list(names)
        if len(names) != len(tasks) or len(set(names)) != len(names):
            raise ValueError(
                f"{owner}: task names {names} must be distinct, one per task (set `names` to tell tasks apart)"
            )
        super().__init__(**kwargs)
        self.tasks, self.weights, self.names = tasks, torch.tensor(weights) / sum(weights), names
        sizes = torch.tensor([t.vocab_size - 1 for t in tasks])
        self.offsets = (sizes.cumsum(0) - sizes).tolist()

    @property
    def vocab_size(self) -> int:
        """``1 + sum(task.vocab_size - 1)``: padding plus every task's own tokens."""
        return 1 + sum(t.vocab_size - 1 for t in self.tasks)

    @property
    def seq_len(self) -> int:
        """The longest task's ``seq_len``."""
        return max(t.seq_len for t in self.tasks)

    @property
    def max_shots(self) -> int:
        """The largest shot count every task accepts (the callback uses one list of shots)."""
        return min(t.max_shots for t in self.tasks)

    def heldout_tasks(self) -> list[str]:
        """The task names, in order."""
        return list(self.names)

    def _shift(self, ids: torch.Tensor, i: int) -> torch.Tensor:
        """Task ``i``'s token ids in the mixture's vocabulary (padding stays ``0``)."""
        return torch.where(ids > 0, ids + self.offsets[i], ids)

    def assignments(self, n: int, stream: int) -> torch.Tensor:
        """``[n]`` long: the task index of each of the ``n`` sequences of ``stream``."""
        return torch.multinomial(self.weights, n, replacement=True, generator=stream_generator(self.seed, stream))

    def sequences(self, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` sequences of ``stream``, each from the task :meth:`assignments` picks."""
        which = self.assignments(n, stream)
        input_ids = torch.zeros(n, self.seq_len, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, task in enumerate(self.tasks):
            rows = (which == i).nonzero().squeeze(1)
            if len(rows):
                x, y = task.sequences(len(rows), stream)
                input_ids[rows, : x.shape[1]] = self._shift(x, i)
                labels[rows, : y.shape[1]] = torch.where(y == IGNORE_INDEX, y, self._shift(y, i))
        return input_ids, labels

    def _episodes(self, n_shots: int, num_episodes: int, task: str) -> Episodes:
        """Task ``task``'s own held-out episodes, shifted into the mixture's ids."""
        i = self.names.index(task)
        ep = self.tasks[i].heldout_episodes(n_shots, num_episodes)
        return Episodes(
            self._shift(ep.demo_ids, i), self._shift(ep.query_ids, i), self._shift(ep.answers, i),
            self._shift(ep.candidates, i), ep.shot_index, ep.query_mask,
        )
