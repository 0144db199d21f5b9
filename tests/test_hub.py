"""Hub push and download against a loopback Hub (tests/hub_server.py) driven by the real
huggingface_hub client: one commit with adapter + single file + card + samples, a new commit per
changed push, the adapter back through `load_pipeline(..., lora="<repo id>")` with the same outputs,
and errors that say what to do. The token must never land in a file or on the console."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from conftest import REPO, tiny_forward
from hub_server import HubServer, front_matter, point_client_at
from PIL import Image
from safetensors.torch import load_file

from pixart_tune.hub import HubError, model_card, public_base, push_to_hub

WRITE = "hf_loopbackWRITEtoken0123456789"  # unique strings, so a leak is found by a plain search
READ = "hf_loopbackREADtoken9876543210"
OTHER = "hf_loopbackOTHERuser5555555555"
TOKENS = {WRITE: ("user", "write"), READ: ("user", "read"), OTHER: ("other", "write")}
UPLOAD = {"adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors", "README.md",
          "samples/000.png"}  # fmt: skip


@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens=TOKENS, max_lifetime_s=600) as server:
        yield server
    assert not server.running


@pytest.fixture
def client(hub, monkeypatch, tmp_path):
    """huggingface_hub pointed at the loopback Hub, online, with an empty cache and no stored login."""
    point_client_at(hub, monkeypatch, tmp_path / "hf-cache")
    return hub


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_home):
    """A real tiny LoRA run (3 steps, trigger 'sks') plus one validation sample as `generate` writes it."""
    from pixart_tune import train

    run = tmp_path_factory.mktemp("hub-run")
    overrides = [f"output_dir={run}", f"data.cache_dir={run / 'cache'}", "train.steps=3", "data.trigger=sks"]
    train(REPO / "recipes" / "tiny-lora.yaml", overrides, show_progress=False)
    (run / "samples").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(run / "samples" / "000.png")
    (run / "samples" / "000.json").write_text(json.dumps({"prompt": ["sks, a red square"], "files": [str(run / "samples" / "000.png")]}))
    return run


def _no_token_anywhere(hub: HubServer, *texts: str) -> None:
    for repo_id, path, blob in hub.uploaded_blobs():
        for token in TOKENS:
            assert token.encode() not in blob, f"token in {repo_id}/{path}"
    for text in texts:
        for token in TOKENS:
            assert token not in text


def test_push_run_uploads_adapter_single_file_samples_and_card(run, client, capfd, tmp_path):
    url = push_to_hub(run, "user/tiny-lora", token=WRITE)
    assert url == f"{client.url}/user/tiny-lora"
    files = client.files("user/tiny-lora")
    assert set(files) == UPLOAD | {".gitattributes"}
    assert len(client.commits("user/tiny-lora")) == 2, "repo creation + ONE upload commit"
    assert files["adapter_model.safetensors"] == (run / "final" / "adapter_model.safetensors").read_bytes()
    assert files["samples/000.png"] == (run / "samples" / "000.png").read_bytes()
    cfg = json.loads(files["adapter_config.json"])
    assert cfg["base_model_name_or_path"] == "embedded:tiny", "no local cache path in the public config"
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 8)

    # the diffusers single file: same tensors under transformer.<module> keys
    peft_state = load_file(str(run / "final" / "adapter_model.safetensors"))
    (tmp_path / "single.safetensors").write_bytes(files["pytorch_lora_weights.safetensors"])
    single = load_file(str(tmp_path / "single.safetensors"))
    assert set(single) == {k.replace("base_model.model.", "transformer.", 1) for k in peft_state}
    for k, v in peft_state.items():
        assert torch.equal(single[k.replace("base_model.model.", "transformer.", 1)], v)

    card = files["README.md"].decode()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "peft"
    assert set(meta["tags"]) >= {"pixart-alpha", "lora", "text-to-image", "diffusers", "pixart_tune"}
    assert meta["instance_prompt"] == "sks"
    assert "base_model" not in meta, "the Hub accepts only Hub ids there; embedded:tiny is named in the text"
    assert meta["widget"] == [{"text": "sks, a red square", "output": {"url": "samples/000.png"}}]
    assert "| steps | `3` |" in card and "| LoRA rank | `8` |" in card and "| trigger | `sks` |" in card
    assert "![sks, a red square](samples/000.png)" in card
    assert 'pipe = load_pipeline("embedded:tiny", lora="user/tiny-lora")' in card

    # the Hub reads the card's metadata back; the token only ever travelled in the Authorization header
    from huggingface_hub import HfApi

    info = HfApi(token=WRITE).model_info("user/tiny-lora")
    assert info.card_data.license == "apache-2.0" and not info.private
    commit = client.requests_to("POST", r"/api/models/user/tiny-lora/commit/main")[-1]
    assert commit.headers["authorization"] == f"Bearer {WRITE}" and WRITE.encode() not in commit.body
    out = capfd.readouterr()
    assert f"to {url}" in out.out
    _no_token_anywhere(client, out.out, out.err)


def test_push_names_the_hub_base_of_a_run_on_a_local_copy(run, client, tmp_path):
    """A run trained on a local folder: base_model= names its Hub id in the card and adapter_config."""
    local = tmp_path / "run"
    shutil.copytree(run, local, ignore=shutil.ignore_patterns("cache"))
    config = yaml.safe_load((local / "config.yaml").read_text())
    config["model"]["base"] = str(tmp_path / "my-pixart-copy")
    (local / "config.yaml").write_text(yaml.safe_dump(config))
    push_to_hub(local, "user/local-base", token=WRITE)
    files = client.files("user/local-base")
    assert "base_model" not in front_matter(files["README.md"].decode()), "a local path is not a Hub id"
    push_to_hub(local, "user/local-base", token=WRITE, base_model="PixArt-alpha/PixArt-XL-2-1024-MS")
    files = client.files("user/local-base")
    meta = front_matter(files["README.md"].decode())
    assert meta["base_model"] == "PixArt-alpha/PixArt-XL-2-1024-MS" and meta["license"] == "openrail++"
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "PixArt-alpha/PixArt-XL-2-1024-MS"
    n_requests = len(client.requests)
    with pytest.raises(HubError, match="Hub id"):
        push_to_hub(local, "user/local-base", token=WRITE, base_model="/data/my-pixart-copy")
    assert len(client.requests) == n_requests, "a bad base_model is refused before any request"


def test_public_base_names_hub_cache_snapshots_by_their_repo_id(tmp_path):
    snapshot = tmp_path / "hub" / "models--PixArt-alpha--PixArt-XL-2-1024-MS" / "snapshots" / "0123abc"
    assert public_base(str(snapshot)) == "PixArt-alpha/PixArt-XL-2-1024-MS"
    assert public_base(str(tmp_path / "models--x" / "snapshots" / "1")) == str(tmp_path / "models--x" / "snapshots" / "1")
    assert public_base("/data/my-base") == "/data/my-base" and public_base(None) is None
    assert public_base("PixArt-alpha/PixArt-XL-2-512x512") == "PixArt-alpha/PixArt-XL-2-512x512"


def test_push_again_makes_a_new_commit_and_unchanged_push_makes_none(run, client, tmp_path, capfd):
    run2 = tmp_path / "run"
    shutil.copytree(run, run2, ignore=shutil.ignore_patterns("cache"))
    push_to_hub(run2, "user/again", token=WRITE, commit_message="first")
    first = client.commits("user/again")[-1]
    Image.new("RGB", (32, 32), (20, 200, 30)).save(run2 / "samples" / "001.png")  # e.g. a later validation image
    push_to_hub(run2, "user/again", token=WRITE, commit_message="second")
    second = client.commits("user/again")[-1]
    assert second.oid != first.oid and second.parent == first.oid and second.title == "second"
    assert "samples/001.png" in second.files and "samples/001.png" in second.files["README.md"].decode()
    assert second.files["adapter_model.safetensors"] == first.files["adapter_model.safetensors"]
    # Like the real Hub: preupload reports existing files' oids and the client drops an all-unchanged commit.
    # (so the same LoRA must give the same bytes: the single file's safetensors header is written sorted)
    n_commits = len(client.requests_to("POST", r"/commit/"))
    capfd.readouterr()
    push_to_hub(run2, "user/again", token=WRITE)
    assert client.commits("user/again")[-1].oid == second.oid
    assert len(client.requests_to("POST", r"/commit/")) == n_commits
    assert "nothing new to push" in capfd.readouterr().out


def test_load_pipeline_downloads_the_pushed_adapter_and_matches_local(run, client, tiny_base, monkeypatch, tmp_path):
    from pixart_tune.inference import add_adapter, set_adapters
    from pixart_tune.models import resolve_base

    push_to_hub(run / "final", "user/name", token=WRITE)  # a bare adapter folder this time
    monkeypatch.setenv("HF_TOKEN", WRITE)  # downloads use the standard login, as a user's would
    monkeypatch.chdir(tmp_path)
    # Run the card's own snippet up to the load: it names the base and the repo exactly as users will.
    card = client.files("user/name")["README.md"].decode()
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    compile(code, "README.md", "exec")
    load = "".join(line + "\n" for line in code.splitlines() if not line.startswith(("image", "    ")))
    assert 'load_pipeline("embedded:tiny", lora="user/name")' in load and resolve_base("embedded:tiny") == str(tiny_base)
    scope: dict = {}
    exec(load.replace('load_pipeline("embedded:tiny"', f'load_pipeline({str(tiny_base)!r}'), scope)  # noqa: S102
    pipe = scope["pipe"]
    fetched = [r.path for r in client.requests_to("GET", r"^/user/name/resolve/")]
    assert {p.rsplit("/", 1)[-1] for p in fetched} == {"adapter_config.json", "adapter_model.safetensors"}

    t = pipe.transformer
    hub_out = tiny_forward(t)
    add_adapter(t, str(run / "final"), "local")
    set_adapters(t, {"local": 1.0})
    local_out = tiny_forward(t)
    set_adapters(t, {"adapter0": 0.0})
    base_out = tiny_forward(t)
    assert torch.equal(hub_out, local_out), "the Hub round trip changes nothing"
    assert (hub_out - base_out).abs().max() > 1e-6, "and the adapter is really applied"

    set_adapters(t, {"adapter0": 1.0})
    image = pipe("sks, a photo of a cat", num_inference_steps=2, height=64, width=64, use_resolution_binning=False,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (64, 64) and max(hi - lo for lo, hi in image.getextrema()) > 0


def test_private_repo_is_private_and_never_turned_public(run, client):
    push_to_hub(run / "final", "user/secret", token=WRITE, private=True)
    assert client.repos["user/secret"].private
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):  # another user does not even see it
        HfApi(token=OTHER).model_info("user/secret")
    push_to_hub(run / "final", "user/public", token=WRITE)
    n = len(client.commits("user/public"))
    with pytest.raises(HubError, match="public"):
        push_to_hub(run / "final", "user/public", token=WRITE, private=True)
    assert len(client.commits("user/public")) == n


def test_bad_token_says_how_to_log_in(run, client, capfd):
    with pytest.raises(HubError, match=r"401.*hf auth login.*HF_TOKEN") as err:
        push_to_hub(run, "user/bad", token="hf_not_a_real_token_42")
    assert "hf_not_a_real_token_42" not in str(err.value)
    assert "user/bad" not in client.repos


def test_no_token_at_all_stops_before_any_request(run, client):
    n = len(client.requests)
    with pytest.raises(HubError, match="hf auth login"):
        push_to_hub(run, "user/anon")
    assert len(client.requests) == n


def test_token_from_hf_token_variable(run, client, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE)
    push_to_hub(run / "final", "user/from-env")
    assert "README.md" in client.files("user/from-env")


def test_read_only_token_says_permission(run, client, capfd):
    with pytest.raises(HubError, match="permission") as err:  # a new repo: creation is refused
        push_to_hub(run, "user/ro-new", token=READ)
    assert "write" in str(err.value) and "user/ro-new" not in client.repos
    push_to_hub(run / "final", "user/ro-existing", token=WRITE)
    n = len(client.commits("user/ro-existing"))
    with pytest.raises(HubError, match="permission"):  # an existing repo: the commit is refused
        push_to_hub(run, "user/ro-existing", token=READ)
    assert len(client.commits("user/ro-existing")) == n
    with pytest.raises(HubError, match="permission"):  # someone else's namespace
        push_to_hub(run, "other/mine", token=WRITE)
    out = capfd.readouterr()
    _no_token_anywhere(client, out.out, out.err, str(err.value))


def test_offline_mode_is_reported_before_trying(run, client, monkeypatch):
    from huggingface_hub import constants

    n = len(client.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(run, "user/offline", token=WRITE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # set at import time, as in a real session
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(run, "user/offline", token=WRITE)
    assert len(client.requests) == n


def test_folders_without_an_adapter_and_bad_repo_ids(run, client, tmp_path):
    with pytest.raises(HubError, match="no LoRA adapter"):
        push_to_hub(tmp_path, "user/x", token=WRITE)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(HubError, match="full fine-tune"):
        push_to_hub(tmp_path, "user/x", token=WRITE)
    with pytest.raises(HubError, match="not a folder"):
        push_to_hub(tmp_path / "missing", "user/x", token=WRITE)
    for bad in ("no-namespace", "a/b/c", ""):
        with pytest.raises(HubError, match="namespace/name"):
            push_to_hub(run, bad, token=WRITE)


@pytest.mark.parametrize(
    "base, licence, has_base_model",
    [("PixArt-alpha/PixArt-XL-2-1024-MS", "openrail++", True), ("PixArt-alpha/PixArt-XL-2-512x512", "openrail++", True),
     ("embedded:tiny", "apache-2.0", False), ("someone/other-base", "other", True), ("/data/my-base", "other", False)],
)  # fmt: skip
def test_card_licence_and_base_model_follow_the_base(base, licence, has_base_model):
    config = {"model": {"base": base}, "data": {"resolution": 1024}, "train": {"steps": 10, "lr": 1e-4}}
    card = model_card("user/x", base=base, config=config, adapter_config={"r": 4, "lora_alpha": 4})
    meta = front_matter(card)
    assert meta["license"] == licence
    assert meta.get("base_model") == (base if has_base_model else None)
    assert "instance_prompt" not in meta and "widget" not in meta
    assert f'pipe = load_pipeline("{base}", lora="user/x")' in card
    assert 'image = pipe("a photo of a cat", num_inference_steps=20).images[0]' in card  # 1024: no size args
    assert yaml.safe_load(card.split("---")[1]) == meta


# ---- the loopback Hub itself -------------------------------------------------------------------


def test_loopback_hub_speaks_the_hub_errors(client):
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    api = HfApi(token=WRITE)
    api.create_repo("user/errors")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("user/errors")
    assert err.value.response.status_code == 409
    head = api.create_commit("user/errors", [CommitOperationAdd("a.txt", b"a")], commit_message="a").oid
    api.create_commit("user/errors", [CommitOperationAdd("a.txt", b"b")], commit_message="b")
    with pytest.raises(HfHubHTTPError) as err:  # a stale parent commit
        api.create_commit("user/errors", [CommitOperationAdd("a.txt", b"c")], commit_message="c", parent_commit=head)
    assert err.value.response.status_code == 412
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("user/errors", "missing.txt", token=WRITE)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nothing-here", "a.txt", token=WRITE)
    with open(hf_hub_download("user/errors", "a.txt", revision=head, token=WRITE)) as f:
        assert f.read() == "a"
    assert [f.path for f in api.list_repo_tree("user/errors")] == [".gitattributes", "a.txt"]


def test_loopback_hub_stops_by_itself():
    import socket
    import time

    server = HubServer(max_lifetime_s=0.2).start()
    host, port = server.url.removeprefix("http://").split(":")
    deadline = time.monotonic() + 10  # the stop is due after 0.2 s; a loaded machine may take longer
    while server.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()
