"""The ops tier must stay free of Megatron and of the oracle packages."""

import subprocess
import sys


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_ops_imports_no_megatron_or_oracle():
    mods = _modules_after_import("xlstm_megatron.ops")
    bad = sorted(m for m in mods if m.split(".")[0] in {"megatron", "xlstm", "mlstm_kernels", "transformers"})
    assert not bad, f"ops tier imported {bad[:5]}"


# Which of the package's tiers each tier may import: one way, lower tiers first; the peers at the top (training,
# convert, inference, studies) share `runs` and never import each other (the command line wires them together).
ALLOWED = {
    "ops": {"ops"},
    "compat": {"compat"},
    "data": {"data"},
    "layers": {"ops", "layers"},
    "models": {"ops", "layers", "models"},
    "runs": {"ops", "compat", "data", "layers", "models", "runs"},
    "training": {"ops", "compat", "data", "layers", "models", "runs", "training"},
    "convert": {"ops", "compat", "data", "layers", "models", "runs", "convert"},
    "inference": {"ops", "compat", "data", "layers", "models", "runs", "inference"},
    "studies": {"ops", "compat", "data", "layers", "models", "runs", "studies"},
}


def test_tiers_import_one_way():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "xlstm_megatron"
    bad = []
    for tier, allowed in ALLOWED.items():
        for path in (root / tier).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "xlstm_megatron" and len(parts) > 1 and parts[1] not in allowed:
                        bad.append(f"{path.relative_to(root)} imports {name}")
    assert not bad, bad
    assert {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")} == set(ALLOWED)
