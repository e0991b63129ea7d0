"""python_backend/adapters.py and lora_library.py: LoRA sets named per request, found in the LoRA folder as
A1111 finds them, compiled once per engine process within a memory bound, and fed per batch row."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from build_engines.tiny_checkpoint import lora_targets, write_tiny_lora
from python_backend import lora
from python_backend.adapters import (
    DOWN_SUFFIX,
    UP_SUFFIX,
    AdapterStore,
    BranchTarget,
    LoraUse,
    branch_feeds,
    branch_targets,
    decode_set,
    encode_set,
    file_version,
)
from python_backend.lora_library import LoraLibrary


@pytest.fixture(scope="module")
def shapes(tiny_checkpoint: Path) -> dict[lora.Target, lora.Shape]:
    every = lora.shapes_from_checkpoint(tiny_checkpoint)
    return {t: every[t] for t in lora_targets(every)}


@pytest.fixture
def folder(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    write_tiny_lora(tmp_path / "ink.safetensors", tiny_checkpoint, "kohya", seed=1)
    (tmp_path / "styles").mkdir()
    write_tiny_lora(tmp_path / "styles" / "paper_v2.safetensors", tiny_checkpoint, "peft", seed=2)
    write_tiny_lora(tmp_path / "w.safetensors", tiny_checkpoint, "kohya", seed=3, output_name="watercolor")
    return tmp_path


def _targets(shapes: dict[lora.Target, lora.Shape], component: str) -> dict[str, BranchTarget]:
    return {
        t.path: BranchTarget(t.path, shape[1:], shape[0])
        for t, shape in shapes.items()
        if t.component == component
    }


def _use(folder: Path, file: str, multiplier: float) -> LoraUse:
    return LoraUse(file, file_version(folder / file), multiplier)


def test_a_set_encodes_canonically_and_back():
    uses = (LoraUse("a.safetensors", "10-5", 0.5), LoraUse("b/c.safetensors", "3-1", -1.0))
    assert decode_set(encode_set(uses)) == uses
    assert encode_set(uses) == encode_set(list(uses)) and encode_set(()) == "" and decode_set("") == ()
    for bad in ("{", '[["a", "1"]]', '[["a", "1", "x"]]', '[["a", "1", NaN]]', '"text"'):
        with pytest.raises(ValueError, match="lora: "):
            decode_set(bad)


def test_store_compiles_the_component_of_a_set(folder, shapes):
    store = AdapterStore(folder, "unet", _targets(shapes, "unet"))
    uses = [_use(folder, "ink.safetensors", 0.8), _use(folder, "styles/paper_v2.safetensors", -0.5)]
    compiled = store.compiled(encode_set(uses))
    files = [lora.read_lora(folder / u.file, shapes) for u in uses]
    expected = lora.compile_set([(f, u.multiplier, u.multiplier) for f, u in zip(files, uses, strict=True)])
    assert set(compiled) == {t.path for t in expected if t.component == "unet"}
    for target, low in expected.items():
        if target.component == "unet":
            assert np.array_equal(compiled[target.path].down, low.down)
            assert np.array_equal(compiled[target.path].up, low.up)
    assert store.compiled(encode_set(uses)) is compiled  # cached
    assert store.compiled("") == {}


def test_store_keeps_at_most_its_bytes_least_recently_used_first(folder, shapes):
    targets = _targets(shapes, "unet")
    one = encode_set([_use(folder, "ink.safetensors", 1.0)])
    size = sum(
        low.down.nbytes + low.up.nbytes
        for low in AdapterStore(folder, "unet", targets).compiled(one).values()
    )
    store = AdapterStore(folder, "unet", targets, max_bytes=2 * size)
    keys = [encode_set([_use(folder, "ink.safetensors", m)]) for m in (1.0, 0.5, 0.25)]
    first = store.compiled(keys[0])
    store.compiled(keys[1])
    assert store.compiled(keys[0]) is first  # used again: now the most recent
    store.compiled(keys[2])  # evicts keys[1], the least recently used
    assert store.cached_bytes == 2 * size
    assert store.compiled(keys[0]) is first
    assert np.array_equal(
        first["down_blocks.0.attentions.0.proj_in"].up,
        store.compiled(keys[0])["down_blocks.0.attentions.0.proj_in"].up,
    )
    small = AdapterStore(folder, "unet", targets, max_bytes=size - 1)
    assert small.compiled(keys[0]) and small.cached_bytes == 0  # too big to keep: compiled for the call only


def test_store_refuses_what_the_pipeline_did_not_check(folder, shapes, tmp_path_factory):
    store = AdapterStore(folder, "unet", _targets(shapes, "unet"))
    changed = LoraUse("ink.safetensors", "1-1", 1.0)
    with pytest.raises(lora.LoraError, match="changed while the request was running"):
        store.compiled(encode_set([changed]))
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(folder / "ink.safetensors", outside / "ink.safetensors")
    escaping = LoraUse(f"../{outside.name}/ink.safetensors", file_version(outside / "ink.safetensors"), 1.0)
    with pytest.raises(lora.LoraError, match="no such LoRA file in the LoRA folder"):
        store.compiled(encode_set([escaping]))
    with pytest.raises(lora.LoraError, match="sd-serve --lora-dir"):
        AdapterStore(None, "unet", {}).compiled(encode_set([changed]))


def test_feeds_pad_each_row_to_the_batch_rank_and_zero_rows_without_lora():
    targets = {"a": BranchTarget("a", (3,), 2), "b": BranchTarget("b", (4, 3, 3), 5)}
    rng = np.random.default_rng(0)
    r2 = lora.LowRank(rng.random((2, 3), np.float32), rng.random((2, 2), np.float32))
    r4 = lora.LowRank(rng.random((4, 3), np.float32), rng.random((2, 4), np.float32))
    feeds = branch_feeds(targets, [{"a": r2}, {}, {"a": r4}])
    down, up = feeds["a" + DOWN_SUFFIX], feeds["a" + UP_SUFFIX]
    assert down.shape == (3, 4, 3) and up.shape == (3, 2, 4)
    assert np.array_equal(down[0, :2], r2.down) and not down[0, 2:].any() and not down[1].any()
    assert np.array_equal(up[2], r4.up) and not up[1].any()
    for row, low in ((0, r2), (2, r4)):  # the padding adds nothing to ΔW
        assert np.allclose(up[row] @ down[row], low.up @ low.down)
    assert feeds["b" + DOWN_SUFFIX].shape == (3, 0, 4, 3, 3) and feeds["b" + UP_SUFFIX].shape == (3, 5, 0)
    graph_inputs = [
        ("sample", ["N", 4, 8, 8]),
        *((k, ["N", "R", *v.shape[2:]]) for k, v in feeds.items() if k.endswith(DOWN_SUFFIX)),
    ]
    graph_inputs += [("a" + UP_SUFFIX, ["N", 2, "R"]), ("b" + UP_SUFFIX, ["N", 5, "R"])]
    assert branch_targets(graph_inputs) == targets


def test_min_rank_gives_an_unused_layer_one_rank_of_zeros():
    """OpenVINO compiles no empty tensors: a layer no row uses gets one rank of zeros, which adds nothing."""
    targets = {"a": BranchTarget("a", (3,), 2), "b": BranchTarget("b", (4,), 5)}
    rng = np.random.default_rng(1)
    r3 = lora.LowRank(rng.random((3, 3), np.float32), rng.random((2, 3), np.float32))
    feeds = branch_feeds(targets, [{"a": r3}, {}], min_rank=1)
    down, up = feeds["a" + DOWN_SUFFIX], feeds["a" + UP_SUFFIX]
    assert down.shape == (2, 3, 3) and up.shape == (2, 2, 3)
    assert np.allclose(up[0] @ down[0], r3.up @ r3.down) and not up[1].any()
    assert feeds["b" + DOWN_SUFFIX].shape == (2, 1, 4)
    assert not feeds["b" + DOWN_SUFFIX].any()


def test_library_finds_files_by_name_and_alias_as_a1111_does(folder, shapes, tiny_checkpoint):
    library = LoraLibrary(folder, shapes)
    assert library.find("ink").file == "ink.safetensors"
    assert library.find("paper_v2").file == os.path.join("styles", "paper_v2.safetensors")
    assert library.find("watercolor") == library.find("w")  # alias (ss_output_name) and stem
    assert {e["name"]: e["alias"] for e in library.listing()} == {
        "ink": "ink",
        "paper_v2": "paper_v2",
        "w": "watercolor",
    }
    # A file added while serving is found: an unknown name scans the folder again.
    write_tiny_lora(folder / "late.safetensors", tiny_checkpoint, "kohya", seed=4)
    assert library.find("late").name == "late"
    with pytest.raises(lora.LoraError, match="unknown LoRA 'nothing'.*GET /sdapi/v1/loras"):
        library.find("nothing")
    with pytest.raises(lora.LoraError, match="sd-serve --lora-dir"):
        LoraLibrary(None, shapes).find("ink")


def test_an_alias_two_files_share_finds_by_stem_only(folder, shapes, tiny_checkpoint):
    write_tiny_lora(folder / "other.safetensors", tiny_checkpoint, "kohya", seed=5, output_name="watercolor")
    library = LoraLibrary(folder, shapes)
    with pytest.raises(lora.LoraError, match="unknown LoRA 'watercolor'"):
        library.find("watercolor")
    assert library.find("w").name == "w" and library.find("other").name == "other"


def test_library_checks_a_file_once_per_version(folder, shapes, tiny_checkpoint):
    library = LoraLibrary(folder, shapes)
    entry = library.find("ink")
    version, short_hash = library.check(entry)
    assert (
        short_hash == lora.read_lora(folder / "ink.safetensors", shapes).shorthash and len(short_hash) == 12
    )
    assert version == file_version(folder / "ink.safetensors")
    (folder / "ink.safetensors").write_bytes(b"garbage")  # replaced by a broken file: a new version
    with pytest.raises(lora.LoraError, match="ink.safetensors"):
        library.check(entry)
    save_file(
        {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 8), np.float32)},
        str(folder / "xl.safetensors"),
    )
    with pytest.raises(lora.LoraError, match="xl.safetensors"):
        library.check(library.find("xl"))
