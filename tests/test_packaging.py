"""dyt-core stands alone: importing it pulls in no recipe dependency, and it installs into a venv
that has nothing but torch and ninja."""

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_dyt_does_not_import_recipe_dependencies():
    code = (
        "import sys, dyt, dyt.analysis; "
        "heavy = [m for m in ('deepspeed', 'fairseq2', 'datasets', 'matplotlib', 'yaml') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _requirement_closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        dist_name = todo.pop()
        key = dist_name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        seen.add(key)
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    return seen


@pytest.mark.slow
def test_dyt_core_installs_alone_into_a_torch_only_venv(tmp_path):
    """A venv whose site-packages holds torch, ninja and their own requirements (linked from this
    venv, to skip a multi-GB download), then ``pip install ./packages/dyt-core``."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    for name in _requirement_closure("torch") | _requirement_closure("ninja"):
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not top.startswith("..") and top != "bin" and not (site / top).exists():
                (site / top).symlink_to(source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT / "packages" / "dyt-core")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    check = subprocess.run(
        [python, "-c", "import torch, dyt; y = dyt.DyT(4, backend='eager')(torch.randn(2, 4)); "
         "report = dyt.convert_norms(torch.nn.Sequential(torch.nn.LayerNorm(4))); print(len(report.replaced))"],
        capture_output=True, text=True, env=env,
    )
    assert check.returncode == 0 and check.stdout.strip() == "1", check.stdout + check.stderr
    listed = subprocess.check_output([python, "-m", "pip", "list", "--format=freeze"], text=True, env=env)
    assert "deepspeed" not in listed and "fairseq2" not in listed


def test_import_dyt_data_imports_neither_torch_nor_the_kernel_package():
    code = (
        "import sys, dyt_data, dyt_data.shards; "
        "heavy = [m for m in ('torch', 'dyt', 'datasets', 'deepspeed') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_dyt_data_installs_alone_with_its_declared_dependencies(tmp_path):
    """A venv holding only dyt-data's declared requirements (linked from this venv), then ``pip
    install --no-deps ./packages/dyt-data``: it imports, unpack's and the shards' modules load, and a
    stream writes and reads back. An undeclared import (filelock once was) fails here."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    import tomllib

    declared = set()
    for requirement in tomllib.loads((ROOT / "packages" / "dyt-data" / "pyproject.toml").read_text())["project"]["dependencies"]:
        declared |= _requirement_closure(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    for name in declared:
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(top))
            if source.exists() and not top.startswith("..") and top != "bin" and not (site / top).exists():
                (site / top).symlink_to(source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         str(ROOT / "packages" / "dyt-data")], capture_output=True, text=True, env=env, timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    check = subprocess.run([python, "-c", (
        "import sys, numpy as np, pathlib, dyt_data, dyt_data.debian, dyt_data.shards as s; "
        "folder = pathlib.Path(sys.argv[1]); "
        "s.write_shards(folder, [[0, 2]], lambda a, b, p: (np.arange(5, dtype=np.uint16).tofile(p), [2, 3])[1], np.uint16, {}); "
        "print(s.TokenShards(folder).read(1, 3).tolist(), 'torch' in sys.modules)"), str(tmp_path / "stream")],
        capture_output=True, text=True, env=env)
    assert check.returncode == 0 and check.stdout.strip() == "[1, 2, 3] False", check.stdout + check.stderr



OPTIONAL_IMPORTS = {
    "dyt-core": {"triton", "liger_kernel", "mamba_ssm"},
    "dyt-dna": {"mamba_ssm"},
}
"""Modules a package imports only behind a guard that names what to install (the Triton backends, the
Liger and Mamba references of ``dyt-bench``, Caduceus' CUDA scan), so not
dependencies."""

USED_WITHOUT_IMPORT = {"ninja", "tensorboard"}
"""Declared, never imported by name: torch's cpp_extension runs ninja, torch.utils.tensorboard needs
tensorboard."""


def _imported_distributions(src: Path, optional: set[str]) -> dict[str, set[str]]:
    """Distribution name -> the modules of ``src`` that import it, for every ``import`` statement
    anywhere in the files (lazy imports inside functions too); the standard library and the
    package's own modules and the ``optional`` ones left out."""
    import ast

    owners = metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in optional or (src / top).is_dir():
                    continue
                for dist in owners.get(top, [f"(no installed distribution provides {top!r})"]):
                    found.setdefault(dist.lower().replace("_", "-"), set()).add(path.relative_to(src).as_posix())
    return found


@pytest.mark.parametrize("package", ["dyt-core", "dyt-data", "dyt-llama", "dyt-wav2vec2", "dyt-dna"])
def test_each_package_declares_every_distribution_it_imports(package):
    """A package installed alone gets only what its pyproject.toml declares (extras included for
    dyt-core, whose extras are what ``dyt.train`` and the plots need): an import that arrives through
    someone else's requirements breaks when they drop it."""
    import tomllib

    project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project.get("optional-dependencies", {}).values()
                                                 for r in extra)]
    declared = {re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    imported = _imported_distributions(ROOT / "packages" / package / "src", OPTIONAL_IMPORTS.get(package, set()))
    missing = {dist: sorted(files) for dist, files in imported.items() if dist not in declared | {package}}
    assert not missing, f"{package} imports distributions its pyproject.toml does not declare: {missing}"
    unused = declared - set(imported) - USED_WITHOUT_IMPORT
    assert not unused, f"{package} declares distributions it never imports: {sorted(unused)}"
