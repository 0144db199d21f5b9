"""The training engine on the tiny kit: resume after SIGKILL and Ctrl-C, 2-process equivalence,
the non-finite guard, optimisers, schedules, EMA, run-directory files, and a learning test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_same_tensors
from PIL import Image
from safetensors.torch import load_file

RECIPE = REPO / "recipes" / "tiny-lora.yaml"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_home):
    return tmp_path_factory.mktemp("cache")


def _overrides(run: Path, cache: Path, *extra: str) -> list[str]:
    return [f"output_dir={run}", f"data.cache_dir={cache}", "train.log_with=none", *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "trainable.safetensors"
    return load_file(str(folder / name))


def _launch_two_cpu_processes(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of `args` on 2 CPU processes (gloo); the test asserts on the result."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              *args]  # fmt: skip
    return subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


RESUME = ["train.steps=24", "train.checkpoint_every=8", "train.ema_decay=0.9", "train.lr_scheduler=cosine",
          "train.warmup_steps=3"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    from pixart_tune import train

    run = tmp_path_factory.mktemp("straight")
    return train(RECIPE, _overrides(run, cache_dir, *RESUME), show_progress=False)


def test_resume_after_sigkill_matches_uninterrupted(uninterrupted, tmp_path, cache_dir):
    from pixart_tune import train

    run = tmp_path / "killed"
    args = [sys.executable, "-m", "pixart_tune", "train", str(RECIPE), *_overrides(run, cache_dir, *RESUME)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-000008" / "state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "final").exists()

    resumed = train(RECIPE, _overrides(run, cache_dir, *RESUME, "resume=latest"), show_progress=False)
    assert_same_tensors(_weights(resumed), _weights(uninterrupted))  # EMA weights (final/)
    assert_same_tensors(_weights(run / "final-raw"), _weights(uninterrupted.parent / "final-raw"))


def test_resume_on_two_processes_goes_on_from_the_next_epoch(uninterrupted, tmp_path, cache_dir):
    """One process's checkpoint, saved mid-epoch, resumed by 2 CPU processes (as when a run moves to
    more GPUs): the weights, optimizer and step carry on; the batch order restarts at the next epoch,
    with a warning naming what changed."""
    checkpoint = uninterrupted.parent / "checkpoints" / "step-000008"
    saved = json.loads((checkpoint / "state.json").read_text())["sampler"]
    assert saved["world_size"] == 1 and saved["batches_consumed"] > 0  # mid-epoch: something to skip
    run = tmp_path / "two"
    result = _launch_two_cpu_processes("-m", "pixart_tune", "train", str(RECIPE),
                                       *_overrides(run, cache_dir, *RESUME, f"resume={checkpoint}", "train.batch_size=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size 1 -> 2" in result.stderr and f"start of epoch {saved['epoch'] + 1}" in result.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 9 and steps[-1] == 24 and (run / "final" / "adapter_model.safetensors").is_file()


def test_ctrl_c_saves_checkpoint_and_resume_completes(uninterrupted, tmp_path, cache_dir, monkeypatch):
    from pixart_tune import trainer

    calls = {"n": 0}
    real_call = trainer.LossFn.__call__

    def interrupt_at_step_5(self, model, batch, gens):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return real_call(self, model, batch, gens)

    monkeypatch.setattr(trainer.LossFn, "__call__", interrupt_at_step_5)
    run = tmp_path / "interrupted"
    with pytest.raises(trainer.TrainingInterrupted) as exc:
        trainer.train(RECIPE, _overrides(run, cache_dir, *RESUME), show_progress=False)
    assert exc.value.checkpoint == run / "checkpoints" / "step-000005"
    assert json.loads((exc.value.checkpoint / "state.json").read_text())["step"] == 5
    monkeypatch.setattr(trainer.LossFn, "__call__", real_call)
    resumed = trainer.train(RECIPE, _overrides(run, cache_dir, *RESUME, "resume=latest"), show_progress=False)
    assert_same_tensors(_weights(resumed), _weights(uninterrupted))


@pytest.mark.parametrize("device_type", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned-memory + event path needs CUDA"))])
def test_stop_vote_agrees_one_step_later(device_type):
    """Several processes stop after the step where the summed Ctrl-C flags first reach the host: the
    vote cast at step k is read at step k + 1, by every process alike (here another process's flag is
    simulated by the reduce)."""
    from pixart_tune.trainer import StopVote

    others = iter([0.0, 0.0, 1.0, 0.0, 0.0])  # the other process sees Ctrl-C at the third step

    class TwoProcesses:
        device = torch.device(device_type)

        def reduce(self, t, op):
            assert op == "sum" and t.device.type == device_type
            return t + next(others)

    vote = StopVote(TwoProcesses())
    mine = [False, True, False, False, False]  # this process sees it at the second step
    assert [vote(flag) for flag in mine] == [False, False, True, True, False]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    from pixart_tune import trainer

    calls = {"n": 0}
    real_call = trainer.LossFn.__call__

    def nan_from_step_7(self, model, batch, gens):
        calls["n"] += 1
        loss = real_call(self, model, batch, gens)
        return loss * float("nan") if calls["n"] >= 7 else loss

    monkeypatch.setattr(trainer.LossFn, "__call__", nan_from_step_7)
    run = tmp_path / "nan"
    with pytest.raises(trainer.NonFiniteLoss, match="step 7"):
        trainer.train(RECIPE, _overrides(run, cache_dir, "train.steps=20", "train.checkpoint_every=3"), show_progress=False)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-000003", "step-000006"]
    assert all(torch.isfinite(v).all() for v in _weights(run / "checkpoints" / "step-000006").values())
    assert not (run / "final").exists()


@pytest.mark.parametrize("extra", [[], ["train.fp8=true"]], ids=["plain", "fp8"])
def test_two_processes_match_one_with_the_same_global_batch(extra, tmp_path, cache_dir):
    """accelerate launch, 2 CPU processes (gloo) of batch 1 == 1 process of batch 2. With train.fp8 the
    fp8 copies are DDP-ignored buffers (gloo would refuse to broadcast float8) and per-token scales do
    not depend on the batch's make-up."""
    from pixart_tune import train

    common = ["train.steps=6", "train.lr_scheduler=linear", *extra]
    one = train(RECIPE, _overrides(tmp_path / "one", cache_dir, *common, "train.batch_size=2"), show_progress=False)
    result = _launch_two_cpu_processes("-m", "pixart_tune", "train", str(RECIPE),
                                       *_overrides(tmp_path / "two", cache_dir, *common, "train.batch_size=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    a, b = _weights(one), _weights(tmp_path / "two" / "final")
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm() / torch.cat([a[k].flatten() for k in a]).norm()
    assert diff < 1e-3, f"relative weight difference {diff:.2e}"


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "adafactor", "came", "prodigy"])
def test_each_optimizer_trains(optimizer, tmp_path, cache_dir):
    from pixart_tune import train

    lr = "1.0" if optimizer == "prodigy" else "1e-3"
    final = train(RECIPE, _overrides(tmp_path, cache_dir, "train.steps=3", f"train.optimizer={optimizer}", f"train.lr={lr}"),
                  show_progress=False)  # fmt: skip
    weights = _weights(final)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert max(v.abs().max() for v in lora_b) > 0, "B starts at zero: a step must move it"


