import pytest

from optd.engine import Engine, EngineConfig
from tests.engine.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def engine(llama_dir):
    with Engine(EngineConfig(model=str(llama_dir), dtype="float32", max_model_len=128, max_num_seqs=32)) as e:
        yield e
