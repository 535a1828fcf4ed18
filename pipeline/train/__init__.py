"""Fine-tuning an image-text-to-text model on the MG-Geo shards (`mg-geo train`).

config.py  TrainConfig: every flag, the stage presets (stage 1 Meta; stage 2 Clue + Dialogue + Meta replay)
data.py    webdataset streams per part, split across ranks/workers, weighted mixing, resumable position
collate.py chat template -> input ids + labels on trainable assistant tokens only, batch padding
trainer.py the loop (accelerate), checkpoints (weights, optimizer, scheduler, RNG, data position), logs

torch/transformers are imported only here, never by the build, so the build runs without the
`train` extra.
"""
