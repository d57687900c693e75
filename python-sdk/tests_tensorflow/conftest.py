"""The TensorFlow suite (`make test-tensorflow`) lives outside
python-sdk/tests so that the default suite never needs TensorFlow; it
reuses that suite's fixtures (``cluster``) and helpers. Their folder goes
on sys.path (the helpers import each other by module name) and their
conftest is loaded under its own name, since this file is ``conftest``
too: its names re-exported here are what ``from conftest import ...`` in
the helpers then finds."""

import importlib.util
import os
import sys

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)

_spec = importlib.util.spec_from_file_location("serval_tests_conftest", os.path.join(TESTS, "conftest.py"))
_base = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _base
_spec.loader.exec_module(_base)

from serval_tests_conftest import *  # noqa: E402,F401,F403  (the cluster fixture, wait_for, free_port)
