import pytest

import quantized_models as qm


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama directory to load quantized (one per test module: a test may repack its layers)."""
    return qm.write_base(str(tmp_path_factory.mktemp("qbase")))
