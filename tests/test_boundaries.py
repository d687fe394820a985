"""The architecture's one rule: the device side (`edge_cbn.runtime`, `edge_cbn.stream`) never loads
TensorFlow, Keras, the converter or the cluster side (Ray), and the runtime loads nothing of the stream app
or the lab either.  Each module is imported in a fresh interpreter, so one module cannot hide another's imports."""
import json
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import edge_cbn.runtime
import edge_cbn.stream

WORKSTATION = ("tensorflow", "keras", "edge_cbn.convert", "ray", "edge_cbn.cluster")
RULES = {"edge_cbn.runtime": WORKSTATION + ("edge_cbn.stream", "edge_cbn.lab"),
         "edge_cbn.stream": WORKSTATION + ("edge_cbn.lab",)}


def modules(package) -> list[str]:
    found = [package.__name__]
    found += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
              if not m.name.endswith("__main__")]
    return found


def forbidden_loaded(module: str, forbidden: tuple, env=None) -> list[str]:
    """The forbidden packages that importing `module` loads, in a fresh interpreter."""
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in sys.argv[2:] "
            "or any(m == p or m.startswith(p + '.') for p in sys.argv[2:] if '.' in p))))")
    out = subprocess.run([sys.executable, "-c", code, module, *forbidden], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout)


CASES = [(m, RULES[pkg.__name__]) for pkg in (edge_cbn.runtime, edge_cbn.stream) for m in modules(pkg)]


def test_every_device_module_is_walked():
    names = [m for m, _ in CASES]
    assert {"edge_cbn.runtime.noisy_model", "edge_cbn.stream.engine", "edge_cbn.stream.command"} <= set(names)
    assert len(names) >= 25


def test_device_side_never_loads_the_workstation_side():
    with ThreadPoolExecutor(4) as pool:
        loaded = dict(zip([m for m, _ in CASES], pool.map(lambda case: forbidden_loaded(*case), CASES)))
    offenders = [f"{m} loads {', '.join(bad)}" for m, bad in loaded.items() if bad]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("stray", ["import keras", "from edge_cbn.convert import build", "import edge_cbn.lab"])
def test_the_check_sees_a_stray_import(tmp_path, stray):
    """The check itself: a device module with a stray import is caught."""
    pkg = tmp_path / "edge_cbn_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(stray + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert forbidden_loaded("edge_cbn_probe", RULES["edge_cbn.runtime"], env=env), stray
