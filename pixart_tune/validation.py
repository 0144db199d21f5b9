"""Validation images during training: fixed prompts and seeds, one grid PNG per validation step.

The prompts are encoded by T5 once, when the run starts, so T5 (19 GB for T5-XXL) is not kept in
memory during training; the VAE waits on the CPU and visits the GPU only while decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .config import Config
from .data.captions import process_caption
from .models import DTYPES, load_text_encoder, load_tokenizer, load_vae


def encode_prompts(cfg: Config, base: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 features of the validation prompts and of "" (the negative prompt): embeds (P+1, L, D) fp32
    on the CPU, masks (P+1, L). T5 is loaded for this and dropped again."""
    tokenizer = load_tokenizer(base, cfg.model.revision)
    t5 = load_text_encoder(base, DTYPES[cfg.data.t5_dtype], cfg.data.t5_quantization, cfg.model.revision)
    if cfg.data.t5_quantization == "none":
        t5.to(device)
    # Same text processing as the cached captions (lowercasing / cleaning), so prompts match training.
    texts = [process_caption(p, clean=cfg.data.clean_caption) for p in cfg.validation.prompts] + [""]
    tok = tokenizer(texts, max_length=cfg.data.max_tokens, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        embeds = t5(tok.input_ids.to(t5.device), attention_mask=tok.attention_mask.to(t5.device))[0]
    return embeds.float().cpu(), tok.attention_mask


def make_validator(cfg: Config, base: str, device, main: bool, sharded: bool) -> Validator | None:
    """The Validator of this process, or None. Under FSDP every process takes part in sampling (each
    forward gathers weights), but T5 runs once, on the main process; the others receive its features."""
    if not (main or sharded):
        return None
    prompts = encode_prompts(cfg, base, device) if main else None
    if sharded:
        from accelerate.utils import broadcast_object_list

        prompts = broadcast_object_list([prompts], from_process=0)[0]
    return Validator(cfg, base, device, prompts)


class Validator:
    """Generates the recipe's validation prompts × seeds with the model being trained.

    `prompts`: encode_prompts' result (make_validator computes it on the main process only and
    hands it to the others under FSDP, so T5 is loaded once, not once per GPU)."""

    def __init__(self, cfg: Config, base: str, device, prompts: tuple[torch.Tensor, torch.Tensor]):
        from diffusers import DPMSolverMultistepScheduler

        self.cfg, self.device = cfg.validation, torch.device(device)
        self.embeds, self.masks = prompts
        self.vae = load_vae(base, DTYPES[cfg.model.weight_dtype], cfg.model.revision).eval()
        self.scheduler = DPMSolverMultistepScheduler.from_pretrained(base, subfolder="scheduler", revision=cfg.model.revision)

    @torch.no_grad()
    def __call__(self, transformer, step: int, out_dir: Path, save: bool = True) -> Path:
        """One grid PNG: a row per prompt, a column per seed. `transformer` is the live (unwrapped) model.

        Under FSDP every process samples (each forward gathers the sharded weights) and one saves."""
        from diffusers import PixArtAlphaPipeline

        was_training = transformer.training
        transformer.eval()
        try:
            self.vae.to(self.device)
            pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=self.vae, transformer=transformer,
                                       scheduler=self.scheduler)  # fmt: skip
            pipe.set_progress_bar_config(disable=True)
            dtype = next(transformer.parameters()).dtype
            null_e, null_m = self.embeds[-1:].to(self.device, dtype), self.masks[-1:].to(self.device)
            rows = []
            for i in range(len(self.cfg.prompts)):
                row = []
                for seed in self.cfg.seeds:
                    latents = pipe(
                        prompt_embeds=self.embeds[i : i + 1].to(self.device, dtype),
                        prompt_attention_mask=self.masks[i : i + 1].to(self.device),
                        negative_prompt=None, negative_prompt_embeds=null_e, negative_prompt_attention_mask=null_m,
                        num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance_scale,
                        height=self.cfg.height, width=self.cfg.width,
                        # An explicit size is generated as is (e.g. the training buckets' size); without
                        # one, the model's default size with the pipeline's aspect-ratio binning.
                        use_resolution_binning=self.cfg.height is None and self.cfg.width is None,
                        generator=torch.Generator(device="cpu").manual_seed(seed),
                        # Decoded below: the latents come in the transformer's dtype (fp32 master weights in
                        # a full fine-tune) while the VAE has the base's (bf16), which the pipeline would mix.
                        # (Binning keeps the default square size as is, so no resize is owed after decoding.)
                        output_type="latent",
                    ).images  # fmt: skip
                    scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
                    pixels = self.vae.decode(scaled, return_dict=False)[0]
                    row.append(pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0])
                rows.append(row)
        finally:  # back to training as it was, also when sampling fails (e.g. out of memory)
            self.vae.to("cpu")
            return_to_shards(transformer)
            transformer.train(was_training)
        path = out_dir / f"step-{step:06d}.png"
        return _save_grid(rows, path) if save else path


def return_to_shards(model: torch.nn.Module) -> None:
    """Put FSDP2's gathered weights back in their shards after forwards without a backward (sampling).

    recipes/accelerate/fsdp2.yaml keeps each block's gathered weights from its forward to its backward
    (`fsdp_reshard_after_forward: false`: one all-gather per block a step instead of two). A forward
    with no backward after it leaves them gathered: plain tensors where the optimizer and the
    checkpoint expect each process's shard, and a checkpoint taken then hangs in its collectives
    (scripts/fsdp_check.py's validation at step 4, before its checkpoint). A no-op for a model that FSDP
    does not shard, or whose weights are in their shards already."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch before 2.6 keeps it here
        from torch.distributed._composable.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _save_grid(rows: list[list[Image.Image]], path: Path) -> Path:
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * w, r * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path
