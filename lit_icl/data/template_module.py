"""TemplateDataModule: template-based classification tasks and no training corpus, to measure the
in-context learning of a model trained elsewhere (a pretrained checkpoint under ``lit-icl validate``).

The tokenizer is the model's: a ``tokenizer.json``, a Hugging Face model directory holding one, a
named model (``smollm2-135m``, fetched on first use, see :mod:`lit_icl.sources`), or a
checkpoint of a run with a TextDataModule (read by :mod:`lit_icl.data.tokenizer`). The held-out
episodes are the tasks' template episodes (:class:`~lit_icl.data.templates.TemplateHeldout`), as
for a TextDataModule. The validation batches are the tasks' validation examples, one per row, each
the template filled with its text and label word (a demonstration as the episodes show it),
truncated to ``block_size + 1`` tokens: ``input_ids`` right-padded (a causal model's earlier
positions do not see the padding) and ``labels`` the next tokens, ``-100`` at padding
(:func:`~lit_icl.data.batches.next_token_batch`), so the validation loss is the
language-modelling loss on the formatted examples.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import lightning.pytorch as pl
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lit_icl.data.batches import next_token_batch
from lit_icl.data.synthetic import check_at_least
from lit_icl.data.templates import TemplateHeldout, TemplateTask
from lit_icl.data.tokenizer import read_tokenizer
from lit_icl.sources import SOURCES, default_cache_dir

__all__ = ["TemplateDataModule"]


class TemplateDataModule(TemplateHeldout, pl.LightningDataModule):
    """Template tasks for ICL evaluation, with the tasks' formatted validation examples as the
    validation set (no training data: for ``lit-icl validate``).

    Args:
        templates: required: template tasks (:class:`~lit_icl.data.templates.TemplateTask` or
            their keyword dicts); ``source`` may be a named source (``mr``, ``bbc``).
        tokenizer: required: a ``tokenizer.json``, a Hugging Face model directory, a named model
            (``smollm2-135m``) or a checkpoint of a run with a TextDataModule.
        num_heldout: default number of held-out episodes per task.
        batch_size: validation examples per batch (per process under DDP).
        block_size: the longest validation example, in tokens (longer ones are truncated).
        cache_dir: where the tasks' datasets are prepared (``<cache_dir>/hf``); ``None``:
            ``$LIT_ICL_CACHE`` or ``~/.cache/lit_icl``.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        templates: Sequence[TemplateTask] = (),
        tokenizer: str | None = None,
        num_heldout: int = 256,
        batch_size: int = 16,
        block_size: int = 512,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not templates:
            raise ValueError(f"{owner}: templates are required: at least one template task (data.init_args.templates)")
        if not tokenizer:
            raise ValueError(f"{owner}: tokenizer is required: a tokenizer.json, a model directory, a checkpoint or a "
                             f"named model {sorted(n for n, s in SOURCES.items() if s.kind == 'model')}")
        check_at_least(owner, [("num_heldout", num_heldout, 1), ("batch_size", batch_size, 1),
                               ("block_size", block_size, 1), ("num_workers", num_workers, 0)])
        self.cache_dir = cache_dir or default_cache_dir()
        self.save_hyperparameters(ignore=["templates"])
        self._set_tasks(templates, self.cache_dir)
        self.tokenizer_spec, self.num_heldout, self.batch_size = tokenizer, num_heldout, batch_size
        self.block_size, self.num_workers = block_size, num_workers
        self._tokenizer: Tokenizer | None = None
        self._rows: list[list[int]] | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (a named model is fetched on first use)."""
        if self._tokenizer is None:
            self._tokenizer = read_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return self.tokenizer.get_vocab_size()

    @property
    def seq_len(self) -> int:
        """The longest validation example: ``block_size`` tokens."""
        return self.block_size

    def prepare_data(self) -> None:
        """Fetch the tokenizer and load every task's examples (downloads happen here)."""
        self.tokenizer
        self.load_tasks()

    def validation_rows(self) -> list[list[int]]:
        """Token ids of every task's validation examples, formatted with their label words, in
        task order, each at most ``block_size + 1`` tokens (rows shorter than 2 are left out)."""
        if self._rows is None:
            texts = []
            for name in self.tasks.names():
                examples = self.tasks.examples(name)
                texts += [examples.format(t, label) for t, label in zip(examples.eval_texts, examples.eval_labels)]
            rows = [e.ids[: self.block_size + 1] for e in self.tokenizer.encode_batch(texts)]
            self._rows = [r for r in rows if len(r) >= 2]
        return self._rows

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.validation_rows(), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=partial(next_token_batch, pad_id=self.pad_id))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
