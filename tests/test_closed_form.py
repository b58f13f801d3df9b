"""`--method scale`: the closed form of fixed-tau TS-OPSD, logits / tau by a weight edit, on every family."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from test_bad_input_and_signals import runner

from tsopsd.cli import app
from tsopsd.closed_form import MAX_TRIES, next_tau, scale_logits_
from tsopsd.errors import ExitCode
from tsopsd.lab.tiny import ARCHS, build_checkpoint, build_tokenizer, model_config

TAU = 1.7


def _tiny(arch: str, seed: int = 0):
    """A random tiny model of `arch` with its final norm (or head) disturbed, so no weight is trivially 1 or 0."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, 96, hidden=32), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_the_edit_divides_every_logit_by_tau_in_every_family(arch):
    """Against a float64 reference (the input in float64, its logits / tau) on random token sequences."""
    model = _tiny(arch)
    reference = copy.deepcopy(model).double()
    what = scale_logits_(model, TAU, copy.deepcopy(model))
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(input_ids=ids).logits.double()
        want = reference(input_ids=ids).logits / TAU
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (arch, what, float((got - want).abs().max()))
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    if arch in ("phi", "olmo"):  # a head with a bias, a norm without weight (OLMo's head is tied: untied first)
        assert what.startswith("LM head")
        assert arch != "olmo" or model.lm_head.weight is not model.get_input_embeddings().weight
    else:
        assert what.startswith("final norm")


def test_a_soft_capped_head_gets_its_cap_divided_too():
    """Gemma 2: logits cap * tanh(z / cap); with a cap the logits reach, dividing only z would not be exact."""
    model = _tiny("gemma2")
    model.config.final_logit_softcapping = 0.3
    reference = copy.deepcopy(model).double()
    scale_logits_(model, TAU, copy.deepcopy(model))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(input_ids=ids).logits / TAU
        got = model(input_ids=ids).logits.double()
    assert math.isclose(model.config.final_logit_softcapping, 0.3 / TAU)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    model.config.final_logit_softcapping = 0.3  # the norm's edit alone: the cap bends these logits, so it is not exact
    with torch.no_grad():
        assert (model(input_ids=ids).logits.double() - want).abs().max() > 1e-3


def test_the_solve_finds_a_target_in_few_measurements():
    """`next_tau` on entropy curves of the shapes rollouts give (steep, then saturating): within 1% of the target,
    starting from tau = 1, in at most MAX_TRIES measurements."""
    curves = {"steep": lambda t: 0.1 * t ** 4, "saturating": lambda t: 3 * (1 - math.exp(-t / 2)),
              "linear": lambda t: 0.5 * t, "from near zero to near log V": lambda t: 5.6 * t ** 6 / (t ** 6 + 80)}
    for name, h in curves.items():
        for target in (0.3, 0.8, 1.5, 4.8):
            if h(1.0) >= target or h(64.0) <= target:
                continue  # out of this curve's reach
            tries = [(1.0, h(1.0))]
            for _ in range(MAX_TRIES):
                tau = next_tau(tries, target)
                tries.append((tau, h(tau)))
                if abs(h(tau) - target) <= 0.01 * target:
                    break
            assert abs(tries[-1][1] - target) <= 0.01 * target, (name, target, tries)


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    tok = build_tokenizer()
    for i, arch in enumerate(ARCHS):
        build_checkpoint(root / arch, arch=arch, seed=i, sharpen=4.0, tokenizer=tok)
    (root / "p.jsonl").write_text("".join(json.dumps({"prompt": f"the cat sat on {i} and the"}) + "\n"
                                          for i in range(24)))
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_reheat_method_scale_writes_the_closed_form(family_ckpts, tmp_path, arch):
    """Through the CLI: exit 0, status met, OUT loads in plain transformers with logits = the input's / tau and the
    same top-1, its report and card present."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "o"
    res = runner.invoke(app, ["reheat", str(family_ckpts / arch), "--prompts", str(family_ckpts / "p.jsonl"), "--out",
                              str(out), "--method", "scale", "--temperature", str(TAU), "--set", "output.eval_prompts=4",
                              "--set", "output.eval_samples_per_prompt=2", "--max-new-tokens", "4", "--quiet", "--json"])
    assert res.exit_code == ExitCode.DONE, res.stderr
    report = json.loads(res.stdout)
    assert report["status"] == "met" and report["method"] == "scale" and report["closed_form"]["tau"] == TAU
    assert (out / "README.md").read_text().count("closed form of TS-OPSD") == 1
    assert json.loads((out / "reheat_report.json").read_text())["closed_form"]["max_logit_error"] < 1e-4
    original = AutoModelForCausalLM.from_pretrained(str(family_ckpts / arch), dtype=torch.float64)
    edited = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.randint(0, original.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = original(input_ids=ids).logits / TAU, edited(input_ids=ids).logits.double()
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_method_scale_refuses_an_adapter_in_one_line(family_ckpts, tmp_path):
    p = subprocess.run([sys.executable, "-m", "tsopsd", "reheat", str(family_ckpts / "llama"), "--prompts",
                        str(family_ckpts / "p.jsonl"), "--out", str(tmp_path / "o"), "--method", "scale",
                        "--save", "adapter"], capture_output=True, text=True, timeout=120)
    assert p.returncode == ExitCode.BAD_INPUT and not (tmp_path / "o").exists()
    assert p.stderr.strip().splitlines() == ["tsopsd: error: invalid config: output.save: 'adapter' cannot hold "
                                             "--method scale (it edits the final norm or the LM head, which a LoRA "
                                             "adapter cannot express in a form vLLM loads): use --save merged"]


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "olmo"])
def test_an_edit_on_top_of_an_edit_composes(arch):
    """`scale_logits_(model, r, model)`: the model's own logits / r again (how a callback solves tau in place with no
    copy of the model): 1.3 then 2.0/1.3 is the edit at 2.0, for a plain norm, a Gemma norm with a cap and a tied
    head."""
    model = _tiny(arch)
    reference = copy.deepcopy(model).double()
    scale_logits_(model, 1.3, model)
    scale_logits_(model, 2.0 / 1.3, model)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits.double(), reference(input_ids=ids).logits / 2.0, atol=1e-5)


def test_the_check_refuses_logits_that_are_not_the_inputs_over_tau():
    """`check_scaled` on an edit that did not happen (or a family it does not fit): one line, not a silent output."""
    from tsopsd.closed_form import check_scaled
    from tsopsd.errors import TsopsdError

    model = _tiny("llama")
    original = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with pytest.raises(TsopsdError, match="the edit does not fit this family"):
        check_scaled(model, original, ids, TAU)
    scale_logits_(model, TAU, original)
    assert check_scaled(model, original, ids, TAU) < 1e-5
