"""What the user is to fix is one line and exit status 1, never "internal error": a model that does not
exist (every command that takes --model), a missing optional package (named with the extra that
installs it); bad integer lists and options given to the `evaluate` group before a subcommand are usage
errors (exit status 2)."""
import pytest
from click.testing import CliRunner

from edge_cbn.cli import main, one_line_error
from edge_cbn.runtime.errors import MissingDependency


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("command", [["evaluate"], ["divergence"], ["stream", "--frames", "1"],
                                     ["evaluate", "classification", "--data", "."]])
def test_a_model_that_does_not_exist_is_one_line(command, tmp_path):
    missing = str(tmp_path / "missing.tflite")
    result = run(*command, "--model", missing)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0] == f"Error: {missing}: model file does not exist"


@pytest.mark.parametrize("error, line", [
    (ModuleNotFoundError("No module named 'ray'", name="ray"), "Error: ray is not installed: pip install 'edge-cbn[cluster]'"),
    (ModuleNotFoundError("No module named 'pycocotools.coco'", name="pycocotools.coco"),
     "Error: pycocotools is not installed: pip install 'edge-cbn[eval]'"),
    (MissingDependency("a TFLite interpreter", "pip install ai-edge-litert"),
     "Error: a TFLite interpreter is not installed: pip install ai-edge-litert"),
])
def test_a_missing_optional_package_names_what_installs_it(error, line, capsys):
    assert one_line_error(error) == 1
    assert capsys.readouterr().err.strip() == line


def test_a_missing_internal_module_is_still_an_internal_error(capsys):
    one_line_error(ModuleNotFoundError("No module named 'edge_cbn.nope'", name="edge_cbn.nope"))
    assert "internal error: ModuleNotFoundError" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["evaluate", "--seeds", "0,x"], "expected comma-separated integers"),
    (["evaluate", "--seeds", "-1"], "integers >= 0"),
    (["evaluate", "--checkpoints", "0,16"], "integers >= 1"),
    (["evaluate", "classification", "--data", ".", "--seeds", "a"], "expected comma-separated integers"),
    (["evaluate", "--seeds", "5,6", "--noise", "paper:0.3", "classification", "--data", "."],
     "--noise, --seeds given before `classification`"),
])
def test_usage_errors_are_exit_status_2(args, says):
    result = run(*args)
    assert result.exit_code == 2 and says in result.output, result.output


def test_renamed_flags_still_parse_and_are_not_shown():
    """`--refuse-every`, `bench refuse` (before "refold" was the one word) and `--noise-pool`, evaluate's
    `--pool` (before the temporal noise states and the worker pool had two names) still work for old
    scripts and service files; --help shows only the new spellings."""
    from edge_cbn.lab.bench.command import bench
    from edge_cbn.lab.evaluate.tasks import classification
    from edge_cbn.stream.command import main as stream

    ctx = stream.make_context("stream", ["--refuse-every", "3", "--noise-pool", "2"])
    assert (ctx.params["refold_every"], ctx.params["noise_states"]) == (3, 2)
    ctx = stream.make_context("stream", ["--refold-every", "4", "--noise-states", "5"])
    assert (ctx.params["refold_every"], ctx.params["noise_states"]) == (4, 5)
    shown = CliRunner().invoke(stream, ["--help"]).output
    assert "--refold-every" in shown and "--noise-states" in shown
    assert "--refuse-every" not in shown and "--noise-pool" not in shown
    assert classification.make_context("classification", ["--pool", "2"], resilient_parsing=True).params["noise_states"] == 2
    assert "--pool" not in CliRunner().invoke(classification, ["--help"]).output
    listing = CliRunner().invoke(bench, ["--help"]).output
    assert "refold" in listing and "refuse" not in listing
    assert "--models" in CliRunner().invoke(bench, ["refuse", "--help"]).output
