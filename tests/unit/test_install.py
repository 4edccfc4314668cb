import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _install_module():
    spec = importlib.util.spec_from_file_location("personalize_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_only_missing_or_unsatisfied_requirements_are_installed(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nsafetensors>=0.1  # present\nnumpy<1.0\nno-such-package-personalize==1.0\n\n")
    assert _install_module().missing_requirements(req) == ["numpy<1.0", "no-such-package-personalize==1.0"]


def test_shipped_requirements_never_name_torch():
    names = [line.split("#")[0].strip().lower() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not any(n.startswith(("torch", "torchvision", "torchaudio")) for n in names if n)
