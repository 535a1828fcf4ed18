"""Fine-tuning an image-text-to-text model on the MG-Geo shards (`mg-geo train`).

config.py  TrainConfig: every flag, the stage presets (stage 1 Meta; stage 2 Clue + Dialogue + Meta replay)
data.py      shard streams per part, split across ranks/workers, weighted mixing, batches built in the
             workers, a position (shard, offset, buffer refs) a resumed run seeks to
collate.py   chat template -> input ids + labels on trainable assistant tokens only; padding or packing
step.py      one optimizer step: loss weighted by label tokens, packed-row positions
speed.py     optional paths: Liger, selective checkpointing, compile, bf16 with fp32 master weights
attention.py one-call vision window attention (--vision-attn windows)
trainer.py   the loop (accelerate), checkpoints (weights, optimizer, scheduler, RNG, data position), logs

torch/transformers are imported only here, never by the build, so the build runs without the
`train` extra.
"""
