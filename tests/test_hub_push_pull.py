"""Pushing to and pulling from a Hub: LongLoRA adapters (`longlora_hf.hub.push_adapter_to_hub`,
`peft_model.push_to_hub`, `trainer.push_to_hub` through `longlora-hf sft --push_to_hub`), merged models
(`longlora-hf merge --push_to_hub`), their cards.

Every push and pull runs in a fresh Python process with the unmodified `huggingface_hub` client pointed
at a Hub-compatible server on loopback (`HF_ENDPOINT`, tests/support/hub_server.py says which Hub behaviours it
covers), a token in `HF_TOKEN`, and its own empty cache (`HF_HOME`), so nothing is read from disk that
did not come over HTTP. The token must never show up in output, in files written, or on the Hub.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load, load_file

from support.helpers import shadow_longlora_hf, tiny_model
from support.hub_server import LocalHub


ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_longloraTestToken0123456789"
BASE, ADAPTER, MERGED, SFT = "alice/tiny-base", "alice/tiny-longlora", "alice/tiny-merged", "alice/tiny-sft"
PEFT_PUSHED = "alice/tiny-longlora-peft-push"


def hub_python(hub: LocalHub, home: Path, code: str, cwd: Path = ROOT, token: str | None = TOKEN, extra_env=None):
    """Run `code` in a new process talking to `hub`, with an empty cache at `home`; fail on a non-zero exit or
    on the token appearing in the output."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        **(extra_env or {}),
    )
    if token:
        env["HF_TOKEN"] = token
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert TOKEN not in result.stdout + result.stderr
    return result


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_token_absent(*places):
    """No file under the given directories, and no file in the given {name: bytes} dicts, holds the token."""
    for place in places:
        contents = (
            place.items()
            if isinstance(place, dict)
            else ((p, p.read_bytes()) for p in Path(place).rglob("*") if p.is_file())
        )
        for name, content in contents:
            assert TOKEN.encode() not in content, f"the token was written to {name}"


PUSH_ADAPTER = """
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from longlora_hf import LongLoraConfig
    from longlora_hf.hub import push_adapter_to_hub

    base = AutoModelForCausalLM.from_pretrained("{base}")
    model = get_peft_model(base, LongLoraConfig(target_context_length=1024))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: move every trainable tensor (LoRA, embeddings, norms)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.eval()
    ids = torch.randint(0, 4096, (1, 700), generator=torch.Generator().manual_seed(0))  # beyond the base's 256
    with torch.no_grad():
        save_file({{"ids": ids, "logits": model(ids).logits}}, "{out}")
    push_adapter_to_hub(model, "{repo}")
    model.push_to_hub("{peft_repo}")  # PEFT's own way, too
    push_adapter_to_hub(model, "{peft_repo}-after-card")
    model.push_to_hub("{peft_repo}-after-card", commit_message="a later push")
"""

PULL_ADAPTER = """
    import torch
    import longlora_hf
    from peft import AutoPeftModelForCausalLM, PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = load_file("{pushed}")["ids"]
    auto = AutoPeftModelForCausalLM.from_pretrained("{repo}")
    base = AutoModelForCausalLM.from_pretrained("{base}")
    explicit = PeftModel.from_pretrained(base, "{repo}")
    for model in (auto, explicit):
        config = model.get_base_model().config
        assert config.max_position_embeddings == 1024, config.max_position_embeddings
        assert config._attn_implementation == "sdpa", config._attn_implementation
    with torch.no_grad():
        save_file({{"auto": auto(ids).logits, "explicit": explicit(ids).logits}}, "{out}")
"""


