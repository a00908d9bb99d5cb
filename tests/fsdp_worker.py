"""Train a tiny model for a few steps with the ICL and text measures on DEVICES CPU processes
under STRATEGY (ddp or fsdp2) in PRECISION (further arguments: "ac", activation checkpointing;
"meta", the model built on the meta device and drawn after sharding);
rank 0 writes the measures' figures and the full
final weights to OUT (torch.save). Used by tests/test_fsdp.py to compare sharded with DDP."""
import sys

import lightning.pytorch as pl
import torch

from lit_icl.callbacks import ICLConversionCallback
from lit_icl.data import AssociativeRecallDataModule
from lit_icl.model import TransformerConfig
from lit_icl.module import LitTransformerLM
from lit_icl.strategies import whole_model
from lit_icl.text_icl import TextICLCallback


class WithDocuments(AssociativeRecallDataModule):
    def heldout_documents(self, num_documents: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, self.vocab_size, (num_documents, 25), generator=gen)


if __name__ == "__main__":
    devices, strategy, precision, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = WithDocuments(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=64, num_val=8, num_heldout=21,
                       batch_size=4)
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=2, n_head=2, n_embd=16,
                                                block_size=32, attention=["linear", "softmax"], momentum=0.5),
                              lr=1e-2, warmup_steps=1, activation_checkpointing="ac" in sys.argv[5:],
                              meta_init="meta" in sys.argv[5:])
    icl = ICLConversionCallback(shots=[0, 2, 4], batch_size=4, finetune_lr=0.5)
    text = TextICLCallback(num_documents=7, batch_size=2, positions=(2, 20), prefix=9, num_features=32)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, precision=precision, max_steps=4,
                         val_check_interval=4, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[icl, text])
    trainer.fit(module, datamodule=dm)
    weights = {k: v.detach().cpu() for k, v in whole_model(module.model).state_dict().items()}
    tied = module.model.lm_head.weight is module.model.wte.weight
    if trainer.is_global_zero:
        torch.save({"icl": icl.results, "text": text.results, "weights": weights, "tied": tied,
                    "val_loss": float(trainer.callback_metrics["val/loss"])}, out)
