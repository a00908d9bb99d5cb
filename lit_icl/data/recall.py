"""Associative recall (the associative-recall task of the linear-attention literature,
e.g. Arora et al. 2024, Zoology): a random key->value map shown as pairs, then keys are asked.

Token layout: ``0`` = pad, keys ``1..n_keys``, values ``n_keys+1..n_keys+n_values``.

A training sequence has ``n_pairs + n_queries`` slots of two tokens ``key value``. Each sequence
draws a fresh map over distinct keys and a shot count ``k ~ U{1..n_pairs}``; the first ``k``
slots show the pairs, the remaining ``n_pairs + n_queries - k`` slots ask keys drawn uniformly
from the shown ones, followed by their value. Labels (already shifted: ``labels[t]`` is the
target when predicting at position ``t``) are set only at the key of a query slot and equal its
value; everything else is ``-100``. The loss therefore measures recall alone, and the answer is
only in the context, so a model without it is at chance ``1 / n_values``.

Streams: train, validation, test and held-out episodes come from generators seeded by
``SeedSequence([seed, stream])`` with distinct streams 0, 1, 3 and 2, so the held-out maps are
never seen in training (see :mod:`lit_icl.data.synthetic`).
"""

from __future__ import annotations

from lit_icl.data.synthetic import MapRecallDataModule

__all__ = ["AssociativeRecallDataModule"]


class AssociativeRecallDataModule(MapRecallDataModule):
    """Synthetic associative-recall sequences plus held-out ICL episodes.

    A held-out episode shows ``n_shots`` pairs (``M = 2 * n_shots`` tokens), asks one of their
    keys (``Q = 1``); the answer is its value and the candidates are all value tokens.

    Args:
        n_pairs: most pairs shown in a sequence (the shot count ``k`` is drawn in ``1..n_pairs``).
        n_keys: size of the key alphabet (keys in a map are distinct, so ``n_pairs <= n_keys``).
        n_values: size of the value alphabet (values may repeat within a map).
        n_queries: least number of query slots; a sequence has ``2 * (n_pairs + n_queries)`` tokens.
        **kwargs: ``num_train``, ``num_val``, ``num_heldout``, ``batch_size``, ``num_workers``,
            ``seed``: see :class:`~lit_icl.data.synthetic.SyntheticICLDataModule`.
    """

    task_name = "recall"
    slot_layout = ("k", "v")
    key_base = 1

    def __init__(
        self,
        n_pairs: int = 8,
        n_keys: int = 32,
        n_values: int = 32,
        n_queries: int = 8,
        **kwargs,
    ) -> None:
        super().__init__(n_pairs, n_keys, n_values, n_queries, names=("n_pairs", "n_keys", "n_values", "n_queries"),
                         **kwargs)

    @property
    def value_base(self) -> int:
        return 1 + self.n_keys

    @property
    def vocab_size(self) -> int:
        """Pad + keys + values."""
        return 1 + self.n_keys + self.n_values