@pytest.fixture(scope="module")
def hub():
    with LocalHub({TOKEN: "alice"}) as server:
        yield server


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """The bundled demo Llama published as alice/tiny-base, and a LongLoRA adapter on it (trainable tensors
    moved as training would) published with `push_adapter_to_hub` and with `peft_model.push_to_hub`; its logits
    before pushing."""
    tmp = tmp_path_factory.mktemp("pushed")
    code = f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from longlora_hf.demo import ASSETS
        AutoModelForCausalLM.from_pretrained(ASSETS).push_to_hub("{BASE}")
        AutoTokenizer.from_pretrained(ASSETS).push_to_hub("{BASE}")
    """
    succeeded(hub_python(hub, tmp / "home_base", code))
    succeeded(
        hub_python(
            hub,
            tmp / "home_push",
            PUSH_ADAPTER.format(base=BASE, repo=ADAPTER, peft_repo=PEFT_PUSHED, out=tmp / "pushed.safetensors"),
        )
    )
    return tmp / "pushed.safetensors"


def test_push_adapter_to_hub_publishes_config_safetensors_and_the_longlora_card(hub, pushed):
    files = hub.files(ADAPTER)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)  # safetensors only
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "LONGLORA" and config["base_model_name_or_path"] == BASE
    assert (config["target_context_length"], config["position_interpolation_factor"]) == (1024, 4.0)
    weights = load(files["adapter_model.safetensors"])
    for part in ("lora_A", "lora_B", "embed_tokens", "input_layernorm", "model.norm"):
        assert any(part in key for key in weights), part
    card = ModelCard(files["README.md"].decode())
    assert (
        card.data.base_model == BASE
        and card.data.library_name == "peft"
        and card.data.pipeline_tag == "text-generation"
    )
    assert {"longlora", "peft", "lora"} <= set(card.data.tags)
    for fact in (
        f"| Base model | `{BASE}` |",
        "| Original context | 256 tokens |",
        "| Target context | 1024 tokens |",
        "| Position extension | x4 over the base model's own scheme, giving linear (factor 4, original 256, theta "
        "10000) |",
        "| S2-Attn group size ratio | 0.25",
        "input embedding, every normalization layer",
        "| Training data | not recorded |",
        "| Training steps | not recorded |",
        "Not evaluated yet",
        "import longlora_hf",
        "longlora-hf merge",
        f'AutoPeftModelForCausalLM.from_pretrained("{ADAPTER}")',
    ):
        assert fact in card.text, fact
    assert_token_absent(files)


def test_peft_push_to_hub_uploads_the_adapter_but_transformers_writes_its_generic_card(hub, pushed):
    """What the README says of `peft_model.push_to_hub`: same files, but on a repo's first push transformers'
    `PushToHubMixin` replaces the saved README with its own card (use `push_adapter_to_hub` for ours). If
    this starts failing, transformers changed and the README should say so."""
    files = hub.files(PEFT_PUSHED)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert (
        load(files["adapter_model.safetensors"]).keys() == load(hub.files(ADAPTER)["adapter_model.safetensors"]).keys()
    )
    card = ModelCard(files["README.md"].decode())
    assert "longlora" not in (card.data.tags or []) and "| Target context |" not in card.text


def test_a_later_peft_push_to_hub_keeps_the_longlora_card_already_on_the_hub(hub, pushed):
    """transformers reuses a repo's card on later pushes, so a card published once stays."""
    repo = f"{PEFT_PUSHED}-after-card"
    assert [c.message for c in hub.state.repos[repo].commits][-1] == "a later push"
    card = ModelCard(hub.files(repo)["README.md"].decode())
    assert "longlora" in card.data.tags and "| Target context | 1024 tokens |" in card.text


