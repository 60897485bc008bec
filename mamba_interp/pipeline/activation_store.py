"""Disk-backed activations: one safetensors file per (layer, hook), written in chunks as they are collected.

Large runs (many layers, long sequences, the 130M–2.8B checkpoints) collect more activations than a machine holds
(samples × seq_len × hook widths × 4 bytes per layer). :class:`ActivationWriter` preallocates one file
``<hook name>.safetensors`` per (layer, hook) holding a single [b, l, k] float32 tensor and writes each batch of
sequences at its offset as soon as the forward pass produced it; :meth:`ActivationWriter.finish` renames the
complete files into place (a run killed mid-collection leaves only ``*.partial`` files) and writes ``index.json``
and ``mask.safetensors``. :class:`DiskActivationSet` reads them back with the interface of the in-memory
:class:`~mamba_interp.pipeline.activation_stats.ActivationSet`:

* ``acts[(hook, layer)]`` is a memory-mapped [b, l, k] tensor (nothing is read until it is indexed);
* ``iter_sequences`` / ``token_source`` (what steps 2 and 3 use) read chunks of sequences with plain file reads,
  so only one chunk is resident at a time and the memory is returned after it.

Why safetensors rather than zarr: every file is a standard safetensors file that any reader (``safe_open``, the
``safetensors`` CLI, other frameworks) opens; the project already depends on it; and an uncompressed row-major
layout lets a chunk of sequences be one contiguous read. Activations are float32 with little redundancy, so
zarr's compression (its main advantage) buys little, and it would be one more dependency. ``bench/bench_scale.py
--store-bench`` measures the write and chunked-read throughput.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import numpy as np
import torch

from mamba_interp.pipeline.activation_stats import ActivationSet, hook_name
from mamba_interp.utils.io import atomic_write_json

INDEX = "index.json"
MASK = "mask.safetensors"
FORMAT = "mamba_interp.activations/1"
_ALIGN = 8  # safetensors pads its header so the data starts 8-byte aligned


def _header(name: str, shape: Sequence[int], metadata: dict[str, str]) -> bytes:
    nbytes = int(np.prod(shape)) * 4
    head = {name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}, "__metadata__": metadata}
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % _ALIGN)
    return struct.pack("<Q", len(text)) + text


def _data_offset(path: Path) -> tuple[int, list[int]]:
    """Byte offset of the (single) tensor's data and its shape, read from a safetensors header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    (info,) = [v for k, v in head.items() if k != "__metadata__"]
    if info["dtype"] != "F32":
        raise ValueError(f"{path} holds {info['dtype']}; the activation store holds float32")
    return 8 + n + info["data_offsets"][0], list(info["shape"])


