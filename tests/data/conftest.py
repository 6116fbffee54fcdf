import pytest

from lorakit.models import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()
