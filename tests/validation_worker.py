"""make_validator under 2 CPU processes (gloo) as FSDP runs it (`sharded`): only the main process may
load T5; every process must end with the same prompt features. Launched by tests/test_training.py.

    accelerate launch --multi_gpu --num_processes 2 validation_worker.py TINY_BASE OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from pixart_tune import validation
from pixart_tune.config import load_config


def main(base: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)
    main_process = accelerator.is_main_process
    loads = []
    real = validation.load_text_encoder

    def counted(*args, **kwargs):
        loads.append(1)
        return real(*args, **kwargs)

    validation.load_text_encoder = counted
    cfg = load_config(None, {"model.base": base, "validation.prompts": ["a red cube", "a cat"]})
    v = validation.make_validator(cfg, base, accelerator.device, main_process, sharded=True)
    torch.save({"embeds": v.embeds, "masks": v.masks, "t5_loads": len(loads)},
               Path(out) / f"rank{accelerator.process_index}.pt")  # fmt: skip
    accelerator.wait_for_everyone()  # as the trainer ends: every process done before the group goes down
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
