"""`edge-cbn stream --delegate`: what a delegate spec resolves to, one clear line for a delegate that cannot
load (in a subprocess: no traceback, no "Exception ignored" from LiteRT's half-built delegate), `auto`
falling back to xnnpack with a notice, xnnpack equal to the default, usage errors of --delegate-option, and
(with a C compiler) a no-op delegate library loaded once and shared by every serving interpreter."""
import ctypes
import ctypes.util
import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_cbn.runtime.bundle import load_bundle
from edge_cbn.runtime.errors import BadInput
from edge_cbn.runtime.interpreter import DELEGATE_LIBRARIES, delegate_library, open_delegate
from edge_cbn.stream import Engine, StreamOptions
from edge_cbn.stream.command import main
from test_stream import NOISY, export_tiny, read_log

# A LiteRT external delegate (external_delegate_interface.h) that claims no node: the model runs as on
# xnnpack.  It counts the delegates created and destroyed and the graphs it was applied to; option fail=1
# makes it refuse every graph.
NOOP_DELEGATE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef struct TfLiteDelegate {
  void *data_;
  int (*Prepare)(void *context, struct TfLiteDelegate *delegate);
  void *CopyFromBufferHandle, *CopyToBufferHandle, *FreeBufferHandle;
  int64_t flags;
  void *opaque_delegate_builder;
} TfLiteDelegate;
static int created, destroyed, applied;
static int prepare(void *context, TfLiteDelegate *d) { applied++; return d->data_ ? 1 : 0; }
TfLiteDelegate *tflite_plugin_create_delegate(char **keys, char **values, size_t n, void (*report)(const char *)) {
  TfLiteDelegate *d = calloc(1, sizeof *d);
  d->Prepare = prepare;
  for (size_t i = 0; i < n; i++)
    if (!strcmp(keys[i], "fail") && !strcmp(values[i], "1")) d->data_ = d;
  created++;
  return d;
}
void tflite_plugin_destroy_delegate(TfLiteDelegate *d) { destroyed++; free(d); }
int noop_created(void) { return created; }
int noop_destroyed(void) { return destroyed; }
int noop_applied(void) { return applied; }
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(export_tiny(tmp_path_factory.mktemp("model") / "tiny.tflite"))


@pytest.fixture(scope="module")
def noop_delegate(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the no-op delegate")
    folder = tmp_path_factory.mktemp("delegate")
    (folder / "noop.c").write_text(NOOP_DELEGATE)
    library = folder / "libnoop_delegate.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(library), str(folder / "noop.c")], check=True)
    return str(library)


def summary_of(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])["summary"]


