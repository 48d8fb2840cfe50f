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
