import json
import shutil

import pytest
import torch

from tsopsd.checkpoint import load_checkpoint, resolve_dtype
from tsopsd.errors import TsopsdError
from tsopsd.lab.tiny import build_checkpoint
from tsopsd.writing import atomic_output


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "qwen3"])
def test_loads_each_architecture_with_left_padding_and_pad_token(ckpts, arch):
    ck = load_checkpoint(ckpts[arch], device="cpu")
    assert ck.dtype == torch.float32
    assert not ck.model.training
    assert ck.tokenizer.padding_side == "left"
    assert ck.tokenizer.pad_token_id == ck.tokenizer.eos_token_id  # the toy tokenizer has no pad token


def test_dtype_auto_is_fp32_on_cpu_and_override_works(ckpt):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    ck = load_checkpoint(ckpt, device="cpu", dtype="bfloat16")
    assert next(ck.model.parameters()).dtype == torch.bfloat16


def test_sharded_checkpoint_loads(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model, _ = build_checkpoint(tmp_path / "sharded", arch="llama", tokenizer=tok, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ck = load_checkpoint(tmp_path / "sharded", device="cpu")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), ck.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "checkpoint not found"),
        ("empty", "not a model folder (no config.json)"),
        ("no_weights", "no weights in"),
        ("truncated", "truncated weights file"),
        ("corrupt_header", "corrupt weights file"),
        ("no_tokenizer", "no tokenizer in"),
        ("missing_shard", "weights shard missing"),
    ],
)
def test_bad_checkpoints_give_clear_errors(tmp_path, ckpt, breakage, message):
    path = tmp_path / "ck"
    if breakage == "missing":
        pass
    elif breakage == "empty":
        path.mkdir()
    else:
        _copy(ckpt, path)
        weights = path / "model.safetensors"
        if breakage == "no_weights":
            weights.unlink()
        elif breakage == "truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) - 100])
        elif breakage == "corrupt_header":
            data = bytearray(weights.read_bytes())
            data[8:20] = b"not json at!"
            weights.write_bytes(bytes(data))
        elif breakage == "no_tokenizer":
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (path / name).unlink()
        elif breakage == "missing_shard":
            (path / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}))
            weights.unlink()
    with pytest.raises(TsopsdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(path, device="cpu")


def _save_adapter(ckpt, out, base_name):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(ckpt)).save_pretrained(str(out))
    return peft_model


def test_adapter_loads_with_its_base_and_with_base_override(tmp_path, ckpt):
    peft_model = _save_adapter(ckpt, tmp_path / "adapter", str(ckpt))
    ck = load_checkpoint(tmp_path / "adapter", device="cpu")
    assert ck.is_adapter and ck.base_path == ckpt
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(ck.model(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits, atol=1e-5)
    _save_adapter(ckpt, tmp_path / "moved", "/nowhere/base")
    with pytest.raises(TsopsdError, match="adapter base '/nowhere/base' not found.*--base"):
        load_checkpoint(tmp_path / "moved", device="cpu")
    assert load_checkpoint(tmp_path / "moved", base=ckpt, device="cpu").base_path == ckpt


def test_atomic_output_refuses_existing_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        (tmp / "a.txt").write_text("complete")
    assert (out / "a.txt").read_text() == "complete"
    with pytest.raises(TsopsdError, match="output folder exists.*--overwrite"):
        with atomic_output(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "complete"  # the old output survives a failed overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_follow_the_users_umask(tmp_path, mask):
    """An output folder and its files get the modes the umask asks for (mkdtemp alone gives 0700, and safetensors
    writes weights 0600): readable by the RL job or a teammate on a shared cluster under 022, private under 077."""
    import os
    import stat

    from safetensors.torch import save_file

    from tsopsd.writing import atomic_output

    old = os.umask(mask)
    try:
        with atomic_output(tmp_path / "o") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors leaves it
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.json").write_text("{}")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "o", *(tmp_path / "o").rglob("*")]}
    want_dir, want_file = 0o777 & ~mask, 0o666 & ~mask
    assert modes == {"o": want_dir, "o/model.safetensors": want_file, "o/sub": want_dir, "o/sub/a.json": want_file}
