"""Loading the parts of a PixArt-alpha base model: a Hub id, a local folder in the Hub layout, or
the embedded tiny kit. Every caller goes through `resolve_base`, so the tiny kit takes exactly
the path real checkpoints take (`from_pretrained(<folder or id>, subfolder=...)`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import warnings
from pathlib import Path

import torch

from .tiny import EMBEDDED_TINY, embedded_tiny_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


# owner/name as the Hub spells repo ids: no leading '.', '/' or '~', no empty part, no spaces.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub repo id (it may still be a local path; callers check that first)."""
    return HUB_REPO_ID.match(name) is not None


class BaseModelError(ValueError):
    """The base model named in a recipe or on the command line cannot be used."""


def resolve_base(base: str) -> str:
    """Turn `model.base` into what `from_pretrained` takes: a local folder path or a Hub id."""
    if base == EMBEDDED_TINY:
        return str(embedded_tiny_path())
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BaseModelError(f"model.base {base!r} is a file; it must be a folder in the Hub layout or a Hub id")
        missing = [c for c in ("transformer",) if not (path / c).is_dir()]
        if missing:
            raise BaseModelError(
                f"model.base {base!r} is a folder but has no {missing[0]}/ subfolder; expected the Hub layout "
                "(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        return str(path.resolve())
    if looks_like_hub_id(base):
        return base  # a Hub id such as PixArt-alpha/PixArt-XL-2-1024-MS
    raise BaseModelError(
        f"model.base {base!r} is neither an existing folder nor a Hub id (owner/name) nor {EMBEDDED_TINY!r}"
    )


def component_identity(base: str, component: str, revision: str | None = None) -> str:
    """A short fingerprint of one component of a LOCAL base folder: its configs plus the names and
    sizes of its weight files (cache/keys.py adds sampled weight bytes, and handles Hub ids)."""
    h = hashlib.sha256(f"{component}|{revision}".encode())
    for f in sorted((Path(base) / component).iterdir()):
        if f.suffix == ".json":
            h.update(f.name.encode() + f.read_bytes())
        elif f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load_transformer(base: str, dtype: torch.dtype = torch.float32, revision: str | None = None):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(base, subfolder="transformer", torch_dtype=dtype, revision=revision)


def load_vae(base: str, dtype: torch.dtype = torch.float32, revision: str | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype, revision=revision)


def load_tokenizer(base: str, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base, subfolder="tokenizer", revision=revision)


def load_text_encoder(base: str, dtype: torch.dtype = torch.float32, quantization: str = "none", revision=None):
    """T5 encoder in eval mode (its config has dropout 0.1). Never fp16: T5 overflows there.

    `quantization` '8bit' / '4bit' loads it through bitsandbytes, for cards with little memory. In
    4 bit, linears whose input is not a whole number of bitsandbytes' 64-value blocks stay in `dtype`:
    bitsandbytes 0.49+ cannot run them on the CPU. T5-XXL has none (4096 and 10240 wide); the tiny
    kit's T5 (32 wide) has several.
    """
    from transformers import T5EncoderModel

    if dtype == torch.float16:
        raise BaseModelError("T5 must not run in fp16 (it overflows); use fp32 or bf16 (data.t5_dtype)")
    kwargs = {}
    if quantization == "8bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization == "4bit":
        from transformers import BitsAndBytesConfig

        narrow = _linears_off_the_4bit_blocks(base, revision)  # none in T5-XXL: transformers' own choice stays
        if not torch.cuda.is_available() and importlib.util.find_spec("kernels") is None:
            # bitsandbytes logs this at import on some CPUs; the CLI drops that notice (it showed on every CPU run)
            warnings.warn("4-bit T5 on the CPU: bitsandbytes' 4-bit GEMM is faster with the `kernels` package "
                          "(pip install kernels); it runs without it", stacklevel=2)  # fmt: skip
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=narrow or None,  # (4-bit too, despite the name)
        )  # fmt: skip
    model = T5EncoderModel.from_pretrained(
        base, subfolder="text_encoder", dtype=dtype, revision=revision, **kwargs
    )
    return model.eval().requires_grad_(False)


BNB_4BIT_BLOCK = 64  # bitsandbytes' 4-bit quantisation block (its default blocksize)


def _linears_off_the_4bit_blocks(base: str, revision: str | None) -> list[str]:
    """Names of the T5 encoder's linears whose input width is not a multiple of BNB_4BIT_BLOCK (built
    on the meta device from the config: no weights read)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_pretrained(base, subfolder="text_encoder", revision=revision)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.in_features % BNB_4BIT_BLOCK]  # fmt: skip


def load_scheduler_config(base: str, revision: str | None = None) -> dict:
    folder = Path(base) / "scheduler"
    if folder.is_dir():
        return json.loads((folder / "scheduler_config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(base, "scheduler_config.json", subfolder="scheduler", revision=revision)).read_text())
