"""The recipe that recovers a linearized model's quality: attention transfer, then a short fine-tune.

    result = rewrite.distill.distill(model, plan, data, DistillConfig(...))
    result.module          # the linearized OptimizedModule, trained
    result.history         # losses per stage and step

1. Attention transfer (`transfer.py`): only the mixers' new parameters (decays, gates, convs,
   learned feature maps) train, so that each linearized layer's output matches the softmax
   attention it replaced (mean squared error, LoLCATs style): layer-local (each layer fed the
   teacher's inputs) or joint.
2. Fine-tune (`finetune.py`): LoRA adapters (peft) or every parameter, with next-token cross-entropy,
   KL divergence to the original model, or mean squared error to its outputs (encoders). LoRA
   adapters are merged into the base weights at the end unless `FinetuneConfig(merge=False)`.

Both stages checkpoint (`checkpoint.py`) and resume where they stopped, with the same result as
an uninterrupted run. The command line is `rewrite distill` (`cli.py`).
"""

from rewrite.distill.config import DistillConfig, FinetuneConfig, TransferConfig
from rewrite.distill.recipe import DistillResult, distill, main_output

__all__ = ["DistillConfig", "DistillResult", "FinetuneConfig", "TransferConfig", "distill", "main_output"]
