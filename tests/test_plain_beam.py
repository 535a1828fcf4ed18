"""The rule of issue 20: pipeline/ uses Beam (and every other library) through public APIs only.
No import of Beam's runner internals, no fork of our own, no patching of a library's modules or
defaults, no gc or malloc tricks. What runs on a laptop is then what runs on Dataflow, Flink or
Spark, and a Beam upgrade cannot break the build through a private field."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"

# Beam's runner internals and private utilities: apache_beam.runners.* (a runner is chosen by its
# --runner name), apache_beam.utils.*, and the SDK harness' modules by name.
PRIVATE_MODULES = re.compile(r"^apache_beam\.(runners|utils|internal)(\.|$)|worker_handlers|data_plane|statesampler"
                             r"|fn_runner|sdk_worker")
FORBIDDEN_CALLS = {("os", "fork"), ("os", "forkpty"), ("gc", "freeze"), ("gc", "disable"), ("gc", "set_threshold")}
FORBIDDEN_TEXT = re.compile(r"mallopt|malloc_trim|__defaults__|_default_environment|ParallelBundleManager")


def violations(source: str, name: str = "<source>") -> list[str]:
    """Every line of `source` that breaks the rule, as 'name:line: what'."""
    tree = ast.parse(source)
    found = []
    imported = set()  # names bound to a module (import x / import x as y / from a import module)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported.add((alias.asname or alias.name).split(".")[0])
                if PRIVATE_MODULES.search(alias.name):
                    found.append(f"{name}:{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if PRIVATE_MODULES.search(node.module) or any(PRIVATE_MODULES.search(f"{node.module}.{a.name}")
                                                          for a in node.names):
                found.append(f"{name}:{node.lineno}: imports from {node.module}")
            if not node.module.startswith("pipeline"):
                imported.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) \
                and (node.func.value.id, node.func.attr) in FORBIDDEN_CALLS:
            found.append(f"{name}:{node.lineno}: calls {node.func.value.id}.{node.func.attr}()")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and PRIVATE_MODULES.search(node.value) and node.value.startswith("apache_beam."):
            found.append(f"{name}:{node.lineno}: names {node.value}")
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            # `library.attr = ...` (or deeper) on an imported module: a patch of someone else's code
            base = target
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(target, ast.Attribute) and isinstance(base, ast.Name) and base.id in imported:
                found.append(f"{name}:{node.lineno}: assigns {ast.unparse(target)}")
            if isinstance(target, ast.Subscript) and ast.unparse(target.value) == "sys.modules":
                found.append(f"{name}:{node.lineno}: assigns sys.modules[...]")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in imported:
            found.append(f"{name}:{node.lineno}: setattr on {node.args[0].id}")
    for lineno, line in enumerate(source.splitlines(), start=1):
        code = line.split("#", 1)[0]
        if FORBIDDEN_TEXT.search(code):
            found.append(f"{name}:{lineno}: {code.strip()}")
    return found


def test_pipeline_uses_public_apis_only():
    found = []
    for path in sorted(PIPELINE.rglob("*.py")):
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(PIPELINE.parent)))
    assert found == []


def test_the_rule_catches_each_kind_of_breach():
    """The checker itself: each line below is one breach it must report (else the test above
    could pass on anything)."""
    breaches = [
        "from apache_beam.runners.portability.fn_api_runner import FnApiRunner",
        "from apache_beam.runners.worker import statesampler",
        "import apache_beam.utils.counters",
        "import os\nos.fork()",
        "import gc\ngc.freeze()",
        "import sys\nsys.modules['torch'] = None",
        "from img2dataset import distributor\ndistributor.get_context = None",
        "import tqdm\ntqdm.tqdm.monitor_interval = 0",
        "import ctypes\nctypes.CDLL('libc.so.6').mallopt(1, 2)",
        "def f(): pass\nf.__defaults__ = (1,)",
        "x = 'apache_beam.runners.worker.sdk_worker_main'",
        "import threading\nsetattr(threading, 'x', 1)",
    ]
    for code in breaches:
        assert violations(code), code
    fine = ["import apache_beam as beam\np = beam.Pipeline(runner='FnApiRunner')",
            "from apache_beam.options.pipeline_options import PipelineOptions",
            "import os\nos.environ.setdefault('WANDB_MODE', 'disabled')",
            "class A:\n    def f(self):\n        self.x = 1"]
    for code in fine:
        assert violations(code) == [], code
