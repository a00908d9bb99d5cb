"""Run the ICL callback once (trainer.validate) on DEVICES CPU processes; rank 0 writes the
metrics as JSON. Used by tests/test_callbacks.py to compare 2 processes with 1. In float64: the
ranks see other batch shapes than one process does, and float32 rounding could flip an argmax
near-tie (an accuracy), so only float64 makes the comparison independent of the CPU."""
import json
import sys

import lightning.pytorch as pl
import torch

from lit_icl.callbacks import ICLConversionCallback
from lit_icl.data import AssociativeRecallDataModule
from lit_icl.model import TransformerConfig
from lit_icl.module import LitTransformerLM

if __name__ == "__main__":
    devices, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dm = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=32,
                                     num_val=8, num_heldout=21, batch_size=4)
    torch.manual_seed(0)  # the same weights in every process
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=2, n_head=2,
                                                n_embd=16, block_size=32, momentum=0.5))
    cb = ICLConversionCallback(shots=[0, 2, 4], batch_size=4, finetune_lr=0.5)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         precision="64-true", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.validate(module, datamodule=dm)
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump(cb.results, f)
