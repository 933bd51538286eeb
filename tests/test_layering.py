"""The package's three layers: the core imports neither the study nor an integration."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import svdcompress as sc
from svdcompress.cli import main
from svdcompress.core.errors import MissingDependency, require

SRC = Path(sc.__file__).parent


def test_importing_the_core_loads_no_study_integration_or_heavy_dependency():
    code = ("import sys, svdcompress; print(' '.join(m for m in sys.modules if m.split('.')[0] in "
            "('matplotlib', 'transformers', 'onnx', 'onnxruntime') or "
            "m.startswith(('svdcompress.study', 'svdcompress.integrations', 'svdcompress.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def test_core_files_import_only_the_core():
    for path in (SRC / "core").glob("*.py"):
        for node in _imports(path):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name} imports {'.' * node.level}{node.module}"
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                assert not name.startswith(("svdcompress", "matplotlib", "transformers", "onnx")), \
                    f"{path.name} imports {name}"


def test_study_and_integrations_do_not_import_each_other_or_the_cli():
    for layer, other in (("study", "integrations"), ("integrations", "study")):
        for path in (SRC / layer).glob("*.py"):
            for node in _imports(path):
                if isinstance(node, ast.ImportFrom):
                    module = node.module or ""
                    assert not module.startswith((other, "cli")) and module != "..cli", \
                        f"{layer}/{path.name} imports {module}"


def test_no_function_local_imports_anywhere():
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{path.relative_to(SRC)}: import inside {fn.name}()"


def test_no_source_file_over_400_lines():
    for path in SRC.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.relative_to(SRC)


def test_missing_optional_dependency_names_the_pip_command():
    with pytest.raises(MissingDependency, match=r"pip install 'svdcompress\[study\]'"):
        require("surely_not_an_installed_module_xyz", extra="study")
    assert issubclass(MissingDependency, ImportError) and issubclass(MissingDependency, sc.SVDCompressError)


def test_missing_dependency_is_one_cli_line(monkeypatch, tmp_path, capsys):
    from svdcompress.study import MLP
    sc.save(MLP(6, [5], 2), tmp_path / "run")

    def missing(*a, **k):
        raise MissingDependency("onnx is needed for this: pip install 'svdcompress[onnx]'")
    monkeypatch.setattr("svdcompress.cli.export_run", missing)
    assert main(["export", str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'svdcompress[onnx]'" in err


def test_real_bugs_keep_their_traceback_and_debug_shows_user_errors(monkeypatch, tmp_path, capsys):
    def bug(*a, **k):
        raise RuntimeError("a bug, not the user's fault")
    monkeypatch.setattr("svdcompress.cli.eval_run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["eval", str(tmp_path)])
    assert main(["--debug", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith(f"run directory not found: {tmp_path / 'missing'}")
