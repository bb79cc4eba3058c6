import pytest

from tests.conftest import make_corpus


@pytest.fixture(scope="session")
def corpus_data(tmp_path_factory, tokenizer_dir):
    from dtrain.data.prepare import prepare_pretrain

    root = tmp_path_factory.mktemp("train")
    prepare_pretrain([str(make_corpus(root / "c", docs=80, seed=3))], root / "train", str(tokenizer_dir),
                     max_seq_len=64, workers=1)
    prepare_pretrain([str(make_corpus(root / "e", docs=10, seed=4))], root / "eval", str(tokenizer_dir),
                     max_seq_len=64, workers=1)
    return root