def test_came_keeps_a_row_and_a_column_per_weight_matrix():
    """train.optimizer=came: PixArt-Sigma's settings, and second moments factored as the paper's (a
    row and a column of statistics for a matrix, the full shape only for vectors)."""
    from pixart_tune.config import load_config
    from pixart_tune.optim import make_optimizer

    t = load_config(None, ["train.optimizer=came", "train.lr=2e-5"]).train
    layer = torch.nn.Linear(8, 4)
    optimizer = make_optimizer(list(layer.parameters()), t)
    assert optimizer.defaults["betas"] == (0.9, 0.999, 0.9999) and optimizer.defaults["eps"] == (1e-30, 1e-16)
    before = layer.weight.detach().clone()
    layer(torch.randn(3, 8)).square().sum().backward()
    optimizer.step()
    weight, bias = optimizer.state[layer.weight], optimizer.state[layer.bias]
    assert weight["exp_avg_sq_row"].shape == (4,) and weight["exp_avg_sq_col"].shape == (8,)
    assert "exp_avg_sq" not in weight and bias["exp_avg_sq"].shape == (4,)
    assert not torch.equal(layer.weight, before)


def test_adamw_is_fused_where_the_params_will_train():
    """The trainer builds the optimizer while the params are still on the CPU (accelerate moves them
    later): the training device, not the params' device, decides on the fused kernel."""
    from pixart_tune.config import load_config
    from pixart_tune.optim import make_optimizer

    t = load_config(None, []).train
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(params, t, device="cuda").defaults["fused"] is True
    assert not make_optimizer(params, t, device="cpu").defaults["fused"]
    assert not make_optimizer(params, t).defaults["fused"], "without a device, the params' own (the CPU here)"


