"""The darknet `.weights` corpus (tests/hardening/pth_corpus.py, `weights_cases`): truncated files,
impossible headers, wrong sizes and non-finite or negative-variance values are refused with one line
naming the file (and the tensor) within the harness's bounds; genuine files load their tensors."""
import re

import numpy as np
import pytest

from edge_cbn.convert.weights.darknet import read_darknet

from .harness import run_case
from .pth_corpus import TINY_LAYOUT, weights_cases

pytestmark = pytest.mark.hardening

CASES = weights_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_weights_case(case, tmp_path):
    path = case.write(tmp_path)
    result = run_case(read_darknet, path, TINY_LAYOUT)
    if case.loads:
        assert result.kind == "loaded" and result.seconds < 10 and result.added_rss_mb < 512, result
        _, tensors = read_darknet(path, TINY_LAYOUT)
        for name, value in case.expected().items():
            np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    else:
        assert result.ok_refusal(path), result
        assert case.match is None or re.search(case.match, result.message), result.message


def test_corpus_size():
    assert len(CASES) >= 15
