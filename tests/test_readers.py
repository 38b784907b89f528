"""Input readers: invalid UTF-8 is one line naming the file and the line, in every text format."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.errors import DataError
from pipeline.data.readers import iter_documents

OPENERS = {"": open, ".gz": gzip.open, ".xz": lzma.open}
# Byte strings that are never valid UTF-8 wherever they sit in a line.
BAD = [b"\xff", b"\xfe", b"\xc3(", b"\xe2\x28\xa1", b"\x80", b"\xed\xa0\x80"]  # last: an encoded surrogate


def _write(path: Path, data: bytes) -> Path:
    suffix = path.suffix if path.suffix in (".gz", ".xz") else ""
    with OPENERS[suffix](path, "wb") as handle:
        handle.write(data)
    return path


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(min_size=1, max_size=40).filter(str.strip), min_size=1, max_size=8),
       data=st.data(), suffix=st.sampled_from(["", ".gz", ".xz"]))
def test_invalid_utf8_names_file_and_line(tmp_path_factory, texts, data, suffix):
    """Any valid lines read back exactly; one bad byte sequence anywhere in line k stops the read
    with '<file>:<k>: invalid UTF-8 ...' (one line), whatever the compression."""
    tmp = tmp_path_factory.mktemp("utf8")
    lines = [json.dumps({"id": str(i), "text": t}, ensure_ascii=False).encode() + b"\n" for i, t in enumerate(texts)]
    good = _write(tmp / f"good.jsonl{suffix}", b"".join(lines))
    assert [d.text for d in iter_documents([str(good)])] == texts

    k = data.draw(st.integers(0, len(lines) - 1), label="bad line index")
    bad_bytes = data.draw(st.sampled_from(BAD), label="bad bytes")
    at = data.draw(st.integers(0, len(lines[k]) - 1), label="insert position")
    corrupted = lines[:k] + [lines[k][:at] + bad_bytes + lines[k][at:]] + lines[k + 1:]
    bad = _write(tmp / f"bad.jsonl{suffix}", b"".join(corrupted))
    with pytest.raises(DataError) as err:
        list(iter_documents([str(bad)]))
    message = str(err.value)
    assert message.startswith(f"{bad}:{k + 1}: invalid UTF-8") and "\n" not in message


def test_invalid_utf8_in_plain_text_and_through_the_cli(tmp_path, capsys):
    """.txt inputs too; `sgtm data shard` prints the same line as its one-line error (exit 2)."""
    from pipeline.cli import main

    txt = _write(tmp_path / "a.txt", "first story\n<|endoftext|>\nsecond, ñandú\n".encode() + b"caf\xe9\n")
    with pytest.raises(DataError, match=rf"^{txt}:4: invalid UTF-8 \(byte 0xe9 at column 4\)"):
        list(iter_documents([str(txt)]))
    jsonl = _write(tmp_path / "b.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    rc = main(["data", "shard", "--input", str(jsonl), "--tokenizer", "gpt2", "--seq-len", "32",
               "--out", str(tmp_path / "shards"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"sgtm: error: {jsonl}:2: invalid UTF-8 (byte 0xe9 at column 14); "
                               "inputs must be UTF-8 text"]
