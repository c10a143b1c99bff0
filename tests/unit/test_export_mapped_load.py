"""Warm-start reading of an artifact: tensors as views of a private memory map (same values as
safetensors reads, the file never written), and the tokenizer written in its fast-parsing form
(the same tokenizer once loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file
from tokenizers import models, pre_tokenizers

from kiln.errors import ModelLoadError
from kiln.export.reader import map_safetensors, open_map, populate_in_background
from kiln.export.writer import _write_tokenizer
from kiln.kernels.native import cpu_kernels


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.randn(3, 5),
        "b.qblocks": torch.randint(0, 255, (4, 20), dtype=torch.uint8),
        "c.bias": torch.randn(7, dtype=torch.float64),
        "d.half": torch.randn(2, 3).to(torch.bfloat16),
        "e.empty": torch.empty(0, 4),
        "f.codes": torch.randint(-8, 8, (9,), dtype=torch.int8),
    }


def test_mapped_tensors_equal_what_safetensors_reads(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file(_tensors(), str(file), metadata={"format": "pt"})
    mapped = map_safetensors(file)
    expected = load_file(str(file))
    assert set(mapped) == set(expected)
    for name, tensor in expected.items():
        assert mapped[name].dtype == tensor.dtype and mapped[name].shape == tensor.shape
        assert torch.equal(mapped[name], tensor), name
        assert mapped[name].is_contiguous()


def test_writing_a_mapped_tensor_leaves_the_file_alone(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1024)}, str(file))
    before = file.read_bytes()
    tensor = map_safetensors(file)["w"]
    tensor.add_(1.0)  # copy-on-write: this process's pages only
    assert torch.equal(tensor, torch.ones(1024))
    assert file.read_bytes() == before
    assert torch.equal(map_safetensors(file)["w"], torch.zeros(1024))


def test_a_mapped_tensor_outlives_every_other_reference(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(file))
    tensor = map_safetensors(file)["w"]
    file.unlink()  # the map holds the file's pages, not its name
    assert torch.equal(tensor.clone(), torch.arange(4096, dtype=torch.float32))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x08",
        b"\xff" * 8 + b"{}",
        b"\x04\x00\x00\x00\x00\x00\x00\x00[1] ",
        b"\x02" + b"\0" * 7 + b"{",
    ],
)
def test_a_broken_file_is_a_model_load_error(tmp_path: Path, content: bytes) -> None:
    file = tmp_path / "w.safetensors"
    file.write_bytes(content)
    with pytest.raises(ModelLoadError, match="cannot read"):
        map_safetensors(file)


def test_an_entry_past_the_end_is_a_model_load_error(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(8)}, str(file))
    data = bytearray(file.read_bytes())
    file.write_bytes(bytes(data[:-4]))  # the tensor's last element cut off
    with pytest.raises(ModelLoadError, match="w: malformed"):
        map_safetensors(file)


def _bpe(merges: list[tuple[str, str]], vocab: dict[str, int]) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(["<|end|>"])
    return tokenizer


def test_written_tokenizer_is_the_same_tokenizer(tmp_path: Path) -> None:
    vocab = {c: i for i, c in enumerate(["a", "b", "c", "ab", "abc", "Ġ", "Ġa"])}
    tokenizer = _bpe([("a", "b"), ("ab", "c"), ("Ġ", "a")], vocab)
    path = tmp_path / "tokenizer.json"
    _write_tokenizer(tokenizer, path)
    assert '"ab c"' in path.read_text(encoding="utf-8")  # the string form of the merges
    loaded = tokenizers.Tokenizer.from_file(str(path))
    assert loaded.to_str() == tokenizer.to_str()
    text = "abc ab a<|end|>cab"
    assert loaded.encode(text).ids == tokenizer.encode(text).ids


def test_a_merge_with_a_space_keeps_the_pair_form(tmp_path: Path) -> None:
    vocab = {c: i for i, c in enumerate(["a", "b", "a b", "ab", "a bb"])}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("a b", "b")]))
    path = tmp_path / "tokenizer.json"
    _write_tokenizer(tokenizer, path)
    assert '["a b","b"]' in path.read_text(encoding="utf-8")
    loaded = tokenizers.Tokenizer.from_file(str(path))
    assert loaded.to_str() == tokenizer.to_str()


def _resident_kib(address: int) -> int:
    """Rss of the mapping starting at ``address`` in this process (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{address:x}":
            rss = next(x for x in lines[i + 1 :] if x.startswith("Rss:"))
            return int(rss.split()[1])
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("through", ["kiln_populate", "madvise"])
def test_populating_a_map_makes_all_its_pages_resident(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, through: str
) -> None:
    import ctypes

    from kiln.export import reader

    if through == "madvise":  # where kiln's kernels cannot run
        monkeypatch.setattr(reader, "cpu_kernels", lambda: None)
    elif cpu_kernels() is None:
        pytest.skip("kiln's CPU kernels cannot run here")
    file = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(1 << 20)}, str(file), metadata={"format": "pt"})  # 4 MiB
    mapped = open_map(file)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
    assert _resident_kib(address) < 1024  # nothing touched yet
    thread = populate_in_background(mapped)
    assert thread is not None
    thread.join(timeout=30)
    assert _resident_kib(address) >= file.stat().st_size // 1024 - 4
    # The tensors are views of the populated map, with the file's values.
    assert torch.equal(map_safetensors(file, mapped)["w"], load_file(str(file))["w"])


def test_populating_a_map_of_a_file_cut_short_does_not_crash(tmp_path: Path) -> None:
    """Pages past the file's new end cannot be read (SIGBUS): the populating thread must not
    try. In a child process, so a crash fails this test instead of ending the run."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from kiln.export.reader import open_map, populate_in_background
        file = Path({str(tmp_path / "w.bin")!r})
        file.write_bytes(b"x" * (8 << 20))
        mapped = open_map(file)
        os.truncate(file, 1 << 20)
        populate_in_background(mapped).join(timeout=30)
        print("populated")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "populated"
