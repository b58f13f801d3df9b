"""`tsopsd demo --quick` from a built wheel, installed into a fresh venv, run outside the repository."""

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.xdist_group("quick_demo")
def test_demo_quick_runs_from_an_installed_wheel(tmp_path, quick_demo):
    dist = tmp_path / "dist"
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' build/lib keeps deleted modules and data forever
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    wheel = next(dist.glob("tsopsd-*.whl"))
    import zipfile

    packed = set(zipfile.ZipFile(wheel).namelist())  # every module of the source tree, subpackages too
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tsopsd").rglob("*.py"))
               if str(p.relative_to(ROOT)) not in packed]
    assert not missing, f"not in the wheel (pyproject.toml's packages): {missing}"
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # the wheel goes in; its dependencies (torch & co., gigabytes) are borrowed from this environment by
    # path: a plain path line adds no .pth of its own, so this environment's editable tsopsd stays out
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "borrowed-deps.pth").write_text("\n".join(sorted(paths)) + "\n")
    away = tmp_path / "elsewhere"
    away.mkdir()
    # SFT and GRPO collapse are reused from this session's demo (the demo caches its stages); the
    # installed package runs the rest: the reheat with its packaged config, measuring, pictures
    for stage in ("sft", "collapsed"):
        shutil.copytree(quick_demo[0] / stage, away / "demo" / stage)
    where = subprocess.check_output([str(python), "-c", "import tsopsd.lab.demo as d; print(d.__file__)"], cwd=away,
                                    text=True).strip()
    assert where.startswith(str(site)), where
    # the shipped configs are package data: `--config lora` works from the wheel, away from any source tree
    named = subprocess.check_output([str(python), "-c", "from pathlib import Path; from tsopsd.config import "
                                     "load_config, shipped_config; print(shipped_config(Path('lora'))); "
                                     "print(load_config('qwen3-4b-1gpu', inputs=False).train.mode)"],
                                    cwd=away, text=True).split()
    assert named[0].startswith(str(site)) and named[0].endswith("tsopsd/configs/lora.yaml") and named[1] == "lora", named
    p = subprocess.run([str(python), "-m", "tsopsd", "demo", "--quick", "--out", "demo", "--json", "--quiet"],
                       cwd=away, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout)
    assert set(summary["results"]) == {"sft", "collapsed", "reheated"}
    assert (away / "demo" / "reheated" / "model.safetensors").is_file()
    # the same reheat as the in-repo demo's: same packaged config, same seeds, same result
    assert summary["reheat_report"]["after"] == quick_demo[1]["reheat_report"]["after"]
