"""Every docstring example in keras_reformer runs and prints what it shows.

Examples see their module's names plus `keras`, `np`, `ops` and `tf`; they
run in a temporary directory (some save models). A `TensorShape([1, 2])`
printed on TensorFlow matches a shown `(1, 2)`, as on the other backends.
"""

import doctest
import importlib
import pkgutil
import re

import keras
import numpy as np
import pytest

import keras_reformer

MODULES = sorted(info.name for info in pkgutil.walk_packages(
    keras_reformer.__path__, "keras_reformer."))


def _as_tuple(match):
    items = match.group(1)
    return f"({items},)" if items and "," not in items else f"({items})"


class ShapeChecker(doctest.OutputChecker):
    def check_output(self, want, got, optionflags):
        got = re.sub(r"TensorShape\(\[([^\]]*)\]\)", _as_tuple, got)
        want = re.sub(r"TensorShape\(\[([^\]]*)\]\)", _as_tuple, want)
        return super().check_output(want, got, optionflags)


def module_examples(name):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module)
    return [t for t in tests if t.examples and t.name.startswith(name)]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the examples show TensorFlow's outputs")
@pytest.mark.parametrize("name", [
    m for m in MODULES if module_examples(m)])
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    import tensorflow as tf

    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(
        checker=ShapeChecker(),
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in module_examples(name):
        test.globs.update(keras=keras, np=np, ops=keras.ops, tf=tf)
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0, f"{results.failed} example(s) failed in {name}"
