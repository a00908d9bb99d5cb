"""Run the text measures once (trainer.validate) on DEVICES CPU processes; rank 0 writes the
logged figures as JSON. Used by tests/test_text_icl.py to compare 2 processes with 1, in float64
(the ranks see other batch shapes than one process does; only float64 makes the comparison
independent of rounding). 7 documents: the ranks' shares differ in size."""
import json
import sys

import lightning.pytorch as pl
import torch

from lit_icl.data import AssociativeRecallDataModule
from lit_icl.model import TransformerConfig
from lit_icl.module import LitTransformerLM
from lit_icl.text_icl import TextICLCallback


class WithDocuments(AssociativeRecallDataModule):
    def heldout_documents(self, num_documents: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, self.vocab_size, (num_documents, 25), generator=gen)


if __name__ == "__main__":
    devices, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dm = WithDocuments(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=32, num_val=8, batch_size=4)
    torch.manual_seed(0)  # the same weights in every process
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=2, n_head=2, n_embd=16,
                                                block_size=32, attention=["gla", "softmax"], momentum=0.5))
    cb = TextICLCallback(num_documents=7, batch_size=2, positions=(2, 20), prefix=9, num_features=32)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         precision="64-true", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    trainer.validate(module, datamodule=dm)
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump(cb.results, f)
