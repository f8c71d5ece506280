"""What `pip install` puts on a user's path: one package, `stablemlp`, and nothing generic."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("model", "export", "serving", "protos", "bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    (found,) = out.glob("stablemlp-*.whl")
    return found


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"stablemlp"}
    for sub in SUBPACKAGES:
        assert f"stablemlp/{sub}/__init__.py" in names
    assert {"stablemlp/__init__.py", "stablemlp/__main__.py", "stablemlp/cli.py"} <= set(names)
    assert not any("/tests/" in name or name.endswith(".onnx") for name in names)


def test_the_wheel_imports_as_stablemlp_only(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import stablemlp, stablemlp.serving.server, stablemlp.protos.grpc_service_pb2; "
        "assert stablemlp.serving.server.__file__.startswith(sys.argv[1]); "
        "import importlib.util as u; "
        "assert all(u.find_spec(n) is None for n in ('model', 'export', 'serving', 'protos', "
        "'bench', 'cli'))"
    )
    # -I: no user site, no PYTHONPATH, and not the current folder (a checkout) on the path
    subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path / "site")],
        check=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip


def test_the_installed_package_runs_as_a_module_and_a_console_script(tmp_path: Path) -> None:
    failed = subprocess.run(
        [sys.executable, "-I", "-c", "import model"], cwd=tmp_path, capture_output=True, text=True
    )
    assert failed.returncode != 0 and "No module named 'model'" in failed.stderr
    as_module = subprocess.run(
        [sys.executable, "-I", "-m", "stablemlp", "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert as_module.returncode == 0 and "serve" in as_module.stdout
    script = Path(sys.executable).parent / "stablemlp"
    as_script = subprocess.run(
        [str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert as_script.returncode == 0 and as_script.stdout == as_module.stdout


def test_the_declared_python_is_the_one_the_code_needs() -> None:
    """Issue 23.3: the REST body reader uses asyncio.timeout (3.11+); pyproject declared 3.10,
    where every body that did not come with its headers got 500. CI runs 3.11 only, so 3.11 is
    what is declared, linted for and type-checked for."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["requires-python"] == ">=3.11"
    assert config["tool"]["ruff"]["target-version"] == "py311"
    assert config["tool"]["mypy"]["python_version"] == "3.11"
    assert "asyncio.timeout(" in (ROOT / "serving" / "rest" / "guard.py").read_text()


def _imports(path: Path) -> set[str]:
    """The absolute names of the modules `path` imports (relative ones resolved in stablemlp)."""
    package = ["stablemlp", *path.parent.relative_to(ROOT).parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.add(".".join([*base, *([node.module] if node.module else [])]))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


PROTOCOL_FREE = ("runtime", "repository", "observe", "codec.py", "dataplane.py", "datatypes.py",
                 "errors.py", "manifest.py", "settings.py", "protowire.py",
                 "triton.py")  # fmt: skip
PROTOCOLS = ("stablemlp.protos", "google.protobuf", "grpc", "aiohttp")


def test_the_fronts_stand_on_a_core_that_knows_no_protocol() -> None:
    serving = ROOT / "serving"
    checked = 0
    for path in sorted(serving.rglob("*.py")):
        top, imports = path.relative_to(serving).parts[0], _imports(path)
        other = {"grpc": "stablemlp.serving.rest", "rest": "stablemlp.serving.grpc"}.get(top)
        assert other is None or not any(name.startswith(other) for name in imports), path
        if top in PROTOCOL_FREE:
            checked += 1
            assert not [name for name in imports if name.startswith(PROTOCOLS)], path
        if top == "rest":  # REST writes JSON itself: protobuf is the gRPC front's alone
            assert not [n for n in imports if n.startswith(PROTOCOLS[:2])], path
    assert checked >= 20  # the subpackages were found


def test_bench_where_it_is_left_out_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The serving image leaves stablemlp.bench out (Dockerfile): `stablemlp bench` there fails
    with one line naming the fix, not a traceback."""
    from stablemlp.cli import main

    monkeypatch.setitem(sys.modules, "stablemlp.bench.cli", None)  # import fails as in the image
    assert main(["bench", "--smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stablemlp bench: error: the benchmarks are not installed here")
    assert err.count("\n") == 1 and "pip install '.[bench]'" in err


def test_the_serving_images_drop_the_benchmarks() -> None:
    """Both venv stages (CPU, CUDA) remove stablemlp.bench right after installing the package."""
    text = (ROOT / "Dockerfile").read_text()
    drop = "&& rm -r /opt/venv/lib/python3*/site-packages/stablemlp/bench \\"
    installs = [line for line in text.splitlines() if "/opt/venv/bin/pip install /src" in line]
    assert len(installs) == 2 and text.count(drop) == 2