@pytest.mark.parametrize("repo", [ADAPTER, PEFT_PUSHED])
def test_a_pulled_adapter_gives_the_pushed_logits_with_long_context_and_dense_attention(hub, pushed, tmp_path, repo):
    out = tmp_path / "pulled.safetensors"
    succeeded(hub_python(hub, tmp_path / "home", PULL_ADAPTER.format(repo=repo, base=BASE, pushed=pushed, out=out)))
    expected, pulled = load_file(pushed)["logits"], load_file(out)
    torch.testing.assert_close(pulled["auto"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pulled["explicit"], expected, atol=1e-5, rtol=0)
    downloads = [path for method, path in hub.state.requests if method == "GET" and "/resolve/" in path]
    assert any(path.startswith(f"/{repo}/resolve/") for path in downloads)  # it came over HTTP


def test_pulling_needs_longlora_hf_and_says_so(hub, pushed, tmp_path):
    code = f"""
        from peft import AutoPeftModelForCausalLM
        AutoPeftModelForCausalLM.from_pretrained("{ADAPTER}")
    """
    result = hub_python(
        hub, tmp_path / "home", code, cwd=tmp_path, extra_env={"PYTHONPATH": shadow_longlora_hf(tmp_path)}
    )
    assert result.returncode != 0 and "LONGLORA" in result.stderr


def test_merge_push_to_hub_publishes_a_model_plain_transformers_loads(hub, pushed, tmp_path):
    result = succeeded(
        hub_python(
            hub,
            tmp_path / "home_merge",
            f"""
        import sys
        from longlora_hf.cli import main
        sys.exit(main(["merge", "--base", "{BASE}", "--adapter", "{ADAPTER}", "--out", "{tmp_path / "merged"}",
                       "--push_to_hub", "{MERGED}"]))
    """,
        )
    )
    assert f"pushed to {MERGED}" in result.stdout
    files = hub.files(MERGED)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.base_model == BASE and "merged" in card.data.tags
    assert "no `longlora_hf` needed" in card.text and f'from_pretrained("{MERGED}")' in card.text
    # a process where longlora_hf cannot be imported loads it with its default attention: same logits
    out = tmp_path / "merged_logits.safetensors"
    succeeded(
        hub_python(
            hub,
            tmp_path / "home_plain",
            f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{MERGED}")
        assert model.config._attn_implementation == "sdpa" and model.config.max_position_embeddings == 1024
        with torch.no_grad():
            save_file({{"logits": model(load_file("{pushed}")["ids"]).logits}}, "{out}")
    """,
            cwd=tmp_path,
            extra_env={"PYTHONPATH": shadow_longlora_hf(tmp_path)},
        )
    )
    torch.testing.assert_close(load_file(out)["logits"], load_file(pushed)["logits"], atol=1e-4, rtol=0)
    assert_token_absent(files, tmp_path / "merged")


def test_merge_push_to_hub_without_a_token_fails_clearly_and_keeps_the_local_model(hub, pushed, tmp_path):
    result = hub_python(
        hub,
        tmp_path / "home",
        f"""
        import sys
        from longlora_hf.cli import main
        sys.exit(main(["merge", "--base", "{BASE}", "--adapter", "{ADAPTER}", "--out", "{tmp_path / "merged"}",
                       "--push_to_hub", "alice/never-created"]))
    """,
        token=None,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("longlora-hf ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("longlora-hf merge: error: the Hub refused the push to alice/never-created")
    assert "HF_TOKEN" in lines[0] and "the merged model is saved in" in lines[0] and "Traceback" not in result.stderr
    assert (tmp_path / "merged" / "model.safetensors").exists() and "alice/never-created" not in hub.state.repos


def closed_endpoint() -> str:
    """An HTTP endpoint on loopback where nothing listens: the Hub unreachable."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{free.getsockname()[1]}"


def test_merge_push_to_hub_with_the_hub_unreachable_ends_in_one_line_and_keeps_the_local_model(tmp_path):
    """Before, an `httpx...ConnectError` traceback and exit code 1."""
    from peft import get_peft_model

    from longlora_hf import LongLoraConfig

    tiny_model("llama").save_pretrained(tmp_path / "base")
    adapter = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=512))
    adapter.save_pretrained(tmp_path / "adapter")
    endpoint, out = closed_endpoint(), tmp_path / "merged"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "home"))
    command = "import sys; from longlora_hf.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            command,
            "merge",
            "--base",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(out),
            "--push_to_hub",
            "alice/unreachable",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("longlora-hf ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"longlora-hf merge: error: cannot reach the Hub at {endpoint} (ConnectError"), lines[0]
    assert "the push to alice/unreachable did not happen" in lines[0]
    assert f"the merged model is saved in {out} (to push it later: hf upload alice/unreachable {out}" in lines[0]
    assert TOKEN not in result.stdout + result.stderr
    assert (out / "model.safetensors").is_file()


def test_sft_push_to_hub_with_the_hub_unreachable_ends_in_one_line_before_training(tmp_path):
    """Before, an `httpx...ConnectError` traceback from the Trainer creating the repo, exit code 1."""
    endpoint, out = closed_endpoint(), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "home"))
    command = "import sys; from longlora_hf.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            command,
            "sft",
            "--config",
            "trainer_configs/recipes/tiny_cpu.yaml",
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--disable_tqdm",
            "true",
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "alice/unreachable",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("longlora-hf ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"longlora-hf sft: error: cannot reach the Hub at {endpoint}"), lines[0]
    assert "creating the repo for --push_to_hub (nothing trained yet) did not happen" in lines[0], lines[0]
    assert TOKEN not in result.stdout + result.stderr


def test_hub_errors_are_one_line_without_the_token(monkeypatch):
    """What `longlora-hf sft --push_to_hub` uses too: `hub_errors` around a push."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    from longlora_hf.hub.push import HubError, _transport_errors, hub_errors

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", "http://hub.example")
    connect_error = next(error for error in _transport_errors() if error.__module__.startswith(("httpx", "requests")))
    with pytest.raises(HubError) as failed:
        with hub_errors("alice/model", kept="the trained adapter is saved in /runs/x"):
            raise connect_error(f"refused\nwith Authorization: Bearer {TOKEN}")
    message = str(failed.value)
    assert message.startswith("cannot reach the Hub at http://hub.example (")
    assert "the push to alice/model did not happen; the trained adapter is saved in /runs/x" in message
    assert "\n" not in message and TOKEN not in message and isinstance(failed.value, OSError)
    with pytest.raises(HubError, match="^HF_HUB_OFFLINE is set, so the push to alice/model did not happen"):
        with hub_errors("alice/model"):
            raise OfflineModeIsEnabled("offline")
    with pytest.raises(HubError, match=r"^cannot reach .*\); creating alice/model \(--push_to_hub\) did not happen"):
        with hub_errors("alice/model", action="creating alice/model (--push_to_hub)"):
            raise connect_error("refused")
    with pytest.raises(KeyError):  # anything else passes unchanged
        with hub_errors("alice/model"):
            raise KeyError("x")


@pytest.mark.distributed  # a real training run, in a subprocess
def test_sft_push_to_hub_publishes_the_trained_adapter_with_its_training_in_the_card(hub, pushed, tmp_path):
    out = tmp_path / "run"
    result = succeeded(
        hub_python(
            hub,
            tmp_path / "home_train",
            f"""
        import sys
        from longlora_hf.cli import main
        sys.exit(main(["sft", "--config", "trainer_configs/recipes/tiny_cpu.yaml", "--model_name_or_path", "{BASE}",
                       "--output_dir", "{out}", "--max_steps", "2", "--disable_tqdm", "true",
                       "--push_to_hub", "true", "--hub_model_id", "{SFT}"]))
    """,
        )
    )
    files = hub.files(SFT)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert not any(name.startswith("checkpoint-") for name in files)
    card = ModelCard(files["README.md"].decode())
    assert {"longlora", "peft", "trl", "sft"} <= set(card.data.tags) and card.data.base_model == BASE
    assert (
        "| Training steps | 2 (per-device batch 1, gradient accumulation 1, 1 process(es), lr 0.001, "
        "max_length 1024) |" in card.text
    )
    assert "| Target context | 1024 tokens |" in card.text and f'from_pretrained("{SFT}")' in card.text
    # the pulled adapter is the one the run saved
    pulled = tmp_path / "pulled.safetensors"
    succeeded(
        hub_python(
            hub,
            tmp_path / "home_pull",
            f"""
        import torch, longlora_hf
        from peft import AutoPeftModelForCausalLM
        from safetensors.torch import save_file
        ids = torch.randint(0, 4096, (1, 300), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            save_file({{"hub": AutoPeftModelForCausalLM.from_pretrained("{SFT}")(ids).logits,
                        "local": AutoPeftModelForCausalLM.from_pretrained("{out}")(ids).logits}}, "{pulled}")
    """,
        )
    )
    logits = load_file(pulled)
    torch.testing.assert_close(logits["hub"], logits["local"], atol=0, rtol=0)
    assert_token_absent(files, out)
    assert TOKEN not in result.stdout + result.stderr and CARD_WARNING not in result.stderr


PLAIN_SFT_PUSH = """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from longlora_hf import LongLoraConfig
    from longlora_hf.training import LongLoraCallback

    rows = torch.randint(4, 4096, (2, 128), generator=torch.Generator().manual_seed(0)).tolist()
    arguments = SFTConfig(output_dir="{out}", max_length=128, per_device_train_batch_size=1, max_steps=1, bf16=False,
                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, hub_model_id="{repo}")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained("{base}"), args=arguments,
                         train_dataset=Dataset.from_dict({{"input_ids": rows}}),
                         processing_class=AutoTokenizer.from_pretrained("{base}"),
                         peft_config=LongLoraConfig(target_context_length=1024), callbacks=[LongLoraCallback()])
    trainer.train()
    trainer.push_to_hub()
"""
CARD_WARNING = "LongLoRA: this push publishes the trainer's own model card, not the LongLoRA card"


@pytest.mark.distributed  # a real training run, in a subprocess
def test_a_plain_sft_trainer_push_publishes_trls_card_and_the_callback_says_how_to_publish_ours(hub, pushed, tmp_path):
    """TRL writes its card between saving the adapter and uploading, out of a callback's reach: the adapter is
    published, the card is TRL's, and `LongLoraCallback` says so once, naming both ways to the LongLoRA card."""
    repo = "alice/tiny-plain-sft"
    result = succeeded(
        hub_python(hub, tmp_path / "home", PLAIN_SFT_PUSH.format(out=tmp_path / "run", repo=repo, base=BASE))
    )
    assert result.stderr.count(CARD_WARNING) == 1
    assert (
        "LongLoraSFTTrainer in place of SFTTrainer" in result.stderr
        and "push_adapter_to_hub(trainer.model" in result.stderr
    )
    files = hub.files(repo)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LONGLORA"
    card = ModelCard(files["README.md"].decode())
    assert "trl" in card.data.tags and "longlora" not in card.data.tags and "| Target context |" not in card.text


def test_the_loopback_hub_refuses_what_the_hub_refuses(hub, tmp_path):
    """The server's checks are real: the client gets the Hub's errors for them."""
    result = hub_python(
        hub,
        tmp_path / "home",
        """
        from huggingface_hub import HfApi
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
        api = HfApi()
        api.create_repo("alice/private-one", private=True)
        api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="alice/private-one")
        def refused(call, error, text=""):
            try:
                call()
            except error as e:
                assert text in str(e), str(e)
                return
            raise AssertionError(f"not refused: {call}")
        anonymous = HfApi(token=False)
        refused(lambda: anonymous.model_info("alice/private-one"), RepositoryNotFoundError)
        refused(lambda: HfApi(token="hf_wrong").upload_file(path_or_fileobj=b"y", path_in_repo="b.txt",
                                                             repo_id="alice/private-one"),
                HfHubHTTPError, "Invalid credentials")
        refused(lambda: api.create_repo("bob/not-mine"), HfHubHTTPError, "403")
        refused(lambda: api.hf_hub_download("alice/private-one", "missing.txt"), EntryNotFoundError)
        refused(lambda: api.upload_file(path_or_fileobj=b"---\\nbase_model: ./local/dir\\n---\\n# card\\n",
                                        path_in_repo="README.md", repo_id="alice/private-one"),
                ValueError, "base_model")
        assert api.list_repo_files("alice/private-one") == [".gitattributes", "a.txt"]
        print("all refused")
    """,
    )
    assert result.returncode == 0 and "all refused" in result.stdout, result.stderr[-3000:]
