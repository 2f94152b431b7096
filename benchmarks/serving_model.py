"""A model for the serving and engine speed benchmarks: one generated product of 300 640x480 images.

    python benchmarks/serving_model.py cpu runs/speed_cpu            # the default preset
    python benchmarks/serving_model.py cpu-faithful runs/speed_faithful
    python benchmarks/serving_model.py cpu runs/speed_cpu4000 score.memory_coreset=4000   # overrides as KEY=VALUE

One epoch and no step floor: inference speed does not depend on how long the expert trained, only on the
preset's sizes (backbone, D, blocks, patch memory: 10 % of the training patches, at most 20,000).
"""

import sys

from moleflow import Config, MoleFlow
from moleflow.bench.speed import generated_images

preset, out = sys.argv[1], sys.argv[2]
config = Config.from_preset(preset).with_overrides({"train.epochs": 1, "train.min_steps": 0})
model = MoleFlow(config.with_overrides(sys.argv[3:]))
model.fit_task(generated_images(300, 640, 480), name="bench")
model.save(out)
