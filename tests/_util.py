"""Helpers shared by test modules (importable both under pytest and when a test file runs as a script)."""

import json
import os
import subprocess
import sys

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against ``ref`` in float64; inf if ``out`` has a NaN or inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def run_interpreted(script: str) -> dict:
    """Run test file ``script`` as a script under TRITON_INTERPRET=1 (CPU tensors through the Triton
    kernels) in a fresh interpreter with this checkout first on the path; its last stdout line, as JSON."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, installed or not
    env = dict(os.environ, TRITON_INTERPRET="1", DELTATUNE_TRITON="interpret",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_errors_within(name: str, errs: dict, tol: float, what: str = "error") -> None:
    """A check's result ``errs``: every bool (a property the check tested) true, every number (an error) <= ``tol``."""
    flags = {k: v for k, v in errs.items() if isinstance(v, bool)}
    assert all(flags.values()), f"{name}: {flags}"
    bad = {k: v for k, v in errs.items() if not isinstance(v, bool) and not v <= tol}
    assert not bad, f"{name}: {what} over {tol}: {bad} (all: {errs})"
