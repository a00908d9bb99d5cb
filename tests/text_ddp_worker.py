"""Fit a tiny LM on a TextDataModule with DEVICES CPU processes (DDP, gloo) and an empty cache;
each rank writes what it built, its tokenizer's hash and its first training batch as JSON.
Used by tests/test_text.py to check that the processes share one cache without racing."""
import json
import sys

import lightning.pytorch as pl
import torch

from lit_icl.data.text import TextDataModule
from lit_icl.data.tokenizer import tokenizer_sha
from lit_icl.model import TransformerConfig
from lit_icl.module import LitTransformerLM


class FirstBatch(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.ids = batch["input_ids"].tolist()


if __name__ == "__main__":
    devices, corpus, cache, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dm = TextDataModule(corpus=corpus, block_size=16, vocab_size=300, cache_dir=cache, batch_size=4, val_fraction=0.1)
    torch.manual_seed(0)
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=1, n_head=2, n_embd=16,
                                                block_size=16), warmup_steps=1)
    first = FirstBatch()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp", max_steps=2, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[first])
    trainer.fit(module, datamodule=dm)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"built": dm.built, "sha": tokenizer_sha(dm.tokenizer), "first": first.ids,
                   "train_blocks": dm.train_dataloader().size}, f)