def test_the_trainer_builds_the_optimizer_for_its_device(tmp_path, cache_dir, monkeypatch):
    """The wiring that was missing: the trainer tells make_optimizer where training runs (on a GPU,
    the fused AdamW), since its params are still on the CPU when it builds the optimizer."""
    from pixart_tune import trainer

    seen = []
    make = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", lambda params, t, device=None: seen.append(device) or make(params, t, device))
    trainer.train(RECIPE, _overrides(tmp_path, cache_dir, "train.steps=1"), show_progress=False)
    assert seen == [torch.device("cpu")]


def test_lr_schedules():
    from pixart_tune.config import load_config
    from pixart_tune.optim import lr_factor

    t = load_config(None, ["train.steps=110", "train.warmup_steps=10", "train.lr_scheduler=cosine"]).train
    assert [lr_factor(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, t) == pytest.approx(1.0) and lr_factor(60, t) == pytest.approx(0.5)
    assert lr_factor(110, t) == pytest.approx(0.0, abs=1e-9)
    t.lr_scheduler = "linear"
    assert lr_factor(60, t) == pytest.approx(0.5) and lr_factor(110, t) == pytest.approx(0.0)
    t.lr_scheduler = "constant"
    assert lr_factor(60, t) == 1.0 and lr_factor(3, t) == pytest.approx(0.4)


def test_ema_math_and_swap():
    from pixart_tune.ema import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, decay=0.5, on_cpu=True)
    for value in (1.0, 2.0):
        p.data.fill_(value)
        ema.update()
    torch.testing.assert_close(ema.shadow["p"], torch.full((3,), 1.25))  # 0 -> 0.5 -> 1.25
    ema.swap()
    torch.testing.assert_close(p.data, torch.full((3,), 1.25))
    ema.swap()
    torch.testing.assert_close(p.data, torch.full((3,), 2.0))


def test_run_directory_files(tmp_path, cache_dir):
    from pixart_tune import train

    run = tmp_path / "run"
    overrides = [f"output_dir={run}", f"data.cache_dir={cache_dir}", "train.steps=7", "train.checkpoint_every=2",
                 "train.keep_checkpoints=2", "train.log_every=2", "validation.prompts=[a photo of a cat, a rocket]",
                 "validation.seeds=[1, 2]", "validation.every=4", "validation.steps=2", "validation.height=64",
                 "validation.width=96"]  # fmt: skip
    train(RECIPE, overrides, show_progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    grid = Image.open(run / "samples" / "step-000004.png")
    assert grid.size == (2 * 96, 2 * 64)  # seeds across, prompts down
    assert (run / "samples" / "step-000007.png").is_file()
    assert list((run / "logs").rglob("events.out.tfevents.*")), "TensorBoard log"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4, 6, 7]
    assert (run / "final" / "adapter_model.safetensors").is_file() and (run / "config.yaml").is_file()


def test_a_profile_of_a_few_steps_is_written_per_process(tmp_path, cache_dir, monkeypatch):
    """PIXART_TUNE_PROFILE=FIRST:COUNT: a Chrome trace of COUNT steps (after FIRST, and one to warm the
    profiler up) in the run's profile/ folder; a malformed value stops the run naming the variable."""
    from pixart_tune import train

    monkeypatch.setenv("PIXART_TUNE_PROFILE", "1:2")
    run = tmp_path / "run"
    train(RECIPE, _overrides(run, cache_dir, "train.steps=5"), show_progress=False)
    events = json.loads((run / "profile" / "rank0.json").read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("name") == "aten::mm" for e in events)  # the steps' ops are in it
    monkeypatch.setenv("PIXART_TUNE_PROFILE", "8")
    with pytest.raises(ValueError, match="PIXART_TUNE_PROFILE='8': expected FIRST:COUNT"):
        train(RECIPE, _overrides(tmp_path / "bad", cache_dir, "train.steps=2"), show_progress=False)


