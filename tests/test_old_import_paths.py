"""The tier layout of 0.2 (ops/, kernels/, measure/, nn/, train/, integrations/, testing/): every old module path
still imports, as the moved module itself, with a DeprecationWarning naming the new path; the documented short paths
(mat_kernels.hf, .optim, .flops, .reference) import without a warning. Each check runs in a fresh interpreter (a
module warns only when it is first imported)."""
import os
import subprocess
import sys

import pytest

OLD_TO_NEW = {
    "estimate": "measure.layer", "solvers": "measure.solvers", "blocks": "measure.blocks",
    "modules": "measure.discovery", "capture": "measure.capture", "model": "measure.model",
    "layouts": "measure.layouts", "layouts.attention": "measure.layouts.attention",
    "sparse_linear": "nn.sparse_linear", "mat": "train.controller", "policy": "train.policy",
    "prune": "train.prune", "torch_impl": "kernels.torch_segment_grams", "triton.gram": "kernels.triton_segment_grams",
    "triton.autotune": "kernels.triton_autotune", "ops.gram": "ops.segment_grams", "ops.sparse_update": "ops.sparse_grad",
}
PUBLIC = {"hf": "integrations.hf", "optim": "train.optim", "flops": "train.flops", "reference": "testing.reference"}

SCRIPT = """
import importlib, sys, warnings
old, new, expect_warning, warned, warned_new = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
import mat_kernels
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mod = importlib.import_module("mat_kernels." + old)
dep = [w for w in caught if issubclass(w.category, DeprecationWarning) and f"mat_kernels.{warned} is" in str(w.message)]
assert mod is importlib.import_module("mat_kernels." + new), (mod, new)
assert bool(dep) == expect_warning, [str(w.message) for w in caught]
if expect_warning:
    assert "mat_kernels." + warned_new in str(dep[0].message)
print("ok")
"""


@pytest.mark.parametrize("old,new,warns", [(o, n, True) for o, n in OLD_TO_NEW.items()]
                         + [(o, n, False) for o, n in PUBLIC.items()])
def test_old_path(old, new, warns):
    # a submodule of a moved package is reached through the package, which is the one that warns
    parent = old.rsplit(".", 1)[0]
    warned = parent if "." in old and parent in OLD_TO_NEW else old
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, old, new, "1" if warns else "0", warned,
                        OLD_TO_NEW.get(warned, new)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_old_module_attributes_warn():
    r = subprocess.run([sys.executable, "-c", "import warnings, mat_kernels as mk\n"
                        "with warnings.catch_warnings(record=True) as w:\n"
                        "    warnings.simplefilter('always')\n"
                        "    rule = mk.policy.TemporalRule\n"
                        "assert rule.__module__ == 'mat_kernels.train.policy'\n"
                        "assert any('mat_kernels.policy is deprecated' in str(x.message) for x in w)\n"
                        "print('ok')"], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


def test_no_import_cycle_and_no_old_path_inside_the_package():
    """Importing the package imports no deprecated path (nothing inside uses one) and no module imports a module
    that imports it back at import time."""
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c",
                        "import mat_kernels, mat_kernels.ops, mat_kernels.testing.reference"],
                       capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
