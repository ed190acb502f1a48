"""uce-model's TransformerModel class, loaded from its model.py alone (benchmarks only).

`import uce.model` runs the package's __init__, which imports scanpy, accelerate, cellxgene_census and
more, none of which the model needs and a bare GPU machine lacks. The module file is found in the
installed package, or inside the wheel file (`pip download uce-model==0.1.4 --no-deps -d bench/.wheels`),
which is how bench/gpu_check.sh carries the reference to a machine without network.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import zipfile
from pathlib import Path

WHEEL_GLOB = "uce_model-0.1.4-*.whl"


def reference_model_class(wheel_dir: Path | None = None):
    spec = importlib.util.find_spec("uce")  # finds the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        source = (Path(next(iter(spec.submodule_search_locations))) / "model.py").read_text()
    else:
        wheels = sorted(Path(wheel_dir or Path(__file__).parent / ".wheels").glob(WHEEL_GLOB))
        if not wheels:
            raise SystemExit("the reference (uce-model 0.1.4) is neither installed nor in bench/.wheels: "
                             "pip download uce-model==0.1.4 --no-deps -d bench/.wheels")
        with zipfile.ZipFile(wheels[-1]) as z:
            source = z.read("uce/model.py").decode()
    mod = types.ModuleType("uce_reference_model")
    sys.modules[mod.__name__] = mod
    exec(compile(source, "uce/model.py", "exec"), mod.__dict__)
    return mod.TransformerModel