def stream_subprocess(tiny, *args):
    """`python -m edge_cbn.stream` (the CLI, one-line errors included): (exit status, stderr lines)."""
    proc = subprocess.run([sys.executable, "-m", "edge_cbn.stream", "--model", tiny, "--headless", "--quiet",
                           "--frames", "5", *args], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr.strip().splitlines()


def test_a_spec_resolves_to_the_platforms_library():
    assert delegate_library("xnnpack") is None
    assert delegate_library("gpu", "Linux") == "libtensorflowlite_gpu_delegate.so"
    assert delegate_library("edgetpu", "Linux") == "libedgetpu.so.1"
    assert delegate_library("edgetpu", "Darwin") == "libedgetpu.1.dylib"
    assert delegate_library("gpu", "Windows") == "tensorflowlite_gpu_delegate.dll"
    assert delegate_library("gpu", "FreeBSD") == DELEGATE_LIBRARIES["gpu"]["Linux"]  # others: Linux's names
    assert delegate_library("/usr/lib/libfoo.so") == "/usr/lib/libfoo.so"
    with pytest.raises(ValueError, match="auto"):
        delegate_library("auto")
    assert open_delegate("xnnpack").name == "xnnpack" and open_delegate().loaded is None


def test_a_library_that_is_no_delegate_is_bad_input():
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no C library to load")
    with pytest.raises(BadInput, match="no LiteRT delegate library .*tflite_plugin_create_delegate"):
        open_delegate(libc)


def test_a_delegate_that_cannot_load_is_one_line(tiny, tmp_path):
    missing = tmp_path / "nope" / "libfoo.so"
    status, err = stream_subprocess(tiny, "--delegate", str(missing))
    assert status == 1 and err == [f"Error: --delegate: {missing}: cannot be loaded: cannot open shared object "
                                   "file: No such file or directory"]
    fake = tmp_path / "libfake.so"
    fake.write_text("not a shared library\n")
    status, err = stream_subprocess(tiny, "--delegate", str(fake))
    assert status == 1 and len(err) == 1 and err[0].startswith(f"Error: --delegate: {fake}: cannot be loaded: ")
    status, err = stream_subprocess(tiny, "--delegate", "gpu")  # a name says which library it tried
    if status == 0:
        pytest.skip("this machine has the GPU delegate")
    assert status == 1 and len(err) == 1
    assert err[0].startswith(f"Error: --delegate gpu: {DELEGATE_LIBRARIES['gpu']['Linux']}: cannot be loaded")


def test_auto_without_accelerators_falls_back_to_xnnpack_with_a_notice(tiny):
    for name in ("edgetpu", "gpu"):
        try:
            ctypes.CDLL(delegate_library(name))
        except OSError:
            continue
        pytest.skip(f"this machine has the {name} delegate library")
    r = CliRunner().invoke(main, ["--model", tiny, "--headless", "--quiet", "--frames", "5", "--delegate", "auto"])
    assert r.exit_code == 0, r.output
    notice = r.stderr.strip().splitlines()
    assert len(notice) == 1 and "--delegate auto" in notice[0] and "serving on xnnpack" in notice[0]
    assert "edgetpu (libedgetpu.so.1" in notice[0] and "gpu (libtensorflowlite_gpu_delegate.so" in notice[0]
    assert summary_of(r)["delegate"] == "xnnpack" and summary_of(r)["frames"] == 5


def test_xnnpack_is_the_default(tiny, tmp_path):
    """`--delegate xnnpack --num-threads 1` serves what the default (every CPU) serves, under noise with refolds."""
    logs = []
    for name, extra in (("default", []), ("xnnpack", ["--delegate", "xnnpack", "--num-threads", "1"])):
        log = tmp_path / f"{name}.jsonl"
        r = CliRunner().invoke(main, ["--model", tiny, "--headless", "--quiet", "--frames", "16", "--log", str(log),
                                      *NOISY, *extra])
        assert r.exit_code == 0, r.output
        frames, summary = read_log(log)
        assert summary["delegate"] == "xnnpack" and summary["refolds"] >= 1
        logs.append([f["top"] for f in frames])
    assert logs[0] == logs[1]


@pytest.mark.parametrize("args, message", [
    (["--delegate", "auto", "--delegate-option", "device"], "expected KEY=VALUE"),
    (["--delegate", "auto", "--delegate-option", "=usb"], "expected KEY=VALUE"),
    (["--delegate-option", "device=usb"], "takes no options"),
])
def test_bad_delegate_options_are_usage_errors(tiny, args, message):
    r = CliRunner().invoke(main, ["--model", tiny, "--frames", "2", *args])
    assert r.exit_code == 2 and "--delegate-option" in r.output and message in r.output


def test_one_delegate_serves_every_serving_interpreter(tiny, noop_delegate, tmp_path):
    """Loaded once, applied to every serving interpreter (the check on the model, the noise states and their
    rebuilds), to no calibration or agreement interpreter: the same predictions as xnnpack, and freed with
    the last interpreter."""
    lib = ctypes.CDLL(noop_delegate)  # the same handle the stream loads: its counters
    args = ["--model", tiny, "--headless", "--quiet", "--frames", "40", "--num-threads", "1", *NOISY,
            "--agreement-every", "5"]
    logs = {}
    for name in ("xnnpack", noop_delegate):
        log = tmp_path / f"{Path(name).stem}.jsonl"
        r = CliRunner().invoke(main, [*args, "--delegate", name, "--log", str(log)])
        assert r.exit_code == 0, r.output
        frames, summary = read_log(log)
        assert summary["delegate"] == name and summary["refolds"] >= 2
        logs[name] = [f["top"] for f in frames]
    assert logs[noop_delegate] == logs["xnnpack"]
    # The check on the model and the serving model's 3 noise states at start, then their rebuilds (and probes).
    assert lib.noop_created() == 1 and lib.noop_applied() > 1 + 3
    gc.collect()  # the engine's reference cycles
    assert lib.noop_destroyed() == 1  # the last interpreter let it go


def test_only_serving_runs_on_the_delegate(tiny, noop_delegate):
    opts = StreamOptions(noise="relative", num_threads=1, delegate=noop_delegate, agreement_every=5)
    engine = Engine(load_bundle(tiny), opts)
    try:
        assert engine.delegate.name == noop_delegate and engine.delegate.loaded is not None
        assert engine.serving.delegate is engine.delegate and engine.pipeline._twin.delegate is engine.delegate
        cpu = [engine.calibration.noisy, engine.calibration.clean, engine.agreement.clean,
               engine.agreement.uncalibrated]
        assert all(model.delegate is None for model in cpu)
    finally:
        engine.close()


def test_a_delegate_that_cannot_run_the_model_is_one_line(tiny, noop_delegate):
    status, err = stream_subprocess(tiny, "--delegate", noop_delegate, "--delegate-option", "fail=1")
    assert status == 1 and len(err) == 1
    assert err[0].startswith(f"Error: --delegate: {noop_delegate}: cannot run this model: ")
