"""The embedded tiny PixArt-alpha: a real pipeline, built offline and deterministically from a seed.

It has the real block structure of PixArt-XL-2-1024-MS (adaLN-single, cross-attention, learned
sigma: 8 output channels, `sample_size` 128 so the 1024-MS micro-conditions and the pipeline's
resolution binning are active), a factor-8 AutoencoderKL, a small T5 encoder and a sentencepiece
tokenizer trained here. `write_tiny_pipeline(dir)` saves it in exactly the Hub checkpoint layout
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/), so everything that
loads it goes through the same `from_pretrained` path as the real weights.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_TINY = "embedded:tiny"
TINY_VERSION = 1  # bump when the tiny architecture changes: the cached folder name carries it

# Sizes of the tiny kit. As in the real model: caption_channels = the T5 width (4096 for T5-XXL),
# cross_attention_dim = the transformer width (1152 there), and that width divisible by 3 (the
# 1024-MS size embedders give a third of it each to height, width and aspect ratio).
T5_WIDTH = 32
TINY_TRANSFORMER = dict(
    num_attention_heads=3,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    cross_attention_dim=48,
    caption_channels=T5_WIDTH,
    sample_size=128,
    patch_size=2,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    use_additional_conditions=None,  # diffusers turns this on because sample_size == 128
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=256,
    scaling_factor=0.18215,  # the SD VAE's factor, as in PixArt's vae/config.json
    force_upcast=True,
)
# The scheduler PixArt-alpha ships: DPM-Solver++ over the linear 1e-4..0.02 training schedule.
PIXART_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    solver_order=2,
    algorithm_type="dpmsolver++",
    lower_order_final=True,
)

# Words the tiny tokenizer learns pieces from: the sample captions plus everyday prompt words, so
# that arbitrary English prompts tokenize into real pieces rather than <unk>.
_CORPUS = """
a an the of in on at with and or to from by for under over near beside behind above below
photo photograph picture image painting drawing illustration render portrait close-up closeup view
cat kitten dog puppy bird horse fish animal person man woman child astronaut space suit flag
coffee cup mug saucer table wooden spoon rocket launch smoke fire sky cloud clouds sun moon star stars
galaxy galaxies deep field telescope hubble retina eye fundus blood vessels camera cameraman tripod coat
street city house building tree trees forest mountain river lake sea ocean beach sand grass field flower
red orange yellow green blue purple pink white black gray grey brown golden silver dark bright light
big small tall short old young happy sad sleeping sitting standing running flying looking holding
morning evening night sunset sunrise winter summer autumn spring snow rain fog
detailed sharp blurry soft vivid colorful monochrome black-and-white high quality 4k 8k cinematic
style of art artwork oil watercolor pencil sketch anime cartoon realistic photorealistic
sks ohwx token trigger concept subject object background foreground texture pattern
one two three four five many some
"""


def _tokenizer_sentences() -> list[str]:
    words = _CORPUS.split()
    sentences = [" ".join(words[i : i + 12]) for i in range(0, len(words))]
    sample_dir = Path(__file__).resolve().parent.parent / "data" / "sample"
    if sample_dir.is_dir():  # captions of the shipped sample set, when run from a checkout
        sentences += [p.read_text(encoding="utf-8").strip() for p in sorted(sample_dir.glob("*.txt"))]
    return sentences * 4


def train_tiny_spiece_model() -> bytes:
    """Train a small Unigram sentencepiece model (T5's tokenizer format); returns spiece.model bytes."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_sentences()),
        model_writer=out,
        vocab_size=600,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,  # one thread: the same pieces on every machine
        seed_sentencepiece_size=100000,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,  # T5: pad 0, </s> 1, <unk> 2, no <s>
        minloglevel=2,
    )
    return out.getvalue()


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny PixArtAlphaPipeline in memory (random init, deterministic from `seed`)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # T5Tokenizer(vocab_file=...) silently ignores the file in transformers 5.x; loading a
        # folder that holds spiece.model converts it properly.
        Path(tmp, "spiece.model").write_bytes(train_tiny_spiece_model())
        tokenizer = T5Tokenizer.from_pretrained(tmp, extra_ids=0, model_max_length=120)

    torch.manual_seed(seed)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.1,  # as in T5-XXL's config; we always run it in eval()
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    transformer = PixArtTransformer2DModel(**TINY_TRANSFORMER)
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer, scheduler=scheduler
    )


def write_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `directory` in the Hub layout. Atomic: built in a temp dir, renamed."""
    directory = Path(directory).resolve()
    if (directory / "model_index.json").is_file():
        raise FileExistsError(f"{directory} already holds a pipeline (model_index.json); choose another folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent))
    try:
        pipe = build_tiny_pipeline(seed)
        pipe.save_pretrained(tmp, safe_serialization=True)
        # The Hub's tokenizer/ folder holds spiece.model; keep ours in the same layout.
        (tmp / "tokenizer" / "spiece.model").write_bytes(train_tiny_spiece_model())
        if directory.exists() and not any(directory.iterdir()):
            directory.rmdir()
        try:
            os.replace(tmp, directory)
        except OSError:
            if (directory / "model_index.json").is_file():  # a concurrent writer finished first
                raise FileExistsError(f"{directory} was written concurrently") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def embedded_tiny_path(seed: int = 0) -> Path:
    """Folder of the embedded tiny pipeline, written on first use under $PIXART_TUNE_HOME
    (default ~/.cache/pixart_tune); it is deterministic, so every machine gets the same weights."""
    home = Path(os.environ.get("PIXART_TUNE_HOME", Path.home() / ".cache" / "pixart_tune"))
    target = home / f"tiny-pixart-v{TINY_VERSION}-seed{seed}"
    if not (target / "model_index.json").is_file():
        try:
            write_tiny_pipeline(target, seed)
        except FileExistsError:  # another process won the race: its folder is complete
            pass
    return target
