"""Label-mapping classification (in the style of Dai et al. 2023's classification tasks): a fresh random map from input words to K labels.

Token layout: ``0`` = pad, ``1`` = ``->`` (the arrow), ``2`` = ``;`` (the delimiter), label tokens
``3..n_labels+2``, input words ``n_labels+3..n_labels+n_words+2``.

Each sequence (and each held-out episode) draws a new map: ``n_pairs`` distinct input words, each
assigned a label uniformly among the ``n_labels`` label tokens. A demonstration is the four
tokens ``x -> y ;``; a training sequence shows ``k ~ U{1..n_pairs}`` demonstrations, then query
slots ``x -> y ;`` ask words drawn uniformly from the shown ones, with the label scored at the
arrow (``labels`` is ``y`` there and ``-100`` everywhere else). A held-out episode's query is
``x ->`` (``Q = 2``), its answer ``y``, its candidates the ``n_labels`` label tokens. As the map is
fresh in every episode, zero-shot accuracy is at chance ``1 / n_labels`` by construction, while
finetuning on the demonstrations can learn the map too (Dai et al. 2023's ICL-vs-finetuning comparison).
"""

from __future__ import annotations

from lit_icl.data.synthetic import MapRecallDataModule

__all__ = ["ARROW", "DELIMITER", "LabelMappingDataModule"]

ARROW, DELIMITER = 1, 2


class LabelMappingDataModule(MapRecallDataModule):
    """Label-mapping classification sequences plus held-out ICL episodes.

    Args:
        n_pairs: most demonstrations shown in a sequence (shots drawn in ``1..n_pairs``).
        n_words: size of the input-word alphabet (the words of a map are distinct).
        n_labels: K, the number of label tokens (the candidates; chance is ``1 / K``).
        n_queries: least number of query slots; a sequence has ``4 * (n_pairs + n_queries)`` tokens.
        **kwargs: ``num_train``, ``num_val``, ``num_heldout``, ``batch_size``, ``num_workers``,
            ``seed``: see :class:`~lit_icl.data.synthetic.SyntheticICLDataModule`.
    """

    task_name = "label_mapping"
    hparams_ignore = ("names", "n_keys", "n_values")  # MapRecallDataModule's names of n_words, n_labels
    slot_layout = ("k", ARROW, "v", DELIMITER)
    value_base = 3

    def __init__(
        self,
        n_pairs: int = 8,
        n_words: int = 32,
        n_labels: int = 4,
        n_queries: int = 8,
        **kwargs,
    ) -> None:
        super().__init__(n_pairs, n_words, n_labels, n_queries, names=("n_pairs", "n_words", "n_labels", "n_queries"),
                         **kwargs)

    @property
    def n_words(self) -> int:
        return self.n_keys

    @property
    def n_labels(self) -> int:
        return self.n_values

    @property
    def key_base(self) -> int:
        return self.value_base + self.n_values

    @property
    def vocab_size(self) -> int:
        """Pad, arrow, delimiter, labels, words."""
        return 3 + self.n_values + self.n_keys