class ActivationWriter:
    """Writes batches of [b_i, l, k] activations per (short hook, layer) into preallocated safetensors files."""

    def __init__(self, folder: str | Path, n_sequences: int, seq_len: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n, self.l = n_sequences, seq_len
        self.shapes: dict[tuple[str, int], tuple[int, ...]] = {}
        self._files: dict[tuple[str, int], tuple[int, int, int]] = {}  # key -> (fd, data offset, width k)

    def _partial(self, key: tuple[str, int]) -> Path:
        return self.folder / f"{hook_name(*key)}.safetensors.partial"

    def write(self, key: tuple[str, int], start: int, values: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Write sequences ``start .. start + b_i`` of ``values`` [b_i, l, k] (any float dtype, any device)."""
        v = values.detach().to("cpu", torch.float32).contiguous()
        if key not in self._files:
            k = v.shape[-1]
            head = _header(hook_name(*key), (self.n, self.l, k), {"shape": json.dumps(list(shape))})
            fd = os.open(self._partial(key), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, head)
            os.ftruncate(fd, len(head) + self.n * self.l * k * 4)  # sparse until written
            self._files[key] = (fd, len(head), k)
            self.shapes[key] = tuple(shape)
        fd, offset, k = self._files[key]
        if v.shape[1:] != (self.l, k) or not 0 <= start <= self.n - v.shape[0]:
            raise ValueError(f"{hook_name(*key)}: batch of shape {tuple(v.shape)} at row {start} does not fit "
                             f"[{self.n}, {self.l}, {k}]")
        os.pwrite(fd, v.numpy().tobytes(), offset + start * self.l * k * 4)

    def finish(self, mask: torch.Tensor, layers: Sequence[int], hooks: Sequence[str]) -> DiskActivationSet:
        """Close, move the complete files into place, write the index and the mask; return the reader."""
        from safetensors.torch import save_file

        for key, (fd, _, _) in self._files.items():
            os.fsync(fd)
            os.close(fd)
            os.replace(self._partial(key), self.folder / f"{hook_name(*key)}.safetensors")
        self._files.clear()
        missing = [hook_name(s, i) for i in layers for s in hooks if (s, i) not in self.shapes]
        if missing:
            raise RuntimeError(f"no activations were written for {missing[0]}")
        save_file({"mask": mask.to(torch.uint8).contiguous()}, str(self.folder / MASK))
        atomic_write_json(self.folder / INDEX, {
            "format": FORMAT, "layers": list(layers), "hooks": list(hooks), "sequences": self.n,
            "seq_len": self.l, "shapes": {hook_name(s, i): list(self.shapes[(s, i)]) for i in layers for s in hooks},
        })
        return DiskActivationSet.open(self.folder)

    def abort(self) -> None:
        for key, (fd, _, _) in self._files.items():
            os.close(fd)
            self._partial(key).unlink(missing_ok=True)
        self._files.clear()


class DiskActivationSet(ActivationSet):
    """An :class:`ActivationSet` whose [b, l, k] tensors live in the files of an :class:`ActivationWriter`.

    ``acts`` holds memory-mapped (copy-on-write) tensors; chunked reads (:meth:`rows`, hence ``iter_sequences`` and
    ``token_source``) use file reads instead, so their memory is freed after each chunk. ``row0`` is the first
    sequence of this view in the files (:meth:`subset`).
    """

    def __init__(self, folder: Path, acts: dict, shapes: dict, mask: torch.Tensor, layers: tuple[int, ...],
                 hooks: tuple[str, ...], offsets: dict[tuple[str, int], int], row0: int = 0) -> None:
        super().__init__(acts, shapes, mask, layers, hooks)
        self.folder = folder
        self._offsets = offsets
        self._row0 = row0

    @classmethod
    def open(cls, folder: str | Path) -> DiskActivationSet:
        from safetensors.torch import load_file

        folder = Path(folder)
        index = json.loads((folder / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{folder / INDEX} is not an activation store index ({index.get('format')!r})")
        layers, hooks = tuple(index["layers"]), tuple(index["hooks"])
        acts, shapes, offsets = {}, {}, {}
        for i in layers:
            for s in hooks:
                path = folder / f"{hook_name(s, i)}.safetensors"
                offset, shape = _data_offset(path)
                mm = np.memmap(path, dtype=np.float32, mode="c", offset=offset, shape=tuple(shape))
                acts[(s, i)] = torch.from_numpy(mm)
                shapes[(s, i)] = tuple(index["shapes"][hook_name(s, i)])
                offsets[(s, i)] = offset
        mask = load_file(str(folder / MASK))["mask"].bool()
        return cls(folder, acts, shapes, mask, layers, hooks, offsets)

    def rows(self, key: tuple[str, int], start: int, stop: int) -> torch.Tensor:
        t = self.acts[key]
        _, l, k = t.shape
        count = max(0, min(stop, t.shape[0]) - start)
        out = np.empty((count, l, k), dtype=np.float32)
        path = self.folder / f"{hook_name(*key)}.safetensors"
        with open(path, "rb") as f:
            f.seek(self._offsets[key] + (self._row0 + start) * l * k * 4)
            f.readinto(memoryview(out).cast("B"))
        return torch.from_numpy(out)

    def subset(self, rows: slice) -> DiskActivationSet:
        start, stop, step = rows.indices(self.mask.shape[0])
        if step != 1:
            raise ValueError("DiskActivationSet.subset takes a contiguous slice of sequences")
        return DiskActivationSet(self.folder, {k: v[start:stop] for k, v in self.acts.items()}, dict(self.shapes),
                                 self.mask[start:stop], self.layers, self.hooks, self._offsets, self._row0 + start)

    def only(self, short: str, layer: int) -> DiskActivationSet:
        key = (short, layer)
        return DiskActivationSet(self.folder, {key: self.acts[key]}, {key: self.shapes[key]}, self.mask, (layer,),
                                 (short,), {key: self._offsets[key]}, self._row0)

    def __reduce__(self) -> tuple:
        # pickled as where it lives (Ray workers reopen the files), not as its memory-mapped data
        return (_reopen, (str(self.folder), self.hooks, self.layers, self._row0, self.mask.shape[0]))

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))


def _reopen(folder: str, hooks: tuple[str, ...], layers: tuple[int, ...], row0: int, rows: int) -> DiskActivationSet:
    full = DiskActivationSet.open(folder).subset(slice(row0, row0 + rows))
    if (hooks, layers) == (full.hooks, full.layers):
        return full
    (short,), (layer,) = hooks, layers
    return full.only(short, layer)


def collect_for_run(ctx: Any, batch: Any, layers: Sequence[int], hooks: Sequence[str], folder: str,
                    desc: str = "collecting", extra_hooks: Sequence[tuple[str, Any]] = ()) -> ActivationSet:
    """Collect a ``TaskBatch``'s activations for a pipeline step: in memory, or through the disk store in the step's
    ``folder``, as ``--activation-store`` decides (``auto``: on disk above ``memory_plan.AUTO_MEMORY_LIMIT`` or a
    quarter of the free memory); in micro-batches when a hook materialises SSM states
    (``memory_plan.collection_batch``). Both stores hold the same values. ``extra_hooks``: as in
    ``collect_activations``."""
    from mamba_interp.pipeline.activation_stats import collect_activations
    from mamba_interp.pipeline.memory_plan import activation_bytes, collection_batch, decide_store
    from mamba_interp.pipeline.resources import available_memory

    n, l = batch.tokens.shape
    kind = decide_store(ctx.config.activation_store, activation_bytes(ctx.model.cfg, hooks, layers, n, l),
                        available_memory())
    writer = ActivationWriter(ctx.path(folder), n, l) if kind == "disk" else None
    size = collection_batch(ctx.model.cfg, l, hooks, ctx.batch_size)
    if kind == "disk":
        ctx.log.info("collecting %s to the disk store %s (%d sequences per pass)", ", ".join(hooks), folder, size)
    return collect_activations(ctx.model, batch.tokens, layers, hooks, size, attention_mask=batch.attention_mask,
                               progress=lambda it: ctx.progress(it, desc=desc), writer=writer,
                               extra_hooks=extra_hooks)
