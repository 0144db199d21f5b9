"""Publishing a trained LoRA on the Hugging Face Hub, in one commit:

    README.md                          model card: YAML metadata (base_model, license, tags, trigger words),
                                       training settings, samples, a usage snippet
    adapter_config.json                the PEFT adapter (what `load_pipeline(base, lora="<repo id>")` downloads),
    adapter_model.safetensors          base_model_name_or_path rewritten to the public base (no local paths)
    pytorch_lora_weights.safetensors   the same LoRA as one diffusers-format file (ComfyUI and other tools)
    samples/...                        the run's validation images, if any

    push_to_hub("runs/my-lora", "alice/my-pixart-lora")      # run dir: final/, config.yaml, samples/
    push_to_hub("runs/my-lora/final", "alice/my-pixart-lora") # or a bare adapter folder

The token comes from `token=` or huggingface_hub's own login (`hf auth login`, the HF_TOKEN variable);
it only ever travels in the Authorization header: never written to a file, a card or a log line.
Downloading goes the other way through `load_pipeline(base, lora="alice/my-pixart-lora")`.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import yaml

from .models import looks_like_hub_id
from .tiny import EMBEDDED_TINY, TINY_VERSION

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TAGS = ["pixart-alpha", "lora", "text-to-image", "diffusers", "pixart_tune"]
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN (a token with write access: https://huggingface.co/settings/tokens)"
# The settings the card's table shows, in this order: (config.yaml key, label).
CARD_SETTINGS = [
    ("model.base", "base model"), ("model.revision", "base revision"), ("train.method", "method"),
    ("lora.rank", "LoRA rank"), ("lora.alpha", "LoRA alpha"), ("lora.targets", "LoRA targets"),
    ("lora.dora", "DoRA"), ("lora.rslora", "rsLoRA"), ("data.resolution", "resolution (aspect-ratio buckets)"),
    ("data.trigger", "trigger"), ("data.caption_template", "caption template"), ("train.steps", "steps"),
    ("train.batch_size", "batch size"), ("train.grad_accum", "gradient accumulation"), ("train.lr", "learning rate"),
    ("train.lr_scheduler", "LR schedule"), ("train.warmup_steps", "warmup steps"), ("train.optimizer", "optimizer"),
    ("train.weight_decay", "weight decay"), ("train.max_grad_norm", "gradient clipping"),
    ("train.mixed_precision", "mixed precision"), ("model.weight_dtype", "frozen weights dtype"),
    ("train.caption_dropout", "caption dropout"), ("train.snr_gamma", "min-SNR gamma"),
    ("train.noise_offset", "noise offset"), ("train.vlb_weight", "VLB weight"), ("seed", "seed"),
]  # fmt: skip


class HubError(ValueError):
    """Pushing to the Hub failed: what went wrong and what to do about it."""


# ---- what to upload ----------------------------------------------------------------------------


def find_adapter(adapter_or_run: str | Path) -> tuple[Path, Path | None]:
    """(adapter folder, run dir or None) for a run dir (its final/) or a PEFT adapter folder."""
    path = Path(adapter_or_run).expanduser()
    if not path.is_dir():
        raise HubError(f"{path} is not a folder: give a run directory (with final/) or a PEFT adapter folder")
    if (path / "adapter_config.json").is_file():
        run = path.parent if path.name == "final" and (path.parent / "config.yaml").is_file() else None
        adapter = path
    elif (path / "final" / "adapter_config.json").is_file():
        adapter, run = path / "final", path
    else:
        full = (path / "final" / "config.json").is_file() or (path / "config.json").is_file()
        raise HubError(
            f"{path} holds no LoRA adapter (no adapter_config.json, nor final/adapter_config.json)"
            + (": it looks like a full fine-tune, which push does not upload yet" if full else "")
            + ". Give a training run directory or its final/ folder."
        )
    if not (adapter / "adapter_model.safetensors").is_file():
        raise HubError(f"{adapter} has adapter_config.json but no adapter_model.safetensors: the adapter is incomplete")
    return adapter, run


def public_base(base: str | None) -> str | None:
    """The base model as others can name it: the embedded tiny kit's cache folder -> 'embedded:tiny';
    a snapshot in the Hugging Face cache (.../models--ORG--NAME/snapshots/REV) -> 'ORG/NAME'."""
    if base and Path(base).name == f"tiny-pixart-v{TINY_VERSION}-seed0":
        return EMBEDDED_TINY
    parts = Path(base).parts if base else ()
    for folder, snapshots in zip(parts, parts[1:]):
        if snapshots == "snapshots" and folder.startswith("models--") and folder.count("--") == 2:
            return folder.removeprefix("models--").replace("--", "/")
    return base


def is_hub_id(base: str | None) -> bool:
    return bool(base) and looks_like_hub_id(base) and not Path(base).expanduser().exists()


def base_license(base: str | None) -> str:
    """The licence a derivative inherits: PixArt-alpha checkpoints are openrail++, the tiny kit apache-2.0."""
    if base == EMBEDDED_TINY:
        return "apache-2.0"
    if base and base.split("/")[0].lower() == "pixart-alpha":
        return "openrail++"
    return "other"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _last_metrics(run: Path | None) -> dict | None:
    path = run / "metrics.jsonl" if run else None
    if not path or not path.is_file():
        return None
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _sample_prompt(image: Path) -> str | None:
    """The prompt of a sample image, from the JSON that `generate` writes beside its images."""
    for meta in [image.with_suffix(".json"), *sorted(image.parent.glob("*.json"))]:
        try:
            params = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        files = [Path(f).name for f in params.get("files", [image.name])] if isinstance(params, dict) else []
        prompts = params.get("prompt") if image.name in files else None
        if isinstance(prompts, str):
            return prompts
        if isinstance(prompts, list) and prompts:  # one prompt per image, or one for all
            return prompts[files.index(image.name)] if len(prompts) == len(files) else prompts[0]
    return None


def model_card(repo_id: str, *, base: str | None, config: dict | None = None, adapter_config: dict | None = None,
               samples: dict[str, str | None] | None = None, metrics: dict | None = None) -> str:  # fmt: skip
    """README.md for the repo. `samples`: {path in repo: prompt or None}."""
    flat = _flat(config or {})
    trigger = flat.get("data.trigger")
    adapter_config = adapter_config or {}
    meta: dict = {}
    if is_hub_id(base):  # the Hub validates base_model as a model id: no local paths, no 'embedded:tiny'
        meta["base_model"] = base
    meta["license"] = base_license(base)
    meta["library_name"] = "peft"
    meta["pipeline_tag"] = "text-to-image"
    meta["tags"] = list(TAGS)
    if trigger:
        meta["instance_prompt"] = trigger
    if samples:
        meta["widget"] = [{"text": p or "", "output": {"url": path}} for path, p in samples.items()]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    name = repo_id.split("/")[-1]
    base_text = f"[`{base}`](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}`" if base else "(not recorded)"
    if base == EMBEDDED_TINY:
        base_text += " (the tiny PixArt-α that pixart_tune builds offline, for tests and demos)"
    rank, alpha = adapter_config.get("r", flat.get("lora.rank")), adapter_config.get("lora_alpha", flat.get("lora.alpha"))
    lines = [f"---\n{front}---", "", f"# {name}", ""]
    shape = f" (rank {rank}, alpha {alpha:g})" if isinstance(alpha, (int, float)) else ""
    lines.append(f"A LoRA{shape} for PixArt-α {base_text}, trained with pixart_tune on the diffusers "
                 "`PixArtTransformer2DModel`.")  # fmt: skip
    if trigger:
        template = flat.get("data.caption_template", "{trigger}, {caption}")
        lines += ["", "## Trigger words", "",
                  f"Put `{trigger}` in your prompt: training captions read `{template}`."]  # fmt: skip
    prompt = f"{trigger}, a photo" if trigger else "a photo of a cat"
    size = flat.get("data.resolution")
    size_args = f", height={size}, width={size}" if size and size != 1024 else ""
    lines += ["", "## Use it", "", "```python", "from pixart_tune import load_pipeline", "",
              f'pipe = load_pipeline("{base or "PixArt-alpha/PixArt-XL-2-1024-MS"}", lora="{repo_id}")'
              + ("" if base else "  # the adapter does not record its base: use the one it was trained on"),
              f'image = pipe("{prompt}", num_inference_steps=20{size_args}).images[0]',
              'image.save("out.png")', "```", "",
              ("PixArt's diffusers pipeline has no LoRA loader of its own; `load_pipeline` injects the PEFT adapter "
              "(`adapter_config.json` + `adapter_model.safetensors`). Plain peft works too: "
              f'`PeftModel.from_pretrained(pipe.transformer, "{repo_id}")`. '
              f"`{DIFFUSERS_FILE}` holds the same LoRA as one diffusers-format file (keys `transformer.<module>.lora_A.weight`, "
              "rank and alpha in its header) for tools that read single files.")]  # fmt: skip
    if base and not is_hub_id(base) and base != EMBEDDED_TINY:
        lines += ["", f"The base was a local folder (`{base}`) in the PixArt-α Hub layout: pass your copy's path."]
    if samples:
        lines += ["", "## Samples", ""]
        for path, p in samples.items():
            lines += [f"![{p or path}]({path})" + (f"  \n*{p}*" if p else ""), ""]
        lines.pop()
    if flat:
        rows = [(label, flat[key]) for key, label in CARD_SETTINGS if key in flat and flat[key] is not None]
        if metrics and "loss" in metrics:
            rows.append((f"final loss (step {metrics.get('step', '?')})", f"{metrics['loss']:.4g}"))
        lines += ["", "## Training settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {label} | `{value}` |" for label, value in rows]
        lines += ["", "From the run's `config.yaml` (pixart_tune recipe keys)."]
    lines += ["", "## Licence", "",
              f"`{meta['license']}`, inherited from the base model" + (" (see its model card)." if is_hub_id(base) else ".")]  # fmt: skip
    return "\n".join(lines) + "\n"


def _diffusers_file(adapter: Path, base: str | None, out_dir: Path) -> Path | None:
    """The LoRA as pytorch_lora_weights.safetensors (pixart_tune.lora_formats), or None if it has no such form."""
    from .lora_formats import load_lora, save_lora

    try:
        lora, info = load_lora(adapter)
        path = save_lora(out_dir / DIFFUSERS_FILE, lora, format="diffusers", base_model=base,
                         target_modules=info.get("target_modules"))  # fmt: skip
    except ValueError as exc:  # DoRA / LoRA-bias adapters: only the PEFT folder describes them
        warnings.warn(f"{adapter}: no {DIFFUSERS_FILE} uploaded ({exc}); the PEFT adapter is complete on its own", stacklevel=2)
        return None
    _sort_safetensors_metadata(path)
    return path


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a .safetensors header with its metadata keys sorted. safetensors writes them in hash order,
    which differs from call to call, so the same LoRA would look changed and every push would commit it again."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if meta is not None:
        header = {"__metadata__": dict(sorted(meta.items())), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned, as safetensors writes it
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def _samples(run: Path | None, adapter: Path) -> dict[str, Path]:
    """{path in repo: file} of the run's sample images (samples/ of the run, or beside a bare adapter)."""
    folder = next((f for f in ([run / "samples"] if run else []) + [adapter / "samples"] if f.is_dir()), None)
    if folder is None:
        return {}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return {"samples/" + p.relative_to(folder).as_posix(): p for p in files}


