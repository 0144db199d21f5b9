"""The bf16 residual stream (stream.py): diffusers' maths without autocast, a bf16 stream under it."""

import pytest
import torch
from conftest import REPO, tiny_out_and_grads

from pixart_tune.stream import use_bf16_stream

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_full(tiny_base):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer").requires_grad_(True)


def _block_output_dtypes(model, run) -> list[torch.dtype]:
    dtypes = []
    hooks = [b.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype)) for b in model.transformer_blocks]
    run()
    for h in hooks:
        h.remove()
    return dtypes


def test_without_autocast_it_is_diffusers_forward(tiny_base):
    """fp32 weights, no autocast: the table's cast is a no-op, so output and every gradient are
    diffusers' own, bit for bit."""
    ref = _tiny_full(tiny_base)
    model = _tiny_full(tiny_base)
    assert use_bf16_stream(model) == len(model.transformer_blocks) == 2
    ref_out, ref_grads = tiny_out_and_grads(ref)
    out, grads = tiny_out_and_grads(model)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)


def test_under_bf16_autocast_the_stream_is_bf16_and_close(tiny_base):
    """fp32 masters under bf16 autocast: diffusers' blocks hand on an fp32 stream, ours a bf16 one.
    The output stays within bf16's reach of the fp32 stream's, and the tables' gradients stay fp32
    and close to the plain path's."""
    ref = _tiny_full(tiny_base)
    model = _tiny_full(tiny_base)
    use_bf16_stream(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_dtypes = _block_output_dtypes(ref, lambda: tiny_out_and_grads(ref))
        ref_out, ref_grads = tiny_out_and_grads(ref)
        dtypes = _block_output_dtypes(model, lambda: tiny_out_and_grads(model))
        out, grads = tiny_out_and_grads(model)
    assert ref_dtypes == [torch.float32, torch.float32]  # what the change is for
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert (out.float() - ref_out.float()).abs().max() <= 0.02 * ref_out.float().abs().max()
    for name in ("transformer_blocks.0.scale_shift_table", "transformer_blocks.1.scale_shift_table"):
        assert grads[name].dtype == torch.float32  # the fp32 master's gradient
        err = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
        assert err < 0.05, (name, err.item())
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in ref_grads.values()]), dim=0
    )
    assert cos > 0.999


def test_gradient_checkpointing_calls_bind(tiny_base):
    """diffusers' gradient checkpointing calls each block with positional arguments: they bind to the
    stream's forward, and the gradients are the plain model's."""
    ref = _tiny_full(tiny_base)
    model = _tiny_full(tiny_base)
    use_bf16_stream(model)
    model.enable_gradient_checkpointing()
    ref_out, ref_grads = tiny_out_and_grads(ref)
    out, grads = tiny_out_and_grads(model)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_other_blocks_are_left_alone(tiny_base):
    """A block that is not PixArt's plain kind (here: feed-forward chunking on) keeps diffusers' forward."""
    model = _tiny_full(tiny_base)
    model.transformer_blocks[1].set_chunk_feed_forward(2, dim=1)
    assert use_bf16_stream(model) == 1
    assert "forward" in vars(model.transformer_blocks[0]) and "forward" not in vars(model.transformer_blocks[1])


@pytest.mark.parametrize(
    "settings, installed",
    [(["train.mixed_precision=bf16"], True),  # the default: on
     (["train.mixed_precision=bf16", "train.bf16_stream=false"], False),
     (["train.mixed_precision=no"], False)],  # fp32 runs keep diffusers' forward (it would change nothing)
)  # fmt: skip
def test_the_trainer_gives_full_fine_tunes_the_stream_under_bf16(settings, installed, tmp_path, tiny_home, monkeypatch):
    """Through train(): the stream is installed on every block exactly when bf16 autocast runs, and the
    run still writes a diffusers transformer with the usual keys (the masters are untouched)."""
    from diffusers import PixArtTransformer2DModel

    from pixart_tune import stream, train

    counts, original = [], stream.use_bf16_stream
    monkeypatch.setattr(stream, "use_bf16_stream", lambda model: counts.append(original(model)))
    final = train(REPO / "recipes" / "tiny-lora.yaml", [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}",
                  "train.log_with=none", "train.method=full", "train.steps=2", *settings], show_progress=False)  # fmt: skip
    assert counts == ([2] if installed else [])
    model = PixArtTransformer2DModel.from_pretrained(final)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
