"""Held-out in-context-learning episodes: demonstrations, a query, its answer, the candidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Episodes", "joined"]


def joined(*parts: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token blocks ``(ids [N, L_i], mask [N, L_i] or None)`` side by side: the ids and their mask
    (1 where a block has no mask), or None when no block has one."""
    ids = torch.cat([i for i, _ in parts], dim=1)
    if all(m is None for _, m in parts):
        return ids, None
    return ids, torch.cat([torch.ones_like(i) if m is None else m.long() for i, m in parts], dim=1)


@dataclass(frozen=True)
class Episodes:
    """A batch of ``N`` ICL episodes (the demonstration sets of Dai et al. 2023's ICL-vs-finetuning comparison), all of the same shape.

    Attributes:
        demo_ids: ``[N, M]`` long, the demonstrations (``M`` may be 0: zero-shot).
        query_ids: ``[N, Q]`` long, ``Q >= 1``; the prediction is read at the query's last token.
        answers: ``[N]`` long, the correct token id of each episode (one of ``candidates``; with
            ``answer_ids``, the answer's first token).
        candidates: ``[K]`` long, the task's candidate answer tokens; a prediction is the argmax
            of the logits at the query's last position restricted to these ids. Empty (``K = 0``)
            for an open-vocabulary task (``answer_ids``).
        shot_index: optional ``[N, M]`` long, which demonstration (``0..k-1``) each token of
            ``demo_ids`` belongs to, ``-1`` at padding (rows of different lengths). ``None``:
            each row of ``demo_ids`` is one demonstration, without padding. The finetuning
            baseline trains on one demonstration per step, so it needs the split.
        query_mask: optional ``[N, Q]`` (1 = token) for queries of different lengths, padded on
            the LEFT so that every query ends at position ``Q - 1``. ``None``: no padding.
        answer_ids: optional ``[N, A]`` long, an open-vocabulary answer of one or more tokens
            (a function task's word), padded on the RIGHT. The prediction is then the greedy
            continuation of the query, scored by exact match of all its tokens; it is read
            teacher-forced (see :attr:`query_inputs`). ``None``: a label task (``candidates``).
        answer_mask: optional ``[N, A]`` (1 = token) when the answers differ in length.
    """

    demo_ids: torch.Tensor
    query_ids: torch.Tensor
    answers: torch.Tensor
    candidates: torch.Tensor
    shot_index: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None
    answer_ids: torch.Tensor | None = None
    answer_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, want_dim in (("demo_ids", 2), ("query_ids", 2), ("answers", 1), ("candidates", 1)):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Episodes.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != want_dim or t.dtype != torch.long:
                raise ValueError(
                    f"Episodes.{name} must be a {want_dim}-D long tensor, got shape "
                    f"{tuple(t.shape)} dtype {t.dtype}"
                )
        n = self.demo_ids.shape[0]
        if self.query_ids.shape[0] != n or self.answers.shape[0] != n:
            raise ValueError(
                "Episodes need one row per episode: demo_ids "
                f"{tuple(self.demo_ids.shape)}, query_ids {tuple(self.query_ids.shape)}, "
                f"answers {tuple(self.answers.shape)} disagree on N"
            )
        if self.query_ids.shape[1] < 1:
            raise ValueError(f"Episodes.query_ids must have Q >= 1 tokens, got {tuple(self.query_ids.shape)}")
        if self.answer_ids is not None:
            self._check_answer_ids(n)
        elif self.candidates.numel() < 1:
            raise ValueError("Episodes.candidates must hold at least one token id, got shape (0,)")
        elif n and not torch.isin(self.answers, self.candidates).all():
            raise ValueError("Episodes.answers must all be among Episodes.candidates")
        if self.query_mask is not None and (
            self.query_mask.shape != self.query_ids.shape or not bool(self.query_mask[:, -1].all())
        ):
            raise ValueError(
                f"Episodes.query_mask must match query_ids {tuple(self.query_ids.shape)} with every "
                f"query's last token real (left padding), got {tuple(self.query_mask.shape)}"
            )
        if self.shot_index is not None and self.shot_index.shape != self.demo_ids.shape:
            raise ValueError(
                f"Episodes.shot_index shape {tuple(self.shot_index.shape)} != demo_ids shape "
                f"{tuple(self.demo_ids.shape)}"
            )

    def _check_answer_ids(self, n: int) -> None:
        ids, mask = self.answer_ids, self.answer_mask
        if ids.dim() != 2 or ids.dtype != torch.long or ids.shape[0] != n or ids.shape[1] < 1:
            raise ValueError(f"Episodes.answer_ids must be a [N={n}, A>=1] long tensor, got {tuple(ids.shape)} {ids.dtype}")
        if mask is not None and (mask.shape != ids.shape or not bool(mask[:, 0].all())):
            raise ValueError(f"Episodes.answer_mask must match answer_ids {tuple(ids.shape)} with every answer's first "
                             f"token real (right padding), got {tuple(mask.shape)}")
        if n and not torch.equal(self.answers, ids[:, 0]):
            raise ValueError("Episodes.answers must be the first tokens of Episodes.answer_ids")

    @classmethod
    def from_lists(
        cls,
        demos: Sequence[Sequence[Sequence[int]]],
        queries: Sequence[Sequence[int]],
        answers: Sequence[int],
        candidates: Sequence[int],
        pad_id: int = 0,
        answer_tokens: Sequence[Sequence[int]] | None = None,
    ) -> "Episodes":
        """Episodes from token lists of different lengths (e.g. text templates).

        ``demos[i]`` is episode ``i``'s list of demonstrations (each a list of token ids),
        ``queries[i]`` its query. Each episode's demonstrations are concatenated in order and the
        rows left-padded with ``pad_id`` to the longest (``shot_index`` numbers the
        demonstrations, ``-1`` at padding); queries are left-padded too (``query_mask``), so every
        query ends at the last column. ``query_mask`` is ``None`` when no query is padded.
        With ``answer_tokens`` (one list per episode, each non-empty), the task is open-vocabulary:
        ``answers`` is ignored (the first tokens are the answers), ``candidates`` may be empty, and
        the answers are right-padded with ``pad_id`` (``answer_mask``).
        """
        if not len(demos) == len(queries) == len(answers):
            raise ValueError(
                f"Episodes.from_lists needs one entry per episode: {len(demos)} demos, {len(queries)} queries, "
                f"{len(answers)} answers"
            )
        rows = [[t for d in shots for t in d] for shots in demos]
        index = [[s for s, d in enumerate(shots) for _ in d] for shots in demos]
        M = max(map(len, rows), default=0)
        Q = max(map(len, queries), default=0)
        demo_ids = torch.tensor([[pad_id] * (M - len(r)) + r for r in rows], dtype=torch.long).view(len(rows), M)
        shot_index = torch.tensor([[-1] * (M - len(i)) + i for i in index], dtype=torch.long).view(len(rows), M)
        query_ids = torch.tensor([[pad_id] * (Q - len(q)) + list(q) for q in queries], dtype=torch.long)
        query_mask = torch.tensor([[0] * (Q - len(q)) + [1] * len(q) for q in queries], dtype=torch.long)
        answer_ids = answer_mask = None
        if answer_tokens is not None:
            if len(answer_tokens) != len(queries) or not all(len(a) for a in answer_tokens):
                raise ValueError(f"Episodes.from_lists needs one non-empty answer per episode, got "
                                 f"{[len(a) for a in answer_tokens][:10]} for {len(queries)} queries")
            A = max(map(len, answer_tokens))
            answer_ids = torch.tensor([list(a) + [pad_id] * (A - len(a)) for a in answer_tokens], dtype=torch.long)
            answer_mask = torch.tensor([[1] * len(a) + [0] * (A - len(a)) for a in answer_tokens], dtype=torch.long)
            answers = answer_ids[:, 0].tolist()
            answer_mask = None if bool(answer_mask.all()) else answer_mask
        return cls(
            demo_ids=demo_ids,
            query_ids=query_ids.view(len(queries), Q),
            answers=torch.tensor(list(answers), dtype=torch.long),
            candidates=torch.tensor(list(candidates), dtype=torch.long),
            shot_index=shot_index,
            query_mask=None if bool(query_mask.all()) else query_mask.view(len(queries), Q),
            answer_ids=answer_ids,
            answer_mask=answer_mask,
        )

    def __len__(self) -> int:
        return self.demo_ids.shape[0]

    @property
    def prompts(self) -> torch.Tensor:
        """``[N, M + Q]``: demonstrations followed by the query (the prompted, ICL input)."""
        return torch.cat([self.demo_ids, self.query_ids], dim=1)

    def shard(self, rank: int, world_size: int) -> "Episodes":
        """The strided share ``[rank::world_size]`` of the episodes for one process.

        The shards of ranks ``0..world_size-1`` cover every episode exactly once, without
        padding (sizes differ by at most one; a shard may be empty when ``N < world_size``).
        ``candidates`` is shared by all shards.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return self[rank::world_size]

    def __getitem__(self, rows: slice) -> "Episodes":
        """The episodes of ``rows`` (a slice); ``candidates`` is shared."""
        if not isinstance(rows, slice):
            raise TypeError(f"Episodes are indexed by a slice, got {type(rows).__name__}")
        index, qmask, aids, amask = (None if t is None else t[rows] for t in self._optional())
        return Episodes(self.demo_ids[rows], self.query_ids[rows], self.answers[rows], self.candidates, index, qmask,
                        aids, amask)

    def _optional(self) -> tuple:
        return self.shot_index, self.query_mask, self.answer_ids, self.answer_mask

    def to(self, device: torch.device | str) -> "Episodes":
        """A copy with every tensor on ``device``."""
        move = [None if t is None else t.to(device) for t in self._optional()]
        return Episodes(*(t.to(device) for t in (self.demo_ids, self.query_ids, self.answers, self.candidates)), *move)

    def equals(self, other: "Episodes") -> bool:
        """Whether ``other`` holds the same tensors (the same absent ones included)."""
        pairs = zip(vars(self).values(), vars(other).values())
        return all(a is b is None or (a is not None and b is not None and torch.equal(a, b)) for a, b in pairs)

    @property
    def open_vocabulary(self) -> bool:
        """Whether the answers are words of one or more tokens scored by exact match (``answer_ids``)
        rather than a choice among ``candidates``."""
        return self.answer_ids is not None

    @property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens a prediction must produce ``[N, A]`` and which are real ``[N, A]`` (bool):
        the answer's tokens, or for a label task the one answer token (``A = 1``)."""
        if self.answer_ids is None:
            return self.answers[:, None], torch.ones_like(self.answers[:, None], dtype=torch.bool)
        mask = torch.ones_like(self.answer_ids) if self.answer_mask is None else self.answer_mask
        return self.answer_ids, mask.bool()

    @property
    def query_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input that scores the answer teacher-forced: the query, then every answer token but
        the last ``[N, Q + A - 1]``, with its mask (``None`` when nothing is padded). Its last ``A``
        positions predict the ``A`` answer tokens (:attr:`targets`); the query's last token is at
        ``Q - 1``. A label task's is the query itself."""
        if self.answer_ids is None or self.answer_ids.shape[1] == 1:
            return self.query_ids, self.query_mask
        answer_mask = None if self.answer_mask is None else self.answer_mask[:, 1:]  # token j read iff j + 1 scored
        return joined((self.query_ids, self.query_mask), (self.answer_ids[:, :-1], answer_mask))

    @property
    def teacher_forced_prompts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The demonstrations followed by :attr:`query_inputs` ``[N, M + Q + A - 1]``, with its mask:
        the whole prompt in one pass, what the converted state plus the query must reproduce."""
        return joined((self.demo_ids, self.demo_mask), self.query_inputs)

    @property
    def demo_mask(self) -> torch.Tensor | None:
        """``[N, M]`` 1 at demonstration tokens, 0 at padding; ``None`` when nothing is padded."""
        if self.shot_index is None or bool((self.shot_index >= 0).all()):
            return None
        return (self.shot_index >= 0).long()

    @property
    def prompt_mask(self) -> torch.Tensor | None:
        """The attention mask of ``prompts`` (``None`` when nothing is padded)."""
        return joined((self.demo_ids, self.demo_mask), (self.query_ids, self.query_mask))[1]

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """``[N]`` real tokens of each prompt (demonstrations and query, padding excluded) and, for
        an open-vocabulary answer, of all its tokens but the last (the teacher-forced input)."""
        mask = self.prompt_mask
        lengths = torch.full((len(self),), self.prompts.shape[1]) if mask is None else mask.sum(1).cpu()
        return lengths + self.targets[1].sum(1).cpu() - 1

    def drop_longest(self, max_tokens: int) -> tuple["Episodes", int]:
        """Episodes whose prompts fit ``max_tokens``: from each episode that is too long, its
        longest demonstrations are dropped (the others keep their order) until it fits. Returns
        the episodes and the number of demonstrations dropped in all. ValueError when a query
        alone is too long, or when the demonstrations are not split (``shot_index`` is None)."""
        lengths = self.prompt_lengths
        if not len(self) or int(lengths.max()) <= max_tokens:
            return self, 0
        if self.shot_index is None:
            raise ValueError("drop_longest needs episodes that know their demonstrations (shot_index)")
        pad = int(self.demo_ids[self.shot_index < 0][0]) if bool((self.shot_index < 0).any()) else 0
        qmask = torch.ones_like(self.query_ids) if self.query_mask is None else self.query_mask
        demos, queries, dropped = [], [], 0
        for i in range(len(self)):
            row, index = self.demo_ids[i], self.shot_index[i]
            shots = [row[index == s].tolist() for s in range(int(index.max()) + 1 if index.numel() else 0)]
            query = self.query_ids[i][qmask[i].bool()].tolist()
            budget = max_tokens - len(query) - int(self.targets[1][i].sum()) + 1
            if budget < 0:
                raise ValueError(f"a query of {len(query)} tokens (and its answer) alone is longer than {max_tokens} tokens")
            keep = list(range(len(shots)))
            while sum(len(shots[s]) for s in keep) > budget:
                keep.remove(max(keep, key=lambda s: len(shots[s])))
                dropped += 1
            demos.append([shots[s] for s in keep])
            queries.append(query)
        answers = None if self.answer_ids is None else [a[m].tolist() for a, m in zip(*self.targets)]
        fitted = Episodes.from_lists(demos, queries, self.answers.tolist(), self.candidates.tolist(), pad_id=pad,
                                     answer_tokens=answers)
        return fitted.to(self.demo_ids.device), dropped

    def demonstrations(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The demonstrations one by one: ids ``[N, k, L]`` left-padded to the longest, and
        their mask (``None`` when none is padded)."""
        if self.shot_index is None:
            return self.demo_ids[:, None, :], None
        N, M = self.shot_index.shape
        k = int(self.shot_index.max()) + 1 if self.shot_index.numel() else 0
        member = self.shot_index[:, None, :] == torch.arange(k, device=self.shot_index.device)[None, :, None]
        lengths = member.sum(-1)  # [N, k]
        L = int(lengths.max()) if k else 0
        column = L - lengths[..., None] + member.long().cumsum(-1) - 1  # left-padded place
        ids = self.demo_ids.new_zeros(N, k, L)
        mask = torch.zeros_like(ids)
        n, d, t = member.nonzero(as_tuple=True)
        ids[n, d, column[n, d, t]] = self.demo_ids[n, t]
        mask[n, d, column[n, d, t]] = 1
        return ids, None if bool(mask.all()) else mask