def test_auto_attention_is_resolved_per_run_and_config_keeps_auto(tmp_path, cache_dir, monkeypatch, capsys):
    """What `auto` becomes is decided on the machine that trains (printed); config.yaml keeps `auto`
    for another machine, and a Config passed in is not changed."""
    from pixart_tune import loss, speed, train, trainer
    from pixart_tune.config import load_config

    asked = []

    def resolve(preference, device):
        asked.append((preference, str(device)))
        return "math" if preference == "auto" else preference

    monkeypatch.setattr(trainer, "resolve_attention", resolve)
    seen = []
    real_context = speed.attention_context
    monkeypatch.setattr(loss, "attention_context", lambda p: seen.append(p) or real_context(p))  # LossFn's
    run = tmp_path / "run"
    cfg = load_config(RECIPE, _overrides(run, cache_dir, "train.steps=2"))
    train(cfg, show_progress=False)
    assert asked == [("auto", "cpu")] and set(seen) == {"math"}
    assert "train.attention=auto: math on this machine" in capsys.readouterr().out
    assert cfg.train.attention == "auto" and load_config(run / "config.yaml").train.attention == "auto"


def test_full_fine_tune_writes_a_diffusers_transformer(tmp_path, cache_dir):
    from diffusers import PixArtTransformer2DModel

    from pixart_tune import train

    final = train(RECIPE, _overrides(tmp_path, cache_dir, "train.method=full", "train.steps=3", "train.lr=1e-4",
                                     "train.freeze=[pos_embed, caption_projection]"), show_progress=False)  # fmt: skip
    model = PixArtTransformer2DModel.from_pretrained(final)
    base = PixArtTransformer2DModel.from_pretrained(Path(os.environ["PIXART_TUNE_HOME"]) / "tiny-pixart-v1-seed0",
                                                    subfolder="transformer")  # fmt: skip
    changed = {n for (n, a), b in zip(model.state_dict().items(), base.state_dict().values()) if not torch.equal(a, b)}
    assert any(n.startswith("transformer_blocks") for n in changed)
    assert not any(n.startswith(("pos_embed", "caption_projection")) for n in changed), "frozen parts stay"


def test_full_fine_tune_validation_with_a_bf16_base(tmp_path, cache_dir):
    """fp32 master weights make fp32 latents while the VAE is bf16: the grid must still decode."""
    from pixart_tune import train

    train(RECIPE, _overrides(tmp_path, cache_dir, "train.method=full", "train.steps=1", "model.weight_dtype=bf16",
                             "validation.prompts=[a photo of a cat]", "validation.steps=2", "validation.height=64",
                             "validation.width=96"), show_progress=False)  # fmt: skip
    assert Image.open(tmp_path / "samples" / "step-000001.png").size == (96, 64)


def test_a_failed_validation_leaves_the_model_as_training_had_it(tiny_base, monkeypatch):
    """Sampling that fails midway (here the transformer's forward; on a GPU, running out of memory)
    raises, and the model is back in training mode and in its shards (return_to_shards ran)."""
    from diffusers import PixArtTransformer2DModel

    from pixart_tune import validation
    from pixart_tune.config import Config

    cfg = Config.model_validate({"validation": {"prompts": ["a photo of a cat"], "steps": 2, "height": 64, "width": 64}})
    validator = validation.make_validator(cfg, str(tiny_base), "cpu", main=True, sharded=False)
    transformer = PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer").train()
    returned = []
    monkeypatch.setattr(validation, "return_to_shards", returned.append)

    def fail(*args, **kwargs):
        assert not transformer.training  # sampling runs in eval mode
        raise RuntimeError("out of memory while sampling")

    monkeypatch.setattr(transformer, "forward", fail)
    with pytest.raises(RuntimeError, match="out of memory while sampling"):
        validator(transformer, 4, Path("unused"), save=False)
    assert transformer.training and returned == [transformer]


