import gzip
import json

import pytest

from long_exposure.data import CORPUS_NAME, find_corpus, load_addresses


def write_corpus(folder):
    path = folder / CORPUS_NAME
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"year": 1950, "president": "A", "party": "B", "text": "text"}) + "\n")
    return path


def test_a_folder_stands_for_the_corpus_file_in_it(tmp_path, monkeypatch):
    path = write_corpus(tmp_path)
    assert find_corpus(tmp_path) == path
    monkeypatch.setenv("LONG_EXPOSURE_DATA", str(tmp_path))
    assert find_corpus() == path
    assert [a.year for a in load_addresses()] == [1950]


def test_a_missing_corpus_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{CORPUS_NAME} is missing.*LONG_EXPOSURE_DATA"):
        find_corpus(tmp_path / "nowhere")