# ---- the push ----------------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection-level errors of the HTTP library huggingface_hub uses (httpx2 in 2.x, httpx/requests before)."""
    errors: list[type[Exception]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_error(exc: Exception, repo_id: str, endpoint: str) -> HubError:
    """Turn a huggingface_hub / httpx exception into a HubError that says what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE is set: pushing needs the network. Unset HF_HUB_OFFLINE (or set it to 0) and retry.")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        server = (getattr(exc, "server_message", None) or "").strip()
        said = f" (the Hub said: {server})" if server else ""
        if status == 401:
            return HubError(f"authentication failed (401) at {endpoint}: the token is missing, invalid or expired{said}. "
                            f"To push, {LOGIN_HINT}, or pass token=.")  # fmt: skip
        if status == 403:
            return HubError(f"permission denied (403) for {repo_id}{said}: your token may not create or write to this repo. "
                            f"Use a token with write permission for the '{repo_id.split('/')[0]}' namespace "
                            "(a 'write' token, or a fine-grained one with write access to it), or push to your own namespace.")  # fmt: skip
        if status == 404:
            return HubError(f"{repo_id} was not found (404){said}: check the namespace, and that your token can see it.")
        if status == 412:
            return HubError(f"{repo_id} changed while pushing (412){said}: push again.")
        return HubError(f"the Hub refused the push to {repo_id} (HTTP {status}){said}: {exc}")
    return HubError(f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {exc}); check the network, "
                    "HF_ENDPOINT and proxies, then push again.")  # fmt: skip


def push_to_hub(adapter_or_run: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, base_model: str | None = None) -> str:  # fmt: skip
    """Upload a LoRA (run dir or PEFT adapter folder) to the model repo `repo_id` in one commit; returns its URL.

    The repo is created if needed (`private` applies then; pushing with private=True to an existing
    public repo is refused). Pushing again makes a new commit with whatever changed (the Hub skips
    files whose content is identical). `token`: default huggingface_hub's login / HF_TOKEN.
    `base_model`: the Hub id of the base, for a run trained on a local copy of it (a Hugging Face
    cache snapshot is recognised without it); it goes into the card and adapter_config.json."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    adapter, run = find_adapter(adapter_or_run)
    if not looks_like_hub_id(repo_id or ""):
        raise HubError(f"repo id {repo_id!r} must be 'namespace/name' (your user or organization, then the repo name)")
    if base_model is not None and not looks_like_hub_id(base_model):
        raise HubError(f"base_model {base_model!r} must be the base's Hub id, 'namespace/name' "
                       "(e.g. PixArt-alpha/PixArt-XL-2-1024-MS)")  # fmt: skip
    if _offline():
        raise HubError("HF_HUB_OFFLINE is set: pushing needs the network. Unset HF_HUB_OFFLINE (or set it to 0) and retry.")

    config = yaml.safe_load((run / "config.yaml").read_text()) if run else None
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    recorded = adapter_config.get("base_model_name_or_path")
    base = base_model or public_base((config or {}).get("model", {}).get("base") or recorded)
    if base == EMBEDDED_TINY or base_model or is_hub_id(base):
        adapter_config["base_model_name_or_path"] = base  # others load it by this name, not by our cache path

    token = token or get_token()
    if not token:
        raise HubError(f"no Hugging Face token: {LOGIN_HINT}, or pass token=.")
    endpoint = constants.ENDPOINT
    samples = _samples(run, adapter)
    card = model_card(repo_id, base=base, config=config, adapter_config=adapter_config,
                      samples={p: _sample_prompt(f) for p, f in samples.items()}, metrics=_last_metrics(run))  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="pixart_tune_push_") as tmp:
        operations = [
            CommitOperationAdd("adapter_config.json", (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode()),
            CommitOperationAdd("adapter_model.safetensors", str(adapter / "adapter_model.safetensors")),
        ]
        single = _diffusers_file(adapter, base, Path(tmp))
        if single is not None:
            operations.append(CommitOperationAdd(DIFFUSERS_FILE, str(single)))
        operations += [CommitOperationAdd(path, str(file)) for path, file in samples.items()]
        operations.append(CommitOperationAdd("README.md", card.encode()))
        message = commit_message or f"Upload PixArt-alpha LoRA ({len(operations)} files) with pixart_tune"

        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if private and not api.model_info(repo_id).private:
                raise HubError(f"{repo_id} already exists and is public, but private=True was asked: nothing uploaded. "
                               "Make it private in its Settings on the Hub, or push without --private.")  # fmt: skip
            commit = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
        except (HfHubHTTPError, OfflineModeIsEnabled, *_transport_errors()) as exc:
            raise _hub_error(exc, repo_id, endpoint) from exc
        # The client skips files the Hub already holds with the same content (same git oid): say so.
        unchanged = sum(1 for op in operations if getattr(op, "_remote_oid", None) is not None
                        and op._remote_oid == getattr(op, "_local_oid", None))  # fmt: skip

    if unchanged == len(operations):
        print(f"{url} already holds these {len(operations)} files from {adapter}: nothing new to push (commit {commit.oid[:8]})")
    else:
        print(f"pushed {len(operations) - unchanged} new or changed of {len(operations)} files from {adapter} "
              f"to {url} (commit {commit.oid[:8]})")  # fmt: skip
    return str(url)