def test_lora_learns_a_single_concept(tmp_path, cache_dir):
    """A LoRA on one concept lowers the loss on it, and what it generates moves toward it."""
    from pixart_tune import load_pipeline, train
    from pixart_tune.cache import build_cache
    from pixart_tune.config import load_config
    from pixart_tune.evaluate import dataset_loss
    from pixart_tune.features import CachedFeatures
    from pixart_tune.models import resolve_base

    data = tmp_path / "concept"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # a warm red-orange texture, always with the same caption
        pixels = np.zeros((256, 256, 3))
        pixels[..., 0], pixels[..., 1], pixels[..., 2] = 220, 60 + 40 * np.linspace(0, 1, 256)[None, :], 30
        Image.fromarray(np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo of sks texture")
    run = tmp_path / "run"
    final = train(RECIPE, [f"output_dir={run}", f"data.path={data}", f"data.cache_dir={tmp_path / 'c'}", "train.steps=60",
                           "train.lr=2e-3", "train.batch_size=3", "train.log_with=none"], show_progress=False)  # fmt: skip

    before, after = dataset_loss(run / "config.yaml"), dataset_loss(run / "config.yaml", lora=final)
    assert after < 0.8 * before, (before, after)

    cfg = load_config(run / "config.yaml")
    features = CachedFeatures(build_cache(cfg, resolve_base(cfg.model.base), show_progress=False))
    target = torch.stack([features[i]["mean"] for i in range(len(features))]).mean(dim=(0, 2, 3)) * 0.18215
    pipe = load_pipeline(cfg.model.base, lora=str(final), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)

    def channel_means(scale: float) -> torch.Tensor:
        from pixart_tune import set_adapters

        set_adapters(pipe.transformer, {"adapter0": scale})
        latents = pipe("a photo of sks texture", height=256, width=256, num_inference_steps=8, output_type="latent",
                       use_resolution_binning=False, num_images_per_prompt=2, clean_caption=False,
                       generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        return latents.mean(dim=(0, 2, 3))

    base_gap = (channel_means(0.0) - target).norm()
    lora_gap = (channel_means(1.0) - target).norm()
    assert lora_gap < 0.7 * base_gap, (base_gap, lora_gap)


def test_caption_dropout_swaps_in_the_null_caption_per_sample():
    from pixart_tune.loss import _drop_captions

    embeds, mask = torch.randn(3, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    null = {"embeds": torch.randn(2, 4), "mask": torch.tensor([1, 1])}
    e, m = _drop_captions(embeds, mask, null, torch.tensor([False, True, False]))
    assert torch.equal(e[[0, 2]], embeds[[0, 2]]) and torch.equal(m[[0, 2]], mask[[0, 2]])
    assert torch.equal(e[1, :2], null["embeds"]) and not e[1, 2:].any()
    assert m[1].tolist() == [1, 1, 0, 0, 0]
    # a null caption longer than the batch's captions: everything is padded with masked zeros
    long_null = {"embeds": torch.randn(7, 4), "mask": torch.ones(7, dtype=torch.long)}
    e, m = _drop_captions(embeds, mask, long_null, torch.tensor([True, False, False]))
    assert e.shape == (3, 7, 4) and m.shape == (3, 7)
    assert torch.equal(e[0], long_null["embeds"]) and m[0].tolist() == [1] * 7
    assert torch.equal(e[1, :5], embeds[1]) and not e[1, 5:].any() and m[1].tolist() == [1] * 5 + [0, 0]


def test_caption_dropout_trains_and_changes_the_result(tmp_path, cache_dir):
    from pixart_tune import train

    common = ["train.steps=3", "train.log_every=1"]
    plain = train(RECIPE, _overrides(tmp_path / "plain", cache_dir, *common), show_progress=False)
    dropped = train(RECIPE, _overrides(tmp_path / "drop", cache_dir, *common, "train.caption_dropout=1.0"),
                    show_progress=False)  # fmt: skip
    a, b = _weights(plain), _weights(dropped)
    assert a.keys() == b.keys() and all(torch.isfinite(v).all() for v in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)  # every caption replaced by T5(""): other gradients


def test_fsdp_validation_runs_t5_once_and_shares_the_features(tmp_path, tiny_base):
    """Under FSDP every process samples; only the main one loads T5 (2 CPU processes, gloo)."""
    result = _launch_two_cpu_processes(str(REPO / "tests" / "validation_worker.py"), str(tiny_base), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1)]
    assert [r["t5_loads"] for r in ranks] == [1, 0]
    assert ranks[0]["embeds"].shape[0] == 3  # two prompts and the negative ""
    assert torch.equal(ranks[0]["embeds"], ranks[1]["embeds"]) and torch.equal(ranks[0]["masks"], ranks[1]["masks"])


def test_fp8_where_there_are_no_fp8_matmuls_warns_and_still_trains(tmp_path, cache_dir):
    from pixart_tune import train

    with pytest.warns(UserWarning, match="no fp8 matmuls"):
        final = train(RECIPE, _overrides(tmp_path / "run", cache_dir, "train.steps=2", "train.fp8=true"),
                      show_progress=False)  # fmt: skip
    assert (final / "adapter_model.safetensors").is_file()


def test_a_second_run_in_the_process_may_change_mixed_precision(tmp_path, cache_dir):
    """accelerate keeps its settings per process; each train() call starts from its own."""
    from pixart_tune import train

    for precision in ("bf16", "no"):
        final = train(RECIPE, _overrides(tmp_path / precision, cache_dir, "train.steps=1",
                                         f"train.mixed_precision={precision}"), show_progress=False)  # fmt: skip
        assert (final / "adapter_model.safetensors").is_file()
